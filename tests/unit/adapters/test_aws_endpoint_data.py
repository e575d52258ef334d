"""botocore's endpoint data, pruned to the services the operator calls: the same endpoints, less memory."""

from __future__ import annotations

import boto3
import botocore.config
import pytest

from connector_credentials.adapters.aws.sessions import SERVICES, new_session

REGIONS = ("us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1", "il-central-1", "us-isob-east-1")
KEYS = {"aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "secret"}


@pytest.mark.parametrize("fips", [False, True])
def test_every_region_resolves_as_with_the_whole_endpoint_data(fips: bool) -> None:
    config = botocore.config.Config(use_fips_endpoint=fips)
    lean, whole = new_session(), boto3.Session()
    for service in SERVICES:
        for region in REGIONS:
            if fips and region in ("cn-north-1", "us-isob-east-1", "il-central-1"):
                continue  # no FIPS endpoints there
            ours = lean.client(service, region_name=region, config=config, **KEYS)
            theirs = whole.client(service, region_name=region, config=config, **KEYS)
            assert (ours.meta.endpoint_url, ours.meta.partition) == (theirs.meta.endpoint_url, theirs.meta.partition)


def test_sessions_share_one_pruned_copy_of_the_endpoint_data() -> None:
    first, second = new_session(), new_session(aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")
    loaders = [session._session.get_component("data_loader") for session in (first, second)]
    assert loaders[0] is loaders[1]
    endpoints = loaders[0].load_data("endpoints")
    assert {name for partition in endpoints["partitions"] for name in partition["services"]} == set(SERVICES)
    assert {partition["partition"] for partition in endpoints["partitions"]} >= {"aws", "aws-cn", "aws-us-gov"}
