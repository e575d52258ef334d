"""``connector-credentials run``: the operator itself. The adapters are built here and wired into
the core's engine: the socket, the Kubernetes watch (kopf), AWS (boto3), the metrics.

Imported only when ``run`` (or ``doctor``, for :func:`settings_from`) is called: kopf, boto3 and
pydantic take most of a second to import, which ``get``, ``list`` and ``healthz`` never pay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import click
import kopf
from kopf._cogs.structs.references import Insights  # public in kopf.operator(insights=...), not re-exported
from pydantic import ValidationError

from connector_credentials.api.models import GROUP, PLURAL, VERSION
from connector_credentials.cli import memory
from connector_credentials.config.settings import OperatorSettings

logger = logging.getLogger("connector_credentials")


def run(options: dict[str, Any]) -> None:
    """Run the operator and the credential server with these command-line options."""
    memory.limit_malloc_arenas()  # before any thread starts
    settings = settings_from(options)
    if settings.liveness:
        liveness_address(settings.liveness)  # a URL kopf would fail on is a usage error, before anything starts
    clash = _port_clash(settings)
    if clash:
        raise click.UsageError(clash)
    loop_factory, why = event_loop(settings.event_loop)
    try:
        with asyncio.Runner(debug=settings.debug, loop_factory=loop_factory) as runner:
            runner.run(_run(settings, why))
    except KeyboardInterrupt:
        pass


def settings_from(options: dict[str, Any]) -> OperatorSettings:
    """The settings: ``CCRED_*`` variables overridden by the options given (``None`` or ``()``: not given)."""
    overrides: dict[str, Any] = {k: v for k, v in options.items() if v not in (None, ())}
    if "namespaces" in overrides:
        overrides["namespace"] = list(overrides.pop("namespaces"))
    elif overrides.get("all_namespaces"):
        # -A given on the command line outweighs CCRED_NAMESPACE (which the shipped sidecar sets).
        overrides["namespace"] = []
    try:
        settings = OperatorSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise click.UsageError(f"invalid settings: {problems}") from None
    if settings.all_namespaces and settings.namespace:
        raise click.UsageError("use either --all-namespaces or --namespace, not both")
    return settings


def _port_clash(settings: OperatorSettings) -> str | None:
    """Why the metrics and kopf's liveness endpoint cannot both listen as set, or ``None``."""
    from connector_credentials.config.settings import parse_bind_address

    bind = parse_bind_address(settings.metrics_bind_address)
    if bind is None or not bind[1] or not settings.liveness:
        return None
    _, liveness_port = liveness_address(settings.liveness)
    if liveness_port != bind[1]:
        return None
    return (
        f"--liveness ({settings.liveness}) and --metrics-bind-address ({settings.metrics_bind_address}) use the "
        f"same port {liveness_port}: move one of them (e.g. --metrics-bind-address=:8081), or set "
        "--metrics-bind-address=0 to turn the metrics off"
    )


def liveness_address(url: str) -> tuple[str, int]:
    """Where kopf's liveness endpoint will listen for ``--liveness URL``: its host and port, read
    as kopf reads them (``kopf._core.engines.probing``: http only, localhost and port 80 by default)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise click.UsageError(f"--liveness {url!r} is not a URL: {exc}") from None
    if parts.scheme != "http":
        raise click.UsageError(f"--liveness {url!r}: only http:// URLs are served, e.g. http://0.0.0.0:8080/healthz")
    return parts.hostname or "localhost", port or 80


async def _check_liveness_port(url: str) -> None:
    """Stop with one line naming the setting if kopf's liveness endpoint cannot listen where it is told.

    kopf binds it only once the CRD is served, and a port in use then ends kopf with a traceback
    of its own. So the address is bound here first, the same way (asyncio's create_server, as
    aiohttp's TCPSite does), and released at once. A process taking the port in between still
    gets kopf's traceback: this check is for the common case, a port taken before the start.
    """
    host, port = liveness_address(url)
    try:
        probe = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port, reuse_address=True)
    except OSError as exc:
        raise click.ClickException(
            f"cannot serve the liveness endpoint on {url}: {exc} "
            "(set --liveness / CCRED_LIVENESS to another port, and the probe's port with it)"
        ) from None
    probe.close()
    await probe.wait_closed()


class LoopUnavailable(click.ClickException):
    """CCRED_EVENT_LOOP=uvloop without uvloop installed: a setting that cannot be met (exit 2)."""

    exit_code = 2


def event_loop(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The loop factory for :class:`asyncio.Runner` (None: the standard loop), and why it was chosen."""
    if choice == "asyncio":
        return None, "CCRED_EVENT_LOOP=asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise LoopUnavailable(
                "CCRED_EVENT_LOOP=uvloop, but uvloop is not installed: install the operator with its extra "
                "(pip install 'connector-credential-operator[uvloop]'), or set CCRED_EVENT_LOOP=auto or asyncio"
            ) from None
        return None, f"CCRED_EVENT_LOOP={choice}: uvloop is not installed"
    return uvloop.new_event_loop, f"CCRED_EVENT_LOOP={choice}"


