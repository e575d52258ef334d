"""Prometheus metrics: what the operator counts, and the ``/metrics`` endpoint that serves them.

Everything lives in one :class:`Metrics` object with its own
:class:`~prometheus_client.CollectorRegistry` (never the library's global one: a test, or a
second engine in one process, starts from zero, and nothing a library registers globally
leaks into the scrape).

* Counters and histograms are updated where things happen: AWS calls by botocore event hooks
  on every client (:meth:`Metrics.instrument_client`, in the AWS threads; prometheus_client's
  metrics are thread-safe), socket requests by the server, status writes by the status writer.
* What the engine knows (a credential's verdict, the age of its value) is not copied anywhere:
  :class:`EngineCollector` computes it from the engine when Prometheus scrapes.

The endpoint is served from the event loop (aiohttp, like the socket), not from
prometheus_client's own server thread: the engine's state belongs to the loop, and reading it
from another thread while the loop changes it could see a dict change size mid-iteration. The
loop only takes a snapshot of plain tuples (well under a millisecond per thousand
credentials); the text, tens of milliseconds per thousand, is built in a worker thread.

Nothing here sees a value: the labels are namespace, name, reason and readiness; the AWS hooks
read only the operation's name and the answer's HTTP status and error code, never its body
(so no ``versionId`` either).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from connector_credentials.api.conditions import PENDING_REASON
from connector_credentials.core.failures import THROTTLE_CODES
from connector_credentials.core.rotation import OUTCOMES as ROTATION_OUTCOMES

if TYPE_CHECKING:
    from connector_credentials.core.engine import Engine

logger = logging.getLogger(__name__)

#: The AWS operations the operator calls (and so the values of the ``operation`` label).
AWS_OPERATIONS = ("GetSecretValue", "BatchGetSecretValue", "GetCallerIdentity", "AssumeRole")
#: Why the rotation queue could not be read (the ``reason`` label; adapters/aws/rotation_queue.py).
QUEUE_PROBLEMS = ("denied", "missing", "throttled", "unreachable", "identity", "error")
#: How an AWS call ended (the ``outcome`` label), after botocore's retries.
AWS_OUTCOMES = ("ok", "throttled", "denied", "not_found", "client_error", "server_error", "network_error")
#: How a status write ended (the ``result`` label).
STATUS_RESULTS = ("ok", "conflict", "gone", "failed")

_NOT_FOUND = frozenset({"ResourceNotFoundException", "NoSuchEntity"})
_STARTED = "ccred_metrics_started"
#: AWS calls take tens of milliseconds to seconds (timeouts and retries included).
_AWS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: A socket answer from memory takes well under a millisecond; one that waits for AWS, seconds.
_SOCKET_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: From a rotation event's publication (whole seconds) to the new value held: about a second.
_ROTATION_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)


def aws_outcome(status: int | None, code: str) -> str:
    """The ``outcome`` label of an AWS answer: its HTTP status and error code, nothing else."""
    if status is None:
        return "network_error"
    if status < 300:
        return "ok"
    if code in THROTTLE_CODES or status == 429:
        return "throttled"
    if "AccessDenied" in code or status == 403:
        return "denied"
    if code in _NOT_FOUND or status == 404:
        return "not_found"
    if status >= 500:
        return "server_error"
    return "client_error"


class Metrics:
    """The operator's metrics, in a registry of their own."""

    def __init__(self, *, rotation_queue: bool = False) -> None:
        """``rotation_queue``: CCRED_ROTATION_QUEUE_URL is set (without it, its gauge is not exported,
        so that an alert on it being 0 does not fire on every pod that has no queue)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.aws_requests = Counter(
            "ccred_aws_requests",
            "AWS API calls made, by operation and how they ended (after the SDK's retries).",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.aws_duration = Histogram(
            "ccred_aws_request_duration_seconds",
            "How long AWS API calls took, retries included.",
            ["operation"],
            buckets=_AWS_BUCKETS,
            registry=self.registry,
        )
        self.socket_requests = Counter(
            "ccred_socket_requests",
            "Requests answered on the credential socket, by HTTP status code.",
            ["code"],
            registry=self.registry,
        )
        self.socket_duration = Histogram(
            "ccred_socket_request_duration_seconds",
            "How long the credential socket took to answer a request.",
            buckets=_SOCKET_BUCKETS,
            registry=self.registry,
        )
        self.status_writes = Counter(
            "ccred_status_writes",
            "Status writes to the Kubernetes API, by result.",
            ["result"],
            registry=self.registry,
        )
        self.rotation_events = Counter(
            "ccred_rotation_events",
            "Messages from the rotation queue (CCRED_ROTATION_QUEUE_URL), by what became of them.",
            ["outcome"],
            registry=self.registry,
        )
        self.rotation_delivery = Histogram(
            "ccred_rotation_delivery_seconds",
            "From a Secret Label Updated event's time (whole seconds) to the version it names being served.",
            buckets=_ROTATION_BUCKETS,
            registry=self.registry,
        )
        self.rotation_queue_errors = Counter(
            "ccred_rotation_queue_errors",
            "Failed calls to the rotation queue (receives and deletes), by why (polling keeps the credentials fresh).",
            ["reason"],
            registry=self.registry,
        )
        self.rotation_queue_receiving = Gauge(
            "ccred_rotation_queue_receiving",
            "1 while the last read of the rotation queue succeeded; 0 before it and while it fails; absent when off.",
            registry=self.registry if rotation_queue else None,
        )
        # Known label values start at 0, so rate() and absent-series alerts work from the first scrape.
        for outcome in ROTATION_OUTCOMES:
            self.rotation_events.labels(outcome)
        for problem in QUEUE_PROBLEMS:
            self.rotation_queue_errors.labels(problem)
        for operation in AWS_OPERATIONS:
            self.aws_duration.labels(operation)
            for outcome in AWS_OUTCOMES:
                self.aws_requests.labels(operation, outcome)
        for result in STATUS_RESULTS:
            self.status_writes.labels(result)
        self.socket_requests.labels("200")
        #: The counter of each status code seen (labels() looks it up under a lock: not per request).
        self._socket_by_code: dict[int, Any] = {}
        self._engine: EngineCollector | None = None

    # --- the core's Meter port ---------------------------------------------------------------

    def status_written(self, result: str) -> None:
        self.status_writes.labels(result).inc()

    def socket_answered(self, code: int, seconds: float) -> None:
        counter = self._socket_by_code.get(code)
        if counter is None:
            counter = self._socket_by_code[code] = self.socket_requests.labels(str(code))
        counter.inc()
        self.socket_duration.observe(seconds)

    def rotation_event(self, outcome: str) -> None:
        self.rotation_events.labels(outcome).inc()

    def rotation_delivered(self, seconds: float) -> None:
        self.rotation_delivery.observe(seconds)

    def rotation_queue(self, problem: str | None, *, receive: bool = True) -> None:
        if problem is not None:
            self.rotation_queue_errors.labels(problem).inc()
        if receive:
            self.rotation_queue_receiving.set(0 if problem is not None else 1)

    # --- AWS ------------------------------------------------------------------------------

    def instrument_client(self, client: Any) -> None:
        """Count and time every call of this boto3 client (called once per client, as it is made)."""
        events = client.meta.events
        events.register("before-call.*.*", self._aws_started)
        events.register("after-call.*.*", self._aws_answered)
        events.register("after-call-error.*.*", self._aws_failed)

    @staticmethod
    def _aws_started(context: dict[str, Any] | None = None, **_: Any) -> None:
        if context is not None:
            context[_STARTED] = time.monotonic()

    def _aws_answered(
        self, http_response: Any = None, parsed: Any = None, model: Any = None, context: Any = None, **_: Any
    ) -> None:
        status = getattr(http_response, "status_code", None)
        code = ""
        if isinstance(parsed, dict):
            error = parsed.get("Error")
            if isinstance(error, dict):
                code = str(error.get("Code") or "")
        self._aws_done(getattr(model, "name", None), aws_outcome(status, code), context)

    def _aws_failed(self, context: Any = None, event_name: str = "", **_: Any) -> None:
        # after-call-error.<service>.<Operation>: the request never got an answer (connection, timeout).
        self._aws_done(event_name.rsplit(".", 1)[-1] or None, "network_error", context)

    def _aws_done(self, operation: str | None, outcome: str, context: Any) -> None:
        if not operation:
            return
        self.aws_requests.labels(operation, outcome).inc()
        started = context.pop(_STARTED, None) if isinstance(context, dict) else None
        if started is not None:
            self.aws_duration.labels(operation).observe(time.monotonic() - started)

    # --- the engine, at scrape time -----------------------------------------------------------

    def watch(
        self, engine: Engine, connected: Callable[[], bool], *, clock: Callable[[], float] | None = None
    ) -> EngineCollector:
        """Report this engine's credentials, and ``connected()`` as ``ccred_watch_connected``."""
        self._engine = EngineCollector(engine, connected, clock=clock)
        return self._engine

    def snapshot(self) -> EngineSnapshot | None:
        """What the engine knows, as plain tuples: on the event loop, which owns the engine."""
        return self._engine.snapshot() if self._engine is not None else None

    def render(self, accept: str | None = None, snapshot: EngineSnapshot | None = None) -> tuple[bytes, str]:
        """The scrape: the body and its content type (OpenMetrics when the scraper asks for it).

        With a ``snapshot`` (taken on the loop), safe in any thread; without one, the engine is
        read here (so on the loop only).
        """
        if snapshot is None:
            snapshot = self.snapshot()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(_Scrape(self.registry, snapshot)), content_type


