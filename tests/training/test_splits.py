"""Patient-level splits (``training/splits.py``): a stable hash, the documented fractions.

The pinned ids were computed once from the documented function (SHA-256, first 8 bytes as
a fraction of 2^64); if they move, every saved split moves with them.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from training.splits import SPLITS, TRAINING_SPLITS, hash_fraction, split_of


@pytest.mark.parametrize(
    ("patient_id", "split"),
    [
        ("patient-4", "pretrain"),
        ("patient-6", "pretrain"),
        ("patient-1", "finetune"),
        ("patient-2", "finetune"),
        ("patient-8", "test"),
        ("patient-9", "test"),
    ],
)
def test_known_ids_keep_their_split(patient_id: str, split: str) -> None:
    assert split_of(patient_id) == split


def test_hash_fraction_is_the_documented_sha256_prefix() -> None:
    for patient_id in ("patient-1", "patient-4", "", "ümlaut-id"):
        digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
        assert hash_fraction(patient_id) == int.from_bytes(digest[:8], "big") / 2**64
    assert hash_fraction("patient-4") == pytest.approx(0.45320647267997005, abs=1e-15)


def test_split_is_pure_function_of_the_id() -> None:
    ids = [f"p{i}" for i in range(200)]
    first = [split_of(i) for i in ids]
    again = [split_of(i) for i in reversed(ids)]
    assert first == list(reversed(again))
    assert all(0.0 <= hash_fraction(i) < 1.0 for i in ids)


def test_fractions_over_many_ids_are_57_28_15() -> None:
    n = 20_000
    counts = Counter(split_of(f"synthetic-patient-{i:06d}") for i in range(n))
    assert set(counts) == set(SPLITS)
    expected = {"pretrain": 0.57, "finetune": 0.28, "test": 0.15}
    for split, fraction in expected.items():
        assert abs(counts[split] / n - fraction) < 0.01, (split, counts[split] / n)


def test_training_splits_exclude_test() -> None:
    assert set(TRAINING_SPLITS) == {"pretrain", "finetune"}
    assert set(SPLITS) == {*TRAINING_SPLITS, "test"}
