"""The frozen token vocabulary (DESIGN.md 3.2).

Ids are assigned in one documented order, never from file-system or dict order:
1. special tokens (``SPECIAL_TOKENS``), ``[PAD]`` first so padding is id 0;
2. interval tokens ``[W0]..[W3] [M1]..[M12] [LT]``;
3. task tokens ``[MOR] [LOS] [REA] [C0] [C1] [C2]``;
4. codes seen at least ``min_count`` times in the training split, sorted as strings.

A code outside the vocabulary maps to ``[UNK]``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum
from pathlib import Path

PAD, UNK, CLS, VS, VE, REG = "[PAD]", "[UNK]", "[CLS]", "[VS]", "[VE]", "[REG]"
SPECIAL_TOKENS = (PAD, UNK, CLS, VS, VE, REG)
INTERVAL_TOKENS = (
    "[W0]", "[W1]", "[W2]", "[W3]",
    *(f"[M{m}]" for m in range(1, 13)),
    "[LT]",
)  # fmt: skip
TASK_TOKENS = ("[MOR]", "[LOS]", "[REA]", "[C0]", "[C1]", "[C2]")
_FORMAT = "ehrmamba-vocabulary/1"
_STRUCTURE_WORDS = {
    VS: "a visit starts", VE: "the visit ends", REG: "end of the visit's record",
    "[W0]": "within a week", "[LT]": "a year or more later",
    **{f"[W{w}]": f"{w} week{'s' if w > 1 else ''} later" for w in range(1, 4)},
    **{f"[M{m}]": f"{m} month{'s' if m > 1 else ''} later" for m in range(1, 13)},
}  # fmt: skip


def structure_words(token: str) -> str | None:
    """Words for a visit or time-gap token (a forecast may predict one), None for others."""
    return _STRUCTURE_WORDS.get(token)


class TokenType(IntEnum):
    """The token-type stream; 0 is padding so it shares the padding id with concepts."""

    PAD = 0
    SPECIAL = 1
    VISIT_START = 2
    VISIT_END = 3
    REGISTER = 4
    INTERVAL = 5
    PROCEDURE = 6
    MEDICATION = 7
    LAB = 8
    TASK = 9


class Vocabulary:
    """Token string to id and back. Build with :meth:`fit` or :meth:`load`."""

    def __init__(
        self,
        codes: Sequence[str],
        min_count: int,
        code_types: Mapping[str, TokenType] | None = None,
    ) -> None:
        fixed = (*SPECIAL_TOKENS, *INTERVAL_TOKENS, *TASK_TOKENS)
        clash = set(codes) & set(fixed)
        if clash:
            raise ValueError(f"codes collide with reserved tokens: {sorted(clash)}")
        self.tokens: tuple[str, ...] = (*fixed, *sorted(set(codes)))
        self.min_count = min_count
        self._ids = {token: i for i, token in enumerate(self.tokens)}
        self.unk_id = self._ids[UNK]
        self.pad_id = self._ids[PAD]
        self.code_types = {c: TokenType(t) for c, t in (code_types or {}).items() if c in self}

    @classmethod
    def fit(
        cls,
        code_counts: Counter[str],
        min_count: int = 1,
        code_types: Mapping[str, TokenType] | None = None,
    ) -> Vocabulary:
        """Keep codes seen at least ``min_count`` times (count them on the training split).

        ``code_types`` records what kind of event each code was (procedure, medication,
        lab), so a forecast token can be fed back with the right type.
        """
        kept = [c for c, n in code_counts.items() if n >= min_count]
        return cls(kept, min_count, code_types)

    def type_of(self, token_id: int) -> TokenType:
        """The token type a token carries in a sequence."""
        token = self.tokens[token_id]
        fixed = _FIXED_TYPES.get(token)
        if fixed is not None:
            return fixed
        return self.code_types.get(token, TokenType.LAB if "#" in token else TokenType.PROCEDURE)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def id(self, token: str) -> int:
        """The id of ``token``; ``[UNK]`` for anything not in the vocabulary."""
        return self._ids.get(token, self.unk_id)

    def ids(self, tokens: Iterable[str]) -> list[int]:
        return [self._ids.get(t, self.unk_id) for t in tokens]

    def token(self, token_id: int) -> str:
        return self.tokens[token_id]

    @property
    def first_code_id(self) -> int:
        """Ids below this are reserved tokens; at and above it, codes."""
        return len(SPECIAL_TOKENS) + len(INTERVAL_TOKENS) + len(TASK_TOKENS)

    def to_json(self) -> dict[str, object]:
        return {
            "format": _FORMAT,
            "min_count": self.min_count,
            "tokens": list(self.tokens),
            "code_types": {c: int(t) for c, t in sorted(self.code_types.items())},
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        """Load and check that the reserved tokens are where this code expects them."""
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a vocabulary file of format {_FORMAT}")
        types = {c: TokenType(t) for c, t in doc.get("code_types", {}).items()}
        vocab = cls(doc["tokens"][cls._reserved_count() :], int(doc["min_count"]), types)
        if list(vocab.tokens) != doc["tokens"]:
            raise ValueError(f"{path}: token order differs from the documented order")
        return vocab

    @staticmethod
    def _reserved_count() -> int:
        return len(SPECIAL_TOKENS) + len(INTERVAL_TOKENS) + len(TASK_TOKENS)


_FIXED_TYPES: dict[str, TokenType] = {
    **dict.fromkeys((PAD,), TokenType.PAD),
    **dict.fromkeys((UNK, CLS), TokenType.SPECIAL),
    VS: TokenType.VISIT_START,
    VE: TokenType.VISIT_END,
    REG: TokenType.REGISTER,
    **dict.fromkeys(INTERVAL_TOKENS, TokenType.INTERVAL),
    **dict.fromkeys(TASK_TOKENS, TokenType.TASK),
}