class _Scrape(CollectorRegistry):
    """One scrape's view: the registry's metrics, then the engine's snapshot."""

    def __init__(self, registry: CollectorRegistry, snapshot: EngineSnapshot | None) -> None:
        super().__init__(auto_describe=False)
        self._registry, self._snapshot = registry, snapshot

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()
        if self._snapshot is not None:
            yield from self._snapshot.families()


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """Per credential (namespace, name, reason, ready, age of the value or None), and the watch."""

    credentials: list[tuple[str, str, str, bool, float | None]]
    connected: bool

    def families(self) -> Iterator[Metric]:
        rows = self.credentials
        yield _lazy_gauge(
            "ccred_credentials",
            "1 per declared credential, labelled with its Ready condition's reason and status.",
            ("namespace", "name", "reason", "ready"),
            lambda: (((ns, name, reason, "true" if ready else "false"), 1.0) for ns, name, reason, ready, _ in rows),
        )
        yield _lazy_gauge(
            "ccred_value_age_seconds",
            "Seconds since the value held for a credential was last read from AWS (only while one is held).",
            ("namespace", "name"),
            lambda: (((ns, name), age) for ns, name, _, _, age in rows if age is not None),
        )
        connected = GaugeMetricFamily(
            "ccred_watch_connected",
            "1 while the operator watches ConnectorCredentials (kopf's watch is running and the first "
            "listing has landed), else 0.",
        )
        connected.add_metric([], 1.0 if self.connected else 0.0)
        yield connected


