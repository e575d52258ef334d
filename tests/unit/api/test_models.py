import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector_credentials.api.models import (
    ARN_SCHEMA_PATTERN,
    DURATION_PATTERN,
    InvalidSpecError,
    SecretArn,
    format_duration,
    parse_duration,
    parse_spec,
    region_of,
)

ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:xpander/prod/slack-AbCdEf"

regions = st.from_regex(r"\A[a-z]{2,4}(-[a-z]{2,9}){1,2}-[1-9]\Z")
accounts = st.from_regex(r"\A[0-9]{12}\Z")
names = st.from_regex(r"\A[A-Za-z0-9/_+=.@-]{1,64}\Z")
partitions = st.sampled_from(["aws", "aws-cn", "aws-us-gov", "aws-eusc", "aws-iso-b"])


@given(partitions, regions, accounts, names)
def test_any_valid_arn_parses_into_its_parts(partition: str, region: str, account: str, name: str) -> None:
    arn = f"arn:{partition}:secretsmanager:{region}:{account}:secret:{name}"
    parsed = SecretArn.parse(arn)
    assert (parsed.partition, parsed.region, parsed.account, parsed.name) == (partition, region, account, name)
    assert re.match(ARN_SCHEMA_PATTERN, arn)


@given(st.text(max_size=300))
def test_arbitrary_text_is_rejected_with_an_error_or_parses(text: str) -> None:
    try:
        parsed = SecretArn.parse(text)
    except InvalidSpecError as exc:
        assert str(exc)  # never a bare exception
    else:
        assert parsed.arn == text
        assert text.startswith("arn:") and ":secretsmanager:" in text


@pytest.mark.parametrize(
    ("arn", "expected"),
    [
        ("arn:aws:s3:::my-bucket/key", "'s3' resource, not a Secrets Manager secret"),
        ("arn:aws:iam::123456789012:role/x", "'iam' resource"),
        ("arn:aws:secretsmanager:US-EAST-1:123456789012:secret:x", "no valid region"),
        ("arn:aws:secretsmanager:us-east-1:1234:secret:x", "12-digit account"),
        ("arn:aws:secretsmanager:us-east-1:123456789012:parameter:x", "must name a secret"),
        ("arn:aws:secretsmanager:us-east-1:123456789012:secret:bad name", "invalid secret name"),
        ("arn:nope:secretsmanager:us-east-1:123456789012:secret:x", "unknown partition"),
        ("arn:aws:secretsmanager:us-east-1:123456789012\n:secret:x", "12-digit account"),
        ("arn:aws:secretsmanager:us-east-1:123456789012:secret:x\n", "invalid secret name"),
        ("not-an-arn", "is not an ARN"),
    ],
)
def test_wrong_arns_say_which_part_is_wrong(arn: str, expected: str) -> None:
    with pytest.raises(InvalidSpecError, match=re.escape(expected)):
        SecretArn.parse(arn)


def _botocore_regions() -> list[tuple[str, str]]:
    """Every (partition, region) botocore knows, from its partitions data (botocore is installed
    with the operator; the api layer itself may not import it, see .importlinter)."""
    from botocore.loaders import create_loader

    found = []
    for partition in create_loader().load_data("partitions")["partitions"]:
        for region in partition["regions"]:
            # aws-global, aws-cn-global, ...: names of global endpoints, not regions a secret lives in.
            if region != f"{partition['id']}-global":
                found.append((partition["id"], region))
    return found


BOTOCORE_REGIONS = _botocore_regions()


def test_botocore_knows_the_partitions_this_test_is_about() -> None:
    # If botocore's data ever moved, the test below would pass over nothing.
    assert ("aws", "us-east-1") in BOTOCORE_REGIONS
    assert ("aws-eusc", "eusc-de-east-1") in BOTOCORE_REGIONS  # the AWS European Sovereign Cloud
    assert len({partition for partition, _ in BOTOCORE_REGIONS}) >= 8


@pytest.mark.parametrize(("partition", "region"), BOTOCORE_REGIONS)
def test_every_partition_and_region_botocore_knows_is_accepted(partition: str, region: str) -> None:
    arn = f"arn:{partition}:secretsmanager:{region}:123456789012:secret:name-AbCdEf"
    parsed = SecretArn.parse(arn)
    assert (parsed.partition, parsed.region) == (partition, region)
    assert region_of(arn) == region
    assert parse_spec({"secretArn": arn}).arn == parsed


def test_the_european_sovereign_cloud_is_accepted() -> None:
    # #17, defect 8: refused as InvalidSpec ("no valid region") before.
    spec = parse_spec({"secretArn": "arn:aws-eusc:secretsmanager:eusc-de-east-1:123456789012:secret:name-AbCdEf"})
    assert (spec.arn.partition, spec.arn.region) == ("aws-eusc", "eusc-de-east-1")


