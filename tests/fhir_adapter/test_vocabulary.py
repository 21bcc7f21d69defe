"""The frozen vocabulary (DESIGN.md 3.2): fixed id order, min_count, [UNK], save and load."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fhir_adapter.vocabulary import (
    CLS,
    INTERVAL_TOKENS,
    PAD,
    REG,
    SPECIAL_TOKENS,
    TASK_TOKENS,
    UNK,
    VE,
    VS,
    Vocabulary,
)

RESERVED = (*SPECIAL_TOKENS, *INTERVAL_TOKENS, *TASK_TOKENS)


def test_reserved_tokens_have_fixed_ids() -> None:
    vocab = Vocabulary([], min_count=1)
    assert vocab.tokens == RESERVED
    assert SPECIAL_TOKENS == (PAD, UNK, CLS, VS, VE, REG)
    assert [vocab.id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert vocab.pad_id == 0
    assert vocab.unk_id == 1
    assert INTERVAL_TOKENS == (
        "[W0]", "[W1]", "[W2]", "[W3]",
        "[M1]", "[M2]", "[M3]", "[M4]", "[M5]", "[M6]",
        "[M7]", "[M8]", "[M9]", "[M10]", "[M11]", "[M12]",
        "[LT]",
    )  # fmt: skip
    assert "[M0]" not in vocab
    assert vocab.id("[W0]") == 6
    assert vocab.id("[LT]") == 22
    assert TASK_TOKENS == ("[MOR]", "[LOS]", "[REA]", "[C0]", "[C1]", "[C2]")
    assert [vocab.id(t) for t in TASK_TOKENS] == [23, 24, 25, 26, 27, 28]
    assert vocab.first_code_id == 29 == len(vocab)


def test_codes_follow_reserved_tokens_sorted() -> None:
    vocab = Vocabulary(["SNOMED|9", "CPT|2", "LOINC|1#3", "CPT|10", "CPT|2"], min_count=1)
    assert vocab.tokens[: vocab.first_code_id] == RESERVED
    assert vocab.tokens[vocab.first_code_id :] == ("CPT|10", "CPT|2", "LOINC|1#3", "SNOMED|9")
    assert vocab.id("CPT|10") == vocab.first_code_id
    assert len(vocab) == vocab.first_code_id + 4


def test_ids_do_not_depend_on_input_order() -> None:
    codes = [f"CPT|{i}" for i in range(50)]
    forward = Vocabulary.fit(Counter({c: 1 for c in codes}))
    backward = Vocabulary.fit(Counter({c: 1 for c in reversed(codes)}))
    assert forward.tokens == backward.tokens


def test_min_count_boundary() -> None:
    counts = Counter({"CPT|a": 3, "CPT|b": 2, "CPT|c": 1, "CPT|d": 0})
    vocab = Vocabulary.fit(counts, min_count=2)
    assert vocab.tokens[vocab.first_code_id :] == ("CPT|a", "CPT|b")
    assert "CPT|c" not in vocab
    assert vocab.min_count == 2
    everything = Vocabulary.fit(counts, min_count=1)
    assert everything.tokens[everything.first_code_id :] == ("CPT|a", "CPT|b", "CPT|c")


def test_unknown_codes_map_to_unk() -> None:
    vocab = Vocabulary(["CPT|1"], min_count=1)
    assert vocab.id("CPT|2") == vocab.unk_id
    assert vocab.id("") == vocab.unk_id
    assert vocab.ids(["CPT|1", "CPT|2", CLS]) == [vocab.first_code_id, vocab.unk_id, 2]
    assert vocab.token(vocab.id("CPT|1")) == "CPT|1"
    assert "CPT|1" in vocab
    assert "CPT|2" not in vocab


@pytest.mark.parametrize("token", [PAD, UNK, CLS, "[W2]", "[M7]", "[LT]", "[MOR]", "[C2]"])
def test_codes_colliding_with_reserved_tokens_are_rejected(token: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        Vocabulary(["CPT|1", token], min_count=1)
    with pytest.raises(ValueError, match="reserved"):
        Vocabulary.fit(Counter({token: 5}))


def test_save_load_round_trip(tmp_path: Path) -> None:
    vocab = Vocabulary.fit(Counter({"CPT|1": 4, "LOINC|2#0": 7, "RXNORM|3": 2}), min_count=2)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded.tokens == vocab.tokens
    assert loaded.min_count == vocab.min_count
    assert loaded.first_code_id == vocab.first_code_id
    assert [loaded.id(t) for t in vocab.tokens] == list(range(len(vocab)))
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


def _write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_load_rejects_wrong_format(tmp_path: Path) -> None:
    doc = Vocabulary(["CPT|1"], min_count=1).to_json()
    with pytest.raises(ValueError, match="format"):
        Vocabulary.load(_write(tmp_path / "v.json", {**doc, "format": "ehrmamba-vocabulary/2"}))
    without = {k: v for k, v in doc.items() if k != "format"}
    with pytest.raises(ValueError, match="format"):
        Vocabulary.load(_write(tmp_path / "w.json", without))


def test_load_rejects_reordered_codes(tmp_path: Path) -> None:
    vocab = Vocabulary(["CPT|1", "CPT|2"], min_count=1)
    doc, tokens = vocab.to_json(), list(vocab.tokens)
    tokens[-2], tokens[-1] = tokens[-1], tokens[-2]
    with pytest.raises(ValueError, match="order"):
        Vocabulary.load(_write(tmp_path / "v.json", {**doc, "tokens": tokens}))


def test_load_rejects_reordered_reserved_tokens(tmp_path: Path) -> None:
    vocab = Vocabulary(["CPT|1"], min_count=1)
    doc, tokens = vocab.to_json(), list(vocab.tokens)
    tokens[6], tokens[7] = tokens[7], tokens[6]  # [W0] <-> [W1]
    with pytest.raises(ValueError, match="order"):
        Vocabulary.load(_write(tmp_path / "v.json", {**doc, "tokens": tokens}))


def test_load_rejects_reserved_token_moved_among_codes(tmp_path: Path) -> None:
    vocab = Vocabulary(["CPT|1"], min_count=1)
    doc, tokens = vocab.to_json(), list(vocab.tokens)
    tokens[0], tokens[-1] = tokens[-1], tokens[0]  # [PAD] swapped with the code
    with pytest.raises(ValueError, match=r"reserved|order"):
        Vocabulary.load(_write(tmp_path / "v.json", {**doc, "tokens": tokens}))


def test_load_rejects_duplicated_and_missing_codes(tmp_path: Path) -> None:
    vocab = Vocabulary(["CPT|1", "CPT|2"], min_count=1)
    doc, tokens = vocab.to_json(), list(vocab.tokens)
    with pytest.raises(ValueError, match="order"):
        Vocabulary.load(_write(tmp_path / "d.json", {**doc, "tokens": [*tokens, "CPT|2"]}))
    with pytest.raises(ValueError, match="order"):
        Vocabulary.load(_write(tmp_path / "m.json", {**doc, "tokens": tokens[1:]}))
