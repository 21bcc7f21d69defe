"""Lab value bins: quantile cut points per (code, unit), fitted on the training split only.

A numeric lab becomes ``CODE#b`` with b in 0..4. The four cut points are the 20/40/60/80 %
quantiles of that (code, unit)'s training values; bin b holds values in
``[cut[b-1], cut[b])``, so a value equal to a cut point goes to the upper bin, and values
beyond the outer cuts clip to bin 0 or 4 (Odyssey put the maximum in a sixth bin that was
never in the vocabulary). A lab with no numeric value, or whose (code, unit) had too few
training values to fit, keeps its bare code.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

N_BINS = 5
_QUANTILES = (0.2, 0.4, 0.6, 0.8)
_FORMAT = "ehrmamba-lab-bins/1"


Cuts = dict[str, dict[str, list[float]]]  # code -> unit ("" when none) -> four cut points


class LabBins:
    """Cut points per (code, unit). Build with :meth:`fit` or :meth:`load`."""

    def __init__(self, cuts: Cuts, min_values: int) -> None:
        self.cuts = cuts
        self.min_values = min_values

    @classmethod
    def fit(cls, values: Iterable[tuple[str, str | None, float]], min_values: int = 10) -> LabBins:
        """Fit on ``(code, unit, value)`` triples from the training split."""
        grouped: dict[tuple[str, str], list[float]] = {}
        for code, unit, value in values:
            grouped.setdefault((code, unit or ""), []).append(value)
        cuts: Cuts = {}
        for (code, unit), vals in sorted(grouped.items()):
            if len(vals) >= min_values:
                quantiles = np.quantile(np.asarray(vals), _QUANTILES)
                cuts.setdefault(code, {})[unit] = [float(q) for q in quantiles]
        return cls(cuts, min_values)

    def bin(self, code: str, unit: str | None, value: float | None) -> int | None:
        """The bin of a value, or None when it cannot be binned (no value, no fit)."""
        if value is None:
            return None
        cuts = self.cuts.get(code, {}).get(unit or "")
        if cuts is None:
            return None
        return bisect.bisect_right(cuts, value)

    def token(self, code: str, unit: str | None, value: float | None) -> str:
        """``CODE#b`` for a binnable value, else the bare code."""
        b = self.bin(code, unit, value)
        return code if b is None else f"{code}#{b}"

    def save(self, path: Path) -> None:
        doc = {
            "format": _FORMAT,
            "min_values": self.min_values,
            "quantiles": _QUANTILES,
            "cuts": self.cuts,
        }
        path.write_text(json.dumps(doc, indent=1))

    @classmethod
    def load(cls, path: Path) -> LabBins:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a lab-bins file of format {_FORMAT}")
        cuts = {
            code: {unit: [float(x) for x in points] for unit, points in units.items()}
            for code, units in doc["cuts"].items()
        }
        return cls(cuts, int(doc["min_values"]))
