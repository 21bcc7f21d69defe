"""The patient view's HTML, rendered from a scored record and its explanations.

The page comes in two parts because explanations take seconds to tens of seconds: the
head (risks, forecast, and a note that the reasons are being computed) is sent as soon as
the record is scored, the reasons (timeline, event lists, how they were computed) when
the explanations are done. Jinja2 escapes every value; the page loads nothing from
anywhere (inline CSS, SVG and one script, allowed by the response's CSP nonce).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from model.artifact import Artifact
from model.tasks import Task
from service.cds.services import TASK_TITLES
from service.explaining import LAB_LEVELS, ExplainedEvent, TaskExplanation
from service.scoring import Scored
from service.view.timeline import lay_out, paint

BAR_WIDTH = 220.0
_ENV = Environment(
    loader=PackageLoader("service.view", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_EventKey = tuple[int, datetime, str]  # visit, time, token: one event of the record


@dataclass(frozen=True)
class Head:
    """What is known once the record is scored."""

    patient_id: str
    nonce: str
    model_card_url: str
    explaining: tuple[Task, ...]  # the tasks whose reasons follow (the scored ones)


def render_head(head: Head, artifact: Artifact, scored: Scored, tasks: Sequence[Task]) -> str:
    """The page up to the reasons: header, risks, forecast and, when reasons follow, the
    note that they are being computed (hidden by the reasons' own style once they come)."""
    facts = scored.facts
    return _ENV.get_template("head.html").render(
        head=head,
        explaining=[TASK_TITLES[task].lower() for task in head.explaining],
        model={"name": artifact.config.name, "version": artifact.version},
        computed=_when(datetime.now(UTC)),
        facts=facts,
        last_updated=_when(facts.last_updated) if facts.last_updated else "unknown",
        risks=[_risk(artifact, scored, task) for task in tasks],
        forecast=[
            {"name": _name(s.token, artifact.display(s.token)), "p": percent(s.probability)}
            for s in scored.forecast
        ],
    )


def render_reasons(
    nonce: str, explanations: Mapping[Task, TaskExplanation], top: int, failed: str | None
) -> str:
    """The rest of the page: the timeline and the reasons of each explained task (or why
    there are none), the computation's numbers and caveats, and the tab script."""
    tasks = list(explanations)
    events, attributions = _union(explanations)
    layout = lay_out(events)
    paints = {task: _paint(attributions[task], task) for task in tasks}
    marks = [
        {
            "x": x,
            "y": y,
            "kind": e.kind,
            "token": e.token,
            "time": e.time.isoformat(),
            "words": e.words,
        }
        | {key: look[i] for key, look in paints[tasks[0]].items()}
        for i, (e, (x, y)) in enumerate(zip(events, layout.places, strict=True))
    ]  # events come from the explanations: none without a task
    return _ENV.get_template("reasons.html").render(
        nonce=nonce,
        failed=failed,
        tabs=[{"task": t.value, "title": TASK_TITLES[t]} for t in tasks],
        layout=layout,
        marks=marks,
        panels=[_panel(explanations[t], top) for t in tasks],
        data={"words": [e.words for e in events], "tasks": {t.value: paints[t] for t in tasks}},
    )


def render_error(status: int, message: str, hint: str, nonce: str) -> str:
    """A page for a refused or failed request (browsers follow view links)."""
    return _ENV.get_template("error.html").render(
        status=status, message=message, hint=hint, nonce=nonce
    )


def percent(probability: float) -> str:
    """0.317 -> "32%", 0.004 -> "0.4%": a reader's precision, finer where it is small."""
    value = probability * 100
    return f"{value:.1f}%" if value < 10 else f"{value:.0f}%"


def points(attribution: float) -> str:
    """An attribution as percentage points of probability, unsigned."""
    value = abs(attribution) * 100
    return "<0.01 points" if value < 0.01 else f"{value:.2f} points"


def _risk(artifact: Artifact, scored: Scored, task: Task) -> dict[str, Any]:
    thresholds = artifact.config.thresholds[task]
    probability = scored.probabilities.get(task)
    ticks = [("high", thresholds.high)]
    if thresholds.moderate < thresholds.high:  # equal: one cut, called high (as the cards)
        ticks.insert(0, ("moderate", thresholds.moderate))
    return {
        "task": task.value,
        "title": TASK_TITLES[task],
        "reason": scored.not_scored.get(task),
        "probability": None if probability is None else percent(probability),
        "level": None if probability is None else thresholds.level(probability),
        "bar": 0.0 if probability is None else max(1.0, probability * BAR_WIDTH),
        "ticks": [{"name": n, "x": p * BAR_WIDTH, "text": percent(p)} for n, p in ticks],
    }


def _union(
    explanations: Mapping[Task, TaskExplanation],
) -> tuple[list[ExplainedEvent], dict[Task, list[float | None]]]:
    """Every event any task's input held, in record order, and each task's attribution to
    each (None: that task's input ended before the event, as length of stay's does)."""
    seen: dict[_EventKey, ExplainedEvent] = {}
    for explanation in explanations.values():
        for event in explanation.events:
            seen.setdefault((event.visit, event.time, event.token), event)
    keys = sorted(seen, key=lambda k: (k[0], k[1]))  # stable: record order within a moment
    by_task = {
        task: {(e.visit, e.time, e.token): e.attribution for e in explanation.events}
        for task, explanation in explanations.items()
    }
    return [seen[k] for k in keys], {t: [a.get(k) for k in keys] for t, a in by_task.items()}


def _paint(attributions: list[float | None], task: Task) -> dict[str, list[Any]]:
    """The marks' look for one task, as the tab script applies it."""
    largest = max((abs(a) for a in attributions if a is not None), default=0.0)
    looks = [paint(a, largest) for a in attributions]
    return {
        "fill": [fill for fill, _ in looks],
        "r": [radius for _, radius in looks],
        "note": [_note(a, task) for a in attributions],
        "a": attributions,
    }


def _note(attribution: float | None, task: Task) -> str:
    if attribution is None:
        return f"Not in the input for {TASK_TITLES[task].lower()} (after its cut)"
    direction = "Raised" if attribution > 0 else "Lowered" if attribution < 0 else "Did not move"
    return f"{direction} the estimate of {TASK_TITLES[task].lower()} by {points(attribution)}"


def _panel(explanation: TaskExplanation, top: int) -> dict[str, Any]:
    def rows(events: list[ExplainedEvent]) -> list[dict[str, str]]:
        return [{"words": e.words, "points": points(e.attribution)} for e in events]

    return {
        "task": explanation.task.value,
        "title": TASK_TITLES[explanation.task],
        "contributing": rows(explanation.contributing(top)),
        "protective": rows(explanation.protective(top)),
        "probability": percent(explanation.probability),
        "baseline": percent(explanation.baseline_probability),
        "structure": _signed_points(explanation.structure),
        "gap": _signed_points(explanation.completeness_gap),
        "steps": explanation.steps,
        "events": len(explanation.events),
    }


def _signed_points(value: float) -> str:
    """Percentage points with a sign, "0.00" when they round to nothing (never "-0.00")."""
    text = f"{value * 100:+.2f}"
    return "0.00" if text[1:] == "0.00" else text


def _name(token: str, display: str | None) -> str:
    """A forecast event's name, with its lab level (quintile of training values)."""
    name = display or token.split("#", 1)[0]
    _, _, level = token.partition("#")
    if level.isdigit() and int(level) < len(LAB_LEVELS):
        name = f"{name}, {LAB_LEVELS[int(level)]}"
    return name


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