def _loop_name() -> str:
    """The running loop as the log names it: uvloop and its version, or the standard loop."""
    if type(asyncio.get_running_loop()).__module__.partition(".")[0] == "uvloop":
        from importlib.metadata import version

        return f"uvloop {version('uvloop')}"
    return "the standard asyncio event loop"


async def _run(settings: OperatorSettings, why: str) -> None:
    from connector_credentials.adapters.aws.secrets import Boto3SecretsPort
    from connector_credentials.adapters.kube import handlers
    from connector_credentials.adapters.kube.apiserver import KubeStatusSink
    from connector_credentials.adapters.metrics.prometheus import Metrics, MetricsServer
    from connector_credentials.adapters.socket.server import CredentialServer, SocketInUseError
    from connector_credentials.cli import logs
    from connector_credentials.config.settings import parse_bind_address
    from connector_credentials.core.engine import Engine
    from connector_credentials.core.relists import Relists

    redacting = logs.configure(verbose=settings.verbose, debug=settings.debug)
    logger.info("Running on %s (%s).", _loop_name(), why)
    if settings.liveness:
        await _check_liveness_port(settings.liveness)  # before anything of ours listens or logs in
    try:
        sink = KubeStatusSink()
    except (kopf.LoginError, OSError) as exc:  # OSError: e.g. the CA file of the kubeconfig
        raise click.ClickException(f"cannot log in to the Kubernetes API: {exc}") from None
    metrics = Metrics(rotation_queue=bool(settings.rotation_queue_url))
    port = Boto3SecretsPort(settings, instrument=metrics.instrument_client)
    engine = Engine(settings, port, sink, metrics=metrics)
    redacting.index = engine.redaction  # before the engine holds anything: no value is ever logged unmasked
    registry = kopf.OperatorRegistry()
    relisted = Relists()  # the watch's re-lists, noticed by the handlers, acted on by _sync
    handlers.register(registry, engine, relisted)

    ready = asyncio.Event()
    # kopf's view of what it serves: our resource appears in it once its watcher is spawned.
    insights = Insights()
    operator_task: asyncio.Task[None] | None = None

    def healthy() -> bool:
        watching = any(r.group == GROUP and r.plural == PLURAL for r in insights.watched_resources)
        return (
            not engine.draining
            and ready.is_set()
            and watching
            and engine.synced.is_set()
            and operator_task is not None
            and not operator_task.done()
        )

    def watching() -> bool:
        return (
            ready.is_set()
            and engine.synced.is_set()
            and any(r.group == GROUP and r.plural == PLURAL for r in insights.watched_resources)
            and operator_task is not None
            and not operator_task.done()
        )

    metrics.watch(engine, watching)
    metrics_server: MetricsServer | None = None
    bind = parse_bind_address(settings.metrics_bind_address)
    if bind is not None:
        metrics_server = MetricsServer(metrics, *bind)
        try:
            await metrics_server.start()
        except OSError as exc:
            await sink.close()
            raise click.ClickException(
                f"cannot serve metrics on {settings.metrics_bind_address}: {exc} "
                "(set --metrics-bind-address / CCRED_METRICS_BIND_ADDRESS to another port, or 0 to turn it off)"
            ) from None

    server = CredentialServer(settings, engine, healthy)
    try:
        await server.start()
    except (SocketInUseError, OSError) as exc:
        if metrics_server is not None:
            await metrics_server.close()
        await sink.close()
        raise click.ClickException(f"cannot serve on {settings.socket_path}: {exc}") from None
    namespaces = settings.watched_namespaces()
    clusterwide = namespaces is None
    if clusterwide and not settings.all_namespaces:
        logger.warning("No --namespace given: watching all namespaces (pass -n NS to limit it).")

    rotations: asyncio.Task[None] | None = None
    if settings.rotation_queue_url:
        rotations = asyncio.create_task(_receive_rotations(settings.rotation_queue_url, port, engine, metrics))
    stop = asyncio.Event()
    shutdown = _Shutdown(engine, server, settings.shutdown_drain, then=stop.set)
    shutdown.take_signals()  # until kopf runs, and again once it has installed its own handlers

    async def watch() -> None:
        # kopf scans the API's resources once (scanning is off: watching CRDs would need a
        # ClusterRole), so it must start only once the CRD is served, or it never watches.
        await _wait_for_crd(sink)
        if stop.is_set():
            return  # shut down while waiting
        sync_task = asyncio.create_task(_sync(engine, sink, namespaces, relisted))
        signals_task = asyncio.create_task(_take_signals_when(ready, shutdown))
        try:
            await kopf.operator(
                registry=registry,
                standalone=True,
                clusterwide=clusterwide,
                namespaces=namespaces or [],
                ready_flag=ready,
                stop_flag=stop,
                insights=insights,
                memories=handlers.NoMemories(),
                liveness_endpoint=settings.liveness,
            )
        finally:
            sync_task.cancel()
            signals_task.cancel()

    try:
        operator_task = asyncio.create_task(watch())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({operator_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not operator_task.done() and not ready.is_set():
            operator_task.cancel()  # stopped before kopf ever started (e.g. still waiting for the CRD)
            await asyncio.gather(operator_task, return_exceptions=True)
        elif not operator_task.done():
            await operator_task  # kopf stops after the drain (stop flag), with nothing of ours left to wait for
        stopped.cancel()
        if not operator_task.cancelled():
            operator_task.result()
    finally:
        if rotations is not None:
            rotations.cancel()  # its long poll ends with its daemon thread; what it received meanwhile stays queued
        await shutdown.run()  # a no-op if a signal already drained; else (kopf failed) drain now
        await engine.close()  # only now, with the socket closed, are the values dropped
        if metrics_server is not None:
            await metrics_server.close()
        await sink.close()


async def _receive_rotations(url: str, port: Any, engine: Any, metrics: Any) -> None:
    """Rotation events from the queue, once the declared credentials are known (before that, a
    secret not listed yet would look undeclared and its event be lost), until the drain."""
    from connector_credentials.adapters.aws.rotation_queue import WAIT_SECONDS, RotationQueue, queue_region
    from connector_credentials.core.supervise import supervise

    region = queue_region(url, os.environ)
    queue = RotationQueue(
        url,
        lambda: port.queue_client(region, WAIT_SECONDS),
        rotated=engine.rotated,
        meter=metrics,
        role=port.role,
        retry_base=engine.settings.backoff_base,
        retry_cap=engine.settings.backoff_cap,
    )
    await engine.synced.wait()
    await supervise("Receiving rotation events", lambda: queue.run(stopping=lambda: engine.draining), log=logger)


class _Shutdown:
    """SIGTERM/SIGINT: drain, close the socket, then let kopf stop.

    kopf, when it stops by itself on a signal, waits up to 5 s for every task started since it
    started (our socket connections among them) and then cancels them: the drain would start late
    and cut connections. So the operator takes the signals (again, after kopf installed its own),
    drains first, and stops kopf with its stop flag when nothing of its own is left running.
    """

    def __init__(self, engine: Any, server: Any, seconds: float, *, then: Callable[[], None]) -> None:
        self._engine, self._server, self._seconds, self._then = engine, server, seconds, then
        self._task: asyncio.Task[None] | None = None

    def take_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin, sig)

    def begin(self, sig: signal.Signals | None = None) -> None:
        if self._task is None:
            if sig is not None:
                logger.info("Signal %s received: shutting down.", sig.name)
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="ccred-shutdown")

    async def run(self) -> None:
        self.begin()
        assert self._task is not None
        await asyncio.shield(self._task)

    async def _drain(self) -> None:
        """/healthz says 503 and no AWS read starts; what is held is served for the drain period.

        A controller shutting down beside the sidecar keeps reading its credentials meanwhile, and
        never hears 404 for a credential that is still declared.
        """
        try:
            await self._engine.drain()
            if self._seconds > 0:
                logger.info(
                    "Shutting down: serving the values held for %.0fs more, then closing the socket.", self._seconds
                )
                await asyncio.sleep(self._seconds)
            await self._server.close()
            await self._engine.finish_writing()  # before kopf stops: it would wait for our writers, then cancel them
        finally:
            self._then()


