"""``make demo``: the real operator against a real Kubernetes API server and local AWS (moto).

Starts a local control plane (etcd + kube-apiserver built from pinned Go modules, see
tests/controlplane/; or uses an existing cluster given with ``--kubeconfig``), applies the CRD,
the operator's ServiceAccount and the RBAC that deploy/ ships, and starts moto (Secrets Manager
and STS) holding a few made-up secrets, with a fault proxy in front to play IAM (moto does not
enforce per-secret policies). The operator runs as ``connector-credentials run`` with a
TokenRequest token of its ServiceAccount and the environment an EKS pod with IRSA gets (token
file, AWS_ROLE_ARN, AWS_ENDPOINT_URL). deploy/samples/ is applied and the demo shows what came
of it. With the local control plane, nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import signal
import socket
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from connector_credentials.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION, SecretArn
from connector_credentials.client import CredentialClient, CredentialError
from tests.support.awsemu import AwsEmulator, irsa_env
from tests.support.awsproxy import FaultProxy
from tests.support.controlplane import ControlPlane, ControlPlaneUnavailable
from tests.support.kube import SERVICE_ACCOUNT, Cluster, KubeApiError, existing_cluster
from tests.support.runner import OperatorProcess, console_script

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "deploy" / "samples"
CRD = ROOT / "crds" / "connectorcredentials.yaml"
RESOURCE = f"{GROUP}/{VERSION}/{PLURAL}"

#: The placeholder account of the samples; moto serves it (MOTO_ACCOUNT_ID) so their ARNs apply as written.
ACCOUNT = "111122223333"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/xpander-controller"
#: What the role's IAM policy allows (deploy/iam: xpander/<env>/*); the proxy denies the rest.
ALLOWED_PREFIX = "xpander/"
DENIED_MESSAGE = (
    f"User: arn:aws:sts::{ACCOUNT}:assumed-role/xpander-controller/xpander-controller-test is not authorized "
    "to perform: secretsmanager:{action} on resource: {secret_id} because no identity-based policy allows "
    "the secretsmanager:{action} action"
)

#: Made-up values the AWS emulator holds, by secret name; oldest version first, the last one is AWSCURRENT.
#: They are never printed (only masked): the demo's test checks that none shows up in its output.
SECRETS: dict[str, tuple[str, ...]] = {
    "xpander/prod/slack-bot-token": ("xoxb-demo-5f1c9a7e-slack-bot-token-not-real",),
    "xpander/prod/jira": ('{"api_token": "jira-demo-7d2e4b1a-token-not-real", "email": "connector-bot@example.com"}',),
    "xpander/prod/github-token": ("ghp_demoPrevious3c8b0d6fTokenNotReal", "ghp_demoCurrent9a4e2f7bTokenNotReal"),
    "other-team/prod/billing-api-key": ("billing-demo-1e6f3a9c-key-not-real",),
}

READ_BACK = "slack"  # the credential read through the socket at the end
MESSAGE_WIDTH = 90
LOG_TAIL_LINES = 25
STARTUP_TIMEOUT = 30.0  # seconds for the operator to serve on its socket


class DemoError(Exception):
    """Something went wrong; the message says what (and the operator's log tail follows)."""


@dataclass
class Sample:
    """One ConnectorCredential from deploy/samples/ and what the demo arranged for it."""

    name: str
    body: dict[str, Any]
    expected: str = ""
    mapped: bool = False

    @property
    def arn(self) -> str:
        return str(self.body["spec"]["secretArn"])


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"  * {text}")


# --------------------------------------------------------------------------- samples


def load_samples(directory: Path = SAMPLES) -> tuple[str, list[Sample]]:
    """The namespace and the ConnectorCredentials of the manifests in ``directory``."""
    samples: list[Sample] = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") == KIND:
                samples.append(Sample(name=str(doc["metadata"]["name"]), body=copy.deepcopy(doc)))
    if not samples:
        raise DemoError(f"no {KIND} in {directory}")
    namespaces = {str(sample.body["metadata"].get("namespace") or "default") for sample in samples}
    if len(namespaces) != 1:
        raise DemoError(f"the samples in {directory} name more than one namespace: {sorted(namespaces)}")
    return namespaces.pop(), samples


def split_suffix(secret_name: str) -> tuple[str, str | None]:
    """``xpander/prod/jira-GhIjKl`` -> (``xpander/prod/jira``, ``GhIjKl``): AWS appends 6 characters."""
    base, dash, suffix = secret_name.rpartition("-")
    if dash and len(suffix) == 6 and suffix.isalnum():
        return base, suffix
    return secret_name, None


