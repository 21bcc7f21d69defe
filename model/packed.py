"""The whole network up to the final norm in one compiled call, for forwards of a few
tokens.

Shape letters: b batch, l row length, N = b * l tokens, h hidden size, d intermediate
size, n state size, r time-step rank, K conv kernel width, k captured positions per row,
L layers (blocks), e Time2Vec size.

An incremental score (ten new events, two closing tokens, six task tokens) and a forecast
step are a few tokens each. Their arithmetic is small; what costs is the per-operation
overhead of running the embeddings and eight blocks as some three hundred tensor
operations, every one a Python call, an allocation and a dispatch. Here they run in one
numba call over the weights as ``PackedModel`` lays them out, the
matrix products through PyTorch's own sgemm (``model.blas``) and everything between them
in loops the compiler vectorises. It does the same arithmetic as the blocks' fused path
(``model.scan.fast_scan``, ``model.conv.fast_causal_conv_silu``): the same exp, softplus
and SiLU, the same order of sums in the scan and the convolution (tested against the
blocks to float32 rounding).

Rows may be token trees (``model.branches``): every token's state is kept, so a token
continues its parent's state, and its convolution window follows its own path. That costs
N d n floats, which is why this path is for a few tokens (``FEW_TOKENS``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import numpy.typing as npt
import torch
from numba.typed import List
from torch import nn

from model import blas, fastmath
from model.blas import gemm
from model.branches import paths
from model.state import ModelState

if TYPE_CHECKING:
    from model.network import EHRMamba, TokenBatch

FEW_TOKENS = 256  # forwards of at most this many tokens (b * l) take the packed path
COPY_BUDGET = 64 * 2**20  # bytes of transposed projection copies (compact: 14 MB)

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class PackedModel:
    """The embeddings', blocks' and final norm's weights as the kernel reads them: the
    per-channel vectors stacked per layer (leading axis L), the projections per layer in
    numba typed Lists, the tables as they lie (numpy views of the parameters).

    A projection is a transposed (in, out) copy while all of them take at most
    ``COPY_BUDGET`` bytes: MKL multiplies a few rows by it faster than by
    ``nn.Linear``'s (out, in) weight. Beyond that (the paper size: 0.5 GB) the kernel reads
    the parameters themselves rather than hold a second model. ``sources`` are the
    parameters packed, so a changed or replaced weight is noticed (``unchanged``) and the
    model repacked."""

    sources: tuple[_Source, ...]
    concepts: Array  # (v, h)
    time2vec: Array  # (2, 2, e): time then age; weights then biases (column 0 the linear)
    project: Array  # (h, h + 2e), or (h + 2e, h)
    project_bias: Array  # (h,)
    kinds: Array  # (token types, h)
    segments: Array  # (segments, h)
    visit_orders: Array  # (max visit order + 1, h)
    weeks_per_year: float
    norm: Array  # (L, h)
    in_proj: Sequence[Array]  # L x (2d, h); with ``transposed``, (h, 2d)
    in_bias: Array  # (L, 2d)
    conv: Array  # (L, K, d): taps, oldest input first
    conv_bias: Array  # (L, d)
    x_proj: Sequence[Array]  # L x (r + 2n, d), or (d, r + 2n)
    dt_proj: Sequence[Array]  # L x (d, r), or (r, d)
    dt_bias: Array  # (L, d)
    decay: Array  # (L, n, d): A log2 e (exp(delta A) = 2^(delta A log2 e))
    skip: Array  # (L, d): D
    out_proj: Sequence[Array]  # L x (h, d), or (d, h)
    out_bias: Array  # (L, h)
    norm_f: Array  # (h,)
    eps: float
    transposed: bool  # the projections as (in, out) copies (see ``COPY_BUDGET``)
    use_sgemm: bool = True  # PyTorch's sgemm where it exports one; False: np.dot (tests)

    @property
    def tables(self) -> tuple[Array, Array, Array, Array]:
        """The embedding tables in the order of ``_streams``' ids: concepts, token types,
        segments, visit orders."""
        return self.concepts, self.kinds, self.segments, self.visit_orders

    @functools.cached_property
    def table_sizes(self) -> npt.NDArray[np.int64]:
        """The rows of each table in ``tables``."""
        return np.array([table.shape[0] for table in self.tables], np.int64)

    def unchanged(self) -> bool:
        """Whether every parameter is still the one packed, with the same values."""
        return all(
            slots[name] is tensor and tensor._version == version and tensor.data_ptr() == address
            for slots, name, tensor, version, address in self.sources
        )

    @classmethod
    def of(cls, model: EHRMamba) -> PackedModel:
        """Pack the weights of ``model`` up to its final norm."""
        from model.network import WEEKS_PER_YEAR  # here: model.network imports this module

        with torch.no_grad():
            embed, blocks = model.embed, model.backbone.blocks()
            mixers = [block.mixer for block in blocks]
            log2e = float(fastmath.LOG2E)
            d = mixers[0].d
            h = model.config.hidden_size

            def array(t: torch.Tensor) -> Array:
                """The tensor's own memory where it is contiguous float32, else a copy."""
                return np.ascontiguousarray(t.detach().float().numpy())

            projections = [embed.project.weight] + [
                p.weight for m in mixers for p in (m.in_proj, m.x_proj, m.dt_proj, m.out_proj)
            ]
            transposed = sum(p.numel() * 4 for p in projections) <= COPY_BUDGET

            def matrix(weight: torch.Tensor) -> Array:
                return array(weight.t()) if transposed else array(weight)

            def per_layer(weights: list[torch.Tensor]) -> Sequence[Array]:
                matrices: Sequence[Array] = List([matrix(w) for w in weights])
                return matrices

            def stack(tensors: list[torch.Tensor]) -> Array:
                return array(torch.stack([t.detach().float() for t in tensors]))

            def bias_or_zero(bias: torch.Tensor | None, size: int) -> torch.Tensor:
                return bias if bias is not None else torch.zeros(size)

            time2vec = [
                torch.stack([
                    torch.cat([t.linear.weight[:, 0], t.periodic.weight[:, 0]]),
                    torch.cat([t.linear.bias, t.periodic.bias]),
                ])
                for t in (embed.time, embed.age)
            ]  # fmt: skip
            return cls(
                sources=_sources([embed, model.backbone]),
                concepts=array(model.backbone.embeddings.weight),
                time2vec=stack(time2vec),
                project=matrix(embed.project.weight),
                project_bias=array(embed.project.bias),
                kinds=array(embed.token_type.weight),
                segments=array(embed.segment.weight),
                visit_orders=array(embed.visit_order.weight),
                weeks_per_year=WEEKS_PER_YEAR,
                norm=stack([block.norm.weight for block in blocks]),
                in_proj=per_layer([m.in_proj.weight for m in mixers]),
                in_bias=stack([bias_or_zero(m.in_proj.bias, 2 * d) for m in mixers]),
                conv=stack([m.conv1d.weight[:, 0, :].t() for m in mixers]),
                conv_bias=stack([bias_or_zero(m.conv1d.bias, d) for m in mixers]),
                x_proj=per_layer([m.x_proj.weight for m in mixers]),
                dt_proj=per_layer([m.dt_proj.weight for m in mixers]),
                dt_bias=stack([m.dt_proj.bias for m in mixers]),
                decay=stack([-torch.exp(m.A_log.float()).t() * log2e for m in mixers]),
                skip=stack([m.D for m in mixers]),
                out_proj=per_layer([m.out_proj.weight for m in mixers]),
                out_bias=stack([bias_or_zero(m.out_proj.bias, h) for m in mixers]),
                norm_f=array(model.backbone.norm_f.weight),
                eps=float(blocks[0].norm.eps),
                transposed=transposed,
            )

    def forward(
        self,
        batch: TokenBatch,
        state: ModelState | None,
        capture: torch.Tensor | None,
        parent: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ModelState, ModelState | None]:
        """``EHRMamba.forward`` up to the final norm: hidden (b, l, h), the end state, and
        the captured states (zeros at -1) when ``capture`` (b, k) is given. ``state``: the
        start state (zeros when None); ``parent`` (b, l): token trees. Raises ValueError for
        a parent that is not an earlier position or -1, a captured position outside the
        rows or a shape that does not fit, IndexError for an id beyond its table.

        What runs in Python here is kept to a few operations: after the kernel has streamed
        the weights through the caches, each costs several times what it does in a loop
        (docs/benchmarks.md, "The Python around a small forward")."""
        b, length = batch.concept.shape
        h = self.norm_f.shape[0]
        layers, kernel, d = self.conv.shape
        n = self.decay.shape[1]
        ids, when = self._streams(batch)
        if parent is not None:
            parents = np.ascontiguousarray(_numpy(parent), dtype=np.int64)
            _check_shape("parent", parents, (b, length))
            window = paths(parents, kernel)
        else:
            parents, window = _plain_paths(b, length, kernel)
        asked = _NOTHING_ASKED
        if capture is not None:
            asked = capture.cpu().numpy().astype(np.int64)
            _check_shape("capture", asked, (b, asked.shape[-1]))
            if asked.size and not (asked.min() >= -1 and asked.max() < length):
                raise ValueError(f"a captured position must be -1 or 0 to {length - 1}")
        if state is None:
            conv0 = np.zeros((layers, b, d, kernel - 1), np.float32)
            ssm0 = np.zeros((layers, b, d, n), np.float32)
        else:
            conv0, ssm0 = fastmath.as_array(state.conv), fastmath.as_array(state.ssm)
            _check_shape("start conv state", conv0, (layers, b, d, kernel - 1))
            _check_shape("start ssm state", ssm0, (layers, b, d, n))
        routines = (*(blas.routines() if self.use_sgemm else (0, 0)), numba.get_num_threads())
        hidden, end_conv, end_ssm, cap_conv, cap_ssm = _network(
            routines, self.transposed, ids, when, parents, window, asked, conv0, ssm0,
            self.tables, self.time2vec, self.project, self.project_bias,
            self.norm, self.in_proj, self.in_bias, self.conv, self.conv_bias, self.x_proj,
            self.dt_proj, self.dt_bias, self.decay, self.skip, self.out_proj, self.out_bias,
            self.norm_f, np.float32(self.eps),
        )  # fmt: skip
        end = ModelState(torch.from_numpy(end_conv), torch.from_numpy(end_ssm))
        captured = None
        if capture is not None:
            captured = ModelState(torch.from_numpy(cap_conv), torch.from_numpy(cap_ssm))
        return torch.from_numpy(hidden).view(b, length, h), end, captured

    def _streams(self, batch: TokenBatch) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The ids (4, N): concept, type, segment and visit order (clamped as
        ``Embeddings``), and the times (2, N): years since 1970 and age. Raises IndexError
        for an id its table lacks (the kernel would read beyond it)."""
        sizes = self.table_sizes
        ids, when, bad = _gather_streams(
            _numpy(batch.concept), _numpy(batch.type), _numpy(batch.segment),
            _numpy(batch.visit_order), _numpy(batch.time), _numpy(batch.age),
            sizes, np.float32(self.weeks_per_year),
        )  # fmt: skip
        if bad >= 0:
            name = ("concept", "type", "segment", "visit_order")[bad]
            low, high = ids[bad].min(), ids[bad].max()
            wrong = low if low < 0 else high
            raise IndexError(f"{name} id {wrong} is outside its table (0 to {sizes[bad] - 1})")
        return ids, when


def _numpy(t: torch.Tensor) -> npt.NDArray[Any]:
    """A CPU tensor's memory as an array (``applies`` has ruled out other devices)."""
    return t.detach().numpy()


