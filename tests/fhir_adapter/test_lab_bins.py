"""Lab value bins (DESIGN.md 3.2): quantile cut points per (code, unit), clipping, bare codes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fhir_adapter.lab_bins import N_BINS, LabBins

CODE = "LOINC|2345-7"
UNIT = "mg/dL"


def values(code: str, unit: str | None, xs: list[float]) -> list[tuple[str, str | None, float]]:
    return [(code, unit, x) for x in xs]


def zero_to_hundred() -> LabBins:
    """Cut points exactly 20, 40, 60, 80 (the 20/40/60/80 % quantiles of 0..100)."""
    return LabBins.fit(values(CODE, UNIT, [float(x) for x in range(101)]))


def test_cut_points_are_the_quintile_boundaries() -> None:
    bins = zero_to_hundred()
    assert N_BINS == 5
    assert bins.cuts == {CODE: {UNIT: [20.0, 40.0, 60.0, 80.0]}}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, 0),
        (19.999, 0),
        (20.0, 1),  # equal to a cut point: upper bin
        (20.001, 1),
        (39.999, 1),
        (40.0, 2),
        (59.999, 2),
        (60.0, 3),
        (79.999, 3),
        (80.0, 4),
        (100.0, 4),
    ],
)
def test_bin_at_and_around_each_cut_point(value: float, expected: int) -> None:
    bins = zero_to_hundred()
    assert bins.bin(CODE, UNIT, value) == expected
    assert bins.token(CODE, UNIT, value) == f"{CODE}#{expected}"


@pytest.mark.parametrize(("value", "expected"), [(-1e12, 0), (-1.0, 0), (101.0, 4), (1e12, 4)])
def test_values_beyond_the_outer_cuts_clip(value: float, expected: int) -> None:
    bins = zero_to_hundred()
    assert bins.bin(CODE, UNIT, value) == expected
    assert bins.token(CODE, UNIT, value) == f"{CODE}#{expected}"


def test_every_bin_is_in_range() -> None:
    bins = zero_to_hundred()
    seen = {bins.bin(CODE, UNIT, x / 4) for x in range(-100, 600)}
    assert seen == set(range(N_BINS))


def test_min_values_boundary() -> None:
    nine = LabBins.fit(values(CODE, UNIT, [float(x) for x in range(9)]), min_values=10)
    assert nine.cuts == {}
    assert nine.bin(CODE, UNIT, 3.0) is None
    assert nine.token(CODE, UNIT, 3.0) == CODE
    ten = LabBins.fit(values(CODE, UNIT, [float(x) for x in range(10)]), min_values=10)
    assert ten.cuts == {CODE: {UNIT: ten.cuts[CODE][UNIT]}}
    assert ten.token(CODE, UNIT, 3.0).startswith(f"{CODE}#")
    assert ten.min_values == 10


def test_units_are_binned_separately() -> None:
    bins = LabBins.fit(
        [
            *values(CODE, UNIT, [float(x) for x in range(101)]),  # cuts 20/40/60/80
            *values(CODE, "mmol/L", [x / 10 for x in range(101)]),  # cuts 2/4/6/8
        ]
    )
    assert bins.token(CODE, UNIT, 5.0) == f"{CODE}#0"
    assert bins.token(CODE, "mmol/L", 5.0) == f"{CODE}#2"
    # Values without a unit form their own group, here one with too few values.
    assert bins.token(CODE, None, 5.0) == CODE


def test_unit_none_is_its_own_group() -> None:
    bins = LabBins.fit(values(CODE, None, [float(x) for x in range(101)]))
    assert bins.token(CODE, None, 50.0) == f"{CODE}#2"
    assert bins.token(CODE, UNIT, 50.0) == CODE


def test_codes_are_binned_separately() -> None:
    bins = LabBins.fit(
        [
            *values(CODE, UNIT, [float(x) for x in range(101)]),
            *values("LOINC|718-7", UNIT, [float(x) * 10 for x in range(101)]),
        ]
    )
    assert bins.token(CODE, UNIT, 100.0) == f"{CODE}#4"
    assert bins.token("LOINC|718-7", UNIT, 100.0) == "LOINC|718-7#0"


def test_unbinnable_labs_keep_their_bare_code() -> None:
    bins = zero_to_hundred()
    assert bins.bin(CODE, UNIT, None) is None
    assert bins.token(CODE, UNIT, None) == CODE
    assert bins.token("LOINC|unseen", UNIT, 50.0) == "LOINC|unseen"
    assert bins.token(CODE, "g/L", 50.0) == CODE
    assert LabBins({}, 10).token(CODE, UNIT, 50.0) == CODE


def test_fit_does_not_depend_on_input_order() -> None:
    triples = [
        *values(CODE, UNIT, [float(x) for x in range(101)]),
        *values("LOINC|x", "U/L", [x * 0.37 for x in range(40)]),
    ]
    shuffled = list(triples)
    random.Random(7).shuffle(shuffled)
    assert LabBins.fit(shuffled).cuts == LabBins.fit(triples).cuts


def test_save_load_round_trip(tmp_path: Path) -> None:
    bins = LabBins.fit(
        [
            *values(CODE, UNIT, [x * 0.1 + 1 / 3 for x in range(57)]),
            *values("LOINC|x", None, [float(x) ** 1.5 for x in range(33)]),
        ],
        min_values=12,
    )
    path = tmp_path / "bins.json"
    bins.save(path)
    loaded = LabBins.load(path)
    assert loaded.cuts == bins.cuts
    assert loaded.min_values == 12
    for x in [-1.0, 0.5, 1.0, 2.2, 5.0, 9.0, 100.0, 1000.0]:
        assert loaded.token(CODE, UNIT, x) == bins.token(CODE, UNIT, x)
        assert loaded.token("LOINC|x", None, x) == bins.token("LOINC|x", None, x)


def test_load_rejects_wrong_format(tmp_path: Path) -> None:
    path = tmp_path / "bins.json"
    zero_to_hundred().save(path)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "format": "ehrmamba-vocabulary/1"}))
    with pytest.raises(ValueError, match="format"):
        LabBins.load(path)
