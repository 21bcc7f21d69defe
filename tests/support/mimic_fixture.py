"""A small, deterministic folder in the layout of MIMIC-IV on FHIR (PhysioNet's demo, v2.x).

The real demo is open but must be downloaded from PhysioNet, which tests cannot do. This
generator writes what the adapter has to cope with in that export, from the profiles of the
MIMIC Implementation Guide (https://mimic.mit.edu/fhir), not from any MIMIC data:

- one gzipped NDJSON file per profile, named after the profile (``MimicPatient.ndjson.gz``,
  ``MimicEncounterED.ndjson.gz``, ``MimicObservationLabevents.ndjson.gz``, ...), each
  resource with ``meta.profile`` set and a uuid5 id, references as ``Patient/<id>``;
- hospital admissions told apart from ED and ICU stays only by their identifier system, with
  ``admission_type`` mapped into ``Encounter.class`` the way the MIMIC ETL does (an ELECTIVE
  admission has class AMB, an observation admission OBSENC);
- diagnoses and procedures in MIMIC's own ICD code systems, codes without dots, ICD-9 before
  a per-patient switch date and ICD-10 after it; diagnoses carry no time, only an encounter;
- prescriptions as MedicationRequests that reference Medication resources coded by NDC,
  formulary code or drug name (the ETL's order of preference), some without ``authoredOn``;
- lab results coded by ``d_labitems`` itemid with units, some outside any admission;
- dates shifted into the 22nd century, dates of death as plain dates.

Chartevents and organisation files are written too, a few lines each, so that a test sees
them skipped. The data are a format fixture with a learnable but noisy signal: hypertensive
patients get antihypertensives and higher creatinine more often, lipid disorders statins,
frail patients longer stays, more deaths and more readmissions.
"""

from __future__ import annotations

import gzip
import json
import math
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

JsonObject = dict[str, Any]

BASE = "http://mimic.mit.edu/fhir/mimic"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PATIENTS = 80
# MIMIC's timestamps carry the offset of the database's zone; one fixed offset will do.
_ZONE = timezone(timedelta(hours=-5))

# admission_type -> (share, the v3 ActCode class the ETL maps it to, arrives through the ED)
_ADMISSION_TYPES: dict[str, tuple[float, str, bool]] = {
    "EW EMER.": (0.45, "EMER", True),
    "URGENT": (0.15, "AMB", False),
    "ELECTIVE": (0.15, "AMB", False),
    "OBSERVATION ADMIT": (0.1, "OBSENC", True),
    "SURGICAL SAME DAY ADMISSION": (0.1, "SS", False),
    "DIRECT EMER.": (0.05, "EMER", False),
}

# Chronic conditions (ICD-9-CM, ICD-10-CM), written on every admission of a patient who has them.
CHRONIC: dict[str, tuple[str, str]] = {
    "hypertension": ("4019", "I10"),
    "lipid": ("2724", "E785"),
    "heart_failure": ("4280", "I509"),
    "fluid": ("2761", "E871"),
}
# Acute diagnoses, each on an admission with a small chance.
_ACUTE: tuple[tuple[str, str], ...] = (
    ("486", "J189"),  # pneumonia
    ("5990", "N390"),  # urinary tract infection
    ("0389", "A419"),  # sepsis
    ("5849", "N179"),  # acute kidney failure
    ("42731", "I4891"),  # atrial fibrillation
    ("25000", "E119"),  # type 2 diabetes
    ("496", "J449"),  # COPD
    ("78650", "R079"),  # chest pain
)
# Procedures (ICD-9-CM volume 3, ICD-10-PCS): ventilation, central line, intubation, ...
_PROCEDURES: tuple[tuple[str, str], ...] = (
    ("9671", "5A1935Z"),
    ("9672", "5A1955Z"),
    ("3893", "02HV33Z"),
    ("9604", "0BH17EZ"),
    ("4701", "0DTJ4ZZ"),
    ("9915", "3E0G76Z"),
)


@dataclass(frozen=True)
class _Lab:
    itemid: str
    unit: str
    mean: float
    sd: float


