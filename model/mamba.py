"""A Mamba block written plainly, with ``transformers.MambaModel``'s parameter names.

Shape letters:
    b  batch      l  sequence length     h  hidden size (model width)
    d  intermediate size (expand * h)    n  state size     r  time-step rank
    K  conv kernel width                 k  captured positions per sequence

Block (Mamba paper, figure 3):  out = x + out_proj( SSM(SiLU(conv(in_x))) * SiLU(z) )
where [in_x, z] = in_proj(RMSNorm(x)), and the SSM's delta, B, C are projections of its
input (the "selective" part, section 3.2).

Every path can start from a saved state and return the state it ends in, so a sequence can
be scanned in pieces: the state is the last K-1 conv inputs and the SSM state h.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import scan
from model.config import ModelConfig
from model.conv import causal_conv, fast_causal_conv_silu
from model.route import Route
from model.scan import reference_scan


@dataclass(frozen=True)
class LayerState:
    """One block's recurrent state: conv (b, d, K-1) and ssm (b, d, n)."""

    conv: torch.Tensor
    ssm: torch.Tensor


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as ``MambaRMSNorm``)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MambaMixer(nn.Module):
    """The selective SSM with its projections and causal depthwise convolution."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, d, n, r = config.hidden_size, config.intermediate_size, config.state_size, config.dt_rank
        self.d, self.n, self.r, self.kernel = d, n, r, config.conv_kernel
        self.in_proj = nn.Linear(h, 2 * d, bias=config.use_bias)
        self.conv1d = nn.Conv1d(d, d, config.conv_kernel, groups=d, bias=config.use_conv_bias,
                                padding=config.conv_kernel - 1)  # fmt: skip
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1).float()).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, h, bias=config.use_bias)
        self._init_time_step()

    def _init_time_step(self) -> None:
        """Mamba's delta initialisation: softplus(dt bias) log-uniform in [1e-3, 1e-1]."""
        low, high = math.log(1e-3), math.log(1e-1)
        dt = torch.exp(torch.rand(self.d) * (high - low) + low).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            bound = self.r**-0.5
            self.dt_proj.weight.uniform_(-bound, bound)

    def empty_state(self, batch: int, device: torch.device | None = None) -> LayerState:
        return LayerState(
            torch.zeros(batch, self.d, self.kernel - 1, device=device),
            torch.zeros(batch, self.d, self.n, device=device),
        )

    def forward(
        self, x: torch.Tensor, state: LayerState | None = None, route: Route | None = None
    ) -> tuple[torch.Tensor, LayerState, LayerState | None]:
        """x (b, l, h) -> (out (b, l, h), state after the last step, captured states).

        ``route`` (``model.route``, made once per forward) may ask for the state after
        chosen positions of each row: they come back as LayerState(conv (b, k, d, K-1),
        ssm (b, k, d, n)), differentiable in training (the state a task token's branch
        starts from). It may also make each row a token tree (``model.branches``); states
        are then those along each token's path.
        """
        b = x.shape[0]
        start = state or self.empty_state(b, x.device)
        if x.shape[1] == 1 and route is None:  # one token, nothing to capture: the step
            return self._step(x, start)
        capture = route.capture if route is not None else None
        branches = route.branches if route is not None else None
        parent = branches.parent if branches is not None else None
        xz = self.in_proj(x)
        xs, z = xz.chunk(2, dim=-1)  # (b, l, d) each
        conv_in = torch.cat([start.conv.transpose(1, 2).to(xs.dtype), xs], dim=1)  # (b, K-1+l, d)
        length = xs.shape[1]
        weight = self.conv1d.weight[:, 0, :]  # (d, K)
        compiled = x.device.type == "cpu" and not torch.is_grad_enabled()
        if compiled:
            u = fast_causal_conv_silu(conv_in, weight, self.conv1d.bias, branches)
        else:
            u = F.silu(causal_conv(conv_in, weight, self.conv1d.bias, branches))  # (b, l, d)
        A = -torch.exp(self.A_log.float())  # (d, n)
        ssm_captured: torch.Tensor | None = None
        raw_delta, B, C = self._selection(u)
        if compiled:  # the time step's softplus and the output gate ride in the scan's pass
            gated, h, ssm_captured = scan.fast_scan(
                u, raw_delta, A, B, C, self.D, start.ssm, capture, parent,
                delta_bias=self.dt_proj.bias, gate=z,
                plan=route.plan if route is not None else None,
            )  # fmt: skip
        else:
            delta = F.softplus(raw_delta + self.dt_proj.bias)
            if x.is_cuda and route is None and state is None and scan.cuda_scan is not None:
                y, h = scan.cuda_scan(u, delta, A, B, C, self.D)
            elif x.device.type != "cpu" or parent is not None:
                # Trees with gradients (nothing trains on them yet) take the reference path.
                y, h, ssm_captured = reference_scan(
                    u, delta, A, B, C, self.D, start.ssm, capture, parent
                )
            else:
                y, h, ssm_captured = scan.compiled_scan(
                    u, delta, A, B, C, self.D, start.ssm, capture
                )
            gated = y * F.silu(z)
        captured: LayerState | None = None
        if route is not None and capture is not None and ssm_captured is not None:
            captured = LayerState(route.captured_conv(conv_in), ssm_captured)
        out = self.out_proj(gated.to(x.dtype))
        if route is not None and route.end is not None:  # a tree: the last token's path
            end_conv = route.end_conv(conv_in)
        else:
            end_conv = conv_in[:, length:].transpose(1, 2)
        return out, LayerState(end_conv, h), captured

    def _selection(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input-dependent SSM parameters: the time step before its bias and softplus
        (..., d) (delta = softplus(that + dt_proj.bias)), B (..., n), C (..., n)."""
        dt, B, C = torch.split(self.x_proj(u), [self.r, self.n, self.n], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def _step(
        self, x: torch.Tensor, state: LayerState
    ) -> tuple[torch.Tensor, LayerState, LayerState | None]:
        """One token, plain tensor operations only (the form exported to ONNX).
        x (b, 1, h); equal to the parallel path for l = 1."""
        xs, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)  # (b, d) each
        window = torch.cat([state.conv.to(xs.dtype), xs.unsqueeze(-1)], dim=2)  # (b, d, K)
        conv = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        u = F.silu(conv)  # (b, d)
        raw_delta, B, C = self._selection(u)
        delta = F.softplus(raw_delta + self.dt_proj.bias)
        A = -torch.exp(self.A_log.float())
        h = torch.exp(delta.unsqueeze(-1) * A) * state.ssm + (delta * u).unsqueeze(-1) * (
            B.unsqueeze(1)
        )  # (b, d, n)
        y = (h * C.unsqueeze(1)).sum(-1) + self.D * u
        out = self.out_proj((y * F.silu(z)).to(x.dtype)).unsqueeze(1)
        return out, LayerState(window[:, :, 1:], h), None


class MambaBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)); the residual is kept in float32."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = MambaMixer(config)

    def forward(
        self, x: torch.Tensor, state: LayerState | None = None, route: Route | None = None
    ) -> tuple[torch.Tensor, LayerState, LayerState | None]:
        out, end, captured = self.mixer(self.norm(x), state, route)
        return x.float() + out, end, captured
