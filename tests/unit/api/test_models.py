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
)

ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:xpander/prod/slack-AbCdEf"

regions = st.from_regex(r"\A[a-z]{2}(-[a-z]{3,9}){1,2}-[1-9]\Z")
accounts = st.from_regex(r"\A[0-9]{12}\Z")
names = st.from_regex(r"\A[A-Za-z0-9/_+=.@-]{1,64}\Z")
partitions = st.sampled_from(["aws", "aws-cn", "aws-us-gov"])


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
        ("not-an-arn", "is not an ARN"),
    ],
)
def test_wrong_arns_say_which_part_is_wrong(arn: str, expected: str) -> None:
    with pytest.raises(InvalidSpecError, match=re.escape(expected)):
        SecretArn.parse(arn)


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
