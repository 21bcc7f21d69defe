"""The change probe's verdict on the edges the real server's answers do not reach: the
boundary instant, entries without ``meta.lastUpdated``, included resources."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fhir_adapter.changes import Probe, read_probe

SINCE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SELF = {"relation": "self", "url": "http://fhir/Observation?patient=p&_sort=-_lastUpdated&_count=1"}


def _page(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "link": [SELF], "entry": list(entries)}


def _match(updated: str | None, mode: str = "match") -> dict[str, Any]:
    meta = {} if updated is None else {"meta": {"lastUpdated": updated}}
    return {
        "resource": {"resourceType": "Observation", "id": "o", **meta},
        "search": {"mode": mode},
    }


def test_newest_after_the_watermark_is_a_change() -> None:
    assert read_probe(_page(_match("2026-03-01T12:00:00.001Z")), SINCE) is Probe.CHANGED


def test_newest_at_the_watermark_is_not() -> None:
    """The same test as ``_lastUpdated=gt<since>``: equal is not after."""
    assert read_probe(_page(_match("2026-03-01T13:00:00+01:00")), SINCE) is Probe.UNCHANGED


def test_no_resources_of_the_type_is_no_change() -> None:
    assert read_probe(_page(), SINCE) is Probe.UNCHANGED


def test_an_entry_without_last_updated_counts_as_changed() -> None:
    assert read_probe(_page(_match(None)), SINCE) is Probe.CHANGED


def test_included_resources_do_not_count() -> None:
    page = _page(_match("2026-01-01T00:00:00Z"), _match("2027-01-01T00:00:00Z", "include"))
    assert read_probe(page, SINCE) is Probe.UNCHANGED


def test_a_server_that_ignored_count_still_answers_with_the_newest() -> None:
    page = _page(_match("2026-01-01T00:00:00Z"), _match("2026-04-01T00:00:00Z"))
    assert read_probe(page, SINCE) is Probe.CHANGED
