"""Scale benchmark: N credentials that are already declared when the operator starts, against a bare floor.

Run from the repository root with the project's venv (``make bench`` runs it; not collected by pytest)::

    .venv/bin/python bench/scale.py                   # N = 100 and 1,000
    .venv/bin/python bench/scale.py --big             # and 10,000
    .venv/bin/python bench/scale.py --sizes 300 --refresh-interval 20s --no-live

For each N it makes a fresh namespace with the operator's ServiceAccount and the shipped RBAC, N secrets of
200 bytes in moto and N ConnectorCredentials, then starts the operator's console script (production
logging) and measures, until every object has a Ready condition (the first pass):

* the time from the process start and from ``/healthz`` answering 200 until every object has a verdict
  (polled with the admin client, a server-side Table listing at up to 5 Hz);
* the AWS calls by operation (at the AWS proxy) and the status writes (``PATCH .../status`` at the
  Kubernetes proxy), in the first pass and in one steady refresh cycle afterwards;
* the latency of on-demand reads on the socket (``CredentialClient.get``) of credentials that had no
  verdict yet when they were picked, made by a few threads for as long as the first pass lasts;
* the operator's RSS right after its socket answers, and its peak (VmHWM) at the end.

The bare floor, measured in the same run after the operator stopped, is a separate process that does
the same I/O directly: the same AWS reads (ceil(N/20) BatchGetSecretValue of 20 secrets) through the same
AWS proxy (static test keys) and N merge patches of the status subresource with a Ready condition through
the same Kubernetes proxy (the operator's token), on 8 threads with keep-alive connections. Optionally
(on by default) a second operator then starts in an empty namespace and N credentials are created while
it runs.

Everything runs on 127.0.0.1 (a real kube-apiserver + etcd, moto, both proxies); every phase has a
deadline, and every process is stopped whatever happens. See bench/README.md (Scale).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import http.client
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/x.py` puts bench/ on sys.path, not the repository root

GROUP_VERSION = "connectors.xpander.ai/v1alpha1"
RESOURCE = f"{GROUP_VERSION}/connectorcredentials"
ROLE_ARN = "arn:aws:iam::123456789012:role/xpander-controller"
REGION = "us-east-1"
VALUE_BYTES = 200
STS_ACTIONS = ("AssumeRoleWithWebIdentity", "GetCallerIdentity")
SM_ACTIONS = ("GetSecretValue", "BatchGetSecretValue")
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
POLL_PERIOD = 0.2  # 5 Hz, slower when a listing takes longer than that
FORBIDDEN = re.compile(r"\b403\b.*(Forbidden|forbidden)|is forbidden:|APIForbiddenError|Not enough permissions")


class BenchError(Exception):
    """Something did not start or did not finish in time: the benchmark fails (exit 1)."""


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- small HTTP helpers ------------------------------------------------------------------------------


class KeepAlive:
    """One persistent HTTP(S) connection (one per thread), reopened once if the server closed it."""

    def __init__(self, url: str, *, context: ssl.SSLContext | None = None, token: str | None = None) -> None:
        split = urllib.parse.urlsplit(url)
        self._host, self._port = split.hostname or "127.0.0.1", split.port
        self._tls = split.scheme == "https"
        self._context = context
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._conn: http.client.HTTPConnection | None = None

    def _open(self) -> http.client.HTTPConnection:
        if self._tls:
            return http.client.HTTPSConnection(self._host, self._port, context=self._context, timeout=60)
        return http.client.HTTPConnection(self._host, self._port, timeout=60)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": accept, **self._headers}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self._open()
            try:
                self._conn.request(method, path, body=data, headers=headers)
                answer = self._conn.getresponse()
                raw = answer.read()
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt == 2:
                    raise
                continue
            if answer.getheader("Connection", "").lower() == "close":
                self.close()
            return answer.status, json.loads(raw) if raw else None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def objects_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    path = f"/apis/{GROUP_VERSION}/namespaces/{namespace}/connectorcredentials"
    if name is not None:
        path += f"/{name}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


def healthz_status(socket_path: str, timeout: float = 2.0) -> int | None:
    """HTTP status of ``GET /healthz`` on the operator's socket; ``None`` if nothing answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            head = sock.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


def proc_status(pid: int | None, key: str) -> float:
    """A ``/proc/PID/status`` memory figure (``VmRSS``, ``VmHWM``) in MiB; 0 if the process is gone."""
    if pid is None:
        return 0.0
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def process_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a process (all threads) from ``/proc/PID/stat``; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def wait_for(predicate: Callable[[], Any], deadline: float, what: str, interval: float = 0.05) -> Any:
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(interval)


# --- moto at scale -------------------------------------------------------------------------------------


