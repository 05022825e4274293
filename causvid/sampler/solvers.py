"""The bidirectional teacher's many-step ODE solvers (Euler, UniPC) over the shifted grid, with CFG."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from causvid import schedule as S
from causvid.models.attention import ChunkLayout, CrossAttnCache


@dataclass
class TeacherResult:
    x0: torch.Tensor  # [B, F, C, H, W] final sample
    states: dict[int, torch.Tensor]  # step index -> state x_t *before* that step ([B, F, C, H, W])
    timesteps: torch.Tensor  # [N + 1] float64 grid (last 0)


def guided_flow(model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                guidance: float, *, layout: Optional[ChunkLayout] = None, cross_caches=(None, None)) -> torch.Tensor:
    """Flow prediction with CFG ``uncond + w (cond - uncond)`` (two forwards; one when w == 1)."""
    v_c = model(x, t, cond, layout=layout, cross_cache=cross_caches[0])
    if guidance == 1.0 or uncond is None:
        return v_c
    v_u = model(x, t, uncond, layout=layout, cross_cache=cross_caches[1])
    return S.cfg_combine(v_c, v_u, guidance)


@torch.no_grad()
def teacher_sample(model, noise: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor] = None, *,
                   num_steps: int = 50, shift: float = 8.0, guidance: float = 6.0, solver: str = "euler",
                   keep_steps: Sequence[int] = (), layout: Optional[ChunkLayout] = None,
                   progress: Optional[Callable[[int], None]] = None) -> TeacherResult:
    """Solve the probability-flow ODE from ``noise`` (sigma = 1) to sigma = 0.

    ``keep_steps``: indices i in [0, num_steps] whose state *before* step i is returned (num_steps = final).
    CFG is applied to the flow, which is the same as applying it to x0 at a fixed x_t (linear map).
    ``layout`` makes the model block-causal (the causal teacher of the paper's ablation).
    """
    if solver not in ("euler", "unipc"):
        raise ValueError(f"unknown solver {solver!r}; valid: euler, unipc")
    sig = S.sampling_sigmas(num_steps, shift)
    ts = sig * S.T_MAX
    B, F = noise.shape[:2]
    caches = (CrossAttnCache(), CrossAttnCache())
    x = noise.float()
    states: dict[int, torch.Tensor] = {}
    unipc = UniPCState() if solver == "unipc" else None
    for i in range(num_steps):
        if i in keep_steps:
            states[i] = x.clone()
        t = torch.full((B, F), float(ts[i]), device=x.device)
        v = guided_flow(model, x, t, cond, uncond, guidance, layout=layout, cross_caches=caches)
        if unipc is None:
            x = S.euler_step(x, v, float(sig[i]), float(sig[i + 1]))
        else:
            x = unipc.step(x, v, sig, i)
        if progress is not None:
            progress(i)
    if num_steps in keep_steps:
        states[num_steps] = x.clone()
    return TeacherResult(x0=x, states=states, timesteps=ts)


class UniPCState:
    """UniPC multistep (bh2, order 2, predict-x0, lower-order final) for flow models (``wan_architecture.md`` §6.2)."""

    def __init__(self):
        self.m: list[torch.Tensor] = []  # previous x0 predictions
        self.x_prev: Optional[torch.Tensor] = None
        self.order_prev = 0

    @staticmethod
    def _lam(s: float) -> float:
        """lambda = ln(alpha) - ln(sigma) with alpha = 1 - sigma (clamped away from 0 and 1)."""
        s = min(max(s, 1e-12), 1 - 1e-12)
        return math.log(1 - s) - math.log(s)

    def step(self, x: torch.Tensor, v: torch.Tensor, sig: torch.Tensor, i: int) -> torch.Tensor:
        N = len(sig) - 1
        s_i = float(sig[i])
        m_i = (x.double() - s_i * v.double())
        xd = x.double()
        # corrector (i > 0): refine the current sample with the new model output
        if i > 0 and self.x_prev is not None:
            s_p = float(sig[i - 1])
            h = self._lam(s_i) - self._lam(s_p)
            hh = -h
            Bh = math.expm1(hh)
            base = (s_i / s_p) * self.x_prev - (1 - s_i) * Bh * self.m[-1]
            if self.order_prev == 1 or len(self.m) < 2:
                xd = base - (1 - s_i) * Bh * 0.5 * (m_i - self.m[-1])
            else:
                r1 = (self._lam(float(sig[i - 2])) - self._lam(s_p)) / h
                b1 = (Bh / hh - 1) / Bh
                b2 = 2 * ((Bh / hh - 1) / hh - 0.5) / Bh
                # R = [[1, 1], [r1, 1]], solve R rho = [b1, b2]
                det = 1 - r1
                rho1, rho2 = (b1 - b2) / det, (b2 - r1 * b1) / det
                xd = base - (1 - s_i) * Bh * (rho1 * (self.m[-2] - self.m[-1]) / r1 + rho2 * (m_i - self.m[-1]))
        self.m.append(m_i)
        self.m = self.m[-2:]
        order = min(2, N - i, len(self.m))
        s_n = float(sig[i + 1])
        if s_n == 0.0:
            out = m_i
        else:
            h = self._lam(s_n) - self._lam(s_i)
            Bh = math.expm1(-h)
            out = (s_n / s_i) * xd - (1 - s_n) * Bh * m_i
            if order == 2:
                r1 = (self._lam(float(sig[i - 1])) - self._lam(s_i)) / h
                out = out - (1 - s_n) * Bh * 0.5 * (self.m[-2] - m_i) / r1
        self.x_prev = xd
        self.order_prev = order
        return out.to(x.dtype)
