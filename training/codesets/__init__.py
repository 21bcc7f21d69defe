"""Condition code sets for the three condition tasks, as data files with their sources.

Each ``<task>.json`` lists ICD-9-CM and ICD-10-CM code prefixes (dots removed, so ``272``
covers 272.0-272.9) and exact SNOMED CT codes. Matching is on the short system names the
adapter writes (``ICD10CM|E78.5``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from model.tasks import CONDITION_TASKS, Task

_PREFIX_SYSTEMS = ("ICD9CM", "ICD10CM")


@dataclass(frozen=True)
class CodeSet:
    """One task's codes; ``matches("ICD10CM|I10")``."""

    task: Task
    description: str
    sources: tuple[str, ...]
    prefixes: dict[str, tuple[str, ...]]
    exact: dict[str, frozenset[str]]

    def matches(self, code: str) -> bool:
        system, _, value = code.partition("|")
        if system in self.prefixes:
            return value.replace(".", "").upper().startswith(self.prefixes[system])
        return value in self.exact.get(system, frozenset())


def load_codesets() -> dict[Task, CodeSet]:
    """The shipped code sets, one per condition task."""
    out: dict[Task, CodeSet] = {}
    for task in CONDITION_TASKS:
        doc = json.loads(resources.files(__package__).joinpath(f"{task.value}.json").read_text())
        out[task] = CodeSet(
            task=task,
            description=doc["description"],
            sources=tuple(doc["sources"]),
            prefixes={s: tuple(p.upper() for p in doc.get(s, [])) for s in _PREFIX_SYSTEMS},
            exact={"SNOMED": frozenset(doc.get("SNOMED", []))},
        )
    return out
