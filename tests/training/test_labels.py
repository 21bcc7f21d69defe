"""Task labels (DESIGN.md 3.3, ``training/labels.py``): every rule at its boundary.

Each test builds one patient's Timeline by hand and checks the samples and the counted
exclusions of one task, so a failure names the rule that broke.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta

import pytest

from fhir_adapter.timeline import ConditionLabel, Patient, SourceFacts, Timeline, Visit, VisitClass
from fhir_adapter.vocabulary import TASK_TOKENS
from model.tasks import CONDITION_TASKS, Task
from training.codesets import CodeSet, load_codesets
from training.labels import CohortContext, Sample, label_patient, observation_end

T0 = datetime(2020, 1, 1, tzinfo=UTC)
SECOND = timedelta(seconds=1)
DAY = timedelta(days=1)
FAR = T0 + timedelta(days=3650)  # observation end well after every window
INPATIENT, EMERGENCY, AMBULATORY, OTHER = (
    VisitClass.INPATIENT,
    VisitClass.EMERGENCY,
    VisitClass.AMBULATORY,
    VisitClass.OTHER,
)

CODESETS = load_codesets()


# --- tiny builders -----------------------------------------------------------------------


def visit(vid: str, start: datetime, end: datetime | None, cls: VisitClass = INPATIENT) -> Visit:
    return Visit(vid, start, end, cls, (vid,))


def timeline(
    visits: list[Visit],
    *,
    deceased: bool = False,
    deceased_at: datetime | None = None,
    conditions: tuple[str, ...] = (),
) -> Timeline:
    patient = Patient("p1", date(1950, 1, 1), "female", deceased or deceased_at is not None,
                      deceased_at)  # fmt: skip
    labels = [ConditionLabel(code, T0, None) for code in conditions]
    return Timeline(patient, visits, [], labels, SourceFacts("test"))


def run(
    tl: Timeline, obs_end: datetime = FAR, *, classes_known: bool = True
) -> tuple[list[Sample], Counter[str]]:
    return label_patient(tl, CODESETS, CohortContext(obs_end, classes_known))


def of(samples: list[Sample], task: Task) -> list[Sample]:
    return [s for s in samples if s.task is task]


def one(samples: list[Sample], task: Task) -> Sample:
    found = of(samples, task)
    assert len(found) == 1, found
    return found[0]


def stay(days: float = 3, start: datetime = T0) -> Visit:
    return visit("stay", start, start + timedelta(days=days))


END = T0 + 3 * DAY  # end of the default stay


# --- tasks and tokens --------------------------------------------------------------------


def test_task_names_and_tokens() -> None:
    assert [t.value for t in Task] == [
        "mortality",
        "length_of_stay",
        "readmission",
        "hypertension",
        "fluid_electrolyte",
        "lipid_metabolism",
    ]
    assert [t.token for t in Task] == list(TASK_TOKENS)
    assert Task.MORTALITY.token == "[MOR]"
    assert Task.LIPID_METABOLISM.token == "[C2]"
    assert set(CODESETS) == set(CONDITION_TASKS)


# --- mortality ---------------------------------------------------------------------------


def test_mortality_death_exactly_at_end_plus_32_days_is_positive() -> None:
    samples, excluded = run(timeline([stay()], deceased_at=END + timedelta(days=32)))
    assert one(samples, Task.MORTALITY) == Sample(Task.MORTALITY, 1, END, "stay")
    assert not excluded["mortality:not_observed"]


def test_mortality_death_one_second_after_the_window_is_negative() -> None:
    samples, _ = run(timeline([stay()], deceased_at=END + timedelta(days=32) + SECOND))
    assert one(samples, Task.MORTALITY).label == 0


def test_mortality_death_during_the_stay_and_at_its_start() -> None:
    samples, _ = run(timeline([stay()], deceased_at=T0 + DAY))
    assert one(samples, Task.MORTALITY).label == 1
    samples, _ = run(timeline([stay()], deceased_at=T0))
    assert one(samples, Task.MORTALITY).label == 1


def test_mortality_death_recorded_before_the_stay_is_excluded_as_contradictory() -> None:
    samples, excluded = run(timeline([stay()], deceased_at=T0 - SECOND))
    assert of(samples, Task.MORTALITY) == []
    assert excluded["mortality:death_before_stay"] == 1


def test_mortality_deceased_without_time_is_excluded() -> None:
    samples, excluded = run(timeline([stay()], deceased=True))
    assert of(samples, Task.MORTALITY) == []
    assert excluded["mortality:death_time_unknown"] == 1


def test_mortality_alive_but_not_observed_for_32_days_is_excluded() -> None:
    window_end = END + timedelta(days=32)
    samples, excluded = run(timeline([stay()]), window_end - SECOND)
    assert of(samples, Task.MORTALITY) == []
    assert excluded["mortality:not_observed"] == 1
    samples, excluded = run(timeline([stay()]), window_end)
    assert one(samples, Task.MORTALITY) == Sample(Task.MORTALITY, 0, END, "stay")
    assert not excluded["mortality:not_observed"]


def test_mortality_known_later_death_needs_no_observation() -> None:
    # Dying after the window proves the patient was alive through it.
    late = END + timedelta(days=40)
    samples, excluded = run(timeline([stay()], deceased_at=late), END)
    assert one(samples, Task.MORTALITY).label == 0
    assert not excluded["mortality:not_observed"]


def test_mortality_last_inpatient_stay_open_is_excluded() -> None:
    visits = [stay(), visit("open", END + 10 * DAY, None)]
    samples, excluded = run(timeline(visits))
    assert of(samples, Task.MORTALITY) == []
    assert excluded["mortality:open_stay"] == 1


def test_mortality_uses_only_the_last_inpatient_visit() -> None:
    first = visit("first", T0, T0 + 2 * DAY)
    last = visit("last", T0 + 100 * DAY, T0 + 105 * DAY)
    after = visit("clinic", T0 + 110 * DAY, T0 + 110 * DAY + timedelta(hours=1), AMBULATORY)
    # Death within 32 days of the first stay but long after the last one's window.
    tl = timeline([first, last, after], deceased_at=T0 + 200 * DAY)
    samples, _ = run(tl)
    assert one(samples, Task.MORTALITY) == Sample(Task.MORTALITY, 0, last.end, "last")
    # Death within the last stay's window: positive, still one sample.
    samples, _ = run(timeline([first, last, after], deceased_at=T0 + 120 * DAY))
    assert one(samples, Task.MORTALITY) == Sample(Task.MORTALITY, 1, last.end, "last")


def test_mortality_ignores_non_inpatient_visits_when_classes_are_known() -> None:
    emergency = visit("er", T0, T0 + timedelta(hours=5), EMERGENCY)
    samples, excluded = run(timeline([emergency], deceased_at=T0 + DAY))
    assert of(samples, Task.MORTALITY) == []
    assert excluded["mortality:no_index_visit"] == 1


# --- length of stay ----------------------------------------------------------------------


def test_length_of_stay_exactly_24h_is_included_with_cut_at_24h() -> None:
    samples, excluded = run(timeline([visit("v", T0, T0 + timedelta(hours=24))]))
    sample = one(samples, Task.LENGTH_OF_STAY)
    assert sample == Sample(Task.LENGTH_OF_STAY, 0, T0 + timedelta(hours=24), "v")
    assert not excluded["length_of_stay:stay_under_24h"]


def test_length_of_stay_under_24h_is_excluded() -> None:
    samples, excluded = run(timeline([visit("v", T0, T0 + timedelta(hours=24) - SECOND)]))
    assert of(samples, Task.LENGTH_OF_STAY) == []
    assert excluded["length_of_stay:stay_under_24h"] == 1


def test_length_of_stay_exactly_7_days_is_negative_and_one_second_more_positive() -> None:
    samples, _ = run(timeline([visit("v", T0, T0 + 7 * DAY)]))
    assert one(samples, Task.LENGTH_OF_STAY) == Sample(Task.LENGTH_OF_STAY, 0, T0 + DAY, "v")
    samples, _ = run(timeline([visit("v", T0, T0 + 7 * DAY + SECOND)]))
    assert one(samples, Task.LENGTH_OF_STAY) == Sample(Task.LENGTH_OF_STAY, 1, T0 + DAY, "v")


def test_length_of_stay_open_stay_is_excluded() -> None:
    samples, excluded = run(timeline([visit("v", T0, None)]))
    assert of(samples, Task.LENGTH_OF_STAY) == []
    assert excluded["length_of_stay:open_stay"] == 1


def test_length_of_stay_one_sample_per_eligible_inpatient_visit() -> None:
    visits = [
        visit("a", T0, T0 + 2 * DAY),
        visit("clinic", T0 + 50 * DAY, T0 + 52 * DAY, AMBULATORY),
        visit("b", T0 + 100 * DAY, T0 + 110 * DAY),
        visit("short", T0 + 200 * DAY, T0 + 200 * DAY + timedelta(hours=3)),
        visit("open", T0 + 300 * DAY, None),
    ]
    samples, excluded = run(timeline(visits))
    assert [(s.visit_id, s.label) for s in of(samples, Task.LENGTH_OF_STAY)] == [
        ("a", 0),
        ("b", 1),
    ]
    assert excluded["length_of_stay:stay_under_24h"] == 1
    assert excluded["length_of_stay:open_stay"] == 1


# --- readmission -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [INPATIENT, EMERGENCY])
def test_readmission_exactly_at_end_plus_30_days_is_positive(cls: VisitClass) -> None:
    nxt = visit("next", END + 30 * DAY, END + 31 * DAY, cls)
    samples, _ = run(timeline([stay(), nxt]))
    assert of(samples, Task.READMISSION)[0] == Sample(Task.READMISSION, 1, END, "stay")


@pytest.mark.parametrize("cls", [INPATIENT, EMERGENCY])
def test_readmission_one_second_after_the_window_is_negative(cls: VisitClass) -> None:
    nxt = visit("next", END + 30 * DAY + SECOND, END + 31 * DAY, cls)
    samples, _ = run(timeline([stay(), nxt]))
    assert of(samples, Task.READMISSION)[0] == Sample(Task.READMISSION, 0, END, "stay")


@pytest.mark.parametrize("cls", [AMBULATORY, OTHER])
def test_readmission_other_visit_classes_do_not_count(cls: VisitClass) -> None:
    nxt = visit("next", END + DAY, END + DAY + timedelta(hours=1), cls)
    samples, _ = run(timeline([stay(), nxt]))
    assert one(samples, Task.READMISSION) == Sample(Task.READMISSION, 0, END, "stay")


def test_readmission_right_after_end_counts() -> None:
    nxt = visit("next", END + SECOND, END + DAY, EMERGENCY)
    samples, _ = run(timeline([stay(), nxt]))
    assert one(samples, Task.READMISSION).label == 1


def test_readmission_death_within_30_days_without_readmission_is_excluded() -> None:
    for died in (END + DAY, END + 30 * DAY):
        samples, excluded = run(timeline([stay()], deceased_at=died))
        assert of(samples, Task.READMISSION) == []
        assert excluded["readmission:died_before_window"] == 1


def test_readmission_before_death_is_still_positive() -> None:
    nxt = visit("next", END + 5 * DAY, END + 6 * DAY)
    samples, excluded = run(timeline([stay(), nxt], deceased_at=END + 6 * DAY))
    assert [s.label for s in of(samples, Task.READMISSION)] == [1]
    assert excluded["readmission:died_before_window"] == 1  # the second stay's outcome


def test_readmission_death_after_the_window_is_negative() -> None:
    samples, _ = run(timeline([stay()], deceased_at=END + 30 * DAY + SECOND))
    assert one(samples, Task.READMISSION) == Sample(Task.READMISSION, 0, END, "stay")


def test_readmission_not_observed_is_excluded() -> None:
    window_end = END + 30 * DAY
    samples, excluded = run(timeline([stay()]), window_end - SECOND)
    assert of(samples, Task.READMISSION) == []
    assert excluded["readmission:not_observed"] == 1
    samples, excluded = run(timeline([stay()]), window_end)
    assert one(samples, Task.READMISSION).label == 0
    assert not excluded["readmission:not_observed"]


def test_readmission_deceased_without_time_is_excluded() -> None:
    samples, excluded = run(timeline([stay()], deceased=True))
    assert of(samples, Task.READMISSION) == []
    assert excluded["readmission:death_time_unknown"] == 1


def test_readmission_open_index_visit_is_excluded() -> None:
    samples, excluded = run(timeline([visit("v", T0, None)]))
    assert of(samples, Task.READMISSION) == []
    assert excluded["readmission:open_stay"] == 1


def test_readmission_one_sample_per_index_visit() -> None:
    visits = [
        visit("a", T0, T0 + 2 * DAY),
        visit("b", T0 + 10 * DAY, T0 + 12 * DAY),
        visit("c", T0 + 100 * DAY, T0 + 102 * DAY),
    ]
    samples, _ = run(timeline(visits))
    got = [(s.visit_id, s.label, s.cut) for s in of(samples, Task.READMISSION)]
    assert got == [("a", 1, T0 + 2 * DAY), ("b", 0, T0 + 12 * DAY), ("c", 0, T0 + 102 * DAY)]


# --- data without visit classes ----------------------------------------------------------


def test_without_classes_every_visit_is_an_index_visit_and_counts_as_readmission() -> None:
    visits = [
        visit("a", T0, T0 + 2 * DAY, AMBULATORY),
        visit("b", T0 + 10 * DAY, T0 + 12 * DAY, OTHER),
        visit("c", T0 + 100 * DAY, T0 + 108 * DAY, AMBULATORY),
    ]
    samples, excluded = run(timeline(visits), classes_known=False)
    assert one(samples, Task.MORTALITY) == Sample(Task.MORTALITY, 0, T0 + 108 * DAY, "c")
    assert [(s.visit_id, s.label) for s in of(samples, Task.READMISSION)] == [
        ("a", 1),
        ("b", 0),
        ("c", 0),
    ]
    assert [(s.visit_id, s.label) for s in of(samples, Task.LENGTH_OF_STAY)] == [
        ("a", 0),
        ("b", 0),
        ("c", 1),
    ]
    assert not excluded["mortality:no_index_visit"]
    # With classes known the same visits have no index visit at all.
    samples, excluded = run(timeline(visits), classes_known=True)
    for task in (Task.MORTALITY, Task.LENGTH_OF_STAY, Task.READMISSION):
        assert of(samples, task) == []
        assert excluded[f"{task.value}:no_index_visit"] == 1


# --- patients with nothing to predict on -------------------------------------------------


def test_no_visits_excludes_every_task() -> None:
    samples, excluded = run(timeline([], conditions=("ICD10CM|I10",)))
    assert samples == []
    assert excluded == Counter({f"{task.value}:no_visits": 1 for task in Task})


def test_no_index_visit_still_gives_condition_samples() -> None:
    clinic = visit("clinic", T0, T0 + timedelta(hours=1), AMBULATORY)
    samples, excluded = run(timeline([clinic], conditions=("ICD10CM|I10",)))
    assert excluded == Counter(
        {
            "mortality:no_index_visit": 1,
            "length_of_stay:no_index_visit": 1,
            "readmission:no_index_visit": 1,
        }
    )
    assert [(s.task, s.label) for s in samples] == [
        (Task.HYPERTENSION, 1),
        (Task.FLUID_ELECTROLYTE, 0),
        (Task.LIPID_METABOLISM, 0),
    ]


# --- conditions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "task", "matches"),
    [
        ("ICD10CM|E78.5", Task.LIPID_METABOLISM, True),
        ("ICD10CM|E785", Task.LIPID_METABOLISM, True),
        ("ICD10CM|e78.5", Task.LIPID_METABOLISM, True),
        ("ICD10CM|E79.0", Task.LIPID_METABOLISM, False),
        ("ICD10CM|I10", Task.HYPERTENSION, True),
        ("ICD10CM|I16.0", Task.HYPERTENSION, True),
        ("ICD10CM|I14", Task.HYPERTENSION, False),
        ("ICD10CM|I67.4", Task.HYPERTENSION, True),
        ("ICD10CM|I67.8", Task.HYPERTENSION, False),
        ("ICD10CM|E87.1", Task.FLUID_ELECTROLYTE, True),
        ("ICD10CM|E86.0", Task.FLUID_ELECTROLYTE, True),
        ("ICD9CM|401.9", Task.HYPERTENSION, True),
        ("ICD9CM|437.2", Task.HYPERTENSION, True),
        ("ICD9CM|437.3", Task.HYPERTENSION, False),
        ("ICD9CM|272.0", Task.LIPID_METABOLISM, True),
        ("ICD9CM|272.4", Task.LIPID_METABOLISM, True),
        ("ICD9CM|272.5", Task.LIPID_METABOLISM, False),
        ("ICD9CM|272.9", Task.LIPID_METABOLISM, True),
        ("ICD9CM|276.1", Task.FLUID_ELECTROLYTE, True),
        ("SNOMED|38341003", Task.HYPERTENSION, True),
        ("SNOMED|55822004", Task.LIPID_METABOLISM, True),
        ("SNOMED|5582200", Task.LIPID_METABOLISM, False),  # SNOMED is exact, not a prefix
        ("SNOMED|558220041", Task.LIPID_METABOLISM, False),
        ("SNOMED|34095006", Task.FLUID_ELECTROLYTE, True),
        ("LOINC|I10", Task.HYPERTENSION, False),  # right code, wrong system
        ("ICD10CM|401.9", Task.HYPERTENSION, False),  # ICD-9 code under the ICD-10 system
    ],
)
def test_codeset_matching(code: str, task: Task, matches: bool) -> None:
    codeset: CodeSet = CODESETS[task]
    assert codeset.matches(code) is matches


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ((), (0, 0, 0)),
        (("ICD10CM|E78.5",), (0, 0, 1)),
        (("ICD10CM|I10", "ICD9CM|276.1"), (1, 1, 0)),
        (("ICD9CM|272.5",), (0, 0, 0)),
        (("SNOMED|38341003", "SNOMED|55822004", "SNOMED|89627008"), (1, 1, 1)),
        (("ICD10CM|I10", "SNOMED|38341003", "ICD9CM|401.1"), (1, 0, 0)),
    ],
)
def test_one_condition_sample_per_patient_per_task(
    codes: tuple[str, ...], expected: tuple[int, int, int]
) -> None:
    visits = [visit("a", T0, T0 + 2 * DAY), visit("b", T0 + 50 * DAY, T0 + 52 * DAY)]
    samples, _ = run(timeline(visits, conditions=codes))
    got = []
    for task in CONDITION_TASKS:
        sample = one(samples, task)
        assert sample.cut is None
        assert sample.visit_id is None
        got.append(sample.label)
    assert tuple(got) == expected


# --- observation end ---------------------------------------------------------------------


def test_observation_end_is_the_newest_timestamp() -> None:
    a = timeline([visit("a", T0, T0 + 2 * DAY)])
    b = timeline([visit("b", T0 + 5 * DAY, None)])
    assert observation_end([a, b]) == T0 + 5 * DAY
    c = timeline([visit("c", T0, T0 + DAY)], deceased_at=T0 + 9 * DAY)
    assert observation_end([a, b, c]) == T0 + 9 * DAY
    assert observation_end([]) is None
