"""The metrics adapter: Prometheus metrics (``prometheus``: the core's ``Meter`` port, boto3 client
instrumentation by events, the engine's gauges at scrape time) and ``GET /metrics`` over TCP.

May import: prometheus_client, aiohttp, ``core``, ``config``, ``api``. Not the other adapters
(boto3 clients are instrumented through their duck-typed event hooks, without importing boto3).
"""
