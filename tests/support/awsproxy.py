"""An HTTP reverse proxy in front of moto that injects AWS-shaped errors, latency and resets.

Secrets Manager speaks the AWS JSON 1.1 protocol (``X-Amz-Target: secretsmanager.X``, errors as
``{"__type": code, "message": ...}``); STS speaks the query protocol (form ``Action=X``, errors
as ``<ErrorResponse><Error><Type/><Code/><Message/></Error><RequestId/></ErrorResponse>``).
botocore turns both into ``ClientError`` with ``Error.Code == code``. Point the operator's
``AWS_ENDPOINT_URL`` at ``FaultProxy.endpoint`` to put the proxy on its path.

Mind botocore's own retries: throttling, 5xx and connection errors are retried (3 attempts in
all by default here; ``AWS_MAX_ATTEMPTS=1`` turns that off), so a rule with ``times=1`` may be
invisible to the caller; ``calls()`` counts every attempt.

Reads are ``GetSecretValue`` or ``BatchGetSecretValue`` (up to 20 ids in ``SecretIdList``; a 200
with ``SecretValues``, and ``Errors`` entries ``{"SecretId", "ErrorCode", "Message"}`` for the
secrets it could not return). Rules mean the same for a secret read alone or in a batch:

* A rule for ``"GetSecretValue"`` applies to both reads; one for ``"BatchGetSecretValue"`` to
  batches only (``deny(action="BatchGetSecretValue")``: IAM refuses the batch action itself).
* In a batch, an error rule naming a secret (``secret_id_contains``) answers the ids it matches,
  one by one: the id leaves the request and an ``Errors`` entry with the rule's code and message
  (formatted with ``action="GetSecretValue"`` and the id; ``status`` unused) joins the response.
  The first active rule matching an id answers it, one hit per id (``times`` counts ids). The
  other ids go upstream in a rewritten ``SecretIdList`` (moto checks no signature by default; in
  its IAM-auth mode, ``INITIAL_NO_AUTH_ACTION_COUNT``, it would answer SignatureDoesNotMatch);
  upstream's ``Errors`` are kept, the injected ones follow. With no id left nothing is forwarded:
  the proxy answers 200 ``{"SecretValues": [], "Errors": [...]}``. An upstream answer other than
  a 200 JSON object passes through unchanged.
* Every other rule applies to the whole batch, and is checked first (AWS throttles or refuses a
  call before it looks at each secret): an error rule without a secret answers the request (its
  message with ``secret_id="*"``); latency and reset rules, even naming a secret, delay or reset
  it if any id matches. AWS throttles and fails (5xx) whole calls only: a throttle or 5xx rule
  naming a secret stands for that secret's failed read, as an entry botocore does not retry.

``Seen.secret_ids`` is a batch's whole ``SecretIdList``, ``Seen.answered`` the ids the proxy
answered, ``Seen.outcome`` "answered" when none was left to forward. ``reads()`` counts reads (a
batch once), ``batch_sizes()`` lists batch sizes; ``calls()`` counts requests by exact action.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from xml.sax.saxutils import escape

from tests.support import awsbatch
from tests.support.awsbatch import BATCH_ACTION, READ_ACTIONS
from tests.support.lifecycle import Service

STS_ACTIONS = frozenset({"AssumeRoleWithWebIdentity", "GetCallerIdentity", "AssumeRole", "GetSessionToken"})
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
)

ACCESS_DENIED_MESSAGE = (
    "User: arn:aws:sts::123456789012:assumed-role/xpander-controller/xpander-controller-test is not "
    "authorized to perform: secretsmanager:{action} on resource: {secret_id} because no identity-based "
    "policy allows the secretsmanager:{action} action"
)
KMS_DENIED_MESSAGE = "Access to KMS is not allowed"
DECRYPTION_FAILURE_MESSAGE = "Secrets Manager can't decrypt the protected secret text using the provided KMS key."
ASSUME_DENIED_MESSAGE = "Not authorized to perform sts:AssumeRoleWithWebIdentity"
INVALID_TOKEN_MESSAGE = "Incorrect token audience"
EXPIRED_TOKEN_MESSAGE = "Token expired: current date/time must be before the expiration date/time"


@dataclass
class Seen:
    """One request that reached the proxy."""

    action: str | None
    secret_ids: tuple[str, ...]
    protocol: str  # "json" or "query"
    outcome: str  # "pending", "forwarded", "error:<Code>", "reset", "answered" (a batch: every id by rules)
    at: float = field(default_factory=time.monotonic)
    answered: tuple[str, ...] = ()  # a batch's ids answered by per-secret rules (not forwarded)


@dataclass
class Rule:
    """What to do to matching requests: ``kind`` is "error", "latency" or "reset"."""

    kind: str
    action: str | None = None
    secret_id_contains: str | None = None
    error_code: str = ""
    message: str = ""
    status: int = 400
    seconds: float = 0.0
    times: int | None = None  # None: forever
    hits: int = 0

    @property
    def active(self) -> bool:
        return self.times is None or self.hits < self.times

    @property
    def per_secret(self) -> bool:
        """An error rule naming a secret: in a batch it answers the ids it matches one by one."""
        return self.kind == "error" and self.secret_id_contains is not None

    def matches(self, action: str | None, secret_ids: tuple[str, ...]) -> bool:
        if not awsbatch.action_matches(self.action, action):
            return False
        if self.secret_id_contains is not None:
            return any(self.secret_id_contains in secret_id for secret_id in secret_ids)
        return True


def _parse(headers: Any, path: str, body: bytes) -> tuple[str | None, tuple[str, ...], str]:
    """Which AWS action and secret ids a request carries, and in which protocol."""
    target = headers.get("X-Amz-Target")
    if target:
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            payload = {}
        ids: list[str] = []
        if isinstance(payload, dict):
            if isinstance(payload.get("SecretId"), str):
                ids.append(payload["SecretId"])
            ids += [str(item) for item in payload.get("SecretIdList") or []]
        return target.rsplit(".", 1)[-1], tuple(ids), "json"
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
    if "x-www-form-urlencoded" in (headers.get("Content-Type") or ""):
        params.update(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
    return params.get("Action"), (), "query"


def _error_body(protocol: str, code: str, message: str, status: int, request_id: str) -> tuple[bytes, dict[str, str]]:
    if protocol == "json":
        body = json.dumps({"__type": code, "message": message}).encode()
        return body, {
            "Content-Type": "application/x-amz-json-1.1",
            "x-amzn-RequestId": request_id,
            "x-amzn-ErrorType": code,
        }
    kind = "Receiver" if status >= 500 else "Sender"
    xml = (
        f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>{kind}</Type>'
        f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    )
    return xml.encode(), {"Content-Type": "text/xml", "x-amzn-RequestId": request_id}


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # joined on server_close(): nothing outlives stop()
    block_on_close = True

    def __init__(self, proxy: FaultProxy, address: tuple[str, int]) -> None:
        self.proxy = proxy
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test output is for the operator's logs

    def _handle(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        action, secret_ids, protocol = _parse(self.headers, self.path, body)
        seen = Seen(action, secret_ids, protocol, "pending")
        proxy._record(seen)  # counted on arrival, even if a latency rule holds it
        batch = action == BATCH_ACTION and protocol == "json"

        for rule in proxy._take_rules(action, secret_ids, batch=batch):
            if rule.kind == "latency":
                proxy._stopping.wait(rule.seconds)
            elif rule.kind == "reset":
                seen.outcome = "reset"
                # SO_LINGER 0 turns close() into a TCP RST: the client sees a reset, not an answer.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            else:
                seen.outcome = f"error:{rule.error_code}"
                secret_id = secret_ids[0] if secret_ids and not batch else "*"
                message = rule.message.format(action=action or "", secret_id=secret_id)
                payload, headers = _error_body(protocol, rule.error_code, message, rule.status, str(uuid.uuid4()))
                self._respond(rule.status, headers, payload)
                return

        if batch:
            self._batch(seen, body)
            return
        seen.outcome = "forwarded"
        self._respond(*self._forward(body))

    def _batch(self, seen: Seen, body: bytes) -> None:
        """A batch past the request-level rules: per-secret rules answer their ids, upstream the rest."""
        ids = awsbatch.secret_id_list(body) or []
        keep, errors = awsbatch.split(ids, self.server.proxy._take_per_secret(ids))
        seen.answered = tuple(entry["SecretId"] for entry in errors)
        if not errors:
            seen.outcome = "forwarded"
            self._respond(*self._forward(body))
        elif not keep:
            seen.outcome = "answered"
            self._respond(*awsbatch.answered(errors, str(uuid.uuid4())))
        else:
            seen.outcome = "forwarded"
            self._respond(*awsbatch.merged(self._forward(awsbatch.reduced_body(body, keep)), errors))

    def _forward(self, body: bytes) -> awsbatch.Reply:
        """Send the request (with ``body``; http.client sets its Content-Length) upstream."""
        upstream = urllib.parse.urlsplit(self.server.proxy.upstream)
        conn = http.client.HTTPConnection(upstream.hostname or "127.0.0.1", upstream.port or 80, timeout=60)
        try:
            headers = {key: value for key, value in self.headers.items() if key.lower() not in _HOP_BY_HOP}
            conn.request(self.command, self.path, body=body if body or self.command != "GET" else None, headers=headers)
            response = conn.getresponse()
            status, payload = response.status, response.read()
            reply_headers = {key: value for key, value in response.getheaders() if key.lower() not in _HOP_BY_HOP}
        except OSError as exc:
            status, payload = 502, f"proxy: upstream failed: {exc}".encode()
            reply_headers = {"Content-Type": "text/plain"}
        finally:
            conn.close()
        return status, reply_headers, payload

    def _respond(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        except OSError:  # the client gave up (e.g. its read timeout after injected latency)
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle  # noqa: N815


class FaultProxy(Service):
    """Forwards everything to ``upstream`` (moto) unless a rule says otherwise; thread-safe."""

    def __init__(self, upstream: str, *, port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._seen: list[Seen] = []
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        self._stopping.clear()
        self._server = _Server(self, ("127.0.0.1", self._port))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()  # wakes up injected latencies
        server.shutdown()
        thread.join()
        with server.connections_lock:
            connections = list(server.connections)
        for conn in connections:  # unblock keep-alive handlers waiting for a next request
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()  # joins the handler threads
        self._server = self._thread = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- rules -------------------------------------------------------------------------------

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _take_rules(self, action: str | None, secret_ids: tuple[str, ...], *, batch: bool = False) -> list[Rule]:
        """Matching latency rules, then at most one terminal (error/reset) rule; counts their hits.

        For a ``batch``, per-secret error rules are left to ``_take_per_secret``.
        """
        taken: list[Rule] = []
        with self._lock:
            for rule in self._rules:
                if rule.active and not (batch and rule.per_secret) and rule.matches(action, secret_ids):
                    rule.hits += 1
                    taken.append(rule)
                    if rule.kind != "latency":
                        break
        return taken

    def _take_per_secret(self, secret_ids: list[str]) -> list[Rule | None]:
        """For each id of a batch, the first active per-secret error rule that answers it (one hit each)."""
        taken: list[Rule | None] = []
        with self._lock:
            for secret_id in secret_ids:
                candidates = (rule for rule in self._rules if rule.per_secret and rule.active)
                rule = next((rule for rule in candidates if rule.matches(BATCH_ACTION, (secret_id,))), None)
                if rule is not None:
                    rule.hits += 1
                taken.append(rule)
        return taken

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    def add_rule(
        self,
        action: str | None = None,
        secret_id_contains: str | None = None,
        *,
        error_code: str = "AccessDeniedException",
        message: str = ACCESS_DENIED_MESSAGE,
        status: int = 400,
        times: int | None = None,
    ) -> Rule:
        """Answer matching requests with an AWS error (``{action}``/``{secret_id}`` fill the message)."""
        return self._add(
            Rule(
                "error", action, secret_id_contains, error_code=error_code, message=message, status=status, times=times
            )
        )

    def throttle(
        self, action: str | None = "GetSecretValue", secret_id_contains: str | None = None, *, times: int | None = None
    ) -> Rule:
        code = "Throttling" if action in STS_ACTIONS else "ThrottlingException"
        return self.add_rule(
            action, secret_id_contains, error_code=code, message="Rate exceeded", status=400, times=times
        )

    def fail_5xx(
        self,
        action: str | None = "GetSecretValue",
        secret_id_contains: str | None = None,
        *,
        times: int | None = None,
        status: int = 500,
    ) -> Rule:
        code = "InternalFailure" if action in STS_ACTIONS else "InternalServiceError"
        return self.add_rule(
            action,
            secret_id_contains,
            error_code=code,
            message="An internal error occurred. Try again later.",
            status=status,
            times=times,
        )

    def latency(
        self,
        seconds: float,
        action: str | None = None,
        secret_id_contains: str | None = None,
        *,
        times: int | None = None,
    ) -> Rule:
        """Delay matching requests (then they go on to other rules or upstream)."""
        return self._add(Rule("latency", action, secret_id_contains, seconds=seconds, times=times))

    def reset_connection(
        self, action: str | None = None, secret_id_contains: str | None = None, *, times: int | None = None
    ) -> Rule:
        """Close the connection with a TCP reset instead of answering."""
        return self._add(Rule("reset", action, secret_id_contains, times=times))

    # Ready-made errors the way AWS words them.

    def deny(
        self, secret_id_contains: str | None = None, *, action: str = "GetSecretValue", times: int | None = None
    ) -> Rule:
        """IAM denies the role (no identity-based policy allows the action)."""
        return self.add_rule(
            action, secret_id_contains, error_code="AccessDeniedException", message=ACCESS_DENIED_MESSAGE, times=times
        )

    def deny_kms(self, secret_id_contains: str | None = None, *, times: int | None = None) -> Rule:
        """The role may read the secret but not use its customer-managed KMS key."""
        return self.add_rule(
            "GetSecretValue",
            secret_id_contains,
            error_code="AccessDeniedException",
            message=KMS_DENIED_MESSAGE,
            times=times,
        )

    def decryption_failure(self, secret_id_contains: str | None = None, *, times: int | None = None) -> Rule:
        return self.add_rule(
            "GetSecretValue",
            secret_id_contains,
            error_code="DecryptionFailure",
            message=DECRYPTION_FAILURE_MESSAGE,
            times=times,
        )

    def deny_assume_role(self, *, times: int | None = None) -> Rule:
        """The role's trust policy does not admit this service account."""
        return self.add_rule(
            "AssumeRoleWithWebIdentity",
            error_code="AccessDenied",
            message=ASSUME_DENIED_MESSAGE,
            status=403,
            times=times,
        )

    def invalid_identity_token(self, *, times: int | None = None) -> Rule:
        return self.add_rule(
            "AssumeRoleWithWebIdentity",
            error_code="InvalidIdentityToken",
            message=INVALID_TOKEN_MESSAGE,
            status=400,
            times=times,
        )

    def expired_token(self, *, times: int | None = None) -> Rule:
        return self.add_rule(
            "AssumeRoleWithWebIdentity",
            error_code="ExpiredTokenException",
            message=EXPIRED_TOKEN_MESSAGE,
            status=400,
            times=times,
        )

    def remove(self, rule: Rule) -> None:
        """Remove one rule (AWS allows again what it refused)."""
        with self._lock:
            self._rules = [kept for kept in self._rules if kept is not rule]

    def clear(self) -> None:
        """Remove every rule (the counters stay)."""
        with self._lock:
            self._rules.clear()

    # -- observations ------------------------------------------------------------------------

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def calls(self, action: str | None = None, secret_id_contains: str | None = None) -> int:
        """How many requests arrived (forwarded or injected), optionally of one action / secret."""
        return sum(
            1
            for seen in self.seen
            if (action is None or seen.action == action)
            and (secret_id_contains is None or any(secret_id_contains in sid for sid in seen.secret_ids))
        )

    def reads(self, secret_id_contains: str | None = None) -> int:
        """Read requests (GetSecretValue, BatchGetSecretValue: once) naming a matching secret, or all."""
        return sum(
            1
            for seen in self.seen
            if seen.action in READ_ACTIONS
            and (secret_id_contains is None or any(secret_id_contains in sid for sid in seen.secret_ids))
        )

    def batch_sizes(self) -> list[int]:
        """The number of ids of each BatchGetSecretValue request, in arrival order (0: ``Filters``)."""
        return [len(seen.secret_ids) for seen in self.seen if seen.action == BATCH_ACTION]

    def reset_counters(self) -> None:
        with self._lock:
            self._seen.clear()
