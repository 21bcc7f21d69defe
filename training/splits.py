"""Patient-level splits by a stable hash: every sample of a patient lands in one split.

The split depends only on the patient id (SHA-256, first 8 bytes as a fraction of 2^64), so
it is the same on every machine, in every run, whatever order the data arrives in.
"""

from __future__ import annotations

import hashlib

SPLITS = ("pretrain", "finetune", "test")
_BOUNDS = (0.57, 0.85)  # pretrain 57 %, finetune 28 %, test 15 %
TRAINING_SPLITS = ("pretrain", "finetune")


def hash_fraction(patient_id: str) -> float:
    """A stable number in [0, 1) for a patient id."""
    digest = hashlib.sha256(patient_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(patient_id: str) -> str:
    fraction = hash_fraction(patient_id)
    if fraction < _BOUNDS[0]:
        return "pretrain"
    if fraction < _BOUNDS[1]:
        return "finetune"
    return "test"
