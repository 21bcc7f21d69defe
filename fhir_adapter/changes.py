"""Has a patient's record of one resource type changed since an instant? Asked cheaply.

The incremental fetch could simply search ``Type?patient=X&_lastUpdated=gt<since>`` for
every type, and does when something changed. But on a server that does not index
``meta.lastUpdated`` together with the patient (sekmet, the test and demo server, scans
every resource of the type), that filter costs in proportion to the whole store, on every
warm predict: the whole check took 44 ms (median) with the filter against 8 ms with probes
at 60 shared patients (``ehrmamba bench warm-path``, docs/benchmarks.md).
A probe ``Type?patient=X&_sort=-_lastUpdated&_count=1`` costs what the patient's own
resources cost on any server that can sort, and its one entry, the newest, answers the
question: changed exactly when its ``meta.lastUpdated`` is after ``since``, which is the
same test the filter applies (the watermark is the newest ``meta.lastUpdated`` seen).

A probe is only believed when the server shows it sorted as asked: its ``self`` link names
``_sort=-_lastUpdated`` (FHIR R4 search: the self link carries the parameters the server
used) and it reported no issue (a server that ignores a sort it does not know says so in
an ``OperationOutcome`` entry, as sekmet does). Anything else, an entry without
``meta.lastUpdated`` included, counts as changed, so a doubt costs a search, never a
stale answer.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from urllib.parse import parse_qsl, urlsplit

from fhir_adapter.dates import parse_datetime
from fhir_adapter.record import JsonObject

NEWEST_FIRST = "-_lastUpdated"


class Probe(Enum):
    """What a probe answer says about one resource type."""

    UNCHANGED = "unchanged"
    CHANGED = "changed"
    NOT_SORTED = "not_sorted"  # the server did not show that it sorted: ask with the filter


def probe_query(patient_id: str) -> dict[str, str]:
    """The newest of the patient's resources of a type, alone."""
    return {"patient": patient_id, "_sort": NEWEST_FIRST, "_count": "1"}


def read_probe(bundle: JsonObject, since: datetime) -> Probe:
    """The verdict of one probe's searchset page (``since`` timezone-aware)."""
    if not _sorted_newest_first(bundle):
        return Probe.NOT_SORTED
    newest: datetime | None = None
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "OperationOutcome":
            return Probe.NOT_SORTED
        if (entry.get("search") or {}).get("mode", "match") != "match":
            continue
        updated = parse_datetime((resource.get("meta") or {}).get("lastUpdated"))
        if updated is None:
            return Probe.CHANGED
        newest = updated if newest is None else max(newest, updated)
    return Probe.CHANGED if newest is not None and newest > since else Probe.UNCHANGED


def _sorted_newest_first(bundle: JsonObject) -> bool:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "self":
            query = parse_qsl(urlsplit(str(link.get("url") or "")).query)
            return ("_sort", NEWEST_FIRST) in query
    return False
