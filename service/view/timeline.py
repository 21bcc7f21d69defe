"""Where each event of a record goes on the view's SVG timeline, and its colour for a task.

Time runs left to right and each visit is a band. Inside a band, each moment that has
events is a column and events of one kind at one moment stack in that kind's lane, so
every event is a mark of its own and none hides another. The bands sit side by side in
time order with a fixed gap: the gaps between visits (months, years) and the length of a
visit are not to scale, the order is; the page says so and each band's tooltip gives its
dates. A linear time axis would squeeze a week in hospital into one pixel beside thirty
years of history.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

LANES = {"lab": "Labs", "medication": "Medications", "procedure": "Procedures", "event": "Other"}
LEFT = 104.0  # lane names
TOP = 30.0  # band dates
PLOT_WIDTH = 640.0  # what the columns are sized to fill before the page scrolls sideways
GAP = 18.0  # between visits
PAD = 5.0  # inside a band, either side
COLUMN = (4.0, 14.0)  # narrowest and widest column
ROW = 11.0  # one stacked mark
LANE_PAD = 8.0
LABEL_SPACE = 76.0  # a band's date label needs this much room to the previous one
RADIUS = (2.5, 5.5)  # no attribution, largest attribution
NEUTRAL = (209, 209, 209)  # a true grey: no hint of either direction
RAISES = (185, 28, 28)
LOWERS = (29, 78, 216)


class Placeable(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def time(self) -> datetime: ...
    @property
    def visit(self) -> int: ...


@dataclass(frozen=True)
class Lane:
    name: str
    y: float
    height: float


@dataclass(frozen=True)
class Band:
    """One visit: ``label`` is its first date, or None where it would overprint another."""

    visit: int
    x: float
    width: float
    start: datetime
    end: datetime
    events: int
    label: str | None


@dataclass(frozen=True)
class Layout:
    width: float
    height: float
    lanes: list[Lane]
    bands: list[Band]
    places: list[tuple[float, float]]  # per event, in the order given


def lay_out(events: Sequence[Placeable]) -> Layout:
    """Positions for ``events`` (time order within each visit; visits in order)."""
    kinds = [kind for kind in LANES if any(_lane(e.kind) == kind for e in events)]
    moments = sorted({(e.visit, e.time) for e in events})
    visits = sorted({visit for visit, _ in moments})
    fixed = len(visits) * 2 * PAD + max(0, len(visits) - 1) * GAP
    column = min(COLUMN[1], max(COLUMN[0], (PLOT_WIDTH - fixed) / max(1, len(moments))))
    stacks: Counter[tuple[int, datetime, str]] = Counter()
    rows: list[int] = []
    for event in events:
        key = (event.visit, event.time, _lane(event.kind))
        rows.append(stacks[key])
        stacks[key] += 1
    lanes: list[Lane] = []
    y = TOP
    for kind in kinds:
        depth = max(n for (_, _, k), n in stacks.items() if k == kind)
        lanes.append(Lane(LANES[kind], y, depth * ROW + 2 * LANE_PAD))
        y += lanes[-1].height
    lane_top = {kind: lane.y for kind, lane in zip(kinds, lanes, strict=True)}
    x = LEFT
    column_x: dict[tuple[int, datetime], float] = {}
    bands: list[Band] = []
    per_visit = Counter(e.visit for e in events)
    for visit in visits:
        times = [t for v, t in moments if v == visit]
        for i, moment in enumerate(times):
            column_x[(visit, moment)] = x + PAD + (i + 0.5) * column
        width = 2 * PAD + len(times) * column
        bands.append(Band(visit, x, width, times[0], times[-1], per_visit[visit], None))
        x += width + GAP
    places = [
        (column_x[(e.visit, e.time)],
         lane_top[_lane(e.kind)] + LANE_PAD + (row + 0.5) * ROW)
        for e, row in zip(events, rows, strict=True)
    ]  # fmt: skip
    return Layout(max(x - GAP, LEFT) + PAD, y + 4, lanes, _labelled(bands), places)


def _labelled(bands: list[Band]) -> list[Band]:
    """Date labels from the newest visit back, each where it has room: the latest visits
    matter most and are always named."""
    out: list[Band] = []
    room_until = math.inf
    for band in reversed(bands):
        if room_until - band.x >= LABEL_SPACE:
            band = replace(band, label=band.start.date().isoformat())
            room_until = band.x
        out.append(band)
    return out[::-1]


def _lane(kind: str) -> str:
    return kind if kind in LANES else "event"


def paint(attribution: float | None, largest: float) -> tuple[str, float]:
    """A mark's fill and radius: red raised the probability, blue lowered it, darker and
    larger the more (against ``largest``, the task's largest magnitude; square root, so
    that the many small attributions are not all the same grey). An event the task's
    input did not hold (after the length-of-stay cut) is drawn white."""
    if attribution is None:
        return "#ffffff", RADIUS[0]
    share = math.sqrt(abs(attribution) / largest) if largest > 0 else 0.0
    end = RAISES if attribution > 0 else LOWERS
    rgb = (round(a + (b - a) * share) for a, b in zip(NEUTRAL, end, strict=True))
    radius = RADIUS[0] + (RADIUS[1] - RADIUS[0]) * share
    return "#{:02x}{:02x}{:02x}".format(*rgb), round(radius, 2)
