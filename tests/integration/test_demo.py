"""`make demo` (``python -m tests.support.demo``) as a newcomer runs it: exit 0, sensible output, no values;
and with ``--keep``, the README's kubectl commands behave as on a real cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.demo import SECRETS
from tests.support.runner import console_script

ROOT = Path(__file__).parents[2]
KUBECTL = shutil.which("kubectl") or "kubectl"
EXPECTED = {
    "slack": ("True", "AccessVerified"),
    "jira": ("True", "AccessVerified"),
    "github": ("True", "AccessVerified"),
    "denied": ("False", "AccessDenied"),
    "missing": ("False", "SecretNotFound"),
}
MASKED = re.compile(r"value:\s+\*{8} \(\d+ chars(, masked|; --show prints it)\)")


def secret_values() -> list[str]:
    """Every value the demo stores, and the fields of the JSON ones."""
    found: list[str] = []
    for versions in SECRETS.values():
        for value in versions:
            found.append(value)
            try:
                document = json.loads(value)
            except ValueError:
                continue
            found += [field for field in document.values() if isinstance(field, str)]
    return found


def assert_no_values(text: str, where: str) -> None:
    for value in secret_values():
        assert value not in text, f"a sample secret value appears in {where}"


def workdir_of(output: str) -> Path:
    match = re.search(r"log (/\S+/operator\.log)", output)
    assert match, output
    return Path(match.group(1)).parent


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.support.demo", *args]


def test_demo_shows_every_sample_and_a_masked_read() -> None:
    started = time.monotonic()
    result = subprocess.run(
        demo_command(),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    workdir = workdir_of(output)
    try:
        for name, (ready, reason) in EXPECTED.items():
            assert re.search(rf"^\s*{name}\s+{ready}\s+{reason}\s", output, re.MULTILINE), output
        assert "Kubernetes: local kube-apiserver" in output
        assert "AWS emulator" in output
        assert "Operator started" in output
        assert "xpander/slack" in output
        assert MASKED.search(output), output
        assert "Try:" in output
        # The operator's own /metrics, scraped by the demo: the samples' verdicts, counted.
        assert re.search(
            r"ccred_credentials: 1 AccessDenied, 3 AccessVerified, 1 SecretNotFound; "
            r"ccred_aws_requests_total: .*\d+ GetCallerIdentity",
            output,
        ), output
        assert_no_values(output, "the demo's output")
        log = (workdir / "operator.log").read_text(encoding="utf-8")
        assert "Serving credentials on" in log
        assert_no_values(log, "the operator's log")
        # Only the log is left behind: no socket, token, kubeconfig; no process.
        assert [path.name for path in workdir.iterdir()] == ["operator.log"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert time.monotonic() - started < 60


class Lines:
    """A child's stdout collected by a thread, so that waiting for a line can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.text = ""
        self._grew = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._grew:
                self.text += line
                self._grew.notify_all()

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._grew:
            while needle not in self.text:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    pytest.fail(f"{needle!r} not in the demo's output:\n{self.text}")
                self._grew.wait(min(remaining, 0.2))
            return self.text

    def join(self) -> str:
        self._thread.join(10)
        return self.text


def test_demo_keep_serves_until_interrupted() -> None:
    proc = subprocess.Popen(
        demo_command("--keep"),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = Lines(proc)
    workdir: Path | None = None
    try:
        output = lines.wait_for("Running until Ctrl-C", timeout=60)
        workdir = workdir_of(output)
        kubeconfig = re.search(r"export KUBECONFIG=(\S+)", output)
        socket_path = re.search(r"get xpander/slack --socket-path (\S+)", output)
        pid = re.search(r"\(pid (\d+),", output)
        assert kubeconfig and socket_path and pid, output
        assert Path(kubeconfig.group(1)).is_file()
        cli = subprocess.run(
            [console_script(), "get", "xpander/github", "--socket-path", socket_path.group(1)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "CCRED_SOCKET_PATH": ""},
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert MASKED.search(cli.stdout), cli.stdout
        assert_no_values(cli.stdout + cli.stderr, "`connector-credentials get`")
        assert f"socket: {socket_path.group(1)}" in output
        readme_commands_behave(Path(kubeconfig.group(1)))

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        output = lines.join()
        assert_no_values(output, "the demo's output")
        assert not Path(socket_path.group(1)).exists()
        assert not Path(kubeconfig.group(1)).exists()
        assert not Path(f"/proc/{pid.group(1)}").exists() or "connector-credentials" not in Path(
            f"/proc/{pid.group(1)}/cmdline"
        ).read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def readme_commands_behave(kubeconfig: Path) -> None:
    """What the README tells a newcomer to try in the demo's cluster, checked against what it means."""

    def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [KUBECTL, f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, timeout=60, check=False
        )
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    applied = kubectl("apply", "-f", str(ROOT / "deploy" / "samples") + "/").stdout
    assert applied.count("connectorcredential.connectors.xpander.ai/") == len(EXPECTED), applied
    listed = kubectl("get", "ccred", "-n", "xpander").stdout
    assert listed.splitlines()[0].split()[:4] == ["NAME", "READY", "REASON", "AGE"], listed
    for name, (ready, reason) in EXPECTED.items():
        assert re.search(rf"^{name}\s+{ready}\s+{reason}\s", listed, re.MULTILINE), listed
    described = kubectl("describe", "ccred", "-n", "xpander", "denied").stdout
    events = described[described.index("Events:") :]
    assert "AccessDenied" in events
    assert "AccessVerified" not in events, "describe shows the Events of other objects"
    explained = kubectl("explain", "connectorcredential.spec").stdout
    assert "secretArn" in explained and "refreshInterval" in explained, explained
    dry = kubectl("delete", "ccred", "-n", "xpander", "--all", "--dry-run=server").stdout
    assert "(server dry run)" in dry, dry
    assert len(kubectl("get", "ccred", "-n", "xpander", "-o", "name").stdout.split()) == len(EXPECTED)
    kubectl("wait", "--for=condition=Ready", "ccred/slack", "-n", "xpander", "--timeout=5s")
    refused = kubectl("wait", "--for=condition=Ready", "ccred/denied", "-n", "xpander", "--timeout=1s", check=False)
    assert refused.returncode != 0, refused.stdout