# d_labitems itemid, unit, and a plausible normal distribution of values.
_LABS: dict[str, _Lab] = {
    "creatinine": _Lab("50912", "mg/dL", 1.0, 0.25),
    "sodium": _Lab("50983", "mEq/L", 139.0, 3.0),
    "potassium": _Lab("50971", "mEq/L", 4.2, 0.4),
    "glucose": _Lab("50931", "mg/dL", 110.0, 25.0),
    "hemoglobin": _Lab("51222", "g/dL", 12.5, 1.5),
    "wbc": _Lab("51301", "K/uL", 8.0, 2.5),
    "lactate": _Lab("50813", "mmol/L", 1.4, 0.5),
    "urea": _Lab("51006", "mg/dL", 16.0, 6.0),
    "bilirubin": _Lab("50885", "mg/dL", 0.7, 0.3),
    "cholesterol": _Lab("50907", "mg/dL", 180.0, 30.0),
}


@dataclass(frozen=True)
class _Drug:
    key: str
    name: str
    ndc: str | None
    formulary: str | None


# Invented product codes in the shape of MIMIC's prescriptions columns (11-digit NDC, formulary
# code); two drugs have no NDC, one has only its name, as in the real table.
_DRUGS: dict[str, _Drug] = {
    d.key: d
    for d in (
        _Drug("metoprolol", "Metoprolol Tartrate", "51079025520", "METO25"),
        _Drug("lisinopril", "Lisinopril", "68180051301", "LISI10"),
        _Drug("amlodipine", "Amlodipine", "00069152066", "AMLO5"),
        _Drug("atorvastatin", "Atorvastatin", "00071015523", "ATOR40"),
        _Drug("simvastatin", "Simvastatin", "00006073531", "SIMV20"),
        _Drug("heparin", "Heparin", "63323026201", "HEPA5I"),
        _Drug("acetaminophen", "Acetaminophen", "00904198661", "ACET325"),
        _Drug("insulin", "Insulin", None, "GLAR100I"),
        _Drug("furosemide", "Furosemide", "00054829725", "FURO40I"),
        _Drug("potassium", "Potassium Chloride", "58177000104", "KCL20P"),
        _Drug("vancomycin", "Vancomycin", "00409653301", "VANC1F"),
        _Drug("pantoprazole", "Pantoprazole", None, "PANT40"),
        _Drug("docusate", "Docusate Sodium", None, None),
    )
}


def profile(name: str) -> str:
    """The canonical URL of a MIMIC profile, as ``meta.profile`` carries it."""
    return f"{BASE}/StructureDefinition/{name}"


def code_system(name: str) -> str:
    """The canonical URL of a MIMIC code system."""
    return f"{BASE}/CodeSystem/{name}"


def identifier_system(name: str) -> str:
    """The canonical URL of a MIMIC identifier namespace."""
    return f"{BASE}/identifier/{name}"


def resource_id(rtype: str, natural_key: str) -> str:
    """A uuid5 id, as the MIMIC ETL derives ids from table keys (namespace per type)."""
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"{BASE}/{rtype}")
    return str(uuid.uuid5(namespace, natural_key))


@dataclass
class _Writer:
    """Resources grouped by the file (profile) they belong in."""

    files: dict[str, list[JsonObject]] = field(default_factory=lambda: defaultdict(list))

    def add(self, file: str, rtype: str, profile_name: str, rid: str, **body: Any) -> str:
        self.files[file].append(
            {"resourceType": rtype, "id": rid, "meta": {"profile": [profile(profile_name)]}, **body}
        )
        return rid

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for file, resources in sorted(self.files.items()):
            with (
                (folder / f"{file}.ndjson.gz").open("wb") as raw,
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out,
            ):
                for resource in resources:
                    out.write(json.dumps(resource, sort_keys=True).encode() + b"\n")


@dataclass(frozen=True)
class _Traits:
    """What drives one patient's data: the hidden truth the signal comes from."""

    age: float  # at the first admission
    female: bool
    frailty: float  # roughly 0..2
    chronic: frozenset[str]
    readmits: bool


def write_mimic_fhir(folder: Path, patients: int = PATIENTS, seed: int = 7) -> Path:
    """Write a MIMIC-IV on FHIR style folder of ``patients`` patients into ``folder``.

    The same ``patients`` and ``seed`` always give byte-identical files.
    """
    rng = np.random.default_rng(seed)
    writer = _Writer()
    _write_medications(writer)
    organization = writer.add(
        "MimicOrganization",
        "Organization",
        "mimic-organization",
        resource_id("Organization", "bidmc"),
        name="Beth Israel Deaconess Medical Center",
    )
    for index in range(patients):
        pid = _write_patient(writer, rng, 10_000_000 + index, organization)
        if index < 3:
            _write_chartevents(writer, pid, count=2)
    writer.write(folder)
    return folder


