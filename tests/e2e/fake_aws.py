"""Fake AWS for the e2e tests: moto's server behind a gate that enforces deploy/iam/*.json.

moto checks IAM policies for Secrets Manager against the resource ``*`` only, so it cannot
allow one secret and deny another. This gate stands in for IAM on the two calls the
operator makes, using the repository's own policy templates:

* ``sts:AssumeRoleWithWebIdentity`` -- the trust policy (``trust-policy.json``), with the
  token's issuer as ``OIDC_PROVIDER``, must admit the projected token's ``sub`` and
  ``aud`` claims, and the role must be the one the policy is for. The token's signature is
  not checked (moto's STS does not either): the point is the claims our manifests produce.
* ``secretsmanager:GetSecretValue`` / ``DescribeSecret`` -- the permissions policy
  (``policy.json``) must allow the action on the requested ARN; ``BatchGetSecretValue`` needs
  the action on ``*`` and ``GetSecretValue`` on every id. Statements with a
  ``Condition`` grant nothing here (only the KMS one has one).

Everything else goes to moto untouched. At start it seeds the secrets the samples in
``deploy/samples`` name (under their names, so moto gives them fresh 6-character
suffixes) and serves their ARNs at ``GET /_e2e/seeded`` -- 503 until seeded, which makes it
the readiness probe.

Run in the cluster as ``python fake_aws.py --port 5000 --iam-dir /app/iam``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

ACCOUNT_ID = "111122223333"
REGION = "us-east-1"
ROLE_NAME = "xpander-controller"
#: Values for the placeholders in deploy/iam/*.json (OIDC_PROVIDER comes from the token).
PLACEHOLDERS = {
    "ACCOUNT_ID": ACCOUNT_ID,
    "REGION": REGION,
    "ENV": "prod",
    "KMS_KEY_ID": "00000000-0000-0000-0000-000000000000",
    "NAMESPACE": os.environ.get("E2E_NAMESPACE", "xpander"),
    "SERVICE_ACCOUNT": os.environ.get("E2E_SERVICE_ACCOUNT", "xpander-controller"),
}

# The secrets behind deploy/samples (the tests import these to know what to expect).
SLACK = "xpander/prod/slack-bot-token"
JIRA = "xpander/prod/jira"
GITHUB = "xpander/prod/github-token"
OTHER_TEAM = "other-team/prod/billing-api-key"
SLACK_VALUE = "xoxb-e2e-slack-bot-token"
JIRA_TOKEN = "jira-e2e-api-token"
JIRA_VALUE = json.dumps({"api_token": JIRA_TOKEN, "email": "bot@example.com"})
GITHUB_OLD = "ghp-e2e-before-rotation"
GITHUB_NEW = "ghp-e2e-after-rotation"
OTHER_TEAM_VALUE = "not-for-xpander"

GATED_ACTIONS = {
    "secretsmanager.GetSecretValue",
    "secretsmanager.DescribeSecret",
    "secretsmanager.BatchGetSecretValue",
}
_PLACEHOLDER_RE = re.compile(r"\b(" + "|".join(PLACEHOLDERS) + r")\b")

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def fill(template: str, **extra: str) -> Any:
    """Substitute the placeholders of a policy template and parse it."""
    values = {**PLACEHOLDERS, **extra}
    text = _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)
    for name, value in extra.items():
        text = re.sub(rf"\b{name}\b", value, text)
    return json.loads(text)


def iam_match(pattern: str, value: str, *, case_sensitive: bool = True) -> bool:
    """IAM wildcard matching: ``*`` is any run of characters, ``?`` exactly one."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, 0 if case_sensitive else re.IGNORECASE) is not None


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def policy_allows(policy: dict[str, Any], action: str, resource: str) -> bool:
    """Identity-policy evaluation without conditions: an explicit Deny wins, else any Allow."""
    allowed = False
    for statement in _listed(policy["Statement"]):
        if not any(iam_match(a, action, case_sensitive=False) for a in _listed(statement.get("Action", []))):
            continue
        if not any(iam_match(r, resource) for r in _listed(statement.get("Resource", []))):
            continue
        if statement["Effect"] == "Deny":
            return False
        if "Condition" not in statement:
            allowed = True
    return allowed


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def trust_admits(template: str, role_arn: str, token: str) -> tuple[bool, str]:
    """Whether the trust policy lets this web-identity token assume ``role_arn``."""
    if role_arn != f"arn:aws:iam::{ACCOUNT_ID}:role/{ROLE_NAME}":
        return False, f"no such role {role_arn}"
    try:
        claims = jwt_claims(token)
    except (IndexError, ValueError) as exc:
        return False, f"the web-identity token is not a JWT ({exc})"
    provider = str(claims.get("iss", "")).removeprefix("https://")
    policy = fill(template, OIDC_PROVIDER=provider)
    for statement in _listed(policy["Statement"]):
        if statement["Effect"] != "Allow" or "sts:AssumeRoleWithWebIdentity" not in _listed(statement["Action"]):
            continue
        if statement.get("Principal", {}).get("Federated") != f"arn:aws:iam::{ACCOUNT_ID}:oidc-provider/{provider}":
            continue
        conditions = statement.get("Condition", {})
        if set(conditions) - {"StringEquals"}:
            continue
        wanted = conditions.get("StringEquals", {})
        if all(_claim_equals(claims, key.rpartition(":")[2], value) for key, value in wanted.items()):
            return True, "admitted"
    return False, f"trust policy does not admit sub={claims.get('sub')!r} aud={claims.get('aud')!r} from {provider}"


