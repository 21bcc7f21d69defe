"""The six clinical tasks: their names in APIs and files, and their task tokens.

Definitions (index visits, cut times, labels) are DESIGN.md 3.3; the labelling code that
implements them for training is ``training/labels.py``.
"""

from __future__ import annotations

from enum import StrEnum

from fhir_adapter.vocabulary import TASK_TOKENS


class Task(StrEnum):
    MORTALITY = "mortality"
    LENGTH_OF_STAY = "length_of_stay"
    READMISSION = "readmission"
    HYPERTENSION = "hypertension"
    FLUID_ELECTROLYTE = "fluid_electrolyte"
    LIPID_METABOLISM = "lipid_metabolism"

    @property
    def column(self) -> int:
        """The task's place in ``TASK_TOKENS`` and its column of the clinical head."""
        return list(Task).index(self)

    @property
    def token(self) -> str:
        """The task token appended to the input (``[MOR]``, ``[LOS]``, ...)."""
        return TASK_TOKENS[self.column]


CONDITION_TASKS = (Task.HYPERTENSION, Task.FLUID_ELECTROLYTE, Task.LIPID_METABOLISM)
