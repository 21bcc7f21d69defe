"""The view's timeline geometry and colours: every event its own mark, in time order, in its
kind's lane; labels that never overprint; red raises, blue lowers, grey for nothing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from service.view.timeline import LABEL_SPACE, NEUTRAL, lay_out, paint

START = datetime(2020, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Event:
    kind: str
    time: datetime
    visit: int


events = st.lists(
    st.tuples(st.sampled_from(["lab", "medication", "procedure"]), st.integers(0, 40),
              st.integers(1, 12)),
    max_size=300,
).map(
    lambda rows: sorted(
        (Event(kind, START + timedelta(days=visit * 90, hours=hour), visit)
         for kind, hour, visit in rows),
        key=lambda e: (e.visit, e.time),
    )
)  # fmt: skip


@given(events)
def test_every_event_has_a_place_of_its_own_in_time_order(record: list[Event]) -> None:
    layout = lay_out(record)
    assert len(layout.places) == len(record)
    assert len(set(layout.places)) == len(record), "no mark hides another"
    xs = [x for x, _ in layout.places]
    assert xs == sorted(xs), "left to right is earlier to later"
    for event, (x, y) in zip(record, layout.places, strict=True):
        assert 0 < x < layout.width
        (lane,) = [lane for lane in layout.lanes if lane.y < y < lane.y + lane.height]
        assert lane.name.lower().startswith(event.kind[:3])
    labelled = [band.x for band in layout.bands if band.label]
    assert all(b - a >= LABEL_SPACE for a, b in pairwise(labelled))
    if layout.bands:
        assert layout.bands[-1].label is not None, "the newest visit is always dated"
        assert sum(band.events for band in layout.bands) == len(record)


def test_colours_and_sizes_follow_the_attribution() -> None:
    red, red_radius = paint(0.02, 0.02)
    blue, blue_radius = paint(-0.02, 0.02)
    faint, faint_radius = paint(0.0002, 0.02)
    grey, grey_radius = paint(0.0, 0.02)
    assert int(red[1:3], 16) > int(red[5:7], 16)
    assert int(blue[5:7], 16) > int(blue[1:3], 16)
    assert int(red[1:3], 16) < int(faint[1:3], 16), "a small share is a paler red"
    assert grey == "#{:02x}{:02x}{:02x}".format(*NEUTRAL)
    assert grey_radius < faint_radius < red_radius == blue_radius
    assert paint(0.0, 0.0) == (grey, grey_radius), "a task whose events carried nothing"
    assert paint(None, 0.02)[0] == "#ffffff", "not in this task's input: white"