def _write_medications(writer: _Writer) -> None:
    """One Medication per drug, coded by NDC, else formulary code, else name (the ETL's
    order); its id derives from the drug, so orders can reference it by key."""
    for drug in _DRUGS.values():
        identifiers = [
            {"system": code_system(system), "value": value}
            for system, value in (
                ("mimic-medication-ndc", drug.ndc),
                ("mimic-medication-formulary-drug-cd", drug.formulary),
                ("mimic-medication-name", drug.name),
            )
            if value is not None
        ]
        first = identifiers[0]
        writer.add(
            "MimicMedication",
            "Medication",
            "mimic-medication",
            resource_id("Medication", drug.key),
            identifier=identifiers,
            code={"coding": [{"system": first["system"], "code": first["value"]}]},
        )


def _traits(rng: np.random.Generator) -> _Traits:
    age = float(rng.uniform(25, 90))
    frailty = max(0.0, (age - 25) / 50 + float(rng.normal(0, 0.35)))
    chronic: set[str] = set()
    if rng.random() < 0.2 + 0.35 * (age > 60):
        chronic.add("hypertension")
    if rng.random() < 0.2 + 0.25 * ("hypertension" in chronic):
        chronic.add("lipid")
    if rng.random() < 0.05 + 0.15 * frailty:
        chronic.add("heart_failure")
    if rng.random() < 0.15:
        chronic.add("fluid")
    readmits = bool(rng.random() < 0.25 + 0.25 * ("heart_failure" in chronic) + 0.1 * frailty)
    return _Traits(age, bool(rng.random() < 0.5), frailty, frozenset(chronic), readmits)


def _write_patient(
    writer: _Writer,
    rng: np.random.Generator,
    subject_id: int,
    organization: str,
) -> str:
    """One patient and all their stays; returns the Patient id."""
    traits = _traits(rng)
    pid = resource_id("Patient", str(subject_id))
    # Each MIMIC patient has a date shift of their own: first admissions spread over a century.
    first = datetime(int(rng.integers(2110, 2185)), 1, 1, tzinfo=_ZONE) + timedelta(
        days=float(rng.uniform(0, 365))
    )
    icd10_from = first + timedelta(days=float(rng.uniform(-400, 900)))
    born = first - timedelta(days=traits.age * 365.25)
    admissions = 1 + min(int(rng.poisson(0.9)), 3)
    start = first.replace(minute=0, second=0, microsecond=0)
    died_at: datetime | None = None
    for number in range(admissions):
        last = number == admissions - 1
        dies = last and rng.random() < _sigmoid(-3.2 + 2.0 * traits.frailty)
        hadm_id = 20_000_000 + subject_id % 1_000_000 * 10 + number  # 8 digits, as in MIMIC
        end = _write_admission(writer, rng, pid, hadm_id, start, traits, dies, icd10_from)
        if dies:
            # Most deaths in hospital (the day of discharge), some within weeks after.
            after = 0.0 if rng.random() < 0.6 else float(rng.uniform(2, 25))
            died_at = end + timedelta(days=after)
            break
        _write_outpatient_labs(writer, rng, pid, hadm_id, end, traits)
        gap = rng.uniform(3, 26) if traits.readmits and rng.random() < 0.7 else rng.uniform(60, 700)
        if rng.random() < 0.25:  # an ED visit after the stay, sent home
            _write_ed_visit(writer, rng, pid, hadm_id, end + timedelta(days=gap / 2))
        start = (end + timedelta(days=float(gap))).replace(minute=0, second=0, microsecond=0)
    writer.add(
        "MimicPatient",
        "Patient",
        "mimic-patient",
        pid,
        identifier=[{"system": identifier_system("patient"), "value": str(subject_id)}],
        name=[{"use": "official", "family": f"Patient_{subject_id}"}],
        gender="female" if traits.female else "male",
        birthDate=born.date().isoformat(),
        managingOrganization={"reference": f"Organization/{organization}"},
        **({"deceasedDateTime": died_at.date().isoformat()} if died_at else {}),
    )
    return pid