def _claim_equals(claims: dict[str, Any], name: str, expected: Any) -> bool:
    return any(str(v) in [str(e) for e in _listed(expected)] for v in _listed(claims.get(name)))


class Gate:
    """WSGI middleware in front of moto: IAM for the operator's calls, and /_e2e/seeded."""

    def __init__(self, app: WsgiApp, iam_dir: Path) -> None:
        self.app = app
        self.policy = fill((iam_dir / "policy.json").read_text())
        self.trust_template = (iam_dir / "trust-policy.json").read_text()
        self.seeded: dict[str, str] | None = None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/_e2e/seeded":
            if self.seeded is None:
                return _reply(start_response, "503 Service Unavailable", {"seeded": False})
            return _reply(start_response, "200 OK", {"seeded": True, "arns": self.seeded})
        if environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target in GATED_ACTIONS:
            payload = json.loads(body or b"{}")
            action = "secretsmanager:" + target.partition(".")[2]
            secret_id = "*"
            if target == "secretsmanager.BatchGetSecretValue":
                # The batch action on "*", then GetSecretValue on each id. A denied id denies the whole
                # batch here (AWS would list it in Errors): the operator then reads one by one, gated above.
                ids = [_full_arn(str(item)) for item in payload.get("SecretIdList") or []]
                allowed = policy_allows(self.policy, action, "*") and all(
                    policy_allows(self.policy, "secretsmanager:GetSecretValue", item) for item in ids
                )
            else:
                secret_id = _full_arn(str(payload.get("SecretId", "")))
                allowed = policy_allows(self.policy, action, secret_id)
            if not allowed:
                message = (
                    f"User: arn:aws:sts::{ACCOUNT_ID}:assumed-role/{ROLE_NAME}/e2e is not authorized to perform: "
                    f"{action} on resource: {secret_id} because no identity-based policy allows the {action} action"
                )
                return _reply(
                    start_response,
                    "400 Bad Request",
                    {"__type": "AccessDeniedException", "message": message},
                    content_type="application/x-amz-json-1.1",
                )
        else:
            form = parse_qs(body.decode("utf-8", "replace"))
            if form.get("Action") == ["AssumeRoleWithWebIdentity"]:
                ok, why = trust_admits(
                    self.trust_template, form.get("RoleArn", [""])[0], form.get("WebIdentityToken", [""])[0]
                )
                print(f"fake-aws: AssumeRoleWithWebIdentity: {why}", flush=True)
                if not ok:
                    error = (
                        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
                        f"<Code>AccessDenied</Code><Message>Not authorized to perform "
                        f"sts:AssumeRoleWithWebIdentity: {why}</Message></Error></ErrorResponse>"
                    )
                    start_response("403 Forbidden", [("Content-Type", "text/xml")])
                    return [error.encode()]
        return self.app(environ, start_response)


def _full_arn(secret_id: str) -> str:
    if secret_id.startswith("arn:"):
        return secret_id
    return f"arn:aws:secretsmanager:{REGION}:{ACCOUNT_ID}:secret:{secret_id}"


def _reply(
    start_response: StartResponse, status: str, payload: dict[str, Any], content_type: str = "application/json"
) -> list[bytes]:
    data = json.dumps(payload).encode()
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return [data]


def seed(endpoint: str) -> dict[str, str]:
    """Create the sample secrets; return their ARNs by name."""
    import boto3

    client = boto3.client(
        "secretsmanager",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="seeder",
        aws_secret_access_key="seeder",
    )
    arns = {
        SLACK: client.create_secret(Name=SLACK, SecretString=SLACK_VALUE)["ARN"],
        JIRA: client.create_secret(Name=JIRA, SecretString=JIRA_VALUE)["ARN"],
        GITHUB: client.create_secret(Name=GITHUB, SecretString=GITHUB_OLD)["ARN"],
        OTHER_TEAM: client.create_secret(Name=OTHER_TEAM, SecretString=OTHER_TEAM_VALUE)["ARN"],
    }
    client.put_secret_value(SecretId=GITHUB, SecretString=GITHUB_NEW)  # the old value becomes AWSPREVIOUS
    return arns


def serve(port: int, iam_dir: Path, host: str = "0.0.0.0") -> None:
    os.environ.setdefault("MOTO_ACCOUNT_ID", ACCOUNT_ID)
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    gate = Gate(DomainDispatcherApplication(create_backend_app), iam_dir)
    server = make_server(host, port, gate, threaded=True, request_handler=MotoRequestHandler)

    def seed_then_report() -> None:
        gate.seeded = seed(f"http://127.0.0.1:{port}")
        print(f"fake-aws: seeded {json.dumps(gate.seeded)}", flush=True)

    threading.Thread(target=seed_then_report, daemon=True).start()
    print(f"fake-aws: moto behind the IAM gate on {host}:{port}, policies from {iam_dir}", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--iam-dir", type=Path, default=Path(__file__).resolve().parents[2] / "deploy" / "iam")
    args = parser.parse_args()
    serve(args.port, args.iam_dir, args.host)


if __name__ == "__main__":
    main()
