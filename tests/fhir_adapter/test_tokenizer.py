"""Timeline to token sequence (DESIGN.md 3.2): layout, intervals, attributes, cuts, truncation.

Timelines are built by hand (and by Hypothesis), never read from files, so each test names
the one rule it pins.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_adapter.lab_bins import LabBins
from fhir_adapter.timeline import (
    Event,
    EventKind,
    Patient,
    SourceFacts,
    Timeline,
    Visit,
    VisitClass,
)
from fhir_adapter.tokenizer import (
    EPOCH,
    TokenSequence,
    interval_token,
    tokenize,
    truncate,
)
from fhir_adapter.vocabulary import CLS, INTERVAL_TOKENS, REG, UNK, VE, VS, TokenType, Vocabulary

T0 = datetime(2020, 1, 1, tzinfo=UTC)
BIRTH = date(2000, 1, 1)  # exactly 20 years (7305 days) before T0
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)
MICRO = timedelta(microseconds=1)

PROC, MED, LAB = EventKind.PROCEDURE, EventKind.MEDICATION, EventKind.LAB
UNIT = "mg/dL"
BINS = LabBins({"LOINC|A": {UNIT: [1.0, 2.0, 3.0, 4.0]}}, min_values=10)
VOCAB = Vocabulary(
    ["CPT|1", "CPT|2", "RXNORM|3", "LOINC|A", "LOINC|B", *(f"LOINC|A#{b}" for b in range(5))],
    min_count=1,
)

# --- tiny builders -----------------------------------------------------------------------


def visit(vid: str, start: datetime, end: datetime | None) -> Visit:
    return Visit(vid, start, end, VisitClass.INPATIENT, (vid,))


def event(
    vid: str,
    time: datetime,
    code: str,
    kind: EventKind = PROC,
    value: float | None = None,
    unit: str | None = None,
) -> Event:
    return Event(time, vid, kind, code, value, unit)


def timeline(
    visits: Iterable[Visit], events: Iterable[Event] = (), birth: date | None = BIRTH
) -> Timeline:
    patient = Patient("p1", birth, "female", False, None)
    ordered = sorted(events, key=lambda e: e.time)
    return Timeline(patient, list(visits), ordered, [], SourceFacts("test"))


def tokens(seq: TokenSequence, vocab: Vocabulary = VOCAB) -> list[str]:
    return [vocab.token(int(i)) for i in seq.concept]


def seconds(at: datetime) -> int:
    return int((at - EPOCH).total_seconds())


def three_visits() -> Timeline:
    """Two closed visits 10 days apart, then an open one 100 days later."""
    v1 = visit("v1", T0, T0 + 2 * DAY)
    v2 = visit("v2", T0 + 12 * DAY, T0 + 13 * DAY)
    v3 = visit("v3", T0 + 113 * DAY, None)
    events = [
        event("v1", T0 + HOUR, "CPT|1"),
        event("v1", T0 + 2 * HOUR, "LOINC|A", LAB, 2.5, UNIT),
        event("v1", T0 + DAY, "RXNORM|3", MED),
        event("v2", v2.start + HOUR, "LOINC|A", LAB, None, UNIT),
        event("v2", v2.start + 2 * HOUR, "CPT|99"),
        event("v3", v3.start + HOUR, "CPT|2"),
        event("v3", v3.start + 2 * HOUR, "LOINC|B", LAB, 5.0, UNIT),
    ]
    return timeline([v1, v2, v3], events)


# --- interval tokens ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "token"),
    [
        (0, "[W0]"),
        (6, "[W0]"),
        (7, "[W1]"),
        (13, "[W1]"),
        (14, "[W2]"),
        (20, "[W2]"),
        (21, "[W3]"),
        (27, "[W3]"),
        (28, "[M1]"),  # 0.92 months rounds to 1; [M0] is never emitted
        (29, "[M1]"),
        (30, "[M1]"),
        (45, "[M1]"),  # 1.478 months
        (46, "[M2]"),  # 1.511 months
        (91, "[M3]"),
        (350, "[M11]"),  # 11.498 months
        (351, "[M12]"),  # 11.531 months
        (364, "[M12]"),
        (365, "[LT]"),
        (366, "[LT]"),
        (10_000, "[LT]"),
        (1_000_000, "[LT]"),
    ],
)
def test_interval_token_boundaries(days: int, token: str) -> None:
    assert interval_token(days) == token


def test_interval_tokens_are_all_in_the_vocabulary_and_m0_never_appears() -> None:
    emitted = {interval_token(d) for d in range(0, 2000)}
    assert emitted == set(INTERVAL_TOKENS)
    assert interval_token(-3) == "[W0]"


@pytest.mark.parametrize(
    ("gap", "token"),
    [
        (timedelta(0), "[W0]"),
        (6 * DAY + 23 * HOUR + 59 * 60 * SECOND, "[W0]"),  # whole days: 6
        (7 * DAY, "[W1]"),
        (27 * DAY + 23 * HOUR, "[W3]"),
        (28 * DAY, "[M1]"),
        (29 * DAY, "[M1]"),
        (30 * DAY, "[M1]"),
        (45 * DAY + 12 * HOUR, "[M1]"),
        (46 * DAY, "[M2]"),
        (364 * DAY + 23 * HOUR, "[M12]"),
        (365 * DAY, "[LT]"),
        (40 * 365 * DAY, "[LT]"),
    ],
)
def test_interval_between_visits_uses_whole_days_from_end_to_start(
    gap: timedelta, token: str
) -> None:
    v1 = visit("v1", T0, T0 + 3 * HOUR)
    v2 = visit("v2", v1.end + gap if v1.end else T0, None)
    seq = tokenize(timeline([v1, v2]), VOCAB, BINS)
    assert tokens(seq) == [CLS, VS, VE, REG, token, VS]


# --- layout and attribute streams --------------------------------------------------------


def test_layout_is_exact() -> None:
    seq = tokenize(three_visits(), VOCAB, BINS)
    assert tokens(seq) == [
        CLS,
        VS, "CPT|1", "LOINC|A#2", "RXNORM|3", VE, REG,
        "[W1]",
        VS, "LOINC|A", UNK, VE, REG,
        "[M3]",
        VS, "CPT|2", "LOINC|B",
    ]  # fmt: skip
    assert not seq.truncated


def test_type_ids() -> None:
    seq = tokenize(three_visits(), VOCAB, BINS)
    t = TokenType
    assert seq.type.tolist() == [
        t.SPECIAL,
        t.VISIT_START, t.PROCEDURE, t.LAB, t.MEDICATION, t.VISIT_END, t.REGISTER,
        t.INTERVAL,
        t.VISIT_START, t.LAB, t.PROCEDURE, t.VISIT_END, t.REGISTER,
        t.INTERVAL,
        t.VISIT_START, t.PROCEDURE, t.LAB,
    ]  # fmt: skip


def test_segments_alternate_per_visit_with_zero_between_visits() -> None:
    seq = tokenize(three_visits(), VOCAB, BINS)
    assert seq.segment.tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 0, 1, 1, 1]
    assert seq.visit_order.tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 0, 3, 3, 3]


def test_timestamps_follow_the_documented_times() -> None:
    tl = three_visits()
    v1, v2, v3 = tl.visits
    assert v1.end is not None
    assert v2.end is not None
    expected = [
        v1.start,
        v1.start, T0 + HOUR, T0 + 2 * HOUR, T0 + DAY, v1.end, v1.end,
        v2.start,
        v2.start, v2.start + HOUR, v2.start + 2 * HOUR, v2.end, v2.end,
        v3.start,
        v3.start, v3.start + HOUR, v3.start + 2 * HOUR,
    ]  # fmt: skip
    seq = tokenize(tl, VOCAB, BINS)
    assert seq.timestamp.tolist() == [seconds(x) for x in expected]
    assert seq.timestamp.dtype == np.int64


def test_age_in_years_from_birth_date() -> None:
    seq = tokenize(three_visits(), VOCAB, BINS)
    assert seq.age[0] == pytest.approx(20.0)  # 7305 days / 365.25
    assert seq.age[1] == pytest.approx(20.0)
    expected = (seq.timestamp - seconds(datetime(2000, 1, 1, tzinfo=UTC))) / (365.25 * 86_400)
    np.testing.assert_allclose(seq.age, expected, rtol=1e-6)
    assert seq.age.dtype == np.float32


def test_time_in_weeks_since_1970() -> None:
    v = visit("v", datetime(1970, 1, 8, tzinfo=UTC), datetime(1970, 1, 15, tzinfo=UTC))
    seq = tokenize(timeline([v], birth=date(1960, 1, 1)), VOCAB, BINS)
    assert seq.time.tolist() == [1.0, 1.0, 2.0, 2.0]
    full = tokenize(three_visits(), VOCAB, BINS)
    np.testing.assert_allclose(full.time, full.timestamp / (7 * 86_400), rtol=1e-6)
    assert full.time.dtype == np.float32


def test_arrays_have_one_length_and_documented_dtypes() -> None:
    seq = tokenize(three_visits(), VOCAB, BINS)
    assert seq.concept.dtype == np.int32
    assert seq.type.dtype == np.int8
    assert seq.segment.dtype == np.int8
    assert seq.visit_order.dtype == np.int32
    lengths = {len(a) for a in _arrays(seq)}
    assert lengths == {len(seq)} == {17}


def test_no_visits_gives_cls_only() -> None:
    seq = tokenize(timeline([]), VOCAB, BINS)
    assert tokens(seq) == [CLS]


# --- codes -------------------------------------------------------------------------------


def test_lab_tokens_carry_their_bin() -> None:
    v = visit("v", T0, T0 + DAY)
    values = [0.5, 1.0, 2.0, 2.99, 3.0, 4.0, 1e6, -1e6]
    events = [event("v", T0 + i * SECOND, "LOINC|A", LAB, x, UNIT) for i, x in enumerate(values)]
    seq = tokenize(timeline([v], events), VOCAB, BINS)
    bins = [0, 1, 2, 2, 3, 4, 4, 0]
    assert tokens(seq)[2:-2] == [f"LOINC|A#{b}" for b in bins]


def test_labs_without_value_or_fit_keep_the_bare_code() -> None:
    v = visit("v", T0, T0 + DAY)
    events = [
        event("v", T0 + 1 * SECOND, "LOINC|A", LAB, None, UNIT),  # no value
        event("v", T0 + 2 * SECOND, "LOINC|A", LAB, 2.5, "mmol/L"),  # unit never fitted
        event("v", T0 + 3 * SECOND, "LOINC|A", LAB, 2.5, None),  # no unit, never fitted
        event("v", T0 + 4 * SECOND, "LOINC|B", LAB, 2.5, UNIT),  # code never fitted
        event("v", T0 + 5 * SECOND, "LOINC|C", LAB, 2.5, UNIT),  # not in the vocabulary
    ]
    seq = tokenize(timeline([v], events), VOCAB, BINS)
    assert tokens(seq)[2:-2] == ["LOINC|A", "LOINC|A", "LOINC|A", "LOINC|B", UNK]


def test_unknown_codes_get_the_unk_id() -> None:
    v = visit("v", T0, T0 + DAY)
    events = [event("v", T0, "CPT|nope"), event("v", T0, "RXNORM|nope", MED)]
    seq = tokenize(timeline([v], events), VOCAB, BINS)
    assert seq.concept.tolist()[2:4] == [VOCAB.unk_id, VOCAB.unk_id]
    assert seq.type.tolist()[2:4] == [TokenType.PROCEDURE, TokenType.MEDICATION]


def test_bin_without_vocabulary_entry_is_unknown() -> None:
    vocab = Vocabulary(["LOINC|A"], min_count=1)  # bare code known, binned codes not
    v = visit("v", T0, T0 + DAY)
    seq = tokenize(timeline([v], [event("v", T0, "LOINC|A", LAB, 2.5, UNIT)]), vocab, BINS)
    assert tokens(seq, vocab)[2] == UNK


# --- open visits and the until cut -------------------------------------------------------


def test_ongoing_visit_has_no_closing_tokens() -> None:
    v = visit("v", T0, None)
    seq = tokenize(timeline([v], [event("v", T0 + HOUR, "CPT|1")]), VOCAB, BINS)
    assert tokens(seq) == [CLS, VS, "CPT|1"]


def test_until_drops_later_events_and_visits() -> None:
    tl = three_visits()
    seq = tokenize(tl, VOCAB, BINS, until=T0 + 2 * HOUR)
    assert tokens(seq) == [CLS, VS, "CPT|1", "LOINC|A#2"]
    seq = tokenize(tl, VOCAB, BINS, until=T0 + 2 * HOUR - SECOND)
    assert tokens(seq) == [CLS, VS, "CPT|1"]


def test_visit_ending_after_until_stays_open() -> None:
    tl = three_visits()
    v1_end = tl.visits[0].end
    assert v1_end is not None
    before = tokenize(tl, VOCAB, BINS, until=v1_end - SECOND)
    assert tokens(before) == [CLS, VS, "CPT|1", "LOINC|A#2", "RXNORM|3"]
    at_end = tokenize(tl, VOCAB, BINS, until=v1_end)
    assert tokens(at_end) == [CLS, VS, "CPT|1", "LOINC|A#2", "RXNORM|3", VE, REG]


def test_until_inside_a_later_visit() -> None:
    tl = three_visits()
    seq = tokenize(tl, VOCAB, BINS, until=tl.visits[1].start + HOUR)
    assert tokens(seq)[-4:] == [REG, "[W1]", VS, "LOINC|A"]
    assert seq.segment.tolist()[-2:] == [2, 2]


def test_until_after_everything_is_the_whole_sequence() -> None:
    tl = three_visits()
    assert tokenize(tl, VOCAB, BINS, until=T0 + 1000 * DAY) == tokenize(tl, VOCAB, BINS)


def _cut_times(tl: Timeline) -> list[datetime]:
    """Every boundary a cut can sit on: visit starts and ends, start + 24 h, events, +- 1 s."""
    times: list[datetime] = []
    for v in tl.visits:
        times += [v.start, v.start + 24 * HOUR]
        if v.end is not None:
            times.append(v.end)
    times += [e.time for e in tl.events]
    deltas = (-SECOND, -MICRO, timedelta(0), MICRO, SECOND)
    return [t + d for t in times for d in deltas]


def _assert_prefix_property(tl: Timeline, t: datetime, vocab: Vocabulary = VOCAB) -> None:
    full = tokenize(tl, vocab, BINS)
    cut = tokenize(tl, vocab, BINS, until=t)
    assert cut == full.prefix(full.cut(t)), t


@pytest.mark.parametrize(
    "offset",
    [
        timedelta(0),  # first visit start
        HOUR,  # exactly an event time
        HOUR + SECOND,
        24 * HOUR,  # start + 24 h, where length of stay cuts
        2 * DAY - SECOND,
        2 * DAY,  # exactly the first visit's end
        2 * DAY + SECOND,
        12 * DAY,  # exactly the second visit's start
        13 * DAY,  # exactly the second visit's end
        12 * DAY + 24 * HOUR,  # second visit start + 24 h (= its end here)
        113 * DAY + 24 * HOUR,  # inside the open visit
        5000 * DAY,
    ],
)
def test_input_at_any_cut_is_a_prefix_of_the_whole(offset: timedelta) -> None:
    _assert_prefix_property(three_visits(), T0 + offset)


def test_prefix_property_at_every_boundary() -> None:
    tl = three_visits()
    for t in _cut_times(tl):
        if t >= tl.visits[0].start:
            _assert_prefix_property(tl, t)


def test_prefix_property_with_fractions_of_a_second() -> None:
    # FHIR instants keep fractions of a second; timestamps are whole seconds. The cut
    # must agree with the prefix at that resolution (an event 0.4 s after ``until`` but in
    # the same second is known at ``until``, as ``seq.cut`` says).
    start = T0 + timedelta(milliseconds=250)
    v1 = visit("v1", start, start + DAY + timedelta(milliseconds=500))
    v2 = visit("v2", start + DAY + timedelta(milliseconds=900), None)
    events = [
        event("v1", start + timedelta(milliseconds=700), "CPT|1"),
        event("v1", start + HOUR + timedelta(microseconds=999_999), "CPT|2"),
        event("v2", v2.start + timedelta(microseconds=50), "RXNORM|3", MED),
    ]
    tl = timeline([v1, v2], events)
    for t in _cut_times(tl):
        if t >= T0:  # from the first visit's start second on
            _assert_prefix_property(tl, t)
    for ms in range(0, 2000, 50):
        _assert_prefix_property(tl, T0 + timedelta(milliseconds=ms))
        _assert_prefix_property(tl, T0 + DAY + timedelta(milliseconds=ms))
    at = tokenize(tl, VOCAB, BINS, until=start + timedelta(milliseconds=100))
    assert tokens(at) == [CLS, VS, "CPT|1"]  # same second as the event


def test_cut_counts_tokens_known_at_a_time() -> None:
    full = tokenize(three_visits(), VOCAB, BINS)
    assert full.cut(T0 - SECOND) == 0
    assert full.cut(T0) == 2  # [CLS] [VS]
    assert full.cut(T0 + 2 * DAY) == 7  # through the first [REG]
    assert full.cut(T0 + 12 * DAY) == 9  # interval and [VS] at the next start
    assert full.cut(T0 + 5000 * DAY) == len(full)
    prefix = full.prefix(7)
    assert len(prefix) == 7
    assert tokens(prefix)[-2:] == [VE, REG]


# --- truncation --------------------------------------------------------------------------


def two_visits() -> TokenSequence:
    """[CLS] [VS] a b [VE] [REG] [W0] [VS] c d e [VE] [REG] (13 tokens)."""
    v1 = visit("v1", T0, T0 + DAY)
    v2 = visit("v2", T0 + 3 * DAY, T0 + 4 * DAY)
    events = [
        event("v1", T0 + 1 * HOUR, "CPT|1"),
        event("v1", T0 + 2 * HOUR, "CPT|2"),
        event("v2", v2.start + 1 * HOUR, "RXNORM|3", MED),
        event("v2", v2.start + 2 * HOUR, "LOINC|A", LAB),
        event("v2", v2.start + 3 * HOUR, "LOINC|B", LAB),
    ]
    return tokenize(timeline([v1, v2], events), VOCAB, BINS)


def test_short_sequence_is_not_truncated() -> None:
    seq = two_visits()
    assert len(seq) == 13
    assert truncate(seq, 13) == seq
    assert not truncate(seq, 13).truncated
    assert not truncate(seq, 100).truncated


def test_window_starting_at_a_visit_start_gets_no_extra_vs() -> None:
    out = truncate(two_visits(), 7)
    assert tokens(out) == [CLS, VS, "RXNORM|3", "LOINC|A", "LOINC|B", VE, REG]
    assert out.truncated
    assert out.segment.tolist() == [0, 2, 2, 2, 2, 2, 2]


def test_window_starting_at_an_interval_gets_no_vs() -> None:
    out = truncate(two_visits(), 8)
    assert tokens(out) == [CLS, "[W0]", VS, "RXNORM|3", "LOINC|A", "LOINC|B", VE, REG]
    assert out.truncated


def test_window_starting_inside_a_visit_re_prepends_its_vs() -> None:
    seq = two_visits()
    out = truncate(seq, 6)
    assert tokens(out) == [CLS, VS, "LOINC|A", "LOINC|B", VE, REG]
    assert out.truncated
    # The [VS] is the visit's own: its attributes, not the first visit's.
    assert out.segment.tolist() == [0, 2, 2, 2, 2, 2]
    assert out.visit_order.tolist() == [0, 2, 2, 2, 2, 2]
    assert out.timestamp[1] == seq.timestamp[7]
    out = truncate(seq, 12)
    assert tokens(out) == [CLS, VS, "CPT|2", VE, REG, "[W0]", VS, "RXNORM|3", "LOINC|A",
                           "LOINC|B", VE, REG]  # fmt: skip
    assert out.visit_order.tolist()[:3] == [0, 1, 1]


def test_truncated_cls_takes_the_time_of_the_next_token() -> None:
    seq = two_visits()
    for m in (6, 7, 8, 12):
        out = truncate(seq, m)
        assert out.type[0] == TokenType.SPECIAL
        assert out.concept[0] == VOCAB.id(CLS)
        assert out.segment[0] == 0
        assert out.visit_order[0] == 0
        assert out.timestamp[0] == out.timestamp[1]
        assert out.age[0] == out.age[1]
        assert out.time[0] == out.time[1]
        assert (np.diff(out.timestamp) >= 0).all()


def test_truncation_keeps_the_most_recent_tokens() -> None:
    seq = two_visits()
    for m in range(3, 13):
        out = truncate(seq, m)
        start = len(seq) - (m - 1)
        closing = (TokenType.VISIT_END, TokenType.REGISTER)
        after = start
        while after < len(seq) and seq.type[after] in closing:
            after += 1
        if after < len(seq):
            start = after  # a window starts after a dropped visit's closing tokens
        inside = seq.segment[start] != 0 and seq.type[start] != TokenType.VISIT_START
        kept = len(seq) - start - (1 if inside else 0)
        assert len(out) == kept + (2 if inside else 1)  # [CLS] (and [VS]) lead
        assert m - 2 <= len(out) <= m
        for a, b in zip(_arrays(out), _arrays(seq), strict=True):
            assert a[-kept:].tolist() == b[-kept:].tolist()


def test_window_never_starts_with_closing_tokens_of_a_dropped_visit() -> None:
    seq = two_visits()
    ve = int(np.flatnonzero(seq.type == TokenType.VISIT_END)[0])
    out = truncate(seq, len(seq) - ve + 1)  # the window would start at the first [VE]
    assert tokens(out)[:3] == [CLS, "[W0]", VS]
    out = truncate(seq, len(seq) - ve)  # ... or at the first [REG]
    assert tokens(out)[:3] == [CLS, "[W0]", VS]


def test_truncate_does_not_modify_its_input() -> None:
    seq = two_visits()
    before = seq.timestamp.copy()
    truncate(seq, 6)
    assert seq.timestamp.tolist() == before.tolist()
    assert seq == two_visits()


def test_tokenize_with_max_length_truncates() -> None:
    tl = three_visits()
    full = tokenize(tl, VOCAB, BINS)
    assert tokenize(tl, VOCAB, BINS, max_length=8) == truncate(full, 8)
    assert tokenize(tl, VOCAB, BINS, max_length=8).truncated
    assert not tokenize(tl, VOCAB, BINS, max_length=len(full)).truncated


@pytest.mark.parametrize("m", [-1, 0, 1, 2])
def test_max_length_too_small_raises(m: int) -> None:
    with pytest.raises(ValueError, match="max_length"):
        truncate(two_visits(), m)
    with pytest.raises(ValueError, match="max_length"):
        tokenize(three_visits(), VOCAB, BINS, max_length=m)
    assert len(truncate(two_visits(), 3)) == 3


def test_patient_without_birth_date_raises() -> None:
    tl = timeline([visit("v", T0, T0 + DAY)], birth=None)
    with pytest.raises(ValueError, match="birth date"):
        tokenize(tl, VOCAB, BINS)


# --- properties on random timelines ------------------------------------------------------

CODES = {
    PROC: ["CPT|1", "CPT|2", "CPT|404"],
    MED: ["RXNORM|3", "RXNORM|404"],
    LAB: ["LOINC|A", "LOINC|B"],
}
GAPS = st.one_of(
    st.integers(0, 3 * 86_400),
    st.integers(0, 40 * 86_400),
    st.integers(300 * 86_400, 800 * 86_400),
)


def micros(max_seconds: int) -> st.SearchStrategy[int]:
    """Microseconds up to ``max_seconds``: often whole seconds, sometimes any fraction."""
    whole = st.integers(0, max_seconds).map(lambda s: s * 10**6)
    return st.one_of(whole, st.integers(0, max_seconds * 10**6))


@st.composite
def timelines(draw: st.DrawFn) -> Timeline:
    """0-6 non-overlapping visits with random gaps (the last maybe open), sorted events."""
    n = draw(st.integers(0, 6))
    t = T0 + timedelta(microseconds=draw(micros(3 * 10**9)) - 2 * 10**15)
    visits: list[Visit] = []
    events: list[Event] = []
    for i in range(n):
        if i:
            t += timedelta(seconds=draw(GAPS), microseconds=draw(micros(1)))
        duration = draw(micros(20 * 86_400))
        is_open = i == n - 1 and draw(st.booleans())
        vid = f"v{i}"
        visits.append(visit(vid, t, None if is_open else t + timedelta(microseconds=duration)))
        in_visit = st.one_of(st.just(0), st.just(duration), st.integers(0, duration))
        offsets = sorted(draw(st.lists(in_visit, max_size=6)))
        for offset in offsets:
            kind = draw(st.sampled_from(list(EventKind)))
            code = draw(st.sampled_from(CODES[kind]))
            value = unit = None
            if kind is LAB:
                value = draw(st.none() | st.floats(-1.0, 6.0, allow_nan=False))
                unit = draw(st.sampled_from([UNIT, UNIT, "mmol/L", None]))
            events.append(event(vid, t + timedelta(microseconds=offset), code, kind, value, unit))
        t += timedelta(microseconds=duration)
    return timeline(visits, events, birth=date(1940, 2, 29))


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _arrays(seq: TokenSequence) -> list[npt.NDArray[Any]]:
    return [seq.concept, seq.type, seq.age, seq.time, seq.segment, seq.visit_order,
            seq.timestamp]  # fmt: skip


@PROPERTY
@given(timelines())
def test_property_arrays_share_one_length(tl: Timeline) -> None:
    seq = tokenize(tl, VOCAB, BINS)
    assert {len(a) for a in _arrays(seq)} == {len(seq)}
    assert len(seq) >= 1
    assert seq.concept[0] == VOCAB.id(CLS)


@PROPERTY
@given(timelines())
def test_property_timestamps_never_decrease(tl: Timeline) -> None:
    seq = tokenize(tl, VOCAB, BINS)
    assert (np.diff(seq.timestamp) >= 0).all()


@PROPERTY
@given(timelines())
def test_property_layout(tl: Timeline) -> None:
    seq = tokenize(tl, VOCAB, BINS)
    types = [TokenType(t) for t in seq.type.tolist()]
    between = [t in (TokenType.SPECIAL, TokenType.INTERVAL) for t in types]
    assert [s == 0 for s in seq.segment.tolist()] == between
    for t, s, o in zip(types, seq.segment.tolist(), seq.visit_order.tolist(), strict=True):
        if t in (TokenType.SPECIAL, TokenType.INTERVAL):
            assert o == 0
        else:
            assert s == (1 if o % 2 else 2)
    assert types.count(TokenType.VISIT_START) == len(tl.visits)
    closed = sum(v.end is not None for v in tl.visits)
    assert types.count(TokenType.VISIT_END) == types.count(TokenType.REGISTER) == closed
    assert types.count(TokenType.INTERVAL) == max(len(tl.visits) - 1, 0)
    assert sum(t in (TokenType.PROCEDURE, TokenType.MEDICATION, TokenType.LAB)
               for t in types) == len(tl.events)  # fmt: skip
    # Every interval token is preceded by [REG] and followed by [VS].
    for i, t in enumerate(types):
        if t is TokenType.INTERVAL:
            assert types[i - 1] is TokenType.REGISTER
            assert types[i + 1] is TokenType.VISIT_START


@PROPERTY
@given(timelines())
def test_property_deterministic(tl: Timeline) -> None:
    assert tokenize(tl, VOCAB, BINS) == tokenize(tl, VOCAB, BINS)
    assert tokenize(tl, VOCAB, BINS, max_length=5) == tokenize(tl, VOCAB, BINS, max_length=5)


@PROPERTY
@given(timelines(), st.data())
def test_property_input_at_a_cut_is_a_prefix(tl: Timeline, data: st.DataObject) -> None:
    if not tl.visits:
        return
    first = tl.visits[0].start
    boundaries = [t for t in _cut_times(tl) if t >= first]
    for t in boundaries:
        _assert_prefix_property(tl, t)
    offset = data.draw(micros(5 * 365 * 86_400), label="offset")
    _assert_prefix_property(tl, first + timedelta(microseconds=offset))


@PROPERTY
@given(timelines(), st.integers(3, 60))
def test_property_truncate(tl: Timeline, m: int) -> None:
    seq = tokenize(tl, VOCAB, BINS)
    out = truncate(seq, m)
    assert min(len(seq), m) - 2 <= len(out) <= min(len(seq), m)
    assert {len(a) for a in _arrays(out)} == {len(out)}
    assert out.concept[0] == VOCAB.id(CLS)
    assert out.truncated == (len(seq) > m)
    assert (np.diff(out.timestamp) >= 0).all()
    assert out.concept[-1] == seq.concept[-1]
    assert out.timestamp[-1] == seq.timestamp[-1]
    if out.truncated:
        assert out.type[1] in (TokenType.VISIT_START, TokenType.INTERVAL)
        assert out.timestamp[0] == out.timestamp[1]
    assert tokenize(tl, VOCAB, BINS, max_length=m) == out
