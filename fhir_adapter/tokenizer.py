"""Timeline to EHRMamba token sequence (DESIGN.md 3.2).

Layout: ``[CLS] [VS] e ... [VE] [REG] [interval] [VS] e ... [VE] [REG] ...``; a visit still
open at the cut has no ``[VE] [REG]`` yet. Every token carries parallel attributes: type,
age (years), time (weeks since 1970-01-01), visit segment (alternating 1/2 per visit, 0
between visits), visit order (1, 2, ...; 0 between visits) and its timestamp.

Timestamps never decrease along a sequence ([CLS] at the first visit's start, [VS] at the
start, events at their clamped times, [VE] and [REG] at the end, an interval token at the
start of the visit it leads into). So the input for any cut time is a prefix of the whole
sequence, ``seq.prefix(seq.cut(t))``: one scan serves every cut point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from fhir_adapter.lab_bins import LabBins
from fhir_adapter.timeline import Event, EventKind, Timeline
from fhir_adapter.vocabulary import CLS, REG, VE, VS, TokenType, Vocabulary

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECONDS_PER_WEEK = 7 * 86_400
_SECONDS_PER_YEAR = 365.25 * 86_400
_DAYS_PER_MONTH = 30.44
EVENT_TYPES = {
    EventKind.PROCEDURE: TokenType.PROCEDURE,
    EventKind.MEDICATION: TokenType.MEDICATION,
    EventKind.LAB: TokenType.LAB,
}
_CLOSING = (TokenType.VISIT_END, TokenType.REGISTER)


def interval_token(days: int) -> str:
    """The token for ``days`` whole days between a visit's end and the next one's start.

    0-27 days: ``[W0]..[W3]`` (days // 7); 28-364: ``[M1]..[M12]`` (nearest whole month of
    30.44 days, clipped to 1..12); 365 or more: ``[LT]``. ``[M0]`` is never emitted.
    """
    if days < 28:
        return f"[W{max(days, 0) // 7}]"
    if days < 365:
        month = math.floor(days / _DAYS_PER_MONTH + 0.5)
        return f"[M{min(max(month, 1), 12)}]"
    return "[LT]"


@dataclass(frozen=True, eq=False)
class TokenSequence:
    """Parallel arrays of one length ``L``; ``truncated`` tells whether old tokens were cut.

    concept int32, type int8, age float32 (years), time float32 (weeks since 1970),
    segment int8, visit_order int32, timestamp int64 (seconds since 1970, UTC).
    """

    concept: npt.NDArray[np.int32]
    type: npt.NDArray[np.int8]
    age: npt.NDArray[np.float32]
    time: npt.NDArray[np.float32]
    segment: npt.NDArray[np.int8]
    visit_order: npt.NDArray[np.int32]
    timestamp: npt.NDArray[np.int64]
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.concept.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenSequence):
            return NotImplemented
        return self.truncated == other.truncated and all(
            np.array_equal(getattr(self, f), getattr(other, f)) for f in _ARRAYS
        )

    __hash__ = None  # type: ignore[assignment]

    def prefix(self, length: int) -> TokenSequence:
        """The first ``length`` tokens (a view, no copy)."""
        return replace(self, **{f: getattr(self, f)[:length] for f in _ARRAYS})

    def suffix(self, start: int) -> TokenSequence:
        """The tokens from ``start`` on (a view, no copy)."""
        return replace(self, **{f: getattr(self, f)[start:] for f in _ARRAYS})

    def cut(self, at: datetime) -> int:
        """How many tokens are known at ``at``: the prefix length for that cut time."""
        return int(np.searchsorted(self.timestamp, _seconds(at), side="right"))


_ARRAYS = tuple(f.name for f in fields(TokenSequence) if f.name != "truncated")


def concatenate(parts: Sequence[TokenSequence]) -> TokenSequence:
    """The tokens of ``parts`` one after another (the first part's ``truncated``)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    arrays: dict[str, Any] = {f: np.concatenate([getattr(p, f) for p in parts]) for f in _ARRAYS}
    return replace(parts[0], **arrays)


def tokenize(
    timeline: Timeline,
    vocab: Vocabulary,
    bins: LabBins,
    *,
    until: datetime | None = None,
    max_length: int | None = None,
) -> TokenSequence:
    """The token sequence of ``timeline`` as known at ``until`` (all of it when None).

    Raises ValueError when the patient has no birth date (the age stream needs one).
    """
    birth = timeline.patient.birth_date
    if birth is None:
        raise ValueError(f"patient {timeline.patient.id!r} has no birth date")
    rows = _rows(timeline, bins, until)
    seq = _arrays(rows, vocab, birth)
    if max_length is not None:
        seq = truncate(seq, max_length)
    return seq


# A token before ids and derived attributes: (token, type, timestamp, segment, visit_order).
_Row = tuple[str, TokenType, datetime, int, int]


def _rows(timeline: Timeline, bins: LabBins, until: datetime | None) -> list[_Row]:
    limit = None if until is None else _seconds(until)

    def known(at: datetime) -> bool:
        # Compared at the timestamp stream's resolution (whole seconds), so the input at
        # ``until`` is exactly ``seq.prefix(seq.cut(until))`` even for fractional seconds.
        return limit is None or _seconds(at) <= limit

    visits = [v for v in timeline.visits if known(v.start)]
    by_visit: dict[str, list[Event]] = {v.id: [] for v in visits}
    for event in timeline.events:
        if event.visit_id in by_visit and known(event.time):
            by_visit[event.visit_id].append(event)
    first = visits[0].start if visits else (until or EPOCH)
    rows: list[_Row] = [(CLS, TokenType.SPECIAL, first, 0, 0)]
    previous_end: datetime | None = None
    for order, visit in enumerate(visits, start=1):
        segment = 1 if order % 2 else 2
        if previous_end is not None:
            days = (visit.start - previous_end).days
            rows.append((interval_token(days), TokenType.INTERVAL, visit.start, 0, 0))
        rows.append((VS, TokenType.VISIT_START, visit.start, segment, order))
        for event in by_visit[visit.id]:
            token = (
                bins.token(event.code, event.unit, event.value)
                if event.kind is EventKind.LAB
                else event.code
            )
            rows.append((token, EVENT_TYPES[event.kind], event.time, segment, order))
        if visit.end is not None and known(visit.end):
            rows.append((VE, TokenType.VISIT_END, visit.end, segment, order))
            rows.append((REG, TokenType.REGISTER, visit.end, segment, order))
            previous_end = visit.end
        else:
            previous_end = None  # an open visit can only be the last one
    return rows


def _arrays(rows: Sequence[_Row], vocab: Vocabulary, birth: date) -> TokenSequence:
    seconds = np.array([_seconds(r[2]) for r in rows], dtype=np.int64)
    born = _seconds(datetime(birth.year, birth.month, birth.day, tzinfo=UTC))
    return TokenSequence(
        concept=np.array(vocab.ids(r[0] for r in rows), dtype=np.int32),
        type=np.array([r[1] for r in rows], dtype=np.int8),
        age=((seconds - born) / _SECONDS_PER_YEAR).astype(np.float32),
        time=(seconds / _SECONDS_PER_WEEK).astype(np.float32),
        segment=np.array([r[3] for r in rows], dtype=np.int8),
        visit_order=np.array([r[4] for r in rows], dtype=np.int32),
        timestamp=seconds,
    )


def truncate(seq: TokenSequence, max_length: int) -> TokenSequence:
    """Keep the most recent tokens, re-prepending ``[CLS]`` (and ``[VS]`` when the window
    starts inside a visit) so a truncated input reads like a whole one.

    A window that would start on a visit's closing ``[VE] [REG]`` starts after them
    instead (those tokens mean nothing without their visit), so the result can be one or
    two tokens shorter than ``max_length``.
    """
    index = kept_positions(seq, max_length)
    if index is None:
        return seq
    out = {f: getattr(seq, f)[index].copy() for f in _ARRAYS}
    # [CLS] takes the time of the token after it, so timestamps still never decrease.
    for name in ("age", "time", "timestamp"):
        out[name][0] = out[name][1]
    return TokenSequence(**out, truncated=True)


def kept_positions(seq: TokenSequence, max_length: int) -> npt.NDArray[np.int64] | None:
    """The positions of ``seq`` that ``truncate`` keeps, in order (None: all of them). The
    first one or two are the re-prepended ``[CLS]`` (and ``[VS]``); the rest are a
    contiguous run ending at the last token."""
    if max_length < 3:
        raise ValueError("max_length must leave room for [CLS], [VS] and one token")
    n = len(seq)
    if n <= max_length:
        return None
    start = n - (max_length - 1)
    after_closing = start
    while after_closing < n and seq.type[after_closing] in _CLOSING:
        after_closing += 1
    if after_closing < n:
        start = after_closing
    head = [0]  # [CLS] copied from position 0
    if seq.segment[start] != 0 and seq.type[start] != TokenType.VISIT_START:
        start += 1
        visit_starts = np.flatnonzero(seq.type[:start] == TokenType.VISIT_START)
        head.append(int(visit_starts[-1]))
    return np.concatenate([np.array(head, dtype=np.int64), np.arange(start, n)])


def is_visit_open(seq: TokenSequence) -> bool:
    """Whether the sequence ends inside a visit that has no ``[VE]`` yet."""
    starts = np.flatnonzero(seq.type == TokenType.VISIT_START)
    ends = np.flatnonzero(seq.type == TokenType.VISIT_END)
    return bool(starts.size) and (not ends.size or starts[-1] > ends[-1])


def close_visit(seq: TokenSequence, vocab: Vocabulary) -> TokenSequence:
    """``seq`` with ``[VE] [REG]`` appended when its last visit is still open.

    Training inputs for mortality, readmission and the conditions end with a closed visit;
    at serving time the current visit may be open, and this makes the input look the same.
    The closing tokens take the last token's time, age, segment and visit order.
    """
    if not is_visit_open(seq):
        return seq
    ids = (vocab.id(VE), vocab.id(REG))
    kinds = (TokenType.VISIT_END, TokenType.REGISTER)
    return _append(seq, ids, kinds, in_visit=True)


def with_task_token(seq: TokenSequence, task_token_id: int) -> TokenSequence:
    """``seq`` followed by a task token (MPF, task token at the end; DESIGN.md 3.3).

    The task token takes the last token's time and age, type TASK, segment and visit order 0.
    """
    return _append(seq, (task_token_id,), (TokenType.TASK,), in_visit=False)


def append_event(seq: TokenSequence, token_id: int, kind: TokenType) -> TokenSequence:
    """``seq`` and one more token inside its last visit, at the last token's time: how a
    forecast event is fed back."""
    return _append(seq, (token_id,), (kind,), in_visit=True)


def _append(
    seq: TokenSequence, ids: Sequence[int], kinds: Sequence[TokenType], *, in_visit: bool
) -> TokenSequence:
    if not len(seq):
        raise ValueError("cannot append to an empty sequence")
    extra = len(ids)
    last = len(seq) - 1

    def repeat(name: str) -> npt.NDArray[Any]:
        array: npt.NDArray[Any] = getattr(seq, name)
        return np.concatenate([array, np.repeat(array[last:], extra)])

    zeros = np.zeros(extra, dtype=np.int8)
    return TokenSequence(
        concept=np.concatenate([seq.concept, np.asarray(ids, dtype=np.int32)]),
        type=np.concatenate([seq.type, np.asarray(kinds, dtype=np.int8)]),
        age=repeat("age"),
        time=repeat("time"),
        segment=repeat("segment") if in_visit else np.concatenate([seq.segment, zeros]),
        visit_order=(
            repeat("visit_order")
            if in_visit
            else np.concatenate([seq.visit_order, zeros.astype(np.int32)])
        ),
        timestamp=repeat("timestamp"),
        truncated=seq.truncated,
    )


def _seconds(at: datetime) -> int:
    return int((at - EPOCH).total_seconds())