class _Samples:
    """A family's samples, made as the encoder reads them, one at a time (and again if read again):
    at 10,000 credentials a scrape would otherwise hold 20,000 samples and their label dicts at
    once, about 10 MiB."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], Iterator[Sample]]) -> None:
        self._make = make

    def __iter__(self) -> Iterator[Sample]:
        return self._make()


def _lazy_gauge(
    name: str,
    documentation: str,
    labels: tuple[str, ...],
    rows: Callable[[], Iterator[tuple[tuple[str, ...], float]]],
) -> Metric:
    def samples() -> Iterator[Sample]:
        for values, value in rows():
            yield Sample(name, dict(zip(labels, values, strict=True)), value)

    family = Metric(name, documentation, "gauge")
    # prometheus_client's encoders read ``samples`` once, in order: any iterable does.
    family.samples = cast("list[Sample]", _Samples(samples))
    return family


class EngineCollector(Collector):
    """``ccred_credentials``, ``ccred_value_age_seconds`` and ``ccred_watch_connected``, from the engine."""

    def __init__(
        self, engine: Engine, connected: Callable[[], bool], *, clock: Callable[[], float] | None = None
    ) -> None:
        self._engine = engine
        self._connected = connected
        self._clock = clock

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        try:
            return asyncio.get_running_loop().time()  # the clock the engine's fetch times use
        except RuntimeError:
            return time.monotonic()

    def snapshot(self) -> EngineSnapshot:
        now = self._now()
        rows: list[tuple[str, str, str, bool, float | None]] = []
        for entry in self._engine.entries():
            outcome, held = entry.schedule.outcome, entry.held
            fetched = held.fetched_mono if held.value is not None else None
            rows.append(
                (
                    entry.namespace,
                    entry.name,
                    PENDING_REASON if outcome is None else str(outcome.reason),
                    outcome is not None and bool(outcome.ready),
                    None if fetched is None else max(0.0, now - fetched),
                )
            )
        return EngineSnapshot(rows, self._safe_connected())

    def describe(self) -> Iterable[Metric]:
        return list(EngineSnapshot([], False).families())

    def collect(self) -> Iterable[Metric]:
        return list(self.snapshot().families())

    def _safe_connected(self) -> bool:
        try:
            return bool(self._connected())
        except Exception:  # noqa: BLE001 - a scrape must not fail on it
            return False


# --- the endpoint ---------------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` over TCP, on the running event loop."""

    def __init__(self, metrics: Metrics, host: str | None, port: int) -> None:
        self._metrics = metrics
        self._host, self._port = host, port
        self._runner: web.ServerRunner | None = None
        self.bound: list[tuple[str, int]] = []

    async def start(self) -> None:
        self._runner = web.ServerRunner(
            web.Server(self._handle, access_log=None), handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        server = site._server  # the asyncio server: where it really listens (port 0: a free one)
        sockets = getattr(server, "sockets", None) or ()
        self.bound = [tuple(sock.getsockname()[:2]) for sock in sockets]
        where = ", ".join(f"{host}:{port}" for host, port in self.bound) or f"{self._host or '*'}:{self._port}"
        logger.info("Serving Prometheus metrics on http://%s/metrics.", where)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="Only GET is served.\n", headers={"Allow": "GET, HEAD"})
        if request.path != "/metrics":
            return web.Response(status=404, text="Not found; the metrics are at /metrics.\n")
        # The engine's state is read here, on the loop that owns it (a list of tuples: cheap); the
        # text, tens of milliseconds per thousand credentials, is built in a thread.
        snapshot = self._metrics.snapshot()
        body, content_type = await asyncio.get_running_loop().run_in_executor(
            None, self._metrics.render, request.headers.get("Accept"), snapshot
        )
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