def index_moto_lookups() -> None:
    """Give moto's secret store an ARN index (in this process, where moto runs).

    moto 5 finds a secret by scanning every secret for a matching ARN or name, several times per
    request: at 10,000 secrets that is tens of thousands of comparisons per GetSecretValue, all under
    this process's GIL, and the benchmark would measure moto (the scan also races with concurrent
    CreateSecret calls: "dictionary changed size during iteration"). Real Secrets Manager looks a secret
    up by id. Here names are answered from the dict itself and full ARNs from an index kept on insert
    (checked on every hit); only other ARNs (partial ones) fall through to moto's own scan.
    """
    from moto.secretsmanager.models import SecretsStore

    if getattr(SecretsStore, "_bench_indexed", False):
        return
    original_setitem, original_getitem = SecretsStore.__setitem__, SecretsStore.__getitem__
    original_contains, original_get = SecretsStore.__contains__, SecretsStore.get
    absent = object()

    def index_of(store: Any) -> dict[str, str]:
        return store.__dict__.setdefault("_bench_arn_index", {})  # type: ignore[no-any-return]

    def find(store: Any, key: Any) -> Any:
        """The secret, ``absent`` when it surely does not exist, ``None`` when moto's scan must decide."""
        if not isinstance(key, str):
            return None
        if dict.__contains__(store, key):
            return dict.__getitem__(store, key)
        if not key.startswith("arn:"):
            return absent  # moto would compare names (the keys) and then look the name up: not there
        name = index_of(store).get(key)
        if name is not None and dict.__contains__(store, name):
            secret = dict.__getitem__(store, name)
            if secret.arn == key:
                return secret
        return None

    def setitem(self: Any, key: str, value: Any) -> None:
        original_setitem(self, key, value)
        index_of(self)[value.arn] = key

    def getitem(self: Any, key: str) -> Any:
        found = find(self, key)
        if found is absent:
            raise KeyError(key)
        return found if found is not None else original_getitem(self, key)

    def contains(self: Any, key: str) -> bool:
        found = find(self, key)
        return found is not absent and (found is not None or original_contains(self, key))

    def get(self: Any, key: str) -> Any:
        found = find(self, key)
        if found is absent:
            return None
        return found if found is not None else original_get(self, key)

    SecretsStore.__setitem__ = setitem  # type: ignore[method-assign]
    SecretsStore.__getitem__ = getitem  # type: ignore[method-assign]
    SecretsStore.__contains__ = contains  # type: ignore[method-assign]
    SecretsStore.get = get  # type: ignore[method-assign]
    SecretsStore._bench_indexed = True  # type: ignore[attr-defined]


# --- arranging the world ---------------------------------------------------------------------------------


def create_secrets(endpoint: str, prefix: str, count: int, threads: int) -> list[str]:
    """``count`` secrets of VALUE_BYTES printable bytes; their ARNs, in order."""
    import boto3
    import botocore.config

    local = threading.local()
    config = botocore.config.Config(retries={"max_attempts": 1}, proxies={}, max_pool_connections=threads)

    def one(index: int) -> str:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = boto3.session.Session().client(
                "secretsmanager",
                region_name=REGION,
                endpoint_url=endpoint,
                config=config,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
        value = secrets.token_hex(VALUE_BYTES // 2)
        return str(client.create_secret(Name=f"{prefix}/c{index:05d}", SecretString=value)["ARN"])

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def create_objects(
    url: str,
    context: ssl.SSLContext,
    namespace: str,
    names: list[str],
    arns: list[str],
    spec: dict[str, Any],
    threads: int,
) -> None:
    """N ConnectorCredentials, created by the admin on ``threads`` keep-alive connections."""
    local = threading.local()

    def one(item: tuple[str, str]) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = KeepAlive(url, context=context)
        name, arn = item
        body = {
            "apiVersion": GROUP_VERSION,
            "kind": "ConnectorCredential",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"secretArn": arn, **spec},
        }
        status, answer = conn.request("POST", objects_path(namespace), body)
        if status != 201:
            raise BenchError(f"creating {namespace}/{name} answered HTTP {status}: {answer}")

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, zip(names, arns, strict=True)))


