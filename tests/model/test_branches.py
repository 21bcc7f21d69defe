"""Token trees (``parent``): every token of a tree row sees exactly its own path, as if that
path had been scanned alone, on every scan path, from an empty or a carried start state."""

from __future__ import annotations

from contextlib import AbstractContextManager

import pytest
import torch

from model.branches import Branches
from model.config import ModelConfig
from model.network import EHRMamba, TokenBatch
from model.state import ModelState
from tests.model.paths import SCAN_PATHS, use_scan_path
from tests.model.random_batches import VOCAB, random_batch

TOL = 2e-5
# Position:     0  1  2  3  4  5  6  7  8  9  10
PARENTS = [-1, 0, 1, 2, 3, 4, 5, 5, 2, 8, -1]
# 0..6 a chain; 7 branches off 5; 8 off 2, and 9 continues 8 (a deeper branch, whose conv
# window mixes the branch and the chain); 10 branches off the start state.


def _model() -> EHRMamba:
    torch.manual_seed(1)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, dropout=0.0)
    return EHRMamba(config).eval()


def _take(batch: TokenBatch, row: int, positions: list[int]) -> TokenBatch:
    index = torch.tensor(positions)
    return TokenBatch(
        *(getattr(batch, f)[row : row + 1, index] for f in TokenBatch.__dataclass_fields__)
    )


def _path(position: int) -> list[int]:
    path = [position]
    while PARENTS[path[0]] >= 0:
        path.insert(0, PARENTS[path[0]])
    return path


def _mode(grad: bool) -> AbstractContextManager[None]:
    return torch.enable_grad() if grad else torch.inference_mode()


def _start(model: EHRMamba, carried: bool) -> ModelState | None:
    if not carried:
        return None
    with torch.no_grad():  # not inference mode: the reference path may use it under autograd
        state: ModelState = model(random_batch(2, 9, seed=7))[1]
    return state


@pytest.mark.parametrize("carried", [False, True], ids=["empty-start", "carried-start"])
@pytest.mark.parametrize("scan_path", SCAN_PATHS)
def test_every_token_of_a_tree_equals_its_path_scanned_alone(
    scan_path: str, carried: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Branches far back in the compiled kernel: ``tests/model/test_kernels.py``.)"""
    grad = use_scan_path(monkeypatch, scan_path)
    model = _model()
    batch = random_batch(2, len(PARENTS), seed=3)
    parent = torch.tensor([PARENTS, list(range(-1, len(PARENTS) - 1))])  # row 1: plain chain
    start = _start(model, carried)
    capture = torch.tensor([[6, 7, 9, 10], [2, -1, -1, -1]])
    with _mode(grad):
        hidden, end, captured = model(batch, start, capture, parent)
        assert captured is not None
        for position in range(len(PARENTS)):
            path = _path(position)
            alone, alone_end, _ = model(_take(batch, 0, path), _select(start, 0))
            assert torch.allclose(hidden[0, position], alone[0, -1], atol=TOL), position
            if position in (6, 7, 9, 10):  # the captured state is the path's end state
                slot = [6, 7, 9, 10].index(position)
                for got, want in zip(captured.layers, alone_end.layers, strict=True):
                    assert torch.allclose(got.ssm[0, slot], want.ssm[0], atol=TOL)
                    assert torch.allclose(got.conv[0, slot], want.conv[0], atol=TOL)
        # The end state is the last token's path's (here a branch off the start state).
        _, alone_end, _ = model(_take(batch, 0, _path(len(PARENTS) - 1)), _select(start, 0))
        for got, want in zip(end.layers, alone_end.layers, strict=True):
            assert torch.allclose(got.ssm[0], want.ssm[0], atol=TOL)
            assert torch.allclose(got.conv[0], want.conv[0], atol=TOL)
        # A plain row in the same batch is untouched by its neighbour's tree.
        plain, _, _ = model(_take(batch, 1, list(range(len(PARENTS)))), _select(start, 1))
        assert torch.allclose(hidden[1], plain[0], atol=TOL)


def _select(state: ModelState | None, row: int) -> ModelState | None:
    if state is None:
        return None
    return ModelState(state.conv[:, row : row + 1], state.ssm[:, row : row + 1])


@pytest.mark.parametrize("bad", [[-1, 1, 1], [-1, 0, -2], [0, 0, 1]])
def test_a_parent_that_is_not_earlier_is_refused(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="earlier position"):
        Branches.of(torch.tensor([bad]), kernel=4)


def test_plain_chains_need_no_gathered_convolution() -> None:
    branches = Branches.of(torch.tensor([[-1, 0, 1, 2], [-1, 0, 0, 2]]), kernel=4)
    # Row 1: token 2 branches off 0, and token 3 (continuing 2) has 1 off its window too.
    assert list(zip(branches.rows.tolist(), branches.positions.tolist(), strict=True)) == [
        (1, 2),
        (1, 3),
    ]
    assert branches.off_windows.tolist() == [[1, 2, 3, 5], [2, 3, 5, 6]]
