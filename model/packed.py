"""The whole backbone in one compiled call, for forwards of a few tokens.

Shape letters: b batch, l row length, N = b * l tokens, h hidden size, d intermediate
size, n state size, r time-step rank, K conv kernel width, k captured positions per row,
L layers (blocks).

An incremental score (ten new events, two closing tokens, six task tokens) and a forecast
step are a few tokens each. Their arithmetic is small; what costs is the per-operation
overhead of running eight blocks as some forty tensor operations each, every one a Python
call, an allocation and a dispatch. Here the blocks run in one numba call over weights
packed once (stacked per layer, transposed for ``x @ W``), with the matrix products in
BLAS (``np.dot``) and everything between them in loops the compiler vectorises. It does
the same arithmetic as the blocks' fused path (``model.scan.fast_scan``,
``model.conv.fast_causal_conv_silu``): the same exp, softplus and SiLU, the same order of
sums in the scan and the convolution; only the matrix library differs (tested against the
blocks to float32 rounding).

Rows may be token trees (``model.branches``): every token's state is kept, so a token
continues its parent's state, and its convolution window follows its own path. That costs
N d n floats, which is why this path is for a few tokens (``FEW_TOKENS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from model import blas, fastmath
from model.blas import gemm
from model.branches import check_parents
from model.mamba import LayerState, MambaBlock, RMSNorm

FEW_TOKENS = 256  # forwards of at most this many tokens (b * l) take the packed path

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class PackedBackbone:
    """The blocks' and final norm's weights, stacked per layer (leading axis L) and laid
    out as the kernel reads them. ``sources`` are the parameters they were packed from, so
    a changed weight is noticed (``unchanged``) and repacked."""

    sources: tuple[_Source, ...]
    norm: Array  # (L, h)
    in_proj: Array  # (L, h, 2d): x @ in_proj
    in_bias: Array  # (L, 2d)
    conv: Array  # (L, K, d): taps, oldest input first
    conv_bias: Array  # (L, d)
    x_proj: Array  # (L, d, r + 2n)
    dt_proj: Array  # (L, r, d)
    dt_bias: Array  # (L, d)
    decay: Array  # (L, n, d): A log2 e (exp(delta A) = 2^(delta A log2 e))
    skip: Array  # (L, d): D
    out_proj: Array  # (L, d, h)
    out_bias: Array  # (L, h)
    norm_f: Array  # (h,)
    eps: float
    use_sgemm: bool = True  # PyTorch's sgemm where it exports one; False: np.dot (tests)

    def unchanged(self) -> bool:
        """Whether every parameter is still the one packed, with the same values."""
        return all(
            module._parameters[name] is tensor
            and tensor._version == version
            and tensor.data_ptr() == address
            for module, name, tensor, version, address in self.sources
        )

    @classmethod
    def of(cls, blocks: list[MambaBlock], norm_f: RMSNorm) -> PackedBackbone:
        """Pack the weights of ``blocks`` and the final norm."""
        with torch.no_grad():
            mixers = [block.mixer for block in blocks]
            log2e = float(fastmath.LOG2E)
            d = mixers[0].d
            h = norm_f.weight.shape[0]

            def stack(tensors: list[torch.Tensor]) -> Array:
                return np.ascontiguousarray(
                    torch.stack([t.detach().float() for t in tensors]).numpy()
                )

            def bias_or_zero(bias: torch.Tensor | None, size: int) -> torch.Tensor:
                return bias if bias is not None else torch.zeros(size)

            return cls(
                sources=_sources(blocks, norm_f),
                norm=stack([block.norm.weight for block in blocks]),
                in_proj=stack([m.in_proj.weight.t() for m in mixers]),
                in_bias=stack([bias_or_zero(m.in_proj.bias, 2 * d) for m in mixers]),
                conv=stack([m.conv1d.weight[:, 0, :].t() for m in mixers]),
                conv_bias=stack([bias_or_zero(m.conv1d.bias, d) for m in mixers]),
                x_proj=stack([m.x_proj.weight.t() for m in mixers]),
                dt_proj=stack([m.dt_proj.weight.t() for m in mixers]),
                dt_bias=stack([m.dt_proj.bias for m in mixers]),
                decay=stack([-torch.exp(m.A_log.float()).t() * log2e for m in mixers]),
                skip=stack([m.D for m in mixers]),
                out_proj=stack([m.out_proj.weight.t() for m in mixers]),
                out_bias=stack([bias_or_zero(m.out_proj.bias, h) for m in mixers]),
                norm_f=np.ascontiguousarray(norm_f.weight.detach().float().numpy()),
                eps=float(blocks[0].norm.eps),
            )

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[LayerState, ...] | None,
        capture: torch.Tensor | None,
        parent: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[LayerState, ...], tuple[LayerState, ...] | None]:
        """x (b, l, h) input embeddings -> hidden (b, l, h) after the final norm, each
        layer's end state, and each layer's captured states (conv (b, k, d, K-1), ssm
        (b, k, d, n), zeros at -1) when ``capture`` (b, k) is given. ``state``: each
        layer's start state (zeros when None); ``parent`` (b, l): token trees, as
        ``EHRMamba.forward``. Raises ValueError for a parent that is not an earlier
        position or -1."""
        b, length, h = x.shape
        layers, kernel, d = self.conv.shape
        n = self.decay.shape[1]
        if parent is not None:
            parents = parent.cpu().numpy().astype(np.int64)
            check_parents(parents)
        else:
            parents = np.broadcast_to(np.arange(-1, length - 1), (b, length)).copy()
        asked = (
            capture.cpu().numpy().astype(np.int64)
            if capture is not None
            else np.empty((b, 0), np.int64)
        )
        if state is None:
            conv0 = np.zeros((layers, b, d, kernel - 1), np.float32)
            ssm0 = np.zeros((layers, b, d, n), np.float32)
        else:
            conv0 = fastmath.as_array(torch.stack([s.conv for s in state]))
            ssm0 = fastmath.as_array(torch.stack([s.ssm for s in state]))
        sgemm = blas.sgemm_address() if self.use_sgemm else 0
        tokens = fastmath.as_array(x).reshape(b * length, h)
        hidden, end_conv, end_ssm, cap_conv, cap_ssm = _backbone(
            sgemm, tokens, parents, asked, conv0, ssm0,
            self.norm, self.in_proj, self.in_bias, self.conv, self.conv_bias, self.x_proj,
            self.dt_proj, self.dt_bias, self.decay, self.skip, self.out_proj, self.out_bias,
            self.norm_f, np.float32(self.eps),
        )  # fmt: skip
        ends = tuple(
            LayerState(torch.from_numpy(end_conv[i]), torch.from_numpy(end_ssm[i]))
            for i in range(layers)
        )
        captured = (
            tuple(
                LayerState(torch.from_numpy(cap_conv[i]), torch.from_numpy(cap_ssm[i]))
                for i in range(layers)
            )
            if capture is not None
            else None
        )
        return torch.from_numpy(hidden).view(b, length, h), ends, captured


# A parameter as packed: its module and name, the tensor, its version and storage address.
_Source = tuple[nn.Module, str, torch.Tensor, int, int]


def _sources(blocks: list[MambaBlock], norm_f: RMSNorm) -> tuple[_Source, ...]:
    """Every parameter the packing reads. An optimizer step or a loaded state dict bumps a
    version, ``.data =`` moves a storage, assigning a new Parameter replaces the tensor:
    ``unchanged`` notices each, in under a microsecond per parameter (walking the modules
    afresh would cost a millisecond per forward)."""
    return tuple(
        (module, name, tensor, tensor._version, tensor.data_ptr())
        for root in (*blocks, norm_f)
        for module in root.modules()
        for name, tensor in module._parameters.items()
        if tensor is not None
    )


def applies(x: torch.Tensor) -> bool:
    """Whether a forward of the embeddings ``x`` (b, l, h) takes the packed path: a few
    float32 tokens on the CPU, no gradients, not being traced (an exporter must see the
    blocks' tensor operations)."""
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing()  # type: ignore[attr-defined, no-untyped-call]
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and x.shape[0] * x.shape[1] <= FEW_TOKENS
        and x.shape[1] > 0
    )


