"""``requests`` over a Unix socket, so that tools built on requests (schemathesis's ``case.call``)
can reach the operator's socket: a transport adapter whose connection pool dials ``AF_UNIX``.

The URL's host is ignored (use ``http://ccred``); the path and query are sent as they are.
"""

from __future__ import annotations

import socket
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

#: The base URL to give requests (and schemathesis) for the socket.
BASE_URL = "http://ccred"


class _UnixConnection(HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path
        self._unix_timeout = timeout

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._unix_timeout)
        sock.connect(self._socket_path)
        return sock


class _UnixPool(HTTPConnectionPool):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", maxsize=4)
        self._socket_path = socket_path
        self._unix_timeout = timeout

    def _new_conn(self) -> HTTPConnection:
        return _UnixConnection(self._socket_path, self._unix_timeout)


class UnixSocketAdapter(HTTPAdapter):
    """Every request mounted on this adapter goes to ``socket_path``."""

    def __init__(self, socket_path: str, timeout: float = 15.0) -> None:
        super().__init__()
        self._pool = _UnixPool(socket_path, timeout)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None, cert: Any = None) -> Any:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


def unix_session(socket_path: str) -> requests.Session:
    """A session whose ``BASE_URL`` requests go over ``socket_path``."""
    session = requests.Session()
    session.trust_env = False  # no proxies from the environment: there is no network here
    session.mount(BASE_URL, UnixSocketAdapter(socket_path))
    return session
