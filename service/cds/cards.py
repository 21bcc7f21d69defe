"""Cards from a scored patient (CDS Hooks 2.0, "CDS Service Response").

The rule: one card per task of the service whose risk is moderate (indicator ``warning``)
or high (``critical``) by the artifact's thresholds; a low risk, or a task the model could
not score (length of stay without a current stay), gives no card. A call where everything is
low answers ``{"cards": []}``, the spec's "no decision support", for every hook alike: a
reassuring card on every chart opened would teach clinicians to ignore the service's cards,
and a model validated on synthetic patients only should not reassure anyone.

Cards come most urgent first. Each names its outcome in words, shows the probability,
the thresholds, the data it was computed from, the three events that raised it most (in
words, dated), the task's test AUROC, and links the model card and, when given one, the
patient's view (timeline and reasons).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC
from typing import Any, Literal

from model.artifact import Artifact, RiskThresholds
from model.tasks import Task
from service.cds.models import Card, Coding, Link, Source
from service.cds.services import TASK_TITLES, CdsService
from service.explaining import TaskExplanation
from service.scoring import DataFacts, Scored

# The project has no domain of its own; URNs stay the same in every deployment, which a
# code system must (``public_url`` would not).
TASK_SYSTEM = "urn:ehrmamba:task"
OVERRIDE_SYSTEM = "urn:ehrmamba:cds-override-reason"
VIEW_LABEL = "Open the timeline and reasons"
REASONS = 3  # contributing events a card lists

OVERRIDE_REASONS: tuple[Coding, ...] = tuple(
    Coding(system=OVERRIDE_SYSTEM, code=code, display=display)
    for code, display in (
        ("already-aware", "Already aware of this risk"),
        ("not-relevant", "Not relevant to this patient now"),
        ("disagree", "Disagree with the estimate"),
        ("record-incomplete", "The record the model saw is incomplete"),
    )
)

# The outcome each task estimates, as a clinician would say it (DESIGN.md 3.3).
_OUTCOMES: dict[Task, str] = {
    Task.MORTALITY: "death in hospital or within 32 days of discharge",
    Task.LENGTH_OF_STAY: "a hospital stay longer than 7 days",
    Task.READMISSION: "readmission or an emergency visit within 30 days of discharge",
    Task.HYPERTENSION: "a hypertension diagnosis",
    Task.FLUID_ELECTROLYTE: "a fluid, electrolyte or acid-base disorder diagnosis",
    Task.LIPID_METABOLISM: "a lipid metabolism disorder diagnosis",
}
_INDICATORS: dict[str, Literal["warning", "critical"]] = {
    "moderate": "warning",
    "high": "critical",
}


def cards_for(
    service: CdsService,
    scored: Scored,
    artifact: Artifact,
    model_card_url: str,
    view_url: str | None = None,
    explanations: Mapping[Task, TaskExplanation] | None = None,
) -> list[Card]:
    """The cards for ``scored`` under the module's rule, most urgent first; each links
    ``view_url`` (``service.routes.view.view_link``) when there is one, and lists its
    task's reasons when ``explanations`` is given (a task missing from it: still being
    computed)."""
    links = [Link(label=VIEW_LABEL, url=view_url, type="absolute")] if view_url else []
    cards: list[Card] = []
    for task in service.tasks:
        probability = scored.probabilities.get(task)
        if probability is None:
            continue
        thresholds = artifact.config.thresholds[task]
        level = thresholds.level(probability)
        indicator = _INDICATORS.get(level)
        if indicator is None:
            continue
        cards.append(
            Card(
                uuid=uuid.uuid4(),
                summary=f"{level.capitalize()} risk of {_OUTCOMES[task]} ({probability:.2f})",
                detail=_detail(
                    task, probability, thresholds, scored.facts, artifact.metrics, explanations
                ),
                indicator=indicator,
                source=Source(
                    label=f"{artifact.config.name} {artifact.version}",
                    url=model_card_url,
                    topic=Coding(system=TASK_SYSTEM, code=task.value, display=TASK_TITLES[task]),
                ),
                override_reasons=list(OVERRIDE_REASONS),
                links=links,
            )
        )
    return sorted(cards, key=lambda card: card.indicator != "critical")  # stable: task order


def _detail(
    task: Task,
    probability: float,
    thresholds: RiskThresholds,
    facts: DataFacts,
    metrics: dict[str, Any],
    explanations: Mapping[Task, TaskExplanation] | None,
) -> str:
    if thresholds.moderate < thresholds.high:
        limits = f"moderate from {thresholds.moderate:.2f}, high from {thresholds.high:.2f}"
    else:
        limits = f"high from {thresholds.high:.2f}"
    cut = "; older history was left out to fit the model's window" if facts.truncated else ""
    newest = (
        facts.last_updated.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        if facts.last_updated
        else "unknown"
    )
    lines = [
        f"**Estimated probability: {probability:.2f}** of {_OUTCOMES[task]} ({limits}).",
        "",
        f"Computed from {_count(facts.visits, 'visit')} and {_count(facts.events, 'event')}"
        f"{cut}. "
        f"Newest record update: {newest}.",
    ]
    if explanations is not None:  # reasons were asked for
        lines += ["", *_reasons(explanations.get(task))]
    auroc = _test_auroc(metrics, task)
    if auroc is not None:
        lines += ["", f"Test AUROC for this task: {auroc:.2f}, on synthetic test patients."]
    lines += [
        "",
        "Trained and tested on synthetic patients only; an estimate to weigh, not a "
        "diagnosis. See the model card for how it was made and where it falls short.",
    ]
    return "\n".join(lines)


def _reasons(explanation: TaskExplanation | None) -> list[str]:
    """The events that raised the estimate most, in words; or why they are not here."""
    if explanation is None:
        return ["Reasons: still being computed; open the timeline, or they come with the "
                "next card."]  # fmt: skip
    raised = explanation.contributing(REASONS)
    if not raised:
        return ["Reasons: no single event in the record raised this estimate."]
    items = [f"- {event.words}" for event in raised]
    return ["What raised this estimate most (integrated gradients):", *items]


def _test_auroc(metrics: dict[str, Any], task: Task) -> float | None:
    """The served method's mean test AUROC for ``task`` from metrics.json, if recorded."""
    served = metrics.get("served")
    method = served.get("method") if isinstance(served, dict) else None
    tasks = metrics.get("tasks")
    entry = tasks.get(task.value) if isinstance(tasks, dict) else None
    scores = entry.get(method) if isinstance(entry, dict) and method else None
    auroc = scores.get("auroc") if isinstance(scores, dict) else None
    mean = auroc.get("mean") if isinstance(auroc, dict) else None
    return float(mean) if isinstance(mean, int | float) else None


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