def arrange_secrets(aws: AwsEmulator, proxy: FaultProxy, samples: list[Sample]) -> tuple[int, int]:
    """Create the secrets the samples name (with their ARNs where moto allows), deny what IAM would.

    Sets each sample's expected reason; rewrites ``spec.secretArn`` (in memory) where the
    emulator's ARN differs from the sample's. Returns (secrets created, versions stored).
    """
    created: dict[str, str] = {}  # secret name -> the emulator's ARN
    versions = 0
    for sample in samples:
        arn = SecretArn.parse(sample.arn)
        base, suffix = split_suffix(arn.name)
        values = SECRETS.get(base)
        if values is None:  # nothing by that name: the sample is about a missing secret
            sample.expected = "SecretNotFound"
            if arn.account != ACCOUNT:
                sample.body["spec"]["secretArn"] = sample.arn.replace(f":{arn.account}:", f":{ACCOUNT}:", 1)
                sample.mapped = True
            continue
        if base not in created:
            # moto takes a resource's ID from the "_custom_id_" tag: the ARN ends in the sample's suffix.
            tags = {"_custom_id_": suffix} if suffix else None
            real = aws.create_secret(base, string=values[0], region=arn.region, tags=tags)
            for later in values[1:]:
                aws.put_value(real, string=later)
            created[base] = real
            versions += len(values)
            if not base.startswith(ALLOWED_PREFIX):
                proxy.add_rule("GetSecretValue", f":secret:{base}-", message=DENIED_MESSAGE)
        sample.expected = "AccessVerified" if base.startswith(ALLOWED_PREFIX) else "AccessDenied"
        if created[base] != sample.arn:
            sample.body["spec"]["secretArn"] = created[base]
            sample.mapped = True
    return len(created), versions


# --------------------------------------------------------------------------- status


