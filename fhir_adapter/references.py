"""FHIR references: parsing them, and rewriting bundle-local ``urn:uuid`` ones.

Every reader hands the normaliser resources whose references read ``Type/id``, whatever
the source wrote (relative, absolute URL, versioned, or a transaction bundle's
``urn:uuid``), so one code path serves a live server and export files alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JsonObject = dict[str, Any]

# FHIR's id datatype ([A-Za-z0-9-.]{1,64}), less the ids made only of dots: "." and ".."
# are valid ids on paper but path segments in a URL (``Patient/..`` is the server's base).
FHIR_ID_PATTERN = r"^[A-Za-z0-9\-.]*[A-Za-z0-9\-][A-Za-z0-9\-.]*$"
FHIR_ID_MAX = 64


def parse_reference(reference: object) -> tuple[str | None, str] | None:
    """``(type, id)`` for a literal reference; type is None for an unresolved ``urn:uuid``.

    Accepts ``Type/id``, ``Type/id/_history/v`` and absolute URLs ending in either.
    Contained (``#id``) and empty references give None.
    """
    if not isinstance(reference, str):
        return None
    ref = reference.strip()
    if not ref or ref.startswith("#"):
        return None
    if ref.startswith(("urn:uuid:", "urn:oid:")):
        return None, ref.rsplit(":", 1)[-1]
    parts = [p for p in ref.split("?", 1)[0].split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2:
        return None
    return parts[-2], parts[-1]


def reference_id(holder: object, expected_type: str) -> str | None:
    """The id behind ``holder["reference"]`` when it points at ``expected_type``."""
    if not isinstance(holder, dict):
        return None
    parsed = parse_reference(holder.get("reference"))
    if parsed is None:
        return None
    rtype, rid = parsed
    return rid if rtype in (None, expected_type) else None


def patient_id_of(resource: JsonObject) -> str | None:
    """The patient a resource belongs to: its own id for a Patient, else subject/patient."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and rid else None
    for key in ("subject", "patient"):
        pid = reference_id(resource.get(key), "Patient")
        if pid:
            return pid
    return None


def rewrite_references(node: Any, full_urls: Mapping[str, str]) -> Any:
    """A copy of ``node`` with every ``reference`` found in ``full_urls`` replaced.

    Used on transaction bundles, whose entries point at each other by ``fullUrl``
    (``urn:uuid:...``) before a server has assigned ids.
    """
    if isinstance(node, dict):
        out: JsonObject = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in full_urls:
                out[key] = full_urls[value]
            else:
                out[key] = rewrite_references(value, full_urls)
        return out
    if isinstance(node, list):
        return [rewrite_references(item, full_urls) for item in node]
    return node
