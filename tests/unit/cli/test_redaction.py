"""The redaction index (``NeedleIndex``): per-value updates, reference counts, the matching rule,
concurrent readers; and the log filter reading it live."""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector_credentials.api import values as values_module
from connector_credentials.api.values import MASK, MERGE_AFTER, MIN_NEEDLE, NeedleIndex, SecretValue
from connector_credentials.cli.logs import RedactingFilter

VALUE = "CANARY-unit-4f1e9c"


@pytest.fixture
def forms_computed(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts ``SecretValue.needles()`` calls by value: what an index update or a rebuild costs."""
    calls: Counter[str] = Counter()
    original = SecretValue.needles

    def counting(self: SecretValue) -> tuple[str, ...]:
        calls[SecretValue.wire_text(self)] += 1
        return original(self)

    monkeypatch.setattr(SecretValue, "needles", counting)
    return calls


def reference_redact(needles: Iterable[str], text: str) -> str:
    """The matching rule, written the obvious way: at each position the longest needle, left to right."""
    ordered = sorted({n for n in needles if len(n) >= MIN_NEEDLE}, key=len, reverse=True)
    out, i = [], 0
    while i < len(text):
        needle = next((n for n in ordered if text.startswith(n, i)), None)
        if needle is None:
            out.append(text[i])
            i += 1
        else:
            out.append(MASK)
            i += len(needle)
    return "".join(out)


def test_every_occurrence_is_masked_longest_first() -> None:
    index = NeedleIndex([SecretValue("secret-one"), SecretValue("secret-one-longer"), SecretValue("abc")])
    text = "a secret-one-longer, secret-one and secret-onesecret-one; abc"  # "abc": too short to search for
    assert index.redact(text) == "a ***, *** and ******; abc"
    assert index.redact("nothing here") == "nothing here"
    # At the end of the text a longer needle with the same prefix does not fit: the shorter one still matches.
    assert index.redact("ends with secret-one") == "ends with ***"
    assert index.redact("ends with secret-one-long") == "ends with ***-long"
    assert not NeedleIndex()


def test_every_form_of_a_value_is_masked() -> None:
    quoted = SecretValue('CANARY "quoted"\nsecond line')
    binary = SecretValue(b"\x01\x02binary-canary")
    utf8 = SecretValue("ключ-CANARY-🔑".encode())
    index = NeedleIndex([quoted, binary, utf8])
    forms = {
        "text as is": 'CANARY "quoted"\nsecond line',
        "JSON-escaped": json.dumps({"SecretString": quoted.reveal()}),
        "base64": base64.b64encode(b"\x01\x02binary-canary").decode(),
        "binary as base64": utf8.wire_text(),
        "binary as UTF-8": "ключ-CANARY-🔑",
    }
    for form, text in forms.items():
        assert "CANARY" not in index.redact(text), form
        assert MASK in index.redact(f"before {text} after"), form


def test_adding_a_value_computes_its_forms_only_and_rebuilds_only_the_recent_table(
    forms_computed: Counter[str],
) -> None:
    index = NeedleIndex(SecretValue(f"{n:04d}-secret-{'x' * (n % 5)}") for n in range(200))
    settled = index._settled()
    assert len(settled.base.lengths) == 200 and not settled.recent.needles
    forms_computed.clear()
    index.add(SecretValue("brand-new-value"))
    assert forms_computed == Counter({"brand-new-value": 1})
    snapshot = index._snapshot
    assert snapshot.base is settled.base  # not rebuilt: the new needle is in the small table of recent ones
    assert snapshot.recent.needles == {"brand-new-value"} and snapshot.recent.lengths == {"bran": (15,)}
    index.add(SecretValue("0003-SECRET-xxx"))  # a known prefix, with a length it has
    index.discard(SecretValue("brand-new-value"))
    assert forms_computed == Counter({"brand-new-value": 2, "0003-SECRET-xxx": 1})
    assert index._snapshot.base is settled.base and index._snapshot.recent.needles == {"0003-SECRET-xxx"}
    assert index.redact("0003-secret-xxx, 0003-SECRET-xxx, brand-new-value") == "***, ***, brand-new-value"
    # Rebuilding the whole index computes no forms: it is built from the needles counted.
    rebuilt = index._settled()
    assert rebuilt.base is not settled.base and not rebuilt.recent.needles
    assert forms_computed == Counter({"brand-new-value": 2, "0003-SECRET-xxx": 1})
    assert index.redact("0003-secret-xxx, 0003-SECRET-xxx, brand-new-value") == "***, ***, brand-new-value"


def test_a_first_pass_rebuilds_the_whole_index_once_per_merge_after_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """N values added one at a time, a log line after each (a first pass): N / MERGE_AFTER whole
    rebuilds, not N, and no record waits for one (the table of recent needles is enough)."""
    index, builds = NeedleIndex(), []
    original = values_module._table

    def counting(needles: Iterable[str]) -> values_module._Table:
        table = original(needles)
        builds.append(len(table.needles))
        return table

    monkeypatch.setattr(values_module, "_table", counting)
    monkeypatch.setattr(values_module, "monotonic", lambda: 1000.0)  # a burst: none of it is old enough
    held = [SecretValue(f"xoxb-first-pass-{n:05d}") for n in range(1000)]
    for value in held:
        index.add(value)
        assert index.redact(f"read {value.reveal()} ok") == "read *** ok"
    assert builds == [MERGE_AFTER * n for n in range(1, len(held) // MERGE_AFTER + 1)]  # the recent ones: extended


def test_changes_older_than_the_merge_delay_are_built_in_by_the_next_record(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(values_module, "monotonic", lambda: now[0])
    index = NeedleIndex([SecretValue("kept-value-one")])
    index.add(SecretValue("rotated-value-two"))
    assert index._snapshot.recent.needles == {"rotated-value-two"}
    assert index.redact("rotated-value-two") == MASK  # found in the recent table
    now[0] += values_module.MERGE_DELAY
    assert index.redact("rotated-value-two kept-value-one") == f"{MASK} {MASK}"
    assert index._snapshot.base.needles == {"kept-value-one", "rotated-value-two"}
    assert not index._snapshot.recent.needles and index._snapshot.pending_since is None


def test_a_value_held_twice_stays_until_its_last_holder_lets_go() -> None:
    index = NeedleIndex()
    index.add(SecretValue(VALUE))
    index.add(SecretValue(VALUE))  # another credential reading the same secret
    index.discard(SecretValue(VALUE))
    assert index.redact(VALUE) == MASK
    index.discard(SecretValue(VALUE))
    assert index.redact(VALUE) == VALUE
    assert not index and index.needles() == frozenset()
    index.discard(SecretValue(VALUE))  # not held: nothing happens
    index.add(SecretValue(VALUE))
    assert index.redact(VALUE) == MASK


def test_a_form_two_values_share_stays_until_both_are_dropped() -> None:
    text, binary = SecretValue("shared-form-value"), SecretValue(b"shared-form-value")  # UTF-8 form = the text
    index = NeedleIndex([text, binary])
    assert index.needles() == {"shared-form-value", binary.wire_text()}
    index.discard(text)
    assert index.redact("shared-form-value") == MASK
    index.discard(binary)
    assert index.redact("shared-form-value") == "shared-form-value"
    assert index._sources == {} and index._holders == {}  # nothing left behind
    assert index._settled().base == values_module._table(())


def test_needles_sharing_a_prefix_come_and_go_one_length_at_a_time() -> None:
    tokens = [SecretValue(f"xoxb-{n:03d}-{'a' * (n % 3)}") for n in range(30)]  # one prefix, three lengths
    index = NeedleIndex(tokens)
    assert index._settled().base.lengths == {"xoxb": (11, 10, 9)}
    for token in tokens:
        if len(token) == 10:
            index.discard(token)
    assert index.redact("xoxb-000- xoxb-001-a xoxb-002-aa") == "*** xoxb-001-a ***"  # before the rebuild
    assert index._settled().base.lengths == {"xoxb": (11, 9)}
    assert index.redact("xoxb-000- xoxb-001-a xoxb-002-aa") == "*** xoxb-001-a ***"


@given(
    st.lists(
        st.tuples(st.sampled_from(("add", "discard", "rebuild")), st.text("ab-", min_size=1, max_size=7)), max_size=30
    ),
    st.text("ab-x"),
)
def test_the_index_matches_like_a_search_longest_first_after_any_adds_and_discards(
    updates: list[tuple[str, str]], text: str
) -> None:
    """Whatever the changes, and whether they are still pending or built in (``rebuild``)."""
    index, held = NeedleIndex(), Counter[str]()
    for change, value in updates:
        if change == "add":
            index.add(SecretValue(value))
            held[value] += 1
        elif change == "discard":
            index.discard(SecretValue(value))
            held[value] = max(0, held[value] - 1)
        else:
            index._settled()
    live = [form for value, count in held.items() if count for form in SecretValue(value).needles()]
    assert index.redact(text) == reference_redact(live, text)
    index._settled()
    assert index.redact(text) == reference_redact(live, text)


@pytest.fixture
def fast_switching() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as possible
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("fast_switching")
def test_readers_in_other_threads_never_fail_nor_miss_a_value_added_before() -> None:
    permanent = SecretValue("xoxb-permanent-0000")
    index = NeedleIndex([permanent])
    announced: list[str] = []  # values added (and kept) before being announced
    stop = threading.Event()
    failures: list[str] = []

    def update() -> None:
        for n in range(3000):
            churn = SecretValue(f"xoxb-{'c' * (n % 23)}-{n}")  # the same prefix, ever-changing lengths
            index.add(churn)
            if n % 10 == 0:
                kept = f"kept-{n}-value"
                index.add(SecretValue(kept))
                announced.append(kept)
            index.discard(churn)
        stop.set()

    def read() -> None:
        while not stop.is_set():
            kept = announced[-1] if announced else "kept-none"
            try:
                redacted = index.redact(f"[xoxb-permanent-0000] [{kept}] [xoxb-] [xoxb-ccc]")
            except Exception as exc:  # the failure is the finding
                failures.append(repr(exc))
                return
            if "permanent" in redacted or (kept != "kept-none" and kept in redacted):
                failures.append(redacted)
                return

    readers = [threading.Thread(target=read) for _ in range(3)]
    writer = threading.Thread(target=update)
    for thread in (*readers, writer):
        thread.start()
    began = time.monotonic()
    for thread in (writer, *readers):
        thread.join(timeout=60)
    assert not writer.is_alive(), f"the updates took over {time.monotonic() - began:.0f}s"
    assert failures == []
    assert index.needles() == {"xoxb-permanent-0000", *announced}


def test_the_filter_reads_the_live_index_and_computes_nothing_per_record(
    caplog: pytest.LogCaptureFixture, forms_computed: Counter[str]
) -> None:
    index = NeedleIndex()
    handler_filter = RedactingFilter(index)
    log = logging.getLogger("test.redact.live")
    caplog.handler.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.INFO, logger="test.redact.live"):
            log.info("before: %s", "first-canary-value")
            index.add(SecretValue("first-canary-value"))  # after the filter exists, no rebuild asked for
            log.info("held: %s", "first-canary-value")
            index.add(SecretValue("second-canary-value"))
            index.discard(SecretValue("first-canary-value"))
            log.info("rotated: %s %s", "first-canary-value", "second-canary-value")
            calls = sum(forms_computed.values())
            for _ in range(50):
                log.info("again %s", "second-canary-value")
    finally:
        caplog.handler.removeFilter(handler_filter)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[:3] == [
        "before: first-canary-value",
        "held: ***",
        "rotated: first-canary-value ***",
    ]
    assert set(messages[3:]) == {"again ***"}
    assert sum(forms_computed.values()) == calls == 3  # one per index update (two adds, a discard), none per record


def test_the_filter_masks_values_in_messages_args_tracebacks_and_stacks(caplog: pytest.LogCaptureFixture) -> None:
    values = [SecretValue(VALUE), SecretValue(b"\x01\x02binary-canary")]
    log = logging.getLogger("test.redact")
    handler_filter = RedactingFilter(NeedleIndex(values))
    caplog.handler.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.DEBUG, logger="test.redact"):
            log.debug("body: %s", {"SecretString": VALUE})
            log.info(f"json {json.dumps(VALUE)}")
            log.debug("b64 %s", values[1].wire_text())
            try:
                raise ValueError(f"boom {VALUE}")
            except ValueError:
                log.exception("failed")
    finally:
        caplog.handler.removeFilter(handler_filter)
    text = caplog.text
    assert VALUE not in text
    assert values[1].wire_text() not in text
    assert text.count(MASK) >= 4
    stacked = logging.LogRecord("test.redact", logging.INFO, __file__, 1, "here", None, None, sinfo=f"at {VALUE}")
    assert handler_filter.filter(stacked) and stacked.stack_info == "at ***"
