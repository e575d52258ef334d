"""The API layer: the vocabulary everyone shares. The ``ConnectorCredential`` resource's models and
its spec's parsing (``models``), the ``Ready`` condition and its reasons (``conditions``), secret
values that never show themselves (``values``), and the socket's bodies (``wire``).

May import: the standard library, pydantic, and the client's ``protocol`` (the socket contract).
Nothing else of the operator: every other layer builds on this one.
"""
