"""A moto server on 127.0.0.1 for Secrets Manager + STS, and the environment an IRSA pod gets.

moto keeps its state per process and globally: every ``AwsEmulator`` in one process
shares the same secrets (``reset()`` wipes them).
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import boto3
import botocore.config
from moto.server import ThreadedMotoServer

from tests.support.lifecycle import Service
from tests.support.tokens import service_account_token

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient

DEFAULT_ROLE_ARN = "arn:aws:iam::123456789012:role/xpander-controller"
DEFAULT_REGION = "us-east-1"
# Fixed throwaway keys for the harness's own calls; the operator never sees them.
_ADMIN_KEY = "testing"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def label_moved(arn: str, version_id: str, *, label: str = "AWSCURRENT") -> str:
    """Secrets Manager's ``Secret Label Updated`` event as AWS documents it ("Secret event
    notifications"), as an EventBridge rule's SQS target delivers it: the message body."""
    region, account, name = arn.split(":")[3], arn.split(":")[4], arn.split(":")[6][:-7]
    return json.dumps(
        {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Secret Label Updated",
            "source": "aws.secretsmanager",
            "account": account,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "region": region,
            "resources": [arn],
            "detail": {"name": name, "labelUpdated": label, "versionId": version_id},
        }
    )


def irsa_env(tmp_path: str | Path, endpoint: str, role_arn: str = DEFAULT_ROLE_ARN) -> dict[str, str]:
    """Write a web-identity token file and return the env an EKS pod with IRSA gets (no static keys)."""
    token_dir = Path(tmp_path) / "eks.amazonaws.com" / "serviceaccount"
    token_dir.mkdir(parents=True, exist_ok=True)
    token_file = token_dir / "token"
    # moto does not validate the token; it only has to look like a projected service-account JWT.
    token_file.write_text(service_account_token(role=role_arn), encoding="utf-8")
    return {
        "AWS_ROLE_ARN": role_arn,
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file),
        "AWS_ROLE_SESSION_NAME": "xpander-controller-test",
        "AWS_REGION": DEFAULT_REGION,
        "AWS_DEFAULT_REGION": DEFAULT_REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",  # never reach for 169.254.169.254
    }


class AwsEmulator(Service):
    """``ThreadedMotoServer`` bound to 127.0.0.1 plus boto3 helpers for arranging secrets."""

    def __init__(self, *, port: int | None = None) -> None:
        self._port = port
        self._server: ThreadedMotoServer | None = None
        self._endpoint: str | None = None
        self._clients: dict[str, SecretsManagerClient] = {}

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("the AWS emulator is already started")
        # werkzeug logs every request at INFO to stderr: noise in the operator's test output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self._port or 0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self._endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            wsgi = server._server  # moto's stop() leaves the listening socket open
            if wsgi is not None:
                wsgi.server_close()

    @property
    def endpoint(self) -> str:
        if self._endpoint is None:
            raise RuntimeError("the AWS emulator is not started")
        return self._endpoint

    def client(self, region: str = DEFAULT_REGION) -> SecretsManagerClient:
        """An admin Secrets Manager client (static test keys) for arranging the world."""
        if region not in self._clients:
            config = botocore.config.Config(retries={"max_attempts": 1}, proxies={})
            self._clients[region] = boto3.session.Session().client(
                "secretsmanager",
                region_name=region,
                endpoint_url=self.endpoint,
                config=config,
                aws_access_key_id=_ADMIN_KEY,
                aws_secret_access_key=_ADMIN_KEY,
            )
        return self._clients[region]

    def _admin(self, service: str, region: str = DEFAULT_REGION) -> Any:
        config = botocore.config.Config(retries={"max_attempts": 1}, proxies={})
        return boto3.session.Session().client(
            service,  # type: ignore[call-overload]
            region_name=region,
            endpoint_url=self.endpoint,
            config=config,
            aws_access_key_id=_ADMIN_KEY,
            aws_secret_access_key=_ADMIN_KEY,
        )

    def create_queue(self, name: str) -> str:
        """An SQS queue (moto serves SQS too); its URL."""
        url: str = self._admin("sqs").create_queue(QueueName=name)["QueueUrl"]
        return url

    def send(self, url: str, body: str) -> None:
        """Put a message on the queue, as an EventBridge rule's SQS target does."""
        self._admin("sqs").send_message(QueueUrl=url, MessageBody=body)

    def queue_depth(self, url: str) -> int:
        """Messages on the queue, visible or received and not deleted yet."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        found = self._admin("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
        return sum(int(found.get(name, 0)) for name in names)

    def reset(self) -> None:
        """Forget every secret (moto's state is process-global)."""
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST", data=b"")
        with opener.open(req, timeout=10) as resp:
            resp.read()

    def create_secret(
        self,
        name: str,
        string: str | None = None,
        binary: bytes | None = None,
        *,
        region: str = DEFAULT_REGION,
        kms_key_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Create a secret with a string or binary value; return its ARN."""
        kwargs: dict[str, Any] = {"Name": name}
        if string is not None:
            kwargs["SecretString"] = string
        if binary is not None:
            kwargs["SecretBinary"] = binary
        if kms_key_id is not None:
            kwargs["KmsKeyId"] = kms_key_id
        if tags:
            kwargs["Tags"] = [{"Key": key, "Value": value} for key, value in tags.items()]
        arn: str = self.client(region).create_secret(**kwargs)["ARN"]
        return arn

    def put_value(self, arn: str, string: str | None = None, binary: bytes | None = None) -> str:
        """Store a new AWSCURRENT version (a rotation); return its VersionId."""
        kwargs: dict[str, Any] = {"SecretId": arn}
        if string is not None:
            kwargs["SecretString"] = string
        if binary is not None:
            kwargs["SecretBinary"] = binary
        version: str = self.client(_region_of(arn)).put_secret_value(**kwargs)["VersionId"]
        return version

    def schedule_deletion(self, arn: str, days: int = 7) -> None:
        """Mark the secret for deletion (GetSecretValue then fails with InvalidRequestException)."""
        self.client(_region_of(arn)).delete_secret(SecretId=arn, RecoveryWindowInDays=days)

    def delete_now(self, arn: str) -> None:
        """Delete the secret without a recovery window (then ResourceNotFoundException)."""
        self.client(_region_of(arn)).delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)

    def restore(self, arn: str) -> None:
        """Cancel a scheduled deletion."""
        self.client(_region_of(arn)).restore_secret(SecretId=arn)

    def describe(self, arn: str) -> dict[str, Any]:
        result: dict[str, Any] = dict(self.client(_region_of(arn)).describe_secret(SecretId=arn))
        return result


def _region_of(arn: str) -> str:
    parts = arn.split(":")
    return parts[3] if arn.startswith("arn:") and len(parts) > 3 and parts[3] else DEFAULT_REGION
