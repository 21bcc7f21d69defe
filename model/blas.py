"""Matrix products inside compiled kernels, through the BLAS that PyTorch itself runs.

A forward of a few tokens (``model.packed``) multiplies a handful of rows by each weight
matrix. numba's ``np.dot`` calls SciPy's OpenBLAS, which was several times slower than
PyTorch's MKL at 17 rows here and starts threads of its own beside PyTorch's. PyTorch's x86 Linux
wheels link MKL statically and export its Fortran ``sgemm_`` from ``libtorch_cpu``; a
kernel can call it through its address (``sgemm_address``), passed in as an integer, so
the kernel still caches. Where the symbol is absent (another platform or build) the address
is 0 and ``gemm`` falls back to ``np.dot``: the same numbers to float32 rounding (tested).

The products take a weight as ``nn.Linear`` keeps it, (out, in), so a kernel can read the
parameter's own memory, or as a transposed copy, (in, out), which MKL multiplied faster
at 17 rows here; a leading dimension lets x be every row of a wider matrix's first
columns without a copy.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numba
import numpy as np
import numpy.typing as npt
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

Array = npt.NDArray[np.float32]


@functools.cache
def sgemm_address() -> int:
    """The address of PyTorch's ``sgemm_`` (LP64 Fortran interface), or 0 when this
    PyTorch build exports none."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        function = ctypes.CDLL(str(library)).sgemm_
    except (OSError, AttributeError):
        return 0
    return ctypes.cast(function, ctypes.c_void_p).value or 0


def _call13(
    typingctx: Any, fn: Any, a1: Any, a2: Any, a3: Any, a4: Any, a5: Any, a6: Any, a7: Any,
    a8: Any, a9: Any, a10: Any, a11: Any, a12: Any, a13: Any,
) -> Any:  # fmt: skip
    """Call the C function at address ``fn`` with 13 pointer arguments (all int64)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        byte_ptr = ir.IntType(8).as_pointer()
        kind = ir.FunctionType(ir.VoidType(), [byte_ptr] * 13)
        target = builder.inttoptr(args[0], kind.as_pointer())
        builder.call(target, [builder.inttoptr(a, byte_ptr) for a in args[1:]])
        return context.get_dummy_value()

    return types.void(*([types.int64] * 14)), codegen


_call_sgemm = cast(Callable[..., None], intrinsic(_call13))


@numba.njit(inline="always")
def gemm(
    sgemm: int, x: Array, rows: int, depth: int, ldx: int, weight: Array, transposed: bool,
    out: Array, accumulate: bool, scratch: npt.NDArray[np.int32], scalars: Array,
) -> None:  # fmt: skip
    """out (rows, m) = x[:rows, :depth] @ W.T, or ``+=`` with ``accumulate``: what
    ``nn.Linear`` with weight W (m, depth) computes. ``weight`` is W as the layer keeps it,
    or with ``transposed`` a copy of W.T (depth, m), which MKL multiplies faster when x
    has a few rows.

    x's rows are ``ldx`` apart (x may be wider than ``depth``); weight and out are
    contiguous. ``sgemm``: ``sgemm_address()``, 0 for ``np.dot``. ``scratch`` (8,) int32
    and ``scalars`` (2,) float32 hold the Fortran arguments (passed by address)."""
    m = weight.shape[1] if transposed else weight.shape[0]
    if sgemm == 0:
        rows_of_x = np.ascontiguousarray(x[:rows, :depth])
        product = np.dot(rows_of_x, weight) if transposed else np.dot(rows_of_x, weight.T)
        if accumulate:
            out += product
        else:
            out[:] = product
        return
    # Column-major, out^T (m, rows) = W (m, depth) x^T (depth, rows). A row-major (m, depth)
    # W is W^T column-major, hence "T" for it; a row-major copy of W.T is W itself, "N".
    scratch[0] = m
    scratch[1] = rows
    scratch[2] = depth
    scratch[3] = ldx
    scratch[4] = 78  # "N"
    scratch[5] = 78 if transposed else 84  # "N" or "T"
    scratch[6] = m if transposed else depth  # W's leading dimension
    scalars[0] = 1.0
    scalars[1] = 1.0 if accumulate else 0.0
    base = scratch.ctypes.data
    four = 4  # bytes per int32 and per float32
    _call_sgemm(
        sgemm, base + 5 * four, base + 4 * four, base, base + four, base + 2 * four,
        scalars.ctypes.data, weight.ctypes.data, base + 6 * four, x.ctypes.data,
        base + 3 * four, scalars.ctypes.data + four, out.ctypes.data, base,
    )  # fmt: skip
