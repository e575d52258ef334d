"""Cross-account roles in moto: the other account, the role the operator may assume there, and a
secret only that account can read. Shared by the roles, doctor and Pod Identity tests."""

from __future__ import annotations

from typing import Any

import boto3
import botocore.config

from tests.support.awsemu import DEFAULT_REGION

OTHER_ACCOUNT = "210987654321"
READER = f"arn:aws:iam::{OTHER_ACCOUNT}:role/connector-reader"
ALLOW = {"CCRED_ASSUMABLE_ROLES": f"arn:aws:iam::{OTHER_ACCOUNT}:role/connector-*"}


def other_account_secret(world: Any, name: str) -> str:
    """A secret in the other account (created with that account's credentials, as its owner would).

    ``world``: tests/integration/conftest.py's ``World`` (its moto endpoint, prefix and canaries).
    """
    config = botocore.config.Config(proxies={}, retries={"max_attempts": 1})
    sts = boto3.client(
        "sts",
        region_name=DEFAULT_REGION,
        endpoint_url=world.aws.endpoint,
        config=config,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    owner = sts.assume_role(RoleArn=f"arn:aws:iam::{OTHER_ACCOUNT}:role/owner", RoleSessionName="owner")
    credentials = owner["Credentials"]
    client = boto3.client(
        "secretsmanager",
        region_name=DEFAULT_REGION,
        endpoint_url=world.aws.endpoint,
        config=config,
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
    )
    value = world.canary(name)
    arn: str = client.create_secret(Name=f"{world.prefix}/{name}", SecretString=value)["ARN"]
    return arn
