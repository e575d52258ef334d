"""A stand-in controller: /healthz answers while it runs, /ready once the sidecar's socket does.

It reads no credential by itself (the tests do, with ``kubectl exec``) and writes nothing.
"""

from __future__ import annotations

import http.server
import signal
import sys

from connector_credentials.client import CredentialClient


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            ok = True
        elif self.path == "/ready":
            ok = CredentialClient(timeout=2).healthy()
        else:
            self.send_error(404)
            return
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: probes every few seconds would fill the log."""


# PID 1 of its container: SIGTERM is ignored unless handled, and the pod's deletion would wait
# out the grace period, leaving the sidecar none to drain in.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
http.server.ThreadingHTTPServer(("", 9000), Handler).serve_forever()