def _write_admission(
    writer: _Writer,
    rng: np.random.Generator,
    pid: str,
    hadm_id: int,
    admit: datetime,
    traits: _Traits,
    dies: bool,
    icd10_from: datetime,
) -> datetime:
    """One hospital admission with its ED and ICU stays, diagnoses, procedures, orders and
    labs; returns the discharge time."""
    types = list(_ADMISSION_TYPES)
    shares = np.array([_ADMISSION_TYPES[t][0] for t in types])
    admission_type = types[int(rng.choice(len(types), p=shares / shares.sum()))]
    _, class_code, via_ed = _ADMISSION_TYPES[admission_type]
    icu = bool(rng.random() < 0.15 + 0.2 * traits.frailty)
    days = math.exp(float(rng.normal(math.log(2.6) + 0.45 * traits.frailty + 0.5 * icu, 0.55)))
    days = max(days, 1.5 if dies else 0.4)
    discharge = admit + timedelta(days=days)
    eid = resource_id("Encounter", str(hadm_id))
    writer.add(
        "MimicEncounter",
        "Encounter",
        "mimic-encounter",
        eid,
        identifier=[
            {"system": identifier_system("encounter-hosp"), "value": str(hadm_id), "use": "usual"}
        ],
        status="finished",
        **{"class": {"system": ACT_CODE, "code": class_code}},
        type=[{"coding": [{"system": "http://snomed.info/sct", "code": "308335008"}]}],
        priority={
            "coding": [{"system": code_system("mimic-admission-type"), "code": admission_type}]
        },
        subject={"reference": f"Patient/{pid}"},
        period={"start": _ts(admit), "end": _ts(discharge)},
    )
    if via_ed:
        arrived = admit - timedelta(hours=float(rng.uniform(2, 8)))
        _write_ed_stay(
            writer, pid, hadm_id + 10_000_000, arrived, admit + timedelta(minutes=50), eid
        )
    if icu:
        icu_in = admit + timedelta(hours=float(rng.uniform(1, 12)))
        icu_out = min(icu_in + timedelta(days=float(rng.uniform(1, 4))), discharge)
        writer.add(
            "MimicEncounterICU",
            "Encounter",
            "mimic-encounter-icu",
            resource_id("EncounterICU", str(hadm_id)),
            identifier=[
                {"system": identifier_system("encounter-icu"), "value": str(hadm_id + 15_000_000)}
            ],
            status="finished",
            **{"class": {"system": ACT_CODE, "code": "ACUTE"}},
            subject={"reference": f"Patient/{pid}"},
            partOf={"reference": f"Encounter/{eid}"},
            period={"start": _ts(icu_in), "end": _ts(icu_out)},
        )
    icd10 = admit >= icd10_from
    _write_diagnoses(writer, rng, pid, hadm_id, eid, traits, icd10)
    _write_procedures(writer, rng, pid, hadm_id, eid, admit, discharge, icu, icd10)
    _write_orders(writer, rng, pid, hadm_id, eid, admit, discharge, traits)
    _write_labs(writer, rng, pid, hadm_id, eid, admit, discharge, traits, dies)
    return discharge


def _write_ed_stay(
    writer: _Writer, pid: str, stay_id: int, start: datetime, end: datetime, part_of: str | None
) -> str:
    """An ED stay (edstays), part of the admission it led to if any; returns its id."""
    return writer.add(
        "MimicEncounterED",
        "Encounter",
        "mimic-encounter-ed",
        resource_id("EncounterED", str(stay_id)),
        identifier=[{"system": identifier_system("encounter-ed"), "value": str(stay_id)}],
        status="finished",
        **{"class": {"system": ACT_CODE, "code": "EMER", "display": "emergency"}},
        subject={"reference": f"Patient/{pid}"},
        period={"start": _ts(start), "end": _ts(end)},
        **({"partOf": {"reference": f"Encounter/{part_of}"}} if part_of else {}),
    )


def _write_ed_visit(
    writer: _Writer, rng: np.random.Generator, pid: str, hadm_id: int, start: datetime
) -> None:
    """An ED stay after admission ``hadm_id`` that sent the patient home, with its diagnosis."""
    end = start + timedelta(hours=float(rng.uniform(2, 9)))
    stay_id = hadm_id + 12_000_000
    stay = _write_ed_stay(writer, pid, stay_id, start, end, None)
    writer.add(
        "MimicConditionED",
        "Condition",
        "mimic-condition-ed",
        resource_id("ConditionED", f"{stay_id}-R079"),
        category=[_encounter_diagnosis()],
        code={"coding": [{"system": code_system("mimic-diagnosis-icd10"), "code": "R079"}]},
        subject={"reference": f"Patient/{pid}"},
        encounter={"reference": f"Encounter/{stay}"},
    )


