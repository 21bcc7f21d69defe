"""A handful of real patients from ``../shared/data`` for tests against the FHIR server."""

from __future__ import annotations

import tarfile
from functools import cache
from pathlib import Path

from fhir_adapter.files import ExportReader
from fhir_adapter.record import PatientRecord

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SYNTHEA = SHARED_DATA / "synthea-r4" / "bundles.tar.gz"
CLINOSIM = SHARED_DATA / "clinosim-us" / "ndjson.tar.gz"


def require_shared_data() -> None:
    """Fail loudly (never skip) when the shared data sets are not beside the checkout."""
    for path in (SYNTHEA, CLINOSIM):
        if not path.is_file():
            raise FileNotFoundError(f"shared data missing: {path} (see ../shared/data/README.md)")


def synthea_records(folder: Path, count: int) -> list[PatientRecord]:
    """The first ``count`` patient bundles of the Synthea archive, extracted into ``folder``."""
    return list(ExportReader(extract_synthea(folder, count)).records())


def extract_synthea(folder: Path, count: int) -> Path:
    """Extract the first ``count`` patient bundles of the Synthea archive into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(SYNTHEA, mode="r|gz") as archive:
        taken = 0
        for member in archive:
            name = Path(member.name).name
            if not member.isfile() or name.startswith(("hospital", "practitioner")):
                continue
            data = archive.extractfile(member)
            if data is not None:
                (folder / name).write_bytes(data.read())
                taken += 1
            if taken == count:
                break
    return folder


@cache
def clinosim_records(count: int) -> tuple[PatientRecord, ...]:
    """``count`` clinosim patients, the first ones (by id) that had an inpatient stay."""
    picked: list[PatientRecord] = []
    for record in ExportReader(CLINOSIM).records():
        classes = {
            (r.get("class") or {}).get("code")
            for r in record.resources
            if r.get("resourceType") == "Encounter"
        }
        if "IMP" in classes:
            picked.append(record)
            if len(picked) == count:
                break
    return tuple(picked)