async def _take_signals_when(ready: asyncio.Event, shutdown: _Shutdown) -> None:
    await ready.wait()  # kopf has installed its signal handlers by now: put ours back
    shutdown.take_signals()


async def _wait_for_crd(sink: Any) -> None:
    """Return once the API serves ConnectorCredentials; until then /healthz answers 503."""
    delay, said = 1.0, 0.0
    loop = asyncio.get_running_loop()
    while True:
        try:
            if await sink.crd_served():
                if said:
                    logger.info("The ConnectorCredential CRD is installed now; starting the watch.")
                return
            problem = (
                f"the API does not serve {PLURAL}.{GROUP}/{VERSION}: the CRD is not installed (kubectl apply -f crds/)"
            )
        except Exception as exc:  # noqa: BLE001 - retried until the API answers
            problem = f"asking the API which resources it serves failed ({type(exc).__name__}: {_short(exc)})"
        if loop.time() - said >= 60 or not said:
            logger.warning(
                "Not watching yet: %s; /healthz answers 503 until then. Retrying every %.0fs.", problem, delay
            )
            said = loop.time()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]


async def _sync(engine: Any, sink: Any, namespaces: list[str] | None, noticed: Any) -> None:
    """List the declared credentials at start, again after each re-list of the watch, and every
    CCRED_RELIST_INTERVAL.

    At start, so that an unknown name soon means "not declared": until this listing lands, the
    socket answers unknown names with 503 instead of a misleading 404. Then the watch (kopf)
    keeps the engine current, except that a watch that could not resume lists again and sends
    no DELETED for what vanished meanwhile: after each such re-list the credentials are listed
    here again and the engine forgets what is not in the listing (docs/design.md). A re-list is
    noticed by the objects it delivers; one that delivers none (every credential was deleted) is
    caught by the periodic listing.
    """
    delay = 0.5
    periodic = False
    while True:
        count, forgotten = 0, 0
        listed: set[tuple[str, str]] = set()
        try:
            # A page at a time: each page is handed to the engine and dropped before the next.
            async for page in sink.credential_pages(namespaces):
                for item in page.items:
                    engine.upsert(item)
                    meta = item.get("metadata") or {}
                    listed.add((str(meta.get("namespace") or ""), str(meta.get("name") or "")))
                count += len(page.items)
                if page.last:  # one namespace's listing (or all namespaces'), at its own resourceVersion
                    scope = None if page.namespace is None else [page.namespace]
                    gone = engine.forget_unlisted(listed, page.resource_version, scope)
                    noticed.forgotten(gone)
                    forgotten += len(gone)
                    listed = set()
        except Exception as exc:  # noqa: BLE001 - retried until the API answers (upserts are idempotent)
            logger.warning("Listing ConnectorCredentials failed (%s); retrying in %.0fs.", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            continue
        delay = 0.5
        if not engine.synced.is_set():
            engine.synced.set()
            engine.changes.notify_all()  # a watch of an undeclared credential now answers 404, not 503
            logger.info("Loaded %d declared credential(s).", count)
        else:
            log = logger.debug if periodic and not forgotten else logger.info
            log("Listed %d declared credential(s) again; %d deleted meanwhile forgotten.", count, forgotten)
        try:
            async with asyncio.timeout(engine.settings.relist_interval):
                await noticed.settled()
        except TimeoutError:
            periodic = True
            logger.debug("Listing the credentials again (CCRED_RELIST_INTERVAL) to find deletions not reported.")
        else:
            periodic = False
            logger.info("The watch listed the credentials again (it could not resume): listing them to find deletions.")
