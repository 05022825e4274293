"""KV-cached block-autoregressive generation (CausVid Alg. 2) as plain functions, reused by training."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch

from causvid import schedule as S
from causvid.models.attention import ChunkLayout, CrossAttnCache, KVCache

# ----------------------------------------------------------------------------------------------------------------
# KV-cached chunk-by-chunk generation (CausVid Alg. 2)
# ----------------------------------------------------------------------------------------------------------------

FlowFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (x chunk, t [B, n], start_frame) -> flow


def denoise_chunk(flow: FlowFn, x: torch.Tensor, steps: Sequence[float], start_frame: int,
                  eps_for_step: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Few-step sampling of one chunk (``causvid_reference.md`` §2.1 step 2): x0-predict, re-noise, repeat.

    ``x`` [B, n, C, H, W] is the chunk at level ``steps[0]``; ``eps_for_step(j)`` gives the Gaussian noise that
    re-noises the x0 prediction of step j to level ``steps[j + 1]``. Returns the last x0 prediction.
    """
    B, n = x.shape[:2]
    x0 = x
    for j, t_j in enumerate(steps):
        t = torch.full((B, n), float(t_j), device=x.device)
        x0 = S.x0_from_flow(x, flow(x, t, start_frame), t)
        if j + 1 < len(steps):
            x = S.add_noise(x0, eps_for_step(j), torch.full((B, n), float(steps[j + 1]), device=x.device))
    return x0


def v2v_steps(steps: Sequence[float], t_start: float) -> list[float]:
    """Video-to-video levels: ``t_start`` followed by the student's steps strictly below it."""
    if not 0.0 <= float(t_start) <= S.T_MAX:
        raise ValueError(f"t_start must lie in [0, {S.T_MAX}], got {t_start}")
    return [float(t_start)] + [float(s) for s in steps if float(s) < float(t_start)]


def check_prefix(layout: ChunkLayout, num_frames: int, prefix_frames: int) -> None:
    """A prefix (I2V image latent, video extension) must end exactly on a chunk boundary."""
    ends = [b for _, b in layout.chunks(num_frames)]
    if prefix_frames > num_frames or prefix_frames not in ends:
        raise ValueError(f"a prefix of {prefix_frames} latent frames does not end on a chunk boundary of the layout "
                         f"{layout} over {num_frames} frames (chunk ends {ends[:6]}...); use "
                         f"{'1 + k * chunk_size' if layout.independent_first_frame else 'a multiple of chunk_size'} frames")


