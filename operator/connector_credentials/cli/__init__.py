"""The command line, ``connector-credentials``: ``run`` wires the adapters into the core
(``main``), ``doctor`` checks an installation (``doctor`` prints; ``checks`` are its findings),
``logs`` sets up redacted logging, ``memory`` returns freed memory to the OS.

May import everything. ``get``, ``list`` and ``healthz`` only need the client: the heavy imports
(kopf, boto3, the adapters) happen inside ``run`` and ``doctor``, so that a ``get`` starts fast.
"""
