"""Matrix products inside kernels (``model.blas``): equal to numpy's for both weight
layouts, whether split over threads or not, and MKL's thread setting left as found."""

from __future__ import annotations

import ctypes

import numba
import numpy as np
import numpy.typing as npt
import pytest

from model import blas

Array = npt.NDArray[np.float32]


@numba.njit(parallel=blas.PRANGE_ONLY)
def _product(
    routines: tuple[int, int, int], x: Array, rows: int, depth: int, weight: Array,
    transposed: bool, out: Array, accumulate: bool,
) -> None:  # fmt: skip
    """``gemm`` compiled as the packed kernel compiles it (inlined, prange live)."""
    blas.gemm(routines, x, rows, depth, x.shape[1], weight, transposed, out, accumulate)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["in-place", "transposed-copy"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "add"])
def test_products_equal_numpy_split_or_whole(
    threads: int, transposed: bool, accumulate: bool
) -> None:
    """1,000 output columns by 200: three parts of 336, 336 and 328 columns at three
    threads (64-byte aligned starts), one at one; x wider than ``depth``, 7 of 9 rows."""
    rng = np.random.default_rng(threads)
    m, depth, rows = 1000, 200, 7
    assert m * depth // blas.PART >= 3
    weight = rng.standard_normal((m, depth)).astype(np.float32)
    x = rng.standard_normal((9, depth + 5)).astype(np.float32)
    out = rng.standard_normal((rows, m)).astype(np.float32)
    want = x[:rows, :depth] @ weight.T + (out if accumulate else 0)
    layout = np.ascontiguousarray(weight.T) if transposed else weight
    sgemm, set_threads = blas.routines()
    for routines in ((sgemm, set_threads, threads), (0, 0, threads)):  # MKL, then np.dot
        got = out.copy()
        _product(routines, x, rows, depth, layout, transposed, got, accumulate)
        assert np.abs(got - want).max() < 1e-3


@pytest.mark.skipif(blas.routines()[1] == 0, reason="this PyTorch exports no MKL")
def test_mkl_threads_of_the_calling_thread_are_restored() -> None:
    """Each part asks MKL for one thread on its own thread; the caller's setting (here 0:
    MKL's global count) must be what PyTorch's own products find afterwards."""
    set_local = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(blas.routines()[1])
    set_local(0)
    weight = np.ones((1000, 200), np.float32)
    x = np.ones((3, 200), np.float32)
    out = np.zeros((3, 1000), np.float32)
    _product((*blas.routines(), 2), x, 3, 200, weight, False, out, False)
    assert set_local(0) == 0
    assert np.all(out == 200)
