"""The socket adapter: the credential server (``server``: aiohttp on a Unix socket, answering from
the engine) and who may connect (``connections``: peer uid, connection limits).

May import: aiohttp, the client's ``protocol``, ``core``, ``config``, ``api``. Not the other
adapters: it counts its answers through the core's ``Meter`` port.
"""