@pytest.mark.parametrize(
    "region",
    [
        "useast1",
        "US-EAST-1",
        "us-east",
        "us-east-1a",  # an availability zone
        "us-east-1-",
        "-us-east-1",
        "us--east-1",
        "u-east-1",
        "east-1",
        "us_east_1",
        "us-east-x",
        "eusc-de-east",
        "us-east1",
        "us-east-1\n",
        "",
    ],
)
def test_malformed_regions_are_refused(region: str) -> None:
    arn = f"arn:aws:secretsmanager:{region}:123456789012:secret:name-AbCdEf"
    with pytest.raises(InvalidSpecError, match="no valid region"):
        SecretArn.parse(arn)
    assert region_of(arn) is None


@pytest.mark.parametrize("partition", ["AWS", "aws1", "aws-", "aws--cn", "aws-eu sc", "amazon", "aws_cn", "aws\n", ""])
def test_malformed_partitions_are_refused(partition: str) -> None:
    with pytest.raises(InvalidSpecError, match="unknown partition"):
        SecretArn.parse(f"arn:{partition}:secretsmanager:us-east-1:123456789012:secret:name-AbCdEf")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5), ("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("1.5h", 5400), ("500ms", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@given(st.integers(min_value=1, max_value=10 * 86400))
def test_format_duration_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "5", "m5", "5 m", "-5s", "5d", "five minutes"])
def test_bad_durations_are_rejected(text: str) -> None:
    assert not re.fullmatch(DURATION_PATTERN, text)
    with pytest.raises(InvalidSpecError, match="not a duration"):
        parse_duration(text)


def test_a_full_spec_parses_with_camel_case_names() -> None:
    spec = parse_spec({"secretArn": ARN, "jsonKey": "token", "versionStage": "AWSPREVIOUS", "refreshInterval": "30s"})
    assert spec.json_key == "token"
    assert spec.effective_stage == "AWSPREVIOUS"
    assert spec.refresh_seconds(300) == 30
    assert spec.arn.region == "us-east-1"
    assert spec.model_dump(exclude_none=True) == {
        "secretArn": ARN,
        "jsonKey": "token",
        "versionStage": "AWSPREVIOUS",
        "refreshInterval": "30s",
    }


def test_defaults_stage_and_interval() -> None:
    spec = parse_spec({"secretArn": ARN})
    assert spec.effective_stage == "AWSCURRENT"
    assert spec.refresh_seconds(300) == 300


def test_pinned_version_asks_for_no_stage() -> None:
    spec = parse_spec({"secretArn": ARN, "versionId": "a1b2c3d4-5678-90ab-cdef-EXAMPLE11111"})
    assert spec.effective_stage is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, "spec is missing"),
        ({}, "spec.secretArn is required"),
        ({"secretArn": ARN, "refreshInterval": "1s"}, "below the minimum of 5s"),
        ({"secretArn": ARN, "refreshInterval": "4999ms"}, "below the minimum of 5s"),
        ({"secretArn": ARN, "versionStage": "AWSCURRENT", "versionId": "a" * 32}, "mutually exclusive"),
        ({"secretArn": ARN, "jsonKey": ""}, "spec.jsonKey"),
        ({"secretArn": ARN, "jsonKey": "k" * 257}, "spec.jsonKey"),
        ({"secretArn": ARN, "unknown": 1}, "spec.unknown is not a known field"),
        ({"secretArn": "arn:aws:kms:us-east-1:123456789012:key/abc"}, "'kms' resource"),
        ({"secretArn": ARN, "versionId": "short"}, "spec.versionId does not match"),
        ({"secretArn": "x" * 5000}, "spec.secretArn"),
    ],
)
def test_invalid_specs_get_one_clear_message(raw: object, expected: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        parse_spec(raw)
    assert expected in str(info.value)


@given(
    st.dictionaries(
        st.sampled_from(["secretArn", "jsonKey", "versionStage", "versionId", "refreshInterval", "other"]),
        st.one_of(st.text(max_size=80), st.integers(), st.none(), st.booleans()),
    )
)
def test_spec_parsing_never_raises_anything_but_invalid_spec(raw: dict[str, object]) -> None:
    try:
        parse_spec(raw)
    except InvalidSpecError as exc:
        assert str(exc)


@given(st.text(alphabet=st.characters(min_codepoint=0x80), min_size=1, max_size=50))
def test_unicode_in_fields_is_rejected_cleanly(text: str) -> None:
    with pytest.raises(InvalidSpecError):
        parse_spec({"secretArn": f"arn:aws:secretsmanager:us-east-1:123456789012:secret:{text}"})
