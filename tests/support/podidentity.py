"""A stand-in for the EKS Pod Identity agent on 127.0.0.1, and the environment EKS injects with it.

The real agent listens on 169.254.170.23 and answers ``GET /v1/credentials`` with temporary
credentials of the role associated with the pod's namespace and service account, when the
``Authorization`` header carries the pod's projected token (audience ``pods.eks.amazonaws.com``).
This one does the same on loopback (botocore accepts a loopback full URI): it reads the token file
on every request and compares, and hands out credentials it got from moto's STS (``AssumeRole``),
so that moto's ``GetCallerIdentity`` names the associated role. ``refuse()`` makes it answer 403.
"""

from __future__ import annotations

import datetime
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import boto3
import botocore.config

from tests.support.awsemu import DEFAULT_REGION, DEFAULT_ROLE_ARN
from tests.support.lifecycle import Service
from tests.support.tokens import service_account_token

CREDENTIALS_PATH = "/v1/credentials"
AUDIENCE = "pods.eks.amazonaws.com"
_ADMIN_KEY = "testing"


def pod_identity_token(namespace: str = "xpander", service_account: str = "xpander-controller") -> str:
    """A projected service-account token as EKS mounts it for Pod Identity (not signed: nobody checks)."""
    return service_account_token(AUDIENCE, sub=f"system:serviceaccount:{namespace}:{service_account}")


def pod_identity_env(tmp_path: str | Path, endpoint: str, agent_uri: str) -> dict[str, str]:
    """Write the Pod Identity token file and return the env an EKS pod with an association gets."""
    token_dir = Path(tmp_path) / "eks-pod-identity-token"
    token_dir.mkdir(parents=True, exist_ok=True)
    token_file = token_dir / "eks-pod-identity-token"
    if not token_file.exists():  # the agent may hold it already: one token per pod
        token_file.write_text(pod_identity_token(), encoding="utf-8")
    return {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": agent_uri,
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
        "AWS_REGION": DEFAULT_REGION,
        "AWS_DEFAULT_REGION": DEFAULT_REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        agent = self.server.agent
        agent.requests += 1
        if self.path != CREDENTIALS_PATH:
            self._answer(404, {"message": "not found"})
            return
        status, payload = agent.answer(self.headers.get("Authorization"))
        self._answer(status, payload)

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, agent: PodIdentityAgent) -> None:
        self.agent = agent
        super().__init__(("127.0.0.1", 0), _Handler)


class PodIdentityAgent(Service):
    """The agent: ``token_file`` is what the pod's Authorization header must carry."""

    def __init__(self, moto_endpoint: str, token_file: str | Path, *, role_arn: str = DEFAULT_ROLE_ARN) -> None:
        self._moto = moto_endpoint
        self.token_file = Path(token_file)
        self.role_arn = role_arn
        self.requests = 0
        self.refused = 0
        #: Seconds the credentials handed out are valid (None: as STS says). Under 10 minutes, the SDK
        #: fetches new ones before every call that signs with them.
        self.lifetime: float | None = None
        self._refuse: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="pod-identity-agent", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def uri(self) -> str:
        if self._server is None:
            raise RuntimeError("the agent is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}{CREDENTIALS_PATH}"

    def refuse(self, message: str = "Service account token cannot be used: no association found") -> None:
        """Answer every request with 403 (as the agent does when no association matches)."""
        self._refuse = message

    def answer(self, authorization: str | None) -> tuple[int, dict[str, Any]]:
        try:
            expected = self.token_file.read_text(encoding="utf-8")
        except OSError:
            expected = None
        if self._refuse is not None or not authorization or authorization != expected:
            self.refused += 1
            message = self._refuse or "Authorization header does not carry the pod's service account token"
            return 403, {"code": "AccessDeniedException", "message": message}
        sts = boto3.session.Session().client(
            "sts",
            region_name=DEFAULT_REGION,
            endpoint_url=self._moto,
            aws_access_key_id=_ADMIN_KEY,
            aws_secret_access_key=_ADMIN_KEY,
            config=botocore.config.Config(retries={"max_attempts": 1}, proxies={}),
        )
        session = sts.assume_role(RoleArn=self.role_arn, RoleSessionName="eks-test-xpander-controller")
        credentials = session["Credentials"]
        expiration = credentials["Expiration"]
        if self.lifetime is not None:
            expiration = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.lifetime)
        return 200, {
            "AccessKeyId": credentials["AccessKeyId"],
            "SecretAccessKey": credentials["SecretAccessKey"],
            "Token": credentials["SessionToken"],
            "AccountId": self.role_arn.split(":")[4],
            "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
