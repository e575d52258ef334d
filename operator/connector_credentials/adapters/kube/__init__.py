"""The Kubernetes adapter: the status sink over the API server (``apiserver``: status patches,
events, listing, with aiohttp and kopf's login) and kopf's handlers that feed the engine
(``handlers``).

May import: kopf, aiohttp, ``core``, ``config``, ``api``. Not the other adapters.
"""