class Readiness(threading.Thread):
    """Lists the namespace's credentials as a server-side Table (Name and Ready columns only), up to 5 Hz.

    ``ready`` holds every name whose Ready condition is set (True or False), with when it was first seen.
    """

    def __init__(self, url: str, context: ssl.SSLContext, namespace: str) -> None:
        super().__init__(name="readiness", daemon=True)
        self._conn = KeepAlive(url, context=context)
        self._path = objects_path(namespace) + "?includeObject=None"
        self.ready: dict[str, float] = {}
        self.verdicts: Counter[str] = Counter()
        self.listings = 0
        self.list_seconds: list[float] = []
        self.error: str | None = None
        self._halt = threading.Event()
        self._changed = threading.Condition()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                began = time.monotonic()
                self.poll()
                took = time.monotonic() - began
                self.list_seconds.append(took)
                # Never more than half of one core on listing, whatever N is.
                self._halt.wait(max(POLL_PERIOD - took, took))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._conn.close()

    def poll(self) -> None:
        status, table = self._conn.request("GET", self._path, accept=TABLE)
        if status != 200 or not isinstance(table, dict):
            raise BenchError(f"listing credentials answered HTTP {status}")
        now = time.monotonic()
        columns = [column["name"] for column in table.get("columnDefinitions") or []]
        name_at, ready_at, reason_at = columns.index("Name"), columns.index("Ready"), columns.index("Reason")
        verdicts: Counter[str] = Counter()
        with self._changed:
            for row in table.get("rows") or []:
                cells = row["cells"]
                if cells[ready_at] in ("True", "False"):
                    self.ready.setdefault(cells[name_at], now)
                    verdicts[f"{cells[ready_at]}/{cells[reason_at]}"] += 1
            self.verdicts = verdicts
            self.listings += 1
            self._changed.notify_all()

    def wait_all(self, count: int, deadline: float) -> float:
        """When a listing first showed ``count`` verdicts (raises at the deadline)."""
        with self._changed:
            while len(self.ready) < count:
                if self.error is not None:
                    raise BenchError(f"the readiness poller failed: {self.error}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"only {len(self.ready)}/{count} credentials had a verdict by the deadline")
                self._changed.wait(min(remaining, 1.0))
            return max(self.ready.values())

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


@dataclass
class Reads:
    """On-demand socket reads of credentials that had no verdict when picked."""

    latencies: list[float] = field(default_factory=list)
    #: name -> (when the read was sent, seconds it took)
    by_name: dict[str, tuple[float, float]] = field(default_factory=dict)
    picked: set[str] = field(default_factory=set)
    failures: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def on_demand_reader(
    socket_path: str,
    namespace: str,
    names: list[str],
    ready: Readiness,
    reads: Reads,
    done: threading.Event,
    deadline: float,
) -> None:
    from connector_credentials.client import CredentialClient, CredentialError

    chooser = random.Random()
    with CredentialClient(socket_path, timeout=max(5.0, deadline - time.monotonic())) as client:
        while not done.is_set() and time.monotonic() < deadline:
            with reads.lock:
                candidates = [n for n in names if n not in ready.ready and n not in reads.picked]
                name = chooser.choice(candidates) if candidates else None
                if name is not None:
                    reads.picked.add(name)
            if name is None:
                done.wait(0.05)
                continue
            sent, began = time.monotonic(), time.perf_counter()
            try:
                client.get(namespace, name)
            except CredentialError as exc:
                with reads.lock:
                    reads.failures[f"{exc.status or '-'} {exc.reason}"] += 1
                continue
            took = time.perf_counter() - began
            with reads.lock:
                reads.latencies.append(took)
                reads.by_name[name] = (sent, took)


# --- the bare floor (a subprocess) -----------------------------------------------------------------------


def floor_main(spec_path: str) -> None:
    """ceil(N/20) BatchGetSecretValue (+ N status merge patches unless told not to), 8 threads, printed as
    JSON (a subprocess)."""
    import boto3
    import botocore.config

    spec = json.loads(Path(spec_path).read_text())
    threads = int(spec["threads"])
    config = botocore.config.Config(retries={"max_attempts": 1}, proxies={}, max_pool_connections=threads)
    session = boto3.session.Session()
    clients = [
        session.client(
            "secretsmanager",
            region_name=REGION,
            endpoint_url=spec["aws_endpoint"],
            config=config,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        for _ in range(threads)
    ]
    conns = [KeepAlive(spec["kube_url"], token=spec["token"]) for _ in range(threads)]
    local = threading.local()
    slots = iter(range(threads))
    slot_lock = threading.Lock()

    def slot() -> int:
        if not hasattr(local, "slot"):
            with slot_lock:
                local.slot = next(slots)
        return int(local.slot)

    def batch(items: list[tuple[str, str]]) -> None:
        index = slot()
        answer = clients[index].batch_get_secret_value(SecretIdList=[arn for _, arn in items])
        versions = {str(value["ARN"]): str(value["VersionId"]) for value in answer["SecretValues"]}
        if len(versions) != len(items):
            raise RuntimeError(f"a batch of {len(items)} answered {len(versions)} values: {answer.get('Errors')}")
        if spec.get("patches", True):
            for name, arn in items:
                patch(index, name, arn, versions[arn])

    def patch(index: int, name: str, arn: str, version: str) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {
            "type": "Ready",
            "status": "True",
            "reason": "AccessVerified",
            "message": f"Read {arn} (stage AWSCURRENT) as {ROLE_ARN}; re-checked every 30s.",
            "lastTransitionTime": now,
            "observedGeneration": 1,
        }
        status = {
            "conditions": [condition],
            "observedGeneration": 1,
            "versionId": version,
            "identityArn": ROLE_ARN,
            "lastCheckedTime": now,
        }
        code, body = conns[index].request(
            "PATCH",
            objects_path(spec["namespace"], name, "status"),
            {"status": status},
            content_type="application/merge-patch+json",
        )
        if code != 200:
            raise RuntimeError(f"status patch of {name} answered HTTP {code}: {body}")

    items = list(zip(spec["names"], spec["arns"], strict=True))
    batches = [items[start : start + 20] for start in range(0, len(items), 20)]
    began, cpu = time.perf_counter(), time.process_time()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(batch, batches))
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    print(json.dumps({"seconds": elapsed, "cpu": cpu, "items": len(items)}))


def run_floor(
    workdir: Path,
    aws_endpoint: str,
    kube_url: str,
    token: str,
    namespace: str,
    names: list[str],
    arns: list[str],
    threads: int,
    timeout: float,
    *,
    patches: bool = True,
) -> tuple[float, float]:
    """(seconds, CPU seconds) of the bare floor (``patches=False``: the reads only)."""
    spec_path = workdir / "floor.json"
    spec = {
        "aws_endpoint": aws_endpoint,
        "kube_url": kube_url,
        "token": token,
        "namespace": namespace,
        "names": names,
        "arns": arns,
        "threads": threads,
        "patches": patches,
    }
    spec_path.write_text(json.dumps(spec))
    env = {key: os.environ[key] for key in ("PATH", "LANG", "TMPDIR") if key in os.environ}
    env.update(HOME=str(workdir), AWS_EC2_METADATA_DISABLED="true", PYTHONDONTWRITEBYTECODE="1")
    try:
        done = subprocess.run(
            [sys.executable, __file__, "_floor", str(spec_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"the bare floor did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise BenchError(f"the bare floor failed ({done.returncode}): {done.stderr[-2000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return float(answer["seconds"]), float(answer["cpu"])


# --- one size ----------------------------------------------------------------------------------------------


@dataclass
class Env:
    plane: Any
    cluster: Any
    aws: Any
    proxy: Any
    kube_proxy: Any
    context: ssl.SSLContext
    args: argparse.Namespace
    interval: float


@dataclass
class Row:
    n: int
    floor: float = 0.0
    from_start: float = 0.0
    from_healthz: float = 0.0
    healthz_after: float = 0.0
    first_calls: Counter[str] = field(default_factory=Counter)
    reads_per_credential: Counter[int] = field(default_factory=Counter)
    #: On-demand read latencies by what the read found, from the AWS proxy's timestamps: no read of the
    #: credential before the read was sent (it waited for the first check), one before and one while it was
    #: pending (already checked, yet read again: a refresh due then), or none while it was pending.
    waited: list[float] = field(default_factory=list)
    rechecked: list[float] = field(default_factory=list)
    cached: list[float] = field(default_factory=list)
    cpu: float = 0.0
    pass_wall: float = 0.0
    floor_cpu: float = 0.0
    log_lines: int = 0
    #: The operator's WARNING and ERROR lines over its whole run: how many of each, and the first few.
    log_levels: Counter[str] = field(default_factory=Counter)
    log_samples: list[str] = field(default_factory=list)
    first_read_at: float = 0.0
    floor_rate: float = 0.0
    cycle_calls: Counter[str] = field(default_factory=Counter)
    cycle_credentials: int = 0
    cycle_failing: int = 0
    cycle_window: float = 0.0
    first_writes: int = 0
    first_conflicts: int = 0
    first_events: int = 0
    all_events: int = 0
    cycle_events: int = 0
    cycle_writes: int = 0
    rss_idle: float = 0.0
    rss_peak: float = 0.0
    #: GET /metrics after the first pass: median time and body size.
    scrape_ms: float = 0.0
    scrape_kib: float = 0.0
    reads: Reads = field(default_factory=Reads)
    verdicts: Counter[str] = field(default_factory=Counter)
    live: float | None = None
    live_creates: float | None = None
    live_calls: Counter[str] = field(default_factory=Counter)
    setup: float = 0.0
    total: float = 0.0
    list_ms: float = 0.0
    #: The start-up stampede (bench/stampede.py): 64 connections, then all reads at once; its floor.
    stampedes: list[Any] = field(default_factory=list)
    stampede_floors: tuple[float, float] = (0.0, 0.0)


@contextlib.contextmanager
def namespace_with_identity(env: Env, label: str) -> Iterator[tuple[str, str, Path]]:
    """A fresh namespace with the operator's identity; (namespace, token, workdir). The namespace stays
    (deleting 10,000 objects costs more than it is worth in a throwaway control plane)."""
    namespace = f"scale-{label}-{uuid.uuid4().hex[:6]}"
    env.cluster.create_namespace(namespace)
    env.cluster.install_operator_identity(namespace)
    token = env.cluster.service_account_token(namespace)
    workdir = Path(tempfile.mkdtemp(prefix="ccs-", dir="/tmp"))  # Unix socket paths must stay short
    try:
        yield namespace, token, workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_operator(
    env: Env, namespace: str, token: str, workdir: Path, metrics_port: int | None = None, **settings: str
) -> Any:
    """The console script as deployed: production logging; /metrics on (loopback) when a port is given;
    ``settings``: more CCRED_* variables."""
    from tests.support.awsemu import irsa_env
    from tests.support.runner import OperatorProcess, console_script

    extra_env = {"CCRED_SHUTDOWN_DRAIN": "0", **settings}
    if metrics_port is not None:
        extra_env["CCRED_METRICS_BIND_ADDRESS"] = f"127.0.0.1:{metrics_port}"

    kubeconfig = env.cluster.write_kubeconfig(
        workdir / "kubeconfig", token=token, namespace=namespace, server=env.kube_proxy.url
    )
    return OperatorProcess(
        namespace=namespace,
        kubeconfig=kubeconfig,
        aws_env=irsa_env(workdir, env.proxy.endpoint, role_arn=ROLE_ARN),
        socket_path=str(workdir / "c.sock"),
        extra_env=extra_env,
        log_path=workdir / "operator.log",
        home=workdir / "home",
        command=[console_script(), "run", "-n", namespace],  # no --verbose: production logging
    )


def scrape_metrics(port: int, n: int, times: int = 5) -> tuple[float, float, int]:
    """Scrape /metrics a few times: the median time (ms), the body's size (KiB), the credential series."""
    took: list[float] = []
    body = b""
    for _ in range(times):
        start = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        took.append(time.monotonic() - start)
        if response.status != 200:
            raise BenchError(f"/metrics answered {response.status}")
    series = sum(1 for line in body.splitlines() if line.startswith(b"ccred_credentials{"))
    if series != n:
        raise BenchError(f"/metrics has {series} ccred_credentials series for {n} credentials")
    return statistics.median(took) * 1000, len(body) / 1024, series


def aws_calls(env: Env, start: float, end: float) -> list[Any]:
    return [seen for seen in env.proxy.seen if start <= seen.at < end]


def kube_requests(env: Env, method: str, pattern: str, start: float, end: float) -> list[Any]:
    return [seen for seen in env.kube_proxy.requests(method, pattern) if start <= seen.at < end]


def check_operator(operator: Any, what: str) -> None:
    if not operator.running:
        raise BenchError(f"the operator exited during {what} (code {operator.returncode})")


def measure(env: Env, n: int) -> Row:
    args, row = env.args, Row(n)
    began = time.monotonic()
    budget = args.deadline_base + n * args.deadline_per_credential
    env.proxy.reset_counters()
    names = [f"c{i:05d}" for i in range(n)]
    spec = {"refreshInterval": args.refresh_interval}
    with namespace_with_identity(env, str(n)) as (namespace, token, workdir):
        progress(f"N={n}: creating {n} secrets and {n} ConnectorCredentials in {namespace}")
        arns = create_secrets(env.proxy.endpoint, f"xpander/{namespace}", n, args.threads)
        create_objects(env.cluster.url, env.context, namespace, names, arns, spec, args.threads)
        row.setup = time.monotonic() - began
        progress(f"N={n}: set up in {row.setup:.1f} s; starting the operator")
        status_path = rf"/namespaces/{namespace}/connectorcredentials/[^/]+/status$"
        events_path = rf"/namespaces/{namespace}/events$"

        metrics_port = free_port()
        operator = start_operator(env, namespace, token, workdir, metrics_port)
        socket_path = str(workdir / "c.sock")
        ready = Readiness(env.cluster.url, env.context, namespace)
        reads, done = Reads(), threading.Event()
        readers: list[threading.Thread] = []
        try:
            t0 = time.monotonic()
            deadline = t0 + budget
            operator.start()
            ready.start()
            wait_for(
                lambda: healthz_status(socket_path, 0.5) is not None or not operator.running,
                t0 + 60,
                "the operator's socket",
                0.02,
            )
            check_operator(operator, "start-up")
            row.rss_idle = proc_status(operator.pid, "VmRSS")
            cpu_at_socket, t_sock = process_cpu(operator.pid), time.monotonic()
            t_healthy = wait_for(
                lambda: (healthz_status(socket_path) == 200 and time.monotonic()) or not operator.running,
                t0 + 60,
                "/healthz to answer 200",
                0.02,
            )
            check_operator(operator, "start-up")
            row.healthz_after = t_healthy - t0
            progress(
                f"N={n}: /healthz 200 after {row.healthz_after:.1f} s; reading on demand while the first pass runs"
            )
            for index in range(args.readers):
                reader = threading.Thread(
                    target=on_demand_reader,
                    args=(socket_path, namespace, names, ready, reads, done, deadline),
                    name=f"reader-{index}",
                    daemon=True,
                )
                reader.start()
                readers.append(reader)
            t_all = ready.wait_all(n, deadline)
            done.set()
            ready.stop()  # no listing load during the steady cycle
            for reader in readers:
                reader.join(max(1.0, deadline - time.monotonic()))
            check_operator(operator, "the first pass")
            row.from_start, row.from_healthz = t_all - t0, t_all - t_healthy
            row.cpu = process_cpu(operator.pid) - cpu_at_socket
            row.pass_wall = time.monotonic() - t_sock
            row.log_lines = operator.output.count("\n")
            row.verdicts = Counter(ready.verdicts)
            row.reads = reads
            progress(f"N={n}: every credential has a verdict after {row.from_start:.1f} s ({dict(row.verdicts)})")

            first = aws_calls(env, t0, t_all)
            row.first_calls = Counter(str(seen.action) for seen in first)
            per_secret = Counter(sid for seen in first if seen.action in SM_ACTIONS for sid in seen.secret_ids)
            row.reads_per_credential = Counter(per_secret.get(arn, 0) for arn in arns)
            by_arn = dict(zip(arns, names, strict=True))
            read_times: dict[str, list[float]] = {}
            for seen in first:
                if seen.action in SM_ACTIONS:
                    for sid in seen.secret_ids:
                        if sid in by_arn:
                            read_times.setdefault(by_arn[sid], []).append(seen.at)
            for name, (sent, took) in reads.by_name.items():
                times = read_times.get(name, [])
                if not any(at < sent for at in times):
                    row.waited.append(took)
                elif any(sent <= at <= sent + took for at in times):
                    row.rechecked.append(took)
                else:
                    row.cached.append(took)
            gsv_times = [seen.at for seen in first if seen.action in SM_ACTIONS]
            row.first_read_at = (min(gsv_times) - t0) if gsv_times else 0.0
            writes = kube_requests(env, "PATCH", status_path, t0, t_all)
            row.first_writes = len(writes)
            row.first_conflicts = sum(1 for seen in writes if seen.status == 409)
            row.first_events = len(kube_requests(env, "POST", events_path, t0, t_all))
            # As Prometheus would, every scrape interval: before the steady cycle, so the peak includes it.
            row.scrape_ms, row.scrape_kib, _ = scrape_metrics(metrics_port, n)

            # One steady refresh cycle: a window of one refreshInterval, starting once the jitter of the
            # first refreshes has passed. Every credential refreshes once per interval on average.
            w0 = t_all + env.interval * 0.1
            w1 = w0 + env.interval
            if not args.no_cycle:
                progress(f"N={n}: waiting {w1 + 1 - time.monotonic():.0f} s for one steady refresh cycle")
                time.sleep(max(0.0, w1 + 1.0 - time.monotonic()))  # +1 s: calls arrived by w1 are all recorded
                check_operator(operator, "the steady cycle")
                cycle = aws_calls(env, w0, w1)
                row.cycle_calls = Counter(str(seen.action) for seen in cycle)
                row.cycle_credentials = len({sid for seen in cycle for sid in seen.secret_ids})
                row.cycle_failing = sum(1 for verdict, count in row.verdicts.items() if verdict.startswith("False"))
                row.cycle_writes = len(kube_requests(env, "PATCH", status_path, w0, w1))
                row.cycle_events = len(kube_requests(env, "POST", events_path, w0, w1))
                row.cycle_window = w1 - w0
            row.rss_peak = proc_status(operator.pid, "VmHWM")
        finally:
            done.set()
            operator.stop()  # first: nothing below may leave it running
            ready.stop()
        row.all_events = len(kube_requests(env, "POST", events_path, 0.0, time.monotonic()))
        for line in operator.output.splitlines():
            level = re.search(r"\[(WARNING|ERROR|CRITICAL) *\]", line)
            if level:
                row.log_levels[level.group(1)] += 1
                if len(row.log_samples) < 3:
                    row.log_samples.append(line[:240])
        refused = [line for line in operator.output.splitlines() if FORBIDDEN.search(line)]
        if refused:
            raise BenchError(f"the API server refused the operator: {refused[:3]}")
        if ready.list_seconds:
            row.list_ms = statistics.median(ready.list_seconds) * 1000

        progress(
            f"N={n}: the bare floor ({math.ceil(n / 20)} BatchGetSecretValue + {n} status patches, "
            f"{args.threads} threads)"
        )
        row.floor, row.floor_cpu = run_floor(
            workdir, env.proxy.endpoint, env.kube_proxy.url, token, namespace, names, arns, args.threads, budget
        )
        row.floor_rate = n / row.floor
        progress(f"N={n}: floor {row.floor:.1f} s")
        if n <= args.stampede_max:
            import stampede

            row.stampede_floors = stampede.floors(
                sys.modules[__name__], env, workdir, token, namespace, names, arns, budget
            )
            for mode in ("64", "all"):
                progress(f"N={n}: the start-up stampede ({mode} connections)")
                row.stampedes.append(
                    stampede.measure(
                        sys.modules[__name__],
                        env,
                        namespace,
                        token,
                        workdir,
                        names,
                        time.monotonic() + budget,
                        mode=mode,
                    )
                )

    if not args.no_live:
        measure_live(env, row, arns, budget)
    row.total = time.monotonic() - began
    return row


def measure_live(env: Env, row: Row, arns: list[str], budget: float) -> None:
    """The operator runs (healthy, nothing declared), then N credentials are created at once."""
    n, args = row.n, env.args
    names = [f"c{i:05d}" for i in range(n)]
    with namespace_with_identity(env, f"{n}-live") as (namespace, token, workdir):
        operator = start_operator(env, namespace, token, workdir)
        socket_path = str(workdir / "c.sock")
        ready = Readiness(env.cluster.url, env.context, namespace)
        try:
            operator.start()
            wait_for(
                lambda: healthz_status(socket_path) == 200 or not operator.running, time.monotonic() + 60, "/healthz"
            )
            check_operator(operator, "start-up")
            ready.start()
            progress(f"N={n}: operator running in {namespace}; creating {n} ConnectorCredentials at once")
            t0 = time.monotonic()
            # The same secrets as before: what is read does not matter, only how many.
            create_objects(
                env.cluster.url,
                env.context,
                namespace,
                names,
                arns,
                {"refreshInterval": args.refresh_interval},
                args.threads,
            )
            row.live_creates = time.monotonic() - t0
            t_all = ready.wait_all(n, t0 + budget)
            check_operator(operator, "the created-while-running pass")
            row.live = t_all - t0
            row.live_calls = Counter(str(seen.action) for seen in aws_calls(env, t0, t_all))
            progress(f"N={n}: created in {row.live_creates:.1f} s, every verdict after {row.live:.1f} s")
        finally:
            operator.stop()
            ready.stop()


# --- output ------------------------------------------------------------------------------------------------


def fmt_calls(calls: Counter[str]) -> str:
    """Secrets Manager calls: BatchGetSecretValue + GetSecretValue."""
    return f"{calls.get('BatchGetSecretValue', 0)} + {calls.get('GetSecretValue', 0)}"


def fmt_reads(spread: Counter[int]) -> str:
    """How many credentials were read how many times, e.g. "1000 x1"."""
    return ", ".join(f"{count} x{reads}" for reads, count in sorted(spread.items()))


def fmt_sts(calls: Counter[str]) -> str:
    return " + ".join(f"{calls.get(action, 0)}" for action in STS_ACTIONS)


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    print(
        "| N | all verdicts, s from start / from /healthz | bare floor s | ratio (start / healthz) "
        "| SM calls 1st pass (Batch + Get) | reads per credential, 1st pass | STS 1st pass (AssumeRole + "
        "GetCallerIdentity) | SM calls per cycle (Batch + Get) / limit | status writes 1st pass / per cycle "
        "| RSS MiB idle / peak | on-demand read p50 / p99 ms (n) | created while running: all verdicts s "
        "| stampede, 64 connections / all at once: p50 / last s (x floor of a start / of its reads), "
        "SM calls / limit |"
    )
    print("|" + "---|" * 13)
    for row in rows:
        lat = row.reads.latencies
        reads = f"{ms(statistics.median(lat))} / {ms(percentile(lat, 0.99))} ({len(lat)})" if lat else "— (0)"
        if row.reads.failures:
            reads += f", {sum(row.reads.failures.values())} failed"
        limit = math.ceil(row.n / 20) + row.cycle_failing
        cycle = f"{fmt_calls(row.cycle_calls)} / {limit}" if not args.no_cycle else "—"
        writes = f"{row.first_writes} / {row.cycle_writes if not args.no_cycle else '—'}"
        live = "—" if row.live is None else f"{row.live:.1f} (creates {row.live_creates:.1f})"
        print(
            f"| {row.n:,} | {row.from_start:.1f} / {row.from_healthz:.1f} | {row.floor:.1f} "
            f"| {row.from_start / row.floor:.1f}x / {row.from_healthz / row.floor:.1f}x "
            f"| {fmt_calls(row.first_calls)} | {fmt_reads(row.reads_per_credential)} | {fmt_sts(row.first_calls)} "
            f"| {cycle} | {writes} "
            f"| {row.rss_idle:.0f} / {row.rss_peak:.0f} | {reads} | {live} "
            f"| {' / '.join(st.cell(row.n, row.stampede_floors) for st in row.stampedes) or '—'} |"
        )


def print_details(rows: list[Row], args: argparse.Namespace) -> None:
    print()
    for row in rows:
        print(f"N={row.n:,}: set-up {row.setup:.0f} s, whole size {row.total:.0f} s")
        print(f"  verdicts: {dict(row.verdicts)}; /healthz 200 after {row.healthz_after:.1f} s")
        print(f"  first pass, all AWS calls: {dict(row.first_calls)}")
        print(
            f"  status writes in the first pass: {row.first_writes} ({row.first_conflicts} answered 409); "
            f"events posted: {row.first_events} in the first pass, {row.all_events} while the operator ran"
        )
        pass_seconds = row.from_start - row.first_read_at
        print(
            f"  first AWS read {row.first_read_at:.1f} s after the start; first pass from it: {pass_seconds:.1f} s "
            f"= {row.n / max(pass_seconds, 1e-9):.0f} verdicts/s (bare floor: {row.floor_rate:.0f}/s)"
        )
        print(
            f"  CPU from the socket answering to the last verdict: operator {row.cpu:.1f} s "
            f"({row.cpu / row.n * 1000:.1f} ms per credential, {row.cpu / row.pass_wall:.2f} cores; "
            f"{row.log_lines} log lines by then); bare floor {row.floor_cpu:.1f} s "
            f"({row.floor_cpu / row.n * 1000:.1f} ms per credential)"
        )
        kinds = (
            ("not read from AWS yet (waited for the first check)", row.waited),
            ("already checked, read again while pending (a refresh due then)", row.rechecked),
            ("already checked, answered from memory (a re-read, if any, came later)", row.cached),
        )
        for label, values in kinds:
            if values:
                print(
                    f"  on-demand reads, {label}: {len(values)}, p50 {ms(statistics.median(values))} ms, "
                    f"p99 {ms(percentile(values, 0.99))} ms, max {ms(max(values))} ms"
                )
        if not args.no_cycle:
            print(
                f"  steady cycle ({row.cycle_window:.0f} s window): {dict(row.cycle_calls)}, "
                f"{row.cycle_credentials} distinct credentials read, {row.cycle_writes} status writes, "
                f"{row.cycle_events} events"
            )
        if row.reads.failures:
            print(f"  on-demand reads that failed: {dict(row.reads.failures)}")
        print(f"  operator log, warnings and errors: {dict(row.log_levels) or 'none'}")
        for line in row.log_samples:
            print(f"    {line}")
        if row.live is not None:
            print(f"  created while running: AWS calls {dict(row.live_calls)}")
        print(f"  readiness listing (Table, no objects): median {row.list_ms:.0f} ms")
        print(f"  /metrics scrape after the first pass: median {row.scrape_ms:.0f} ms, {row.scrape_kib:.0f} KiB")
        for st in row.stampedes:
            print(
                f"  stampede ({st.mode} connections, AWS +50 ms a call): answers {dict(st.statuses)}, "
                f"SM calls {dict(st.calls)}, last answer {st.last:.2f} s after /healthz "
                f"(floors, AWS +50 ms: a start's I/O {row.stampede_floors[0]:.2f} s, its reads alone "
                f"{row.stampede_floors[1]:.2f} s)"
            )


def environment() -> str:
    from importlib.metadata import version

    versions = ", ".join(f"{name} {version(name)}" for name in ("kopf", "boto3", "aiohttp", "moto"))
    return (
        f"{os.cpu_count()} CPUs, Python {platform.python_version()} ({platform.machine()}), {versions}, "
        f"{platform.system()} {platform.release()}"
    )


# --- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="comma-separated N (default 100,1000)")
    parser.add_argument("--big", action="store_true", help="add N = 10,000 (several minutes)")
    parser.add_argument("--refresh-interval", default="30s", help="spec.refreshInterval of every credential")
    parser.add_argument("--threads", type=int, default=8, help="threads of the bare floor and of the set-up")
    parser.add_argument("--readers", type=int, default=4, help="threads reading on demand during the first pass")
    parser.add_argument("--no-cycle", action="store_true", help="skip the steady refresh cycle")
    parser.add_argument("--no-live", action="store_true", help="skip the created-while-running scenario")
    parser.add_argument(
        "--stampede-max", type=int, default=1000, help="the start-up stampede for N up to this (0: never)"
    )
    parser.add_argument("--moto-as-is", action="store_true", help="keep moto's linear secret lookup")
    parser.add_argument("--deadline-base", type=float, default=60.0, help="seconds every phase may take, plus")
    parser.add_argument("--deadline-per-credential", type=float, default=0.1, help="seconds per credential")
    args = parser.parse_args(argv)
    sizes = [int(size.replace("_", "").replace(",", "")) for size in args.sizes.split(",") if size.strip()]
    if args.big and 10000 not in sizes:
        sizes.append(10000)
    if not sizes or min(sizes) < 1:
        parser.error("--sizes needs positive integers")
    args.size_list = sizes
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_floor"]:
        floor_main(argv[1])
        return 0
    args = parse_args(argv)
    from tests.support.awsemu import AwsEmulator
    from tests.support.awsproxy import FaultProxy
    from tests.support.controlplane import ControlPlane
    from tests.support.kube import Cluster
    from tests.support.kubeproxy import KubeFaultProxy

    from connector_credentials.api.models import parse_duration

    interval = parse_duration(args.refresh_interval)
    # SIGTERM (make, timeout) unwinds like Ctrl-C: every finally runs and every process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.moto_as_is:
        index_moto_lookups()
    started = time.monotonic()
    rows: list[Row] = []
    try:
        with contextlib.ExitStack() as stack:
            plane = stack.enter_context(ControlPlane())
            aws = stack.enter_context(AwsEmulator())
            proxy = stack.enter_context(FaultProxy(aws.endpoint))
            cluster = Cluster(plane)
            cluster.apply_crds()
            kube_proxy = stack.enter_context(KubeFaultProxy(plane.url, plane.ssl_context()))
            env = Env(plane, cluster, aws, proxy, kube_proxy, plane.ssl_context(), args, interval)
            for n in args.size_list:
                rows.append(measure(env, n))
    except Exception as exc:  # whatever failed (a process that did not start, a deadline): exit 1, all stopped
        print(f"scale benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("connector-credentials scale benchmark: N credentials already declared when the operator starts")
    print(f"env: {environment()}")
    print(
        f"refreshInterval {args.refresh_interval}, on-demand readers {args.readers}, bare floor on {args.threads} "
        "threads; operator at production logging; 127.0.0.1 only (kube-apiserver + etcd, moto, both proxies)"
    )
    print("note: one run on a shared machine: read ratios and counts, not the last digit.\n")
    print_table(rows, args)
    print_details(rows, args)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