@numba.njit(cache=True, fastmath=True, error_model="numpy")
def _backbone(
    sgemm: int,  # blas.sgemm_address(), 0 for np.dot
    x: Array,  # (N, h), N = b * l, row-major by (row, position)
    parent: npt.NDArray[np.int64],  # (b, l)
    capture: npt.NDArray[np.int64],  # (b, k), -1 for none
    conv0: Array,  # (L, b, d, K-1) start conv inputs, oldest first
    ssm0: Array,  # (L, b, d, n) start states
    norm: Array, in_proj: Array, in_bias: Array, conv: Array, conv_bias: Array,
    x_proj: Array, dt_proj: Array, dt_bias: Array, decay: Array, skip: Array,
    out_proj: Array, out_bias: Array, norm_f: Array, eps: np.float32,
) -> tuple[Array, Array, Array, Array, Array]:  # fmt: skip
    """Every block, then the final norm. Returns hidden (N, h), end conv (L, b, d, K-1),
    end ssm (L, b, d, n), captured conv (L, b, k, d, K-1) and ssm (L, b, k, d, n)."""
    layers, kernel, d = conv.shape
    n = decay.shape[1]
    r = dt_proj.shape[1]
    b, length = parent.shape
    k = capture.shape[1]
    tokens, h = x.shape
    # Each token's conv window along its path, oldest first, the token itself last:
    # p >= 0 a position of the row, p < 0 the start state's input K-1+p (-1 the newest).
    window = np.empty((b, length, kernel), np.int64)
    for bi in range(b):
        for t in range(length):
            p = t
            window[bi, t, kernel - 1] = p
            for q in range(kernel - 2, -1, -1):
                p = parent[bi, p] if p >= 0 else p - 1
                window[bi, t, q] = p
    residual = x.copy()
    scratch = np.empty(8, np.int32)  # the BLAS call's arguments
    scalars = np.empty(2, np.float32)
    xz = np.empty((tokens, 2 * d), np.float32)  # conv input, then the gate's input
    selection = np.empty((tokens, r + 2 * n), np.float32)  # dt (before dt_proj), B, C
    raw_dt = np.empty((tokens, d), np.float32)
    normed = np.empty((tokens, h), np.float32)
    u = np.empty((tokens, d), np.float32)
    gated = np.empty((tokens, d), np.float32)
    states = np.empty((tokens, n, d), np.float32)  # the state after every token
    start = np.empty((b, n, d), np.float32)
    step = np.empty(d, np.float32)
    drive = np.empty(d, np.float32)
    end_conv = np.zeros((layers, b, d, kernel - 1), np.float32)
    end_ssm = np.zeros((layers, b, d, n), np.float32)
    cap_conv = np.zeros((layers, b, k, d, kernel - 1), np.float32)
    cap_ssm = np.zeros((layers, b, k, d, n), np.float32)
    for li in range(layers):
        _rms_norm(residual, norm[li], eps, normed)
        gemm(sgemm, normed, tokens, h, h, in_proj[li], xz, False, scratch, scalars)
        for m in range(tokens):
            for c in range(2 * d):
                xz[m, c] += in_bias[li, c]
        # Causal conv along each token's path, then SiLU (Mamba's u).
        for bi in range(b):
            for t in range(length):
                out = u[bi * length + t]
                out[:] = conv_bias[li]
                for q in range(kernel):
                    p = window[bi, t, q]
                    tap = conv[li, q]
                    if p >= 0:
                        source = xz[bi * length + p]
                        for c in range(d):
                            out[c] += source[c] * tap[c]
                    else:
                        for c in range(d):
                            out[c] += conv0[li, bi, c, kernel - 1 + p] * tap[c]
                for c in range(d):
                    out[c] = fastmath.silu(out[c])
        gemm(sgemm, u, tokens, d, d, x_proj[li], selection, False, scratch, scalars)
        gemm(sgemm, selection, tokens, r, r + 2 * n, dt_proj[li], raw_dt, False, scratch,
             scalars)  # fmt: skip
        for bi in range(b):
            for s in range(n):
                for c in range(d):
                    start[bi, s, c] = ssm0[li, bi, c, s]
        # The selective scan (Mamba paper, algorithm 2), each token from its parent's state:
        # h_t = exp(delta_t A) h_parent + delta_t u_t B_t,  y_t = C_t h_t + D u_t,
        # then the output gate y_t SiLU(z_t).
        for bi in range(b):
            for t in range(length):
                m = bi * length + t
                p = parent[bi, t]
                prev = states[bi * length + p] if p >= 0 else start[bi]
                y = gated[m]
                for c in range(d):
                    step[c] = fastmath.softplus(raw_dt[m, c] + dt_bias[li, c])
                    drive[c] = step[c] * u[m, c]
                    y[c] = skip[li, c] * u[m, c]
                for s in range(n):
                    b_t = selection[m, r + s]
                    c_t = selection[m, r + n + s]
                    a = decay[li, s]
                    before = prev[s]
                    after = states[m, s]
                    for c in range(d):
                        value = fastmath.exp2(step[c] * a[c]) * before[c] + drive[c] * b_t
                        after[c] = value
                        y[c] += c_t * value
                for c in range(d):
                    y[c] *= fastmath.silu(xz[m, d + c])
        gemm(sgemm, gated, tokens, d, d, out_proj[li], residual, True, scratch, scalars)
        for m in range(tokens):
            for c in range(h):
                residual[m, c] += out_bias[li, c]
        # The states to hand back: after each row's last token, and after its captures.
        for bi in range(b):
            _state_after(bi, length - 1, length, window, xz, conv0[li], states,
                         end_conv[li, bi], end_ssm[li, bi])  # fmt: skip
            for j in range(k):
                if capture[bi, j] >= 0:
                    _state_after(bi, capture[bi, j], length, window, xz, conv0[li], states,
                                 cap_conv[li, bi, j], cap_ssm[li, bi, j])  # fmt: skip
    hidden = np.empty((tokens, h), np.float32)
    _rms_norm(residual, norm_f, eps, hidden)
    return hidden, end_conv, end_ssm, cap_conv, cap_ssm


