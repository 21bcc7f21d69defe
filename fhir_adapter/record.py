"""The raw resources of one patient, gathered from a server or from files.

Both the REST client and the file readers produce a ``PatientRecord``; only
``normalize.build_timeline`` turns one into a Timeline. That single hand-off is what makes
a patient fetched live and the same patient read from an export come out identical.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

JsonObject = dict[str, Any]

# The resource types the adapter reads; anything else in an export is skipped, not dropped.
CLINICAL_TYPES = (
    "Encounter",
    "Procedure",
    "MedicationRequest",
    "MedicationAdministration",
    "Observation",
    "Condition",
)
READ_TYPES = ("Patient", *CLINICAL_TYPES, "Medication")
# Types whose medication may be a reference to a Medication resource (read with _include).
MEDICATION_TYPES = ("MedicationRequest", "MedicationAdministration")


@dataclass(slots=True)
class PatientRecord:
    """One patient's resources, references already normalised to ``Type/id``.

    ``medications`` maps ``Medication/<id>`` to the Medication resources that
    MedicationRequest/Administration may reference. ``dropped`` carries counts of
    resources that were unusable before normalisation could see them.
    """

    patient_id: str
    patient: JsonObject | None
    resources: list[JsonObject]
    source: str
    medications: dict[str, JsonObject] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)