def _write_diagnoses(
    writer: _Writer,
    rng: np.random.Generator,
    pid: str,
    hadm_id: int,
    eid: str,
    traits: _Traits,
    icd10: bool,
) -> None:
    version = int(icd10)
    codes = [CHRONIC[name][version] for name in sorted(traits.chronic)]
    codes += [pair[version] for pair in _ACUTE if rng.random() < 0.12]
    system = code_system("mimic-diagnosis-icd10" if icd10 else "mimic-diagnosis-icd9")
    for seq, code in enumerate(codes, start=1):
        writer.add(
            "MimicCondition",
            "Condition",
            "mimic-condition",
            resource_id("Condition", f"{hadm_id}-{seq}-{code}"),
            category=[_encounter_diagnosis()],
            code={"coding": [{"system": system, "code": code}]},
            subject={"reference": f"Patient/{pid}"},
            encounter={"reference": f"Encounter/{eid}"},
        )


def _write_procedures(
    writer: _Writer,
    rng: np.random.Generator,
    pid: str,
    hadm_id: int,
    eid: str,
    admit: datetime,
    discharge: datetime,
    icu: bool,
    icd10: bool,
) -> None:
    system = code_system("mimic-procedure-icd10" if icd10 else "mimic-procedure-icd9")
    version = int(icd10)
    for seq, pair in enumerate(_PROCEDURES, start=1):
        if rng.random() < (0.45 if icu and seq <= 4 else 0.08):
            day = admit + (discharge - admit) * float(rng.uniform(0, 1))
            writer.add(
                "MimicProcedure",
                "Procedure",
                "mimic-procedure",
                resource_id("Procedure", f"{hadm_id}-{seq}-{pair[version]}"),
                status="completed",
                code={"coding": [{"system": system, "code": pair[version]}]},
                subject={"reference": f"Patient/{pid}"},
                encounter={"reference": f"Encounter/{eid}"},
                # chartdate: a date only, written as midnight
                performedDateTime=_ts(datetime.combine(day.date(), datetime.min.time(), _ZONE)),
            )


def _order_chance(drug: str, traits: _Traits) -> float:
    """How likely an admission orders ``drug``: the learnable part of the signal."""

    def has(name: str) -> float:
        return float(name in traits.chronic)

    boosts = {
        "metoprolol": 0.15 + 0.4 * has("hypertension") + 0.2 * has("heart_failure"),
        "lisinopril": 0.08 + 0.45 * has("hypertension"),
        "amlodipine": 0.05 + 0.35 * has("hypertension"),
        "atorvastatin": 0.08 + 0.5 * has("lipid"),
        "simvastatin": 0.04 + 0.25 * has("lipid"),
        "furosemide": 0.1 + 0.5 * has("heart_failure"),
        "potassium": 0.1 + 0.4 * has("fluid"),
        "vancomycin": 0.05 + 0.15 * traits.frailty,
        "insulin": 0.15,
    }
    return boosts.get(drug, 0.45)


def _write_orders(
    writer: _Writer,
    rng: np.random.Generator,
    pid: str,
    hadm_id: int,
    eid: str,
    admit: datetime,
    discharge: datetime,
    traits: _Traits,
) -> None:
    for number, drug in enumerate(_DRUGS):
        if rng.random() >= _order_chance(drug, traits):
            continue
        entered = admit + (discharge - admit) * float(rng.uniform(0, 0.6))
        order: JsonObject = {
            "identifier": [
                {
                    "system": identifier_system("medication-request-phid"),
                    "value": str(hadm_id * 100 + number),
                }
            ],
            "status": "completed" if rng.random() < 0.8 else "stopped",
            "intent": "order",
            "medicationReference": {"reference": f"Medication/{resource_id('Medication', drug)}"},
            "subject": {"reference": f"Patient/{pid}"},
            "encounter": {"reference": f"Encounter/{eid}"},
            "dispenseRequest": {"validityPeriod": {"start": _ts(entered), "end": _ts(discharge)}},
        }
        if rng.random() < 0.9:  # the rest have no pharmacy row, so no authoredOn, as in MIMIC
            order["authoredOn"] = _ts(entered)
        writer.add(
            "MimicMedicationRequest",
            "MedicationRequest",
            "mimic-medication-request",
            resource_id("MedicationRequest", f"{hadm_id}-{drug}"),
            **order,
        )


