"""The configuration layer: the operator's settings (``CCRED_*``, validated once at start).

May import: ``api``, the client's ``protocol``, the standard library, pydantic and pydantic-settings.
"""