_NOTHING_ASKED = np.empty((0, 0), np.int64)  # no captures (the kernel only reads its shape)


@functools.lru_cache(maxsize=64)
def _plain_paths(b: int, length: int, kernel: int) -> tuple[npt.NDArray[np.int64], ...]:
    """Parents (b, l) and conv windows (b, l, K, see ``paths``) of rows that are plain
    sequences, not trees. Cached, as every update of ten events has the same shape; the
    kernel only reads them. (Not marked read-only: numba would compile the kernel a second
    time for read-only arrays.)"""
    parents = np.broadcast_to(np.arange(-1, length - 1), (b, length)).copy()
    return parents, paths(parents, kernel)


@numba.njit(cache=True, error_model="numpy")
def _gather_streams(
    concept: npt.NDArray[np.integer], kind: npt.NDArray[np.integer],
    segment: npt.NDArray[np.integer], visit_order: npt.NDArray[np.integer],
    time: npt.NDArray[np.floating], age: npt.NDArray[np.floating],
    sizes: npt.NDArray[np.int64], weeks_per_year: np.float32,
) -> tuple[npt.NDArray[np.int64], Array, int]:  # fmt: skip
    """Each (b, l) stream flattened: ids (4, N), visit orders clamped to the last row of
    their table as ``Embeddings`` clamps them, and times (2, N), years (time / weeks per
    year, in float32 as ``Embeddings`` divides) and age. Also the first stream with an id
    outside its table (``sizes``), or -1."""
    b, length = concept.shape
    ids = np.empty((4, b * length), np.int64)
    when = np.empty((2, b * length), np.float32)
    bad = -1
    for i in range(b):
        for t in range(length):
            m = i * length + t
            ids[0, m], ids[1, m], ids[2, m] = concept[i, t], kind[i, t], segment[i, t]
            ids[3, m] = min(visit_order[i, t], sizes[3] - 1)
            when[0, m] = np.float32(time[i, t]) / weeks_per_year
            when[1, m] = np.float32(age[i, t])
            for stream in range(4):
                outside = ids[stream, m] < 0 or ids[stream, m] >= sizes[stream]
                if outside and (bad < 0 or stream < bad):
                    bad = stream
    return ids, when, bad


