import json
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector_credentials.api.conditions import find_condition, same_condition, set_condition
from connector_credentials.api.values import JsonKeyError, SecretValue, extract

VALUE = "CANARY-unit-4f1e9c"


def test_secret_value_never_shows_itself() -> None:
    value = SecretValue(VALUE)
    for text in (repr(value), str(value), f"{value}", f"{value!r}", "%s" % (value,), str([value]), str({"v": value})):
        assert VALUE not in text
    assert value.reveal() == VALUE
    with pytest.raises(TypeError):
        pickle.dumps(value)


def test_binary_values_go_out_as_base64() -> None:
    value = SecretValue(b"\x00\xffbinary")
    assert value.encoding == "base64"
    assert value.wire_text() == "AP9iaW5hcnk="


@pytest.mark.parametrize(
    ("raw", "key", "served"),
    [
        ('{"api_token": "abc", "other": 1}', "api_token", "abc"),
        ('{"n": 42}', "n", "42"),
        ('{"b": true}', "b", "true"),
        ('{"z": null}', "z", "null"),
        ('{"o": {"a": [1, 2]}}', "o", '{"a":[1,2]}'),
        ('{"u": "ключ-🔑"}', "u", "ключ-🔑"),
        (b'{"k": "from-binary"}', "k", "from-binary"),
        ("plain text", None, "plain text"),
    ],
)
def test_json_key_extraction(raw: str | bytes, key: str | None, served: str) -> None:
    assert extract(raw, key).reveal() == served


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (f"not json {VALUE}", "not JSON"),
        (f'["{VALUE}"]', "not an object (it is a array)"),
        ('{"other": "x"}', "no top-level key 'token'"),
        (b"\xff\xfe" + VALUE.encode(), "binary and not UTF-8"),
    ],
)
def test_json_key_errors_say_why_without_the_value(raw: str | bytes, message: str) -> None:
    with pytest.raises(JsonKeyError) as info:
        extract(raw, "token")
    assert message in str(info.value)
    assert VALUE not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


@given(st.dictionaries(st.text(max_size=10), st.text(max_size=20), min_size=1))
def test_json_key_serves_string_values_verbatim(document: dict[str, str]) -> None:
    key = next(iter(document))
    assert extract(json.dumps(document), key).reveal() == document[key]


def test_transition_time_moves_only_when_status_changes() -> None:
    first = set_condition([], status=False, reason="AccessDenied", message="m1", observed_generation=1, now="T1")
    same_status = set_condition(
        first, status=False, reason="SecretNotFound", message="m2", observed_generation=2, now="T2"
    )
    flipped = set_condition(
        same_status, status=True, reason="AccessVerified", message="ok", observed_generation=2, now="T3"
    )
    assert find_condition(first)["lastTransitionTime"] == "T1"  # type: ignore[index]
    assert find_condition(same_status)["lastTransitionTime"] == "T1"  # type: ignore[index]
    assert find_condition(same_status)["reason"] == "SecretNotFound"  # type: ignore[index]
    assert find_condition(flipped)["lastTransitionTime"] == "T3"  # type: ignore[index]


def test_other_conditions_are_kept_and_repeats_are_identical() -> None:
    others = [{"type": "Custom", "status": "True"}]
    a = set_condition(others, status=True, reason="AccessVerified", message="ok", observed_generation=None, now="T1")
    b = set_condition(a, status=True, reason="AccessVerified", message="ok", observed_generation=None, now="T9")
    assert a[0] == others[0]
    assert same_condition(find_condition(a), find_condition(b))
    assert "observedGeneration" not in a[1]
