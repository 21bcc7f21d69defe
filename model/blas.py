"""Matrix products inside compiled kernels, through the BLAS that PyTorch itself runs.

A forward of a few tokens (``model.packed``) multiplies a handful of rows by each weight
matrix. numba's ``np.dot`` calls SciPy's OpenBLAS, which was several times slower than
PyTorch's MKL at 17 rows here and starts threads of its own beside PyTorch's. PyTorch's x86 Linux
wheels link MKL statically and export its Fortran ``sgemm_`` from ``libtorch_cpu``; a
kernel can call it through its address (``routines``), passed in as an integer, so
the kernel still caches. Where the symbol is absent (another platform or build) the address
is 0 and ``gemm`` falls back to ``np.dot``: the same numbers to float32 rounding (tested).

The products take a weight as ``nn.Linear`` keeps it, (out, in), so a kernel can read the
parameter's own memory, or as a transposed copy, (in, out), which MKL multiplied faster
at 17 rows here; a leading dimension lets x be every row of a wider matrix's first
columns without a copy.

A larger product is split by output columns over numba's threads, each part one sgemm
that MKL runs on its calling thread (``gemm``). Such a forward is bound by fetching the
weights (14 MB for the compact size), which both cores then share.
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


# Weights per parallel part of a product (4 bytes each): smaller products run whole.
PART = 64 * 1024
# How a kernel that calls ``gemm`` must be compiled (``gemm`` is inlined into it, and a
# kernel that calls a separately compiled parallel function cannot be cached): parallel,
# but only for prange; numba's other parallel passes would turn the kernel's array
# assignments into parallel loops of their own. (Any: numba takes a dict of its passes
# where its type stubs say bool.)
PRANGE_ONLY: Any = {
    "comprehension": False, "reduction": False, "inplace_binop": False, "setitem": False,
    "numpy": False, "stencil": False, "fusion": False, "prange": True,
}  # fmt: skip


@functools.cache
def _torch_cpu() -> ctypes.CDLL | None:
    """PyTorch's CPU library, whose MKL symbols the kernels call; None where absent."""
    try:
        return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    except OSError:
        return None


def _address(name: str) -> int:
    """The address of ``libtorch_cpu``'s exported ``name``, 0 when it has none."""
    library = _torch_cpu()
    if library is None:
        return 0
    try:
        function = getattr(library, name)
    except AttributeError:
        return 0
    return ctypes.cast(function, ctypes.c_void_p).value or 0


@functools.cache
def routines() -> tuple[int, int]:
    """The addresses of PyTorch's ``sgemm_`` (LP64 Fortran interface) and of MKL's
    ``MKL_Set_Num_Threads_Local`` (C: int -> int), each 0 where this PyTorch build exports
    none. With numba's thread count, what ``gemm`` takes as ``blas``."""
    return _address("sgemm_"), _address("MKL_Set_Num_Threads_Local")


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


def _call_int(typingctx: Any, fn: Any, value: Any) -> Any:
    """Call the C function ``int f(int)`` at address ``fn``."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        kind = ir.FunctionType(ir.IntType(32), [ir.IntType(32)])
        target = builder.inttoptr(args[0], kind.as_pointer())
        return builder.call(target, [args[1]])

    return types.int32(types.int64, types.int32), codegen


_call_sgemm = cast(Callable[..., None], intrinsic(_call13))
_call_int_function = cast(Callable[[int, np.int32], np.int32], intrinsic(_call_int))


@numba.njit(inline="always")
def gemm(
    blas: tuple[int, int, int], x: Array, rows: int, depth: int, ldx: int, weight: Array,
    transposed: bool, out: Array, accumulate: bool,
) -> None:  # fmt: skip
    """out (rows, m) = x[:rows, :depth] @ W.T, or ``+=`` with ``accumulate``: what
    ``nn.Linear`` with weight W (m, depth) computes. ``weight`` is W as the layer keeps it,
    or with ``transposed`` a copy of W.T (depth, m), which MKL multiplies faster when x
    has a few rows.

    x's rows are ``ldx`` apart (x may be wider than ``depth``); weight and out are
    contiguous. ``blas``: ``routines()`` and ``numba.get_num_threads()`` (an argument: the
    call inside a kernel would keep the kernel from being cached); without an sgemm,
    ``np.dot``.

    A product of more than ``PART`` weights is split by output columns into parts that run
    on numba's threads at once, each part one sgemm that MKL is told to run on its calling
    thread alone. Left to itself, MKL splits a product of a few rows poorly and starts its
    second thread even for products too small to share (docs/benchmarks.md: the packed
    call against the blocks path, before and after)."""
    sgemm, set_threads, threads = blas
    m = weight.shape[1] if transposed else weight.shape[0]
    if sgemm == 0:
        rows_of_x = np.ascontiguousarray(x[:rows, :depth])
        product = np.dot(rows_of_x, weight) if transposed else np.dot(rows_of_x, weight.T)
        if accumulate:
            out[:rows] += product
        else:
            out[:rows] = product
        return
    parts = max(1, min(threads, m * depth // PART))
    width = ((m + parts - 1) // parts + 15) // 16 * 16  # columns per part, 64-byte aligned
    for part in numba.prange(parts):
        first = part * width
        count = min(width, m - first)
        if count > 0:
            before = _call_int_function(set_threads, np.int32(1)) if set_threads else 0
            _columns(sgemm, x, rows, depth, ldx, weight, transposed, out, accumulate, first, count)
            if set_threads:
                _call_int_function(set_threads, np.int32(before))


@numba.njit(inline="always")
def _columns(
    sgemm: int, x: Array, rows: int, depth: int, ldx: int, weight: Array, transposed: bool,
    out: Array, accumulate: bool, first: int, count: int,
) -> None:  # fmt: skip
    """out[:rows, first:first + count] (+)= x[:rows, :depth] @ W[first:first + count].T,
    one sgemm call."""
    scratch = np.empty(8, np.int32)  # the Fortran arguments, passed by address
    scalars = np.empty(2, np.float32)
    # Column-major, out^T (count, rows) = W[first:first + count] (count, depth) x^T (depth,
    # rows). A row-major (m, depth) W is W^T column-major, hence "T" for it, its rows
    # ``first`` on starting ``first * depth`` floats in; a row-major copy of W.T is W itself,
    # "N", its rows ``first`` on starting ``first`` floats in.
    scratch[0] = count
    scratch[1] = rows
    scratch[2] = depth
    scratch[3] = ldx
    scratch[4] = 78  # "N"
    scratch[5] = 78 if transposed else 84  # "N" or "T"
    scratch[6] = weight.shape[1]  # W's leading dimension: m for the copy, depth in place
    scratch[7] = out.shape[1]  # out's
    scalars[0] = 1.0
    scalars[1] = 1.0 if accumulate else 0.0
    four = 4  # bytes per int32 and per float32
    start = first if transposed else first * depth
    base = scratch.ctypes.data
    _call_sgemm(
        sgemm, base + 5 * four, base + 4 * four, base, base + four, base + 2 * four,
        scalars.ctypes.data, weight.ctypes.data + start * four, base + 6 * four,
        x.ctypes.data, base + 3 * four, scalars.ctypes.data + four,
        out.ctypes.data + first * four, base + 7 * four,
    )  # fmt: skip
