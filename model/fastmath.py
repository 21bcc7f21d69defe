"""What the compiled kernels share: exp, SiLU and softplus written so the compiler
vectorises them, and the hand-off of tensors to the kernels as float32 arrays.

numba turns ``np.exp`` into a call of the C library's scalar ``expf`` (its vector maths
library, SVML, is absent from the PyPI builds), so a loop that needs an exponential per
element runs one element at a time. ``exp2`` here is the classic range reduction, written
with operations every vector unit has:

    y = k + f,  k an integer, |f| <= 1/2,     2^y = 2^k * p(f)

with p a degree-6 polynomial fitted to 2^f (relative error 1e-7 in float32) and 2^k built
from its exponent bits. ``exp(x) = exp2(x * log2 e)``; the scan folds log2 e into A once,
so a decay costs one multiply and ``exp2``. Relative error at most 1.5e-7 max(1, |x|) for x
in [-87, 88] (tested against numpy's float64 exp): the growth with |x| is the rounding of
x log2 e, no more than exp's own sensitivity to the rounding of a float32 x. 2^y for y
below -126 returns 2^-126 ~ 1e-38 rather than a subnormal, which is zero for every use
here (a state decay, a sigmoid's tail).

Kernels that use these need ``error_model="numpy"``: numba's default checks every float
division for zero and raises, a branch that keeps the loop from being vectorised.

``softplus`` needs log(1 + e), e = exp(-|x|) in (0, 1]: one halving puts 1 + e in
[sqrt(2)/2, sqrt(2)], where log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, and five
terms of the atanh series reach float32 precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numba
import numpy as np
import numpy.typing as npt
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)
_SQRT2 = np.float32(1.4142135623730951)
_LOW = np.float32(-126.0)  # 2^-126: the smallest normal float32
_HIGH = np.float32(127.0)
# 2^f on [-1/2, 1/2], least squares in relative error on Chebyshev nodes, constant first.
_P = tuple(
    np.float32(c)
    for c in (1.0, 6.93147206e-01, 2.40226466e-01, 5.55032900e-02, 9.61851953e-03,
              1.33998604e-03, 1.53375768e-04)
)  # fmt: skip
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_TWO = np.float32(2.0)
_THREE = np.float32(3.0)
_SOFTPLUS_LINEAR = np.float32(20.0)  # torch's threshold: softplus(x) = x above it
_ATANH = tuple(np.float32(1.0 / k) for k in (3, 5, 7, 9))


def _bitcast(typingctx: Any, bits: Any) -> Any:
    """The float32 whose bit pattern is the int32 ``bits`` (a register move, no memory)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_float_from_bits = cast(Callable[[np.int32], np.float32], intrinsic(_bitcast))


@numba.njit(inline="always", fastmath=True, error_model="numpy")
def exp2(y: np.float32) -> np.float32:
    """2^y for float32 y; inlined into, and vectorised with, the caller's loop."""
    y = min(max(y, _LOW), _HIGH)
    k = np.rint(y)
    f = y - k
    p = _P[6]
    p = p * f + _P[5]
    p = p * f + _P[4]
    p = p * f + _P[3]
    p = p * f + _P[2]
    p = p * f + _P[1]
    p = p * f + _P[0]
    scale = _float_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
    value: np.float32 = p * scale
    return value


@numba.njit(inline="always", fastmath=True, error_model="numpy")
def exp(x: np.float32) -> np.float32:
    """e^x for float32 x."""
    value: np.float32 = exp2(x * LOG2E)
    return value


@numba.njit(inline="always", fastmath=True, error_model="numpy")
def silu(x: np.float32) -> np.float32:
    """x * sigmoid(x), Mamba's gate and convolution activation."""
    return x / (_ONE + exp(-x))


@numba.njit(inline="always", fastmath=True, error_model="numpy")
def softplus(x: np.float32) -> np.float32:
    """log(1 + e^x), as ``torch.nn.functional.softplus`` (x itself above 20): Mamba's
    time step. Computed as max(x, 0) + log(1 + e^-|x|), which never overflows."""
    e = exp(-abs(x))  # log(1 + e), 1 + e in (1, 2]
    high = e > _SQRT2 - _ONE  # then log(1 + e) = ln 2 + log((1 + e) / 2)
    # s = (m - 1) / (m + 1) for m = 1 + e or (1 + e) / 2, from e itself: no cancellation
    # when e is tiny, so softplus keeps its relative precision far below zero.
    s = (e - _ONE) / (e + _THREE) if high else e / (e + _TWO)
    s2 = s * s
    series = _ATANH[3]
    series = series * s2 + _ATANH[2]
    series = series * s2 + _ATANH[1]
    series = series * s2 + _ATANH[0]
    series = series * s2 + _ONE
    log_v = _TWO * s * series + (_LN2 if high else _ZERO)
    return x if x > _SOFTPLUS_LINEAR else max(x, _ZERO) + log_v


def as_array(x: torch.Tensor, pad: int = 0, axis: int = -1) -> npt.NDArray[np.float32]:
    """x as a contiguous float32 array (a copy unless it already is one), with ``pad``
    zero entries appended along ``axis``."""
    result = np.ascontiguousarray(x.detach().float().cpu().numpy())
    if not pad:
        return result
    widths = [(0, 0)] * result.ndim
    widths[axis] = (0, pad)
    return np.pad(result, widths)


def as_rows(x: torch.Tensor, pad: int = 0) -> tuple[npt.NDArray[np.float32], int]:
    """x (b, l, c) as ``(rows, at)``, rows a C-contiguous float32 (b, l, w) array with
    x[i, t, j] = rows[i, t, at + j]. No copy where x is a column slice of a contiguous
    (b, l, w) tensor (the gate half of ``in_proj``'s output, B and C of ``x_proj``'s): a
    kernel compiled for C-contiguous rows vectorises loops that it cannot over a strided
    view, and the copy would cost a pass over the data. Otherwise a copy, with ``pad`` zero
    columns appended (``as_array``), and at = 0."""
    if not pad and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 3:
        b, length, c = x.shape
        s0, s1, s2 = (int(s) for s in x.stride())
        if b * length * c and s2 == 1 and s1 >= c and s0 == s1 * length:
            at = int(x.storage_offset()) % s1
            start = x.storage_offset() - at
            if at + c <= s1 and start + b * s0 <= x.untyped_storage().nbytes() // 4:
                rows = torch.as_strided(x.detach(), (b, length, s1), (s0, s1, 1), start)
                shared: npt.NDArray[np.float32] = rows.numpy()
                return shared, at
    return as_array(x, pad), 0