def _check_shape(name: str, array: npt.NDArray[np.generic], shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``array`` has ``shape``: the kernel indexes without bounds
    checks, so a mismatch would read or write beyond an array instead of failing."""
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")


# A parameter as packed: its module's parameter dict and its name there, the tensor, its
# version and storage address.
_Source = tuple[dict[str, nn.Parameter | None], str, torch.Tensor, int, int]


def _sources(roots: list[nn.Module]) -> tuple[_Source, ...]:
    """Every parameter the packing reads. An optimizer step or a loaded state dict bumps a
    version, ``.data =`` (``model.to``, ``model.double``) moves a storage, assigning a new
    Parameter replaces the tensor: ``unchanged`` notices each, in under a microsecond per
    parameter (walking the modules afresh would cost a millisecond per forward)."""
    return tuple(
        (module._parameters, name, tensor, tensor._version, tensor.data_ptr())
        for root in roots
        for module in root.modules()
        for name, tensor in module._parameters.items()
        if tensor is not None
    )


def packable(model: EHRMamba) -> bool:
    """Whether the weights the kernel would read are float32 on the CPU. Checked when
    packing, not per forward: moving or casting the model replaces their storage, which
    ``PackedModel.unchanged`` notices."""
    return all(
        p.device.type == "cpu" and p.dtype == torch.float32
        for root in (model.embed, model.backbone)
        for p in root.parameters()
    )


def applies(model: EHRMamba, batch: TokenBatch) -> bool:
    """Whether ``model``'s forward of ``batch`` may take the packed path (if its weights are
    ``packable``): a few tokens on the CPU, evaluation mode (no dropout), no gradients, not
    being traced (an exporter must see the tensor operations). Each check costs
    microseconds here: this runs before every forward of a few tokens."""
    b, length = batch.concept.shape
    return (
        0 < b * length <= FEW_TOKENS
        and not torch.is_grad_enabled()
        and not model.training
        and batch.concept.is_cpu
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing()  # type: ignore[attr-defined, no-untyped-call]
    )


@numba.njit(parallel=blas.PRANGE_ONLY, cache=True, fastmath=True, error_model="numpy")
def _network(
    routines: tuple[int, int, int],  # blas.routines() ((0, 0) for np.dot), threads
    transposed: bool,  # the projections are (in, out) copies, not the (out, in) parameters
    ids: npt.NDArray[np.int64],  # (4, N): concept, type, segment, visit order; N = b * l
    when: Array,  # (2, N): years since 1970, age
    parent: npt.NDArray[np.int64],  # (b, l)
    window: npt.NDArray[np.int64],  # (b, l, K): ``model.branches.paths``
    capture: npt.NDArray[np.int64],  # (b, k), -1 for none
    conv0: Array,  # (L, b, d, K-1) start conv inputs, oldest first
    ssm0: Array,  # (L, b, d, n) start states
    tables: tuple[Array, Array, Array, Array],  # concepts, types, segments, visit orders
    time2vec: Array, project: Array, project_bias: Array,
    norm: Array, in_proj: Sequence[Array], in_bias: Array, conv: Array, conv_bias: Array,
    x_proj: Sequence[Array], dt_proj: Sequence[Array], dt_bias: Array, decay: Array,
    skip: Array, out_proj: Sequence[Array], out_bias: Array, norm_f: Array, eps: np.float32,
) -> tuple[Array, Array, Array, Array, Array]:  # fmt: skip
    """The embeddings, every block, the final norm. Returns hidden (N, h), end conv
    (L, b, d, K-1), end ssm (L, b, d, n), captured conv (L, b, k, d, K-1) and ssm
    (L, b, k, d, n)."""
    layers, kernel, d = conv.shape
    n = decay.shape[1]
    r = x_proj[0].shape[1 if transposed else 0] - 2 * n
    b, length = parent.shape
    k = capture.shape[1]
    tokens = ids.shape[1]
    h = norm_f.shape[0]
    residual = _embed(routines, transposed, ids, when, tables, time2vec, project, project_bias)
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
        gemm(routines, normed, tokens, h, h, in_proj[li], transposed, xz, False)
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
        gemm(routines, u, tokens, d, d, x_proj[li], transposed, selection, False)
        gemm(routines, selection, tokens, r, r + 2 * n, dt_proj[li], transposed, raw_dt, False)
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
        gemm(routines, gated, tokens, d, d, out_proj[li], transposed, residual, True)
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
def _embed(
    routines: tuple[int, int, int], transposed: bool, ids: npt.NDArray[np.int64], when: Array,
    tables: tuple[Array, Array, Array, Array], time2vec: Array, project: Array,
    project_bias: Array,
) -> Array:  # fmt: skip
    """Input embeddings (N, h), as ``Embeddings`` (paper section 2.2): the concept's row,
    Time2Vec of time and age (a linear feature, then sinusoids), projected back to h; then
    the type, segment and visit-order rows added."""
    concepts, kinds, segments, visits = tables
    tokens = ids.shape[1]
    h = concepts.shape[1]
    e = time2vec.shape[2]
    features = np.empty((tokens, h + 2 * e), np.float32)
    for m in range(tokens):
        features[m, :h] = concepts[ids[0, m]]
        for stream in range(2):
            x = when[stream, m]
            at = h + stream * e
            features[m, at] = x * time2vec[stream, 0, 0] + time2vec[stream, 1, 0]
            for j in range(1, e):
                features[m, at + j] = np.sin(x * time2vec[stream, 0, j] + time2vec[stream, 1, j])
    out = np.empty((tokens, h), np.float32)
    gemm(routines, features, tokens, h + 2 * e, h + 2 * e, project, transposed, out, False)
    for m in range(tokens):
        kind, segment, visit = kinds[ids[1, m]], segments[ids[2, m]], visits[ids[3, m]]
        for c in range(h):
            out[m, c] = out[m, c] + project_bias[c] + kind[c] + segment[c] + visit[c]
    return out


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
