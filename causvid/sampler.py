"""Sampling: the bidirectional teacher's ODE solver with CFG, and KV-cached block-autoregressive generation.

``import causvid.sampler`` pulls in only models, schedule and config: never accelerate, wandb or the trainer.

Core functions (plain, reused by training: ODE pairs, backward simulation):
* :func:`teacher_sample` — many-step Euler (or UniPC) over the shifted grid, CFG with a negative prompt,
  returning the trajectory states asked for (CausVid ``generate_ode_pairs.py``).
* :func:`causal_sample` — CausVid Alg. 2: per chunk, few-step x0-predict + re-noise, then a cache refresh
  pass at t = ``context_noise`` (0), with a preallocated (optionally rolling) KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from causvid import schedule as S
from causvid.models.attention import ChunkLayout, CrossAttnCache, KVCache


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
        import math

        s = min(max(s, 1e-12), 1 - 1e-12)
        return math.log(1 - s) - math.log(s)

    def step(self, x: torch.Tensor, v: torch.Tensor, sig: torch.Tensor, i: int) -> torch.Tensor:
        import math

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


def causal_sample_chunks(model, noise: torch.Tensor, cond: Optional[torch.Tensor], *, layout: ChunkLayout,
                         steps: Sequence[float], context_noise: float = 0.0, kv_cache: Optional[KVCache] = None,
                         cross_cache: Optional[CrossAttnCache] = None, start_frame: int = 0,
                         generator: Optional[torch.Generator] = None, renoise: Optional[torch.Tensor] = None,
                         prefix: Optional[torch.Tensor] = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(f0, f1, x0_chunk)`` chunk by chunk (CausVid Alg. 2).

    ``noise`` [B, F, C, H, W] is the initial noise of every frame. ``steps`` the denoising list *without*
    the final 0 (e.g. [1000, 757, 522]). Re-noising uses ``renoise`` [B, F, n_steps - 1, C, H, W] if given
    (for tests that compare with a whole-clip computation), else fresh Gaussian noise from ``generator``.
    ``prefix`` [B, P, C, H, W]: clean latents written to the cache at t = 0 first (image-to-video /
    video extension); they are yielded unchanged.
    """
    B, F = noise.shape[:2]
    S_tok = model.tokens_per_frame(noise.shape[3], noise.shape[4])
    own_cache = kv_cache is None
    if own_cache:
        kv_cache = model.new_kv_cache(B, start_frame + F, S_tok, dtype=noise.dtype, device=noise.device)
    cross_cache = cross_cache if cross_cache is not None else CrossAttnCache()
    steps = [float(s) for s in steps]
    for f0, f1 in layout.chunks(F):
        a, b = start_frame + f0, start_frame + f1
        n = f1 - f0
        if prefix is not None and f1 <= prefix.shape[1]:
            x0 = prefix[:, f0:f1].to(noise.dtype)
        else:
            x = noise[:, f0:f1]
            for j, t_j in enumerate(steps):
                t = torch.full((B, n), t_j, device=noise.device)
                v = model(x, t, cond, kv_cache=kv_cache, start_frame=a, cross_cache=cross_cache)
                x0 = S.x0_from_flow(x, v, t)
                if j + 1 < len(steps):
                    eps = renoise[:, f0:f1, j] if renoise is not None else torch.randn(
                        x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
                    x = S.add_noise(x0, eps, torch.full((B, n), steps[j + 1], device=noise.device))
        # cache refresh: clean (or lightly noised) chunk at t = context_noise overwrites its slots
        xc = x0
        if context_noise > 0:
            eps = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
            xc = S.add_noise(x0, eps, torch.full((B, n), context_noise, device=noise.device))
        model(xc, torch.full((B, n), float(context_noise), device=noise.device), cond, kv_cache=kv_cache,
              start_frame=a, cross_cache=cross_cache)
        yield a, b, x0


@torch.no_grad()
def causal_sample(model, noise: torch.Tensor, cond: torch.Tensor, *, layout: ChunkLayout, steps: Sequence[float],
                  context_noise: float = 0.0, generator: Optional[torch.Generator] = None,
                  renoise: Optional[torch.Tensor] = None, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Whole video [B, F, C, H, W] from ``noise`` with the KV-cached few-step sampler."""
    return torch.cat([x0 for _, _, x0 in causal_sample_chunks(
        model, noise, cond, layout=layout, steps=steps, context_noise=context_noise, generator=generator,
        renoise=renoise, prefix=prefix)], dim=1)


def student_steps(step_list: Sequence[float]) -> list[float]:
    """The sampler's list: the configured step list without its final 0."""
    steps = [float(s) for s in step_list]
    return steps[:-1] if steps and steps[-1] == 0 else steps
