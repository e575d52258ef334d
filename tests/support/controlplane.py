"""A real, local Kubernetes control plane: etcd and kube-apiserver on 127.0.0.1.

The binaries come from ``tests/controlplane/build.sh`` (pinned Go modules, built once into a
per-user cache). :class:`ControlPlane` starts them with free ports, a temporary data directory,
generated certificates, a service-account signing key (so TokenRequest works) and RBAC
enforced, and writes an admin kubeconfig (a ``system:masters`` client certificate) for the
tests' and the demo's own setup. Nothing else of a cluster runs: no controller manager (so a
deleted namespace stays Terminating and nothing is garbage-collected), no scheduler, no nodes.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.lifecycle import Service

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "tests" / "controlplane" / "build.sh"


class ControlPlaneUnavailable(RuntimeError):
    """The binaries cannot be built here (no Go) or the control plane did not start."""


def build_binaries() -> Path:
    """Build (or reuse) kube-apiserver and etcd; return the directory holding them.

    The build script prints what it builds to stderr (a cold build takes minutes).
    """
    if bin_dir := os.environ.get("CCRED_CONTROLPLANE_BIN"):
        return Path(bin_dir)
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=sys.stderr, text=True, check=False
    )
    if result.returncode != 0:
        raise ControlPlaneUnavailable(f"{BUILD_SCRIPT} failed with exit code {result.returncode} (see above)")
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Linux: the child gets SIGKILL when the test process dies, even by SIGKILL: nothing is left behind.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Pki:
    """One CA signs the serving certificate and the client certificates; one key signs SA tokens."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ccred-test-ca")])
        self._ca = (
            self._builder(name, name, self._ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca_file = self._write("ca.crt", self._ca.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def issue(
        self,
        name: str,
        common_name: str,
        *,
        groups: tuple[str, ...] = (),
        server: bool = False,
        addresses: tuple[str, ...] = ("localhost", "127.0.0.1"),
    ) -> tuple[Path, Path]:
        """A key and a certificate signed by the CA; a serving one names ``addresses`` (DNS names or IPs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
            + [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = self._builder(subject, self._ca.subject, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(address) for address in addresses]),
                critical=False,
            )
        cert = builder.sign(self._ca_key, hashes.SHA256())
        return (
            self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            self._write(f"{name}.key", _private_pem(key)),
        )

    def signing_key(self) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return self._write("sa.pub", public), self._write("sa.key", _private_pem(key))


def _general_name(address: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


class ControlPlane(Service):
    """etcd + kube-apiserver as child processes; ``kubeconfig`` is the admin's."""

    def __init__(self, *, bin_dir: Path | None = None, workdir: Path | None = None) -> None:
        self.bin_dir = bin_dir
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="ccred-cp-"))
        self.etcd_port = self.api_port = 0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._apiserver_command: list[str] = []
        self.started_in = 0.0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def start(self, timeout: float = 60.0) -> Self:
        bin_dir = self.bin_dir or build_binaries()
        began = time.monotonic()
        pki_dir = self.workdir / "pki"
        pki_dir.mkdir(parents=True, exist_ok=True)
        pki = _Pki(pki_dir)
        self.ca_file = pki.ca_file
        serving = pki.issue("apiserver", "kube-apiserver", server=True)
        self.admin_cert = pki.issue("admin", "ccred-admin", groups=("system:masters",))
        sa_public, sa_private = pki.signing_key()
        self.etcd_port, peer_port, self.api_port = free_port(), free_port(), free_port()
        try:
            self._spawn(
                "etcd",
                [
                    str(bin_dir / "etcd"),
                    "--name=test",
                    f"--data-dir={self.workdir / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync",  # a throwaway store: durability buys nothing, fsyncs cost seconds
                    "--log-level=warn",
                ],
            )
            self._apiserver_command = [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.workdir / 'certs'}",
                f"--tls-cert-file={serving[0]}",
                f"--tls-private-key-file={serving[1]}",
                f"--client-ca-file={pki.ca_file}",
                f"--service-account-issuer=https://127.0.0.1:{self.api_port}",
                f"--service-account-key-file={sa_public}",
                f"--service-account-signing-key-file={sa_private}",
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.96.0.0/24",
                # No kubelets or Services to reconcile: the loopback address would be refused anyway.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ]
            self._spawn("kube-apiserver", self._apiserver_command)
            self._wait_ready(deadline=began + timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        self._write_admin_kubeconfig()
        return self

    def _spawn(self, name: str, command: list[str], *, mode: str = "wb") -> None:
        log = (self.workdir / f"{name}.log").open(mode)
        self._logs.append(log)
        self._procs.append(
            subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads run in the child before exec
            )
        )

    # -- faults only a real control plane has ------------------------------------------------

    def stop_apiserver(self, timeout: float = 10.0) -> None:
        """Stop kube-apiserver alone: etcd keeps running, every client's requests and watches fail."""
        if len(self._procs) != 2:
            raise RuntimeError("kube-apiserver is not running")
        proc = self._procs.pop()  # started after etcd: the last one
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        self._logs.pop().close()

    def start_apiserver(self, timeout: float = 60.0) -> None:
        """Start kube-apiserver again, as it was (same port, keys and store): a restart as after a crash.

        Its watch cache starts empty at the store's current revision, so a watch resumed from an
        older resourceVersion is answered 410 Gone, and a client has to list again.
        """
        if len(self._procs) != 1:
            raise RuntimeError("start_apiserver() restarts a kube-apiserver stopped by stop_apiserver()")
        self._spawn("kube-apiserver", self._apiserver_command, mode="ab")
        self._wait_ready(deadline=time.monotonic() + timeout)

    def etcd(self, call: str, body: dict[str, Any]) -> dict[str, Any]:
        """One call of etcd's v3 JSON API (its gRPC gateway), e.g. ``etcd("kv/deleterange", {...})``.

        Keys and values are base64 in that API. Changing the store directly is how a test makes
        something happen that no watch of the API server's can report.
        """
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.etcd_port}/v3/{call}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return dict(json.loads(answer.read()))

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(*map(str, self.admin_cert))
        return context

    def _wait_ready(self, deadline: float) -> None:
        context = self.ssl_context()
        last = "no answer yet"
        while time.monotonic() < deadline:
            for name, proc in zip(("etcd", "kube-apiserver"), self._procs, strict=False):
                if proc.poll() is not None:
                    raise ControlPlaneUnavailable(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=context, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise ControlPlaneUnavailable(f"kube-apiserver not ready in time ({last}): {self.log_tail('kube-apiserver')}")

    def log_tail(self, name: str, size: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-size:]
        return ""

    def _write_admin_kubeconfig(self) -> None:
        self.kubeconfig.write_text(
            kubeconfig(
                server=self.url,
                ca_file=self.ca_file,
                user={"client-certificate": str(self.admin_cert[0]), "client-key": str(self.admin_cert[1])},
                name="ccred-admin",
            )
        )

    def stop(self, timeout: float = 10.0) -> None:
        # The API server first, then its store; SIGKILL whatever does not stop in time.
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def kubeconfig(
    *, server: str, ca_file: Path | None, user: dict[str, str], name: str, namespace: str = "default"
) -> str:
    """A one-context kubeconfig (YAML is a superset of JSON: written as JSON)."""
    cluster: dict[str, str] = {"server": server}
    if ca_file is not None and server.startswith("https:"):
        cluster["certificate-authority"] = str(ca_file)
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "ccred", "cluster": cluster}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": {"cluster": "ccred", "user": name, "namespace": namespace}}],
            "current-context": name,
        },
        indent=2,
    )
