"""The core: what the operator decides, apart from how it talks to the world.

The engine keeps one entry per credential (``entry``), reads secrets through a port
(``ports``: :class:`~connector_credentials.core.ports.SecretsPort`, batched and shared by
``reads``, scheduled by ``timing``), judges what it read (``verdicts``, with the words of
``failures`` and the roles of ``allowlist``), writes the verdict through a sink (``status``)
and answers the socket's questions (``answers``).

May import: ``config``, ``api``, the client's ``protocol`` and the standard library. Never boto3,
botocore, aiohttp, kopf, prometheus_client or click, not even indirectly: the adapters implement
the ports and the command line wires them in (checked by import-linter, see ``.importlinter``).
"""