@numba.njit(inline="always", fastmath=True, error_model="numpy")
def _rms_norm(x: Array, weight: Array, eps: np.float32, out: Array) -> None:
    """out = weight * x / rms(x), per row of x (N, h) (``RMSNorm``)."""
    tokens, h = x.shape
    for m in range(tokens):
        total = np.float32(0.0)
        for c in range(h):
            total += x[m, c] * x[m, c]
        scale = np.float32(1.0) / np.sqrt(total / np.float32(h) + eps)
        for c in range(h):
            out[m, c] = weight[c] * (x[m, c] * scale)


@numba.njit(inline="always", fastmath=True, error_model="numpy")
def _state_after(
    bi: int, t: int, length: int, window: npt.NDArray[np.int64], xz: Array, conv0: Array,
    states: Array, conv_out: Array, ssm_out: Array,
) -> None:  # fmt: skip
    """The layer's state after token ``t`` of row ``bi``: the last K-1 conv inputs on its
    path (conv_out (d, K-1)) and its SSM state (ssm_out (d, n))."""
    kernel = window.shape[2]
    d = conv_out.shape[0]
    for j in range(kernel - 1):
        p = window[bi, t, j + 1]
        for c in range(d):
            conv_out[c, j] = xz[bi * length + p, c] if p >= 0 else conv0[bi, c, kernel - 1 + p]
    after = states[bi * length + t]
    for s in range(ssm_out.shape[1]):
        for c in range(d):
            ssm_out[c, s] = after[s, c]
