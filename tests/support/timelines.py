"""Comparing timelines that came from different places."""

from __future__ import annotations

from fhir_adapter.timeline import Timeline


def timeline_content(timeline: Timeline) -> tuple[object, ...]:
    """Everything but where the data came from and when the server stored it."""
    return (
        timeline.patient,
        timeline.visits,
        timeline.events,
        timeline.conditions,
        dict(timeline.source.resource_counts),
        dict(timeline.source.dropped),
    )