def _lab_value(name: str, rng: np.random.Generator, traits: _Traits, dying: bool) -> float:
    lab = _LABS[name]
    shift = {
        "creatinine": 0.35 * ("hypertension" in traits.chronic) + 0.3 * traits.frailty,
        "sodium": -6.0 * ("fluid" in traits.chronic),
        "cholesterol": 45.0 * ("lipid" in traits.chronic),
        "lactate": 1.6 * dying + 0.3 * traits.frailty,
        "urea": 8.0 * traits.frailty,
    }.get(name, 0.0)
    return round(max(0.05, float(rng.normal(lab.mean + shift, lab.sd))), 2)


def _write_labs(
    writer: _Writer,
    rng: np.random.Generator,
    pid: str,
    hadm_id: int,
    eid: str,
    admit: datetime,
    discharge: datetime,
    traits: _Traits,
    dies: bool,
) -> None:
    days = max(1, math.ceil((discharge - admit) / timedelta(days=1)))
    names = list(_LABS)
    for day in range(min(days, 12)):
        drawn = admit + timedelta(days=day, hours=float(rng.uniform(0.5, 10)))
        if drawn >= discharge:
            break
        for name in rng.choice(names, size=4, replace=False):
            key = f"{hadm_id}-{day}-{name}"
            writer.add(
                "MimicObservationLabevents",
                "Observation",
                "mimic-observation-labevents",
                resource_id("ObservationLab", key),
                **_lab_body(str(name), pid, drawn, rng, traits, dies and day >= days - 3, eid),
            )


def _write_outpatient_labs(
    writer: _Writer,
    rng: np.random.Generator,
    pid: str,
    key: int,
    after: datetime,
    traits: _Traits,
) -> None:
    """Labs drawn in clinic, with no hadm_id and so no encounter, as MIMIC has many of."""
    drawn = after + timedelta(days=float(rng.uniform(10, 40)))
    writer.add(
        "MimicObservationLabevents",
        "Observation",
        "mimic-observation-labevents",
        resource_id("ObservationLab", f"{key}-outpatient"),
        **_lab_body("creatinine", pid, drawn, rng, traits, False, None),
    )


def _lab_body(
    name: str,
    pid: str,
    drawn: datetime,
    rng: np.random.Generator,
    traits: _Traits,
    dying: bool,
    eid: str | None,
) -> JsonObject:
    lab = _LABS[name]
    units = code_system("mimic-units")
    return {
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                        "display": "Laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": code_system("mimic-d-labitems"), "code": lab.itemid}]},
        "subject": {"reference": f"Patient/{pid}"},
        **({"encounter": {"reference": f"Encounter/{eid}"}} if eid else {}),
        "effectiveDateTime": _ts(drawn),
        "issued": _ts(drawn + timedelta(hours=1)),
        "valueQuantity": {
            "value": _lab_value(name, rng, traits, dying),
            "unit": lab.unit,
            "system": units,
            "code": lab.unit,
        },
    }


def _write_chartevents(writer: _Writer, pid: str, count: int) -> None:
    """A few charted heart rates, which the adapter must skip by the file's name."""
    for index in range(count):
        writer.add(
            "MimicObservationChartevents",
            "Observation",
            "mimic-observation-chartevents",
            resource_id("ObservationChart", f"{pid}-{index}"),
            status="final",
            code={
                "coding": [{"system": code_system("mimic-chartevents-d-items"), "code": "220045"}]
            },
            subject={"reference": f"Patient/{pid}"},
            effectiveDateTime=_ts(datetime(2150, 1, 1, tzinfo=UTC)),
            valueQuantity={"value": 80 + index, "unit": "bpm"},
        )


def _encounter_diagnosis() -> JsonObject:
    return {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                "code": "encounter-diagnosis",
                "display": "Encounter Diagnosis",
            }
        ]
    }


def _ts(moment: datetime) -> str:
    """A FHIR dateTime with MIMIC's zone offset and whole seconds."""
    return moment.astimezone(_ZONE).replace(microsecond=0).isoformat()


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))