def causal_sample_chunks(model, noise: torch.Tensor, cond: Optional[torch.Tensor], *, layout: ChunkLayout,
                         steps: Sequence[float], context_noise: float = 0.0, kv_cache: Optional[KVCache] = None,
                         cross_cache: Optional[CrossAttnCache] = None, start_frame: int = 0,
                         generator: Optional[torch.Generator] = None, renoise: Optional[torch.Tensor] = None,
                         prefix: Optional[torch.Tensor] = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(f0, f1, x0_chunk)`` chunk by chunk (CausVid Alg. 2); ``f0, f1`` are absolute frame positions.

    ``noise`` [B, F, C, H, W] is the initial noise of every frame. ``steps`` the denoising list *without*
    the final 0 (e.g. [1000, 757, 522]). Re-noising uses ``renoise`` [B, F, n_steps - 1, C, H, W] if given
    (for tests that compare with a whole-clip computation), else fresh Gaussian noise from ``generator``.
    ``prefix`` [B, P, C, H, W]: clean latents written to the cache at t = 0 first (image-to-video /
    video extension; P must end on a chunk boundary); they are yielded unchanged.
    ``kv_cache``: a caller-owned cache (e.g. rolling); by default one holding all F frames is allocated.
    """
    B, F = noise.shape[:2]
    S_tok = model.tokens_per_frame(noise.shape[3], noise.shape[4])
    if kv_cache is None:  # slots are assigned in order, so F frames of capacity suffice whatever start_frame is
        kv_cache = model.new_kv_cache(B, F, S_tok, device=noise.device)
    cross_cache = cross_cache if cross_cache is not None else CrossAttnCache()
    steps = [float(s) for s in steps]
    P = 0 if prefix is None else prefix.shape[1]
    if P:
        check_prefix(layout, F, P)

    def flow(x, t, a):
        return model(x, t, cond, kv_cache=kv_cache, start_frame=a, cross_cache=cross_cache)

    def fresh(shape, device):
        return torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(device)

    for f0, f1 in layout.chunks(F):
        a, b = start_frame + f0, start_frame + f1
        n = f1 - f0
        if f1 <= P:  # given clean frames: written to the cache at t = 0, no noise
            x0 = prefix[:, f0:f1].to(noise.dtype)
            xc, t_ref = x0, 0.0
        else:
            def eps_for_step(j, f0=f0, f1=f1):
                if renoise is not None:
                    return renoise[:, f0:f1, j]
                return fresh(noise[:, f0:f1].shape, noise.device).to(noise.dtype)

            x0 = denoise_chunk(flow, noise[:, f0:f1], steps, a, eps_for_step)
            # cache refresh: clean (or lightly noised) chunk at t = context_noise overwrites its slots
            xc, t_ref = x0, float(context_noise)
            if context_noise > 0:
                xc = S.add_noise(x0, fresh(x0.shape, x0.device).to(x0.dtype),
                                 torch.full((B, n), t_ref, device=noise.device))
        # yield first, refresh after: the caller sees (and can decode) the chunk one forward earlier; the
        # refresh only matters to the next chunk, and is skipped when the caller stops after the last one
        yield a, b, x0
        flow(xc, torch.full((B, n), t_ref, device=noise.device), a)


@torch.no_grad()
def causal_sample(model, noise: torch.Tensor, cond: torch.Tensor, *, layout: ChunkLayout, steps: Sequence[float],
                  context_noise: float = 0.0, generator: Optional[torch.Generator] = None,
                  renoise: Optional[torch.Tensor] = None, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Whole video [B, F, C, H, W] from ``noise`` with the KV-cached few-step sampler."""
    return torch.cat([x0 for _, _, x0 in causal_sample_chunks(
        model, noise, cond, layout=layout, steps=steps, context_noise=context_noise, generator=generator,
        renoise=renoise, prefix=prefix)], dim=1)


@torch.no_grad()
def causal_teacher_sample(model, noise: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor] = None, *,
                          layout: ChunkLayout, num_steps: int = 50, shift: float = 8.0, guidance: float = 6.0,
                          sink_chunks: int = 0, window_chunks: int = 0) -> torch.Tensor:
    """Many-step autoregressive sampling of a *causal teacher* (the paper's "many-step causal" baseline).

    Chunk by chunk: ``num_steps`` Euler steps of the shifted grid with CFG, the previous chunks clean in a KV
    cache (one cache per CFG branch, each refreshed at t = 0 under its own prompt). ``window_chunks > 0`` makes
    both caches rolling (``sink_chunks`` kept from the start), for rollouts longer than the training clips.
    Returns x0 [B, F, C, H, W].
    """
    B, F = noise.shape[:2]
    S_tok = model.tokens_per_frame(noise.shape[3], noise.shape[4])
    k = layout.chunk_size
    cap = F if window_chunks == 0 else min(F, (sink_chunks + window_chunks) * k)
    sink = sink_chunks * k if window_chunks else 0
    branches = [(cond, model.new_kv_cache(B, cap, S_tok, sink_frames=sink), CrossAttnCache())]
    if uncond is not None and guidance != 1.0:
        branches.append((uncond, model.new_kv_cache(B, cap, S_tok, sink_frames=sink), CrossAttnCache()))
    sig = S.sampling_sigmas(num_steps, shift)
    out = []
    for f0, f1 in layout.chunks(F):
        x, n = noise[:, f0:f1].float(), f1 - f0
        for i in range(num_steps):
            t = torch.full((B, n), float(sig[i]) * S.T_MAX, device=noise.device)
            v = [model(x, t, ctx, kv_cache=kv, start_frame=f0, cross_cache=cc) for ctx, kv, cc in branches]
            v = v[0] if len(v) == 1 else S.cfg_combine(v[0], v[1], guidance)
            x = S.euler_step(x, v, float(sig[i]), float(sig[i + 1]))
        zero = torch.zeros(B, n, device=noise.device)
        for ctx, kv, cc in branches:  # cache refresh: the clean chunk at t = 0
            model(x, zero, ctx, kv_cache=kv, start_frame=f0, cross_cache=cc)
        out.append(x)
    return torch.cat(out, dim=1)


def student_steps(step_list: Sequence[float]) -> list[float]:
    """The sampler's list: the configured step list without its final 0."""
    steps = [float(s) for s in step_list]
    return steps[:-1] if steps and steps[-1] == 0 else steps
