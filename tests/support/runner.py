"""Run the operator's console script as a subprocess, the way a user (or a pod) runs it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Self, TypeVar

from tests.support.lifecycle import Service

T = TypeVar("T")

CONSOLE_SCRIPT = "connector-credentials"
# Variables a subprocess may inherit from the test run; everything else is left out on purpose.
_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "SYSTEMROOT")
_PASSTHROUGH_PREFIXES = ("COVERAGE_", "PYTHONFAULTHANDLER")


def console_script(name: str = CONSOLE_SCRIPT) -> str:
    """The installed console script next to this interpreter (falls back to PATH)."""
    here = Path(sys.executable).parent
    found = shutil.which(name, path=str(here)) or shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"console script {name!r} is not installed next to {sys.executable}")
    return found


def hermetic_env(home: str | Path, **extra: str) -> dict[str, str]:
    """A minimal env: no AWS keys, no proxies, no kubeconfig from the developer's machine.

    ``home`` becomes HOME, so ``~/.aws`` and ``~/.kube`` are empty directories of the test.
    """
    env = {key: os.environ[key] for key in _PASSTHROUGH if key in os.environ}
    env.update({key: value for key, value in os.environ.items() if key.startswith(_PASSTHROUGH_PREFIXES)})
    Path(home).mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, message: str = "condition not met"
) -> T:
    """Poll ``predicate`` until it returns something truthy; return it, or fail with the last value."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    last_error: BaseException | None = None
    while True:
        try:
            last = predicate()
            last_error = None
            if last:
                return last
        except AssertionError as exc:  # predicates may assert; keep polling
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f"last error: {last_error}" if last_error is not None else f"last value: {last!r}"
            raise AssertionError(f"{message} (after {timeout:.1f}s; {detail})")
        time.sleep(interval)


class OperatorProcess(Service):
    """The operator as a subprocess: output goes to ``log_path`` and to ``output`` (in memory).

    By default it runs ``connector-credentials run --verbose -n NAMESPACE`` with a hermetic env
    built from ``kubeconfig``, ``aws_env`` (e.g. ``irsa_env(...)``), ``socket_path`` and ``extra_env``.
    Pass ``command`` to run anything else (the smoke tests use a stand-in).
    """

    def __init__(
        self,
        *,
        namespace: str = "default",
        kubeconfig: str | Path | None = None,
        aws_env: Mapping[str, str] | None = None,
        socket_path: str | Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | Path | None = None,
        home: str | Path | None = None,
        command: Sequence[str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.namespace = namespace
        self.command = (
            list(command)
            if command is not None
            else [console_script(), "run", "--verbose", "-n", namespace, *extra_args]
        )
        self.log_path = Path(log_path) if log_path is not None else None
        self._own_home: str | None = None
        if home is None and self.log_path is not None:
            home = self.log_path.parent / "home"
        elif home is None:
            home = self._own_home = tempfile.mkdtemp(prefix="ccred-home-")
        env = hermetic_env(home)
        # No /metrics unless a test asks for it (extra_env): the default :8080 would clash between
        # operators running side by side, and with a --liveness on 8080.
        env["CCRED_METRICS_BIND_ADDRESS"] = "0"
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        if socket_path is not None:
            env["CCRED_SOCKET_PATH"] = str(socket_path)
        env.update(aws_env or {})
        env.update(extra_env or {})
        self.env = env
        self.cwd = Path(cwd) if cwd is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        self._grew = threading.Condition(self._lock)
        self._log_file: IO[str] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("the process is already started")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.log_path.open("w", encoding="utf-8")
        self._proc = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a signal to the test run does not hit the operator twice
        )
        self._reader = threading.Thread(target=self._read, name="operator-output", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stream = self._proc.stdout
        for raw in iter(stream.readline, b""):
            text = raw.decode("utf-8", "replace")
            with self._grew:
                self._chunks.append(text)
                if self._log_file is not None:
                    self._log_file.write(text)
                    self._log_file.flush()
                self._grew.notify_all()
        stream.close()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; return the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        with self._lock:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        if self._own_home is not None:
            shutil.rmtree(self._own_home, ignore_errors=True)
            self._own_home = None
        return proc.returncode

    # -- observation -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def output(self) -> str:
        """Everything the process printed so far (stdout and stderr interleaved)."""
        with self._lock:
            return "".join(self._chunks)

    def send_signal(self, sig: int) -> None:
        if self._proc is not None:
            self._proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit by itself; return its exit code."""
        if self._proc is None:
            raise RuntimeError("the process is not started")
        code = self._proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return code

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0, *, since: int = 0) -> str:
        """Wait for a substring (str) or regex match in the output after offset ``since``; return the line.

        Fails early if the process exits without printing it.
        """
        deadline = time.monotonic() + timeout
        with self._grew:
            while True:
                text = "".join(self._chunks)[since:]
                line = _find(pattern, text)
                if line is not None:
                    return line
                exited = self._proc is not None and self._proc.poll() is not None
                reader_done = self._reader is None or not self._reader.is_alive()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (exited and reader_done):
                    state = f"exited with {self._proc.returncode}" if exited and self._proc else "still running"
                    tail = text[-3000:]
                    raise AssertionError(
                        f"{pattern!r} not in the output within {timeout:.1f}s (process {state}); output tail:\n{tail}"
                    )
                self._grew.wait(min(remaining, 0.1))


def _find(pattern: str | re.Pattern[str], text: str) -> str | None:
    if isinstance(pattern, re.Pattern):
        match = pattern.search(text)
        if match is None:
            return None
        start, end = match.start(), match.end()
    else:
        start = text.find(pattern)
        if start < 0:
            return None
        end = start + len(pattern)
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    return text[line_start : None if line_end < 0 else line_end]