def ready_condition(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == "Ready":
            return condition
    return {}


def current_conditions(kube: Cluster, namespace: str, samples: list[Sample]) -> dict[str, dict[str, Any]]:
    return {sample.name: ready_condition(kube.get(RESOURCE, namespace, sample.name)) for sample in samples}


def wait_for_reasons(
    kube: Cluster, operator: OperatorProcess, namespace: str, samples: list[Sample], timeout: float
) -> dict[str, dict[str, Any]]:
    """Poll until every sample shows its expected reason; raise :class:`DemoError` if not in time."""
    deadline = time.monotonic() + timeout
    while True:
        conditions = current_conditions(kube, namespace, samples)
        late = [s.name for s in samples if conditions[s.name].get("reason") != s.expected]
        if not late:
            return conditions
        if not operator.running:
            say("\nWhere they are:")
            print_table(samples, conditions)
            raise DemoError(f"the operator exited with code {operator.returncode}")
        if time.monotonic() >= deadline:
            say("\nWhere they are:")
            print_table(samples, conditions)
            raise DemoError(
                f"after {timeout:g}s these have not reached their expected reason: {', '.join(late)} "
                f"(expected: {', '.join(f'{s.name}={s.expected}' for s in samples if s.name in late)})"
            )
        time.sleep(0.1)


def shorten(text: str, width: int = MESSAGE_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def print_table(samples: list[Sample], conditions: Mapping[str, Mapping[str, Any]]) -> None:
    rows = [("NAME", "READY", "REASON", "MESSAGE")]
    for sample in samples:
        condition = conditions.get(sample.name) or {}
        rows.append(
            (
                sample.name,
                str(condition.get("status", "")),
                str(condition.get("reason", "<none>")),
                shorten(str(condition.get("message", ""))),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        say("  " + "   ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[3]]))


def print_failures(samples: list[Sample], conditions: Mapping[str, Mapping[str, Any]]) -> None:
    """The full message of each credential that is not ready: they say what to fix."""
    for sample in samples:
        condition = conditions.get(sample.name) or {}
        if condition.get("status") == "True" or not condition.get("message"):
            continue
        say()
        say(f"  {sample.name}: {condition.get('reason')}")
        for line in textwrap.wrap(str(condition["message"]), width=100, break_on_hyphens=False):
            say(f"      {line}")


def mask(value: str) -> str:
    # Only the length, like `connector-credentials get` without --show.
    return f"******** ({len(value)} chars, masked)"


def read_back(socket_path: str, namespace: str, name: str) -> None:
    with CredentialClient(socket_path, timeout=10) as client:
        try:
            credential = client.get(namespace, name)
        except CredentialError as exc:
            raise DemoError(f"reading {namespace}/{name} through the socket failed: {exc}") from None
    say(f"  {namespace}/{name}")
    say(f"    arn:        {credential.arn}")
    say(f"    versionId:  {credential.version_id}")
    say(f"    value:      {mask(credential.value)}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.demo",
        description="Run the operator against a local kube-apiserver (or --kubeconfig's cluster) and moto.",
        epilog="Through make: make demo ARGS='--keep --timeout 60', or make demo KUBECONFIG=~/.kube/config",
    )
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        default=None,
        metavar="FILE",
        help="use this existing cluster (e.g. kind) instead of starting a local control plane; "
        "needs admin rights there (it applies the CRD, a namespace, a ServiceAccount and RBAC)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep everything running (until Ctrl-C) to explore with kubectl and connector-credentials",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for every sample to reach its expected reason (default: 30)",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def moto_account(account: str) -> Iterator[None]:
    """moto answers for this account (it reads MOTO_ACCOUNT_ID on every request, in this process)."""
    saved = os.environ.get("MOTO_ACCOUNT_ID")
    os.environ["MOTO_ACCOUNT_ID"] = account
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MOTO_ACCOUNT_ID", None)
        else:
            os.environ["MOTO_ACCOUNT_ID"] = saved


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def log_tail(operator: OperatorProcess | None) -> None:
    if operator is None:
        return
    lines = operator.output.splitlines()[-LOG_TAIL_LINES:]
    if lines:
        say(f"\nLast {len(lines)} lines of the operator's log ({operator.log_path}):")
        for line in lines:
            say(f"  | {line}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and `kill` both stop and clean up (even if started where SIGINT is ignored, e.g. with `&`).
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="ccred-demo-", dir="/tmp"))  # short: Unix socket paths are limited
    log_path = workdir / "operator.log"
    operators: list[OperatorProcess] = []
    started = time.monotonic()
    stack = contextlib.ExitStack()
    try:
        try:
            operator = run(args, stack, workdir, log_path, operators)
        except DemoError as exc:
            say(f"\nDemo failed: {exc}")
            log_tail(operators[0] if operators else None)
            return 1
        if not args.keep:
            say(f"\nDone in {time.monotonic() - started:.1f}s. Operator log: {log_path}")
            return 0
        say("\nRunning until Ctrl-C ...")
        try:
            while operator.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            say("\nStopping ...")
            return 0
        say(f"\nThe operator exited with code {operator.returncode}.")
        log_tail(operator)
        return 1
    except KeyboardInterrupt:
        say("\nInterrupted; stopping ...")
        return 130
    finally:
        # No second interruption half-way through the cleanup.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stack.close()
        finally:
            # The log stays for reading afterwards; the token, kubeconfig and socket go.
            for path in workdir.iterdir():
                if path == log_path:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            for sig, handler in saved_handlers.items():
                signal.signal(sig, handler)


def start_kubernetes(args: argparse.Namespace, stack: contextlib.ExitStack, workdir: Path, namespace: str) -> Cluster:
    """A local control plane (or the cluster of --kubeconfig) with the CRD, the namespace and the RBAC."""
    if args.kubeconfig is not None:
        kube = existing_cluster(args.kubeconfig.expanduser())
        where = f"the cluster of {args.kubeconfig} ({kube.url})"
    else:
        plane = ControlPlane(workdir=workdir / "controlplane")
        try:
            stack.enter_context(plane)
        except ControlPlaneUnavailable as exc:
            raise DemoError(
                f"{exc}\n  The demo needs Go (>= 1.25) to build kube-apiserver and etcd once, or an existing "
                "cluster: make demo KUBECONFIG=~/.kube/config (kind works)."
            ) from None
        kube = Cluster(plane)
        where = f"local kube-apiserver {kube.url} (ready in {plane.started_in:.1f}s, etcd, RBAC enforced)"
    kube.apply_crds()
    try:
        kube.create_namespace(namespace)
    except KubeApiError as exc:
        if exc.status != 409:
            raise
    kube.install_operator_identity(namespace)
    step(f"Kubernetes: {where}; CRD {PLURAL}.{GROUP} applied")
    step(f"Namespace {namespace}: ServiceAccount {SERVICE_ACCOUNT} with the Role and RoleBinding from deploy/")
    return kube


def run(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    workdir: Path,
    log_path: Path,
    operators: list[OperatorProcess],
) -> OperatorProcess:
    """Start everything (registering its cleanup on ``stack``), check the outcome; return the operator."""
    namespace, samples = load_samples()
    say("connector-credentials demo: the operator against a real API server and a local AWS stand-in\n")

    kube = start_kubernetes(args, stack, workdir, namespace)
    kubeconfig = workdir / "operator.kubeconfig"
    kube.write_kubeconfig(kubeconfig, token=kube.service_account_token(namespace), namespace=namespace)

    stack.enter_context(moto_account(ACCOUNT))
    aws = stack.enter_context(AwsEmulator())
    proxy = stack.enter_context(FaultProxy(aws.endpoint))
    count, versions = arrange_secrets(aws, proxy, samples)
    step(f"AWS emulator (moto) on {aws.endpoint}, account {ACCOUNT}: {count} secrets, {versions} versions")
    denied = sorted({s.arn.split(":secret:", 1)[1] for s in samples if s.expected == "AccessDenied"})
    step(
        f"IAM stand-in on {proxy.endpoint}: the role may read {ALLOWED_PREFIX}* only"
        + (f" (AccessDenied for {', '.join(denied)})" if denied else "")
    )

    aws_env = irsa_env(workdir, proxy.endpoint, role_arn=ROLE_ARN)
    step(
        f"IRSA for the operator: AWS_ROLE_ARN={ROLE_ARN}, AWS_WEB_IDENTITY_TOKEN_FILE (a projected token), "
        f"AWS_ENDPOINT_URL={proxy.endpoint} - no static keys"
    )

    for sample in samples:
        kube.apply(RESOURCE, namespace, {"apiVersion": API_VERSION, "kind": KIND, **sample.body}, manager="ccred-demo")
    mapped = [s.name for s in samples if s.mapped]
    arns = f"ARNs mapped to the emulator's for {', '.join(mapped)}" if mapped else "ARNs as written"
    step(f"Applied {len(samples)} ConnectorCredentials from deploy/samples/ to namespace {namespace} ({arns})")

    socket_path = str(workdir / "credentials.sock")
    metrics = f"127.0.0.1:{free_port()}"  # loopback only: the demo shares the machine
    operator = OperatorProcess(
        namespace=namespace,
        kubeconfig=kubeconfig,
        aws_env=aws_env,
        socket_path=socket_path,
        log_path=log_path,
        home=workdir / "home",
        # Stop at once when the demo ends: no controller beside it needs the shutdown drain.
        extra_env={"CCRED_SHUTDOWN_DRAIN": "0", "CCRED_METRICS_BIND_ADDRESS": metrics},
    )
    operators.append(operator)
    stack.callback(operator.stop)
    operator.start()
    try:
        operator.wait_for_log("Serving credentials on", timeout=STARTUP_TIMEOUT)
    except AssertionError:
        raise DemoError("the operator did not start serving on its socket") from None
    step(f"Operator started: connector-credentials run -n {namespace} (pid {operator.pid}, log {log_path})")

    began = time.monotonic()
    conditions = wait_for_reasons(kube, operator, namespace, samples, args.timeout)
    step(f"All {len(samples)} reached their expected Ready reason in {time.monotonic() - began:.1f}s")

    say(f"\n$ kubectl get ccred -n {namespace} -o wide   (the Ready condition; messages cut at {MESSAGE_WIDTH})")
    print_table(samples, conditions)
    print_failures(samples, conditions)

    say("\nRead through the socket with the client library (CredentialClient(socket).get):")
    read_back(socket_path, namespace, READ_BACK)

    say(f"\n$ curl http://{metrics}/metrics   (Prometheus; names, reasons and counts, never a value)")
    say(f"  {metrics_summary(metrics)}")

    cli = console_script()
    if args.keep:
        kubectl = "" if shutil.which("kubectl") else "   (kubectl is not installed here)"
        say("\nExplore it (in another terminal):")
        say(f"  export KUBECONFIG={kube.admin_kubeconfig}")
        say(f"  kubectl get ccred -n {namespace} -o wide{kubectl}")
        say(f"  kubectl describe ccred -n {namespace} denied")
        say("  kubectl apply -f deploy/samples/")
        say("  kubectl explain connectorcredential.spec")
        say(f"  kubectl delete ccred -n {namespace} --all --dry-run=server")
        say(f"  socket: {socket_path}")
        say(f"  {cli} get {namespace}/{READ_BACK} --socket-path {socket_path}")
        say(f"  {cli} list --socket-path {socket_path}")
        say(f"  curl -s http://{metrics}/metrics | grep ^ccred_")
        say(f"  tail -f {log_path}")
    else:
        say("\nTry: make demo ARGS=--keep   (keeps it running; then kubectl get ccred and connector-credentials get)")
    return operator


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics_summary(address: str) -> str:
    """One line from a scrape: credentials by reason, and the AWS calls made so far."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
            text = response.read().decode("utf-8")
    except OSError as exc:
        raise DemoError(f"/metrics on {address} did not answer ({exc})") from None
    reasons: dict[str, int] = {}
    calls: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ccred_credentials" and sample.value:
                reasons[sample.labels["reason"]] = reasons.get(sample.labels["reason"], 0) + int(sample.value)
            elif sample.name == "ccred_aws_requests_total" and sample.value:
                operation = sample.labels["operation"]
                calls[operation] = calls.get(operation, 0) + int(sample.value)
    by_reason = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
    by_call = ", ".join(f"{count} {operation}" for operation, count in sorted(calls.items()))
    return f"ccred_credentials: {by_reason}; ccred_aws_requests_total: {by_call}"


if __name__ == "__main__":
    import sys

    sys.exit(main())
