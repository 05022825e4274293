"""Self-Forcing's training rollout (``causvid_reference.md`` §9.2): the generator's sample is its own KV-cached
chunk-by-chunk generation, computed exactly as the inference sampler (:func:`causvid.sampler.causal_sample_chunks`)
computes it, with gradient only through one forward per chunk.

Per chunk (frames ``[f0, f1)``): the step list's x0-predict / re-noise forwards up to the chunk's *exit step* k
(steps ``0..k-1`` under no_grad, fresh Gaussian noise between steps), the exit-step forward with grad (its x0 is the
chunk's output), then the cache refresh of that output at t = ``context_noise`` under no_grad (noised first when
``context_noise > 0``, as the sampler does). Chunks before the last ``grad_frames`` frames (rollouts longer than the
training clip) run entirely under no_grad.

How gradient crosses chunks through the cache (``cache_grad``):

* ``straight_through`` (the published recipe, measured on the reference code): later chunks attend to the refresh
  pass's K/V in the forward while their gradient reaches the earlier chunk's exit-step K/V:
  ``K_used = K_refresh.detach() + K_exit - K_exit.detach()`` (same for V). Forward values equal ``K_refresh``
  exactly (``K_exit - K_exit.detach()`` is 0.0).
* ``detached``: ``K_used = K_refresh.detach()``; chunks exchange no gradient.

Attention inputs are built out of place (``cat(prefix K/V, current K/V)``, never a write into a preallocated
buffer), so no cache update can invalidate a saved tensor, and per-block activation checkpointing of the exit-step
forward stays valid (the attention closure captures the prefix at the forward, so a recomputation in the backward
sees the same keys).

The exit steps are drawn by :func:`draw_exit_steps` from ``(seed, step, update name)`` only: equal on every rank and
every micro-batch with no communication, and the same after a resume.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from causvid import schedule as S
from causvid.models.attention import ChunkLayout, CrossAttnCache, sdpa
from causvid.train.data import mix_seed

__all__ = ["CACHE_GRAD_RULES", "RolloutKVCache", "self_forcing_rollout", "draw_exit_steps", "exit_interval"]

CACHE_GRAD_RULES = ("straight_through", "detached")


class RolloutKVCache:
    """An out-of-place, chunk-granular KV cache for the training rollout (the ``kv_cache`` protocol of
    :class:`causvid.models.dit.WanDiT`: ``plan(start_frame, n)`` then ``attend(layer, q, k, v)``).

    Committed chunks hold per-layer ``(K_used, V_used)`` [B, n*S, H, d]. A forward's queries attend to
    ``cat(committed prefix, own K/V)`` in chronological order: the same keys, in the same order, as the sampler's
    :class:`causvid.models.attention.KVCache` without eviction. ``window_chunks > 0`` keeps the first
    ``sink_chunks`` chunks plus the ``window_chunks - 1`` most recent committed ones (the sampler's rolling cache:
    ``window_chunks`` recent chunks, the current one included).
    """

    supports_checkpointing = True  # attention closures capture their prefix: safe to recompute in the backward

    def __init__(self, rule: str = "straight_through", *, sink_chunks: int = 0, window_chunks: int = 0):
        if rule not in CACHE_GRAD_RULES:
            raise ValueError(f"cache_grad must be one of {list(CACHE_GRAD_RULES)}, got {rule!r}")
        self.rule = rule
        self.sink_chunks, self.window_chunks = int(sink_chunks), int(window_chunks)
        self.committed: list[tuple[int, int, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = []  # (f0, f1, kv)
        self.record: Optional[dict[int, tuple[torch.Tensor, torch.Tensor]]] = None

    def prefix(self) -> list[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """The committed chunks a new forward attends to (chronological)."""
        return [kv for _, _, kv in self.committed]

    def _evict(self) -> None:
        """Rolling window: keep the sink chunks and the ``window_chunks - 1`` most recent committed chunks."""
        c, recent = self.committed, self.window_chunks - 1
        if self.window_chunks > 0 and len(c) > self.sink_chunks + recent:
            self.committed = c[:self.sink_chunks] + (c[len(c) - recent:] if recent else [])

    def plan(self, start_frame: int, num_frames: int) -> None:
        """Called by the model once per forward: bind ``attend`` to the current prefix and a fresh K/V record."""
        if self.committed and start_frame != self.committed[-1][1]:
            raise ValueError(f"rollout chunk at frame {start_frame} does not follow the committed chunk ending at "
                             f"frame {self.committed[-1][1]}")
        self.record = {}
        self.attend = functools.partial(self._attend, self.prefix(), self.record)

    @staticmethod
    def _attend(prefix, record, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        record[layer] = (k, v)
        keys = torch.cat([kv[layer][0].to(k.dtype) for kv in prefix] + [k], dim=1)  # [B, (P + n) * S, H, d]
        values = torch.cat([kv[layer][1].to(v.dtype) for kv in prefix] + [v], dim=1)
        return sdpa(q, keys.to(q.dtype), values.to(q.dtype))

    def commit(self, f0: int, f1: int, refresh: dict, exit_kv: Optional[dict]) -> None:
        """Append chunk ``[f0, f1)`` with K/V used by later chunks, per the cache-gradient rule."""
        kv = {}
        for layer, (kr, vr) in refresh.items():
            kr, vr = kr.detach(), vr.detach()
            if self.rule == "straight_through" and exit_kv is not None and exit_kv[layer][0].requires_grad:
                ke, ve = exit_kv[layer]
                kr, vr = kr + (ke - ke.detach()), vr + (ve - ve.detach())
            kv[layer] = (kr, vr)
        self.committed.append((f0, f1, kv))
        self._evict()


def _fresh(shape, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    """Gaussian noise drawn as the sampler draws it (float32 on the generator's device, then moved)."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(device=device, dtype=dtype)


def self_forcing_rollout(model, noise: torch.Tensor, cond: torch.Tensor, *, layout: ChunkLayout,
                         steps: Sequence[float], exit_steps: Sequence[int], context_noise: float = 0.0,
                         cache_grad: str = "straight_through", grad_frames: Optional[int] = None,
                         renoise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                         sink_chunks: int = 0, window_chunks: int = 0) -> torch.Tensor:
    """The rollout's x0 [B, R, C, H, W] from ``noise`` [B, R, C, H, W] (R latent frames).

    ``steps``: the sampler's list without the final 0. ``exit_steps``: one index into ``steps`` per chunk of
    ``layout.chunks(R)``. ``renoise`` [B, R, len(steps) - 1, C, H, W]: the re-noising draws (as
    :func:`causvid.sampler.causal_sample_chunks` takes them); otherwise fresh noise from ``generator``, which
    also draws the refresh noise when ``context_noise > 0``. ``grad_frames``: only chunks inside the last
    ``grad_frames`` frames run their exit step with grad (default: all). Gradient flows only when grad mode is
    on at the call. ``model`` is called as ``model(x, t, cond, kv_cache=..., start_frame=..., cross_cache=...)``
    (a DDP/FSDP wrapper works): no-grad forwards share one cross-attention cache, grad forwards recompute the
    text K/V so the cross-attention weights get their gradient.
    """
    B, R = noise.shape[:2]
    steps = [float(s) for s in steps]
    chunks = layout.chunks(R)
    if len(exit_steps) != len(chunks):
        raise ValueError(f"{len(exit_steps)} exit steps for {len(chunks)} chunks of {R} frames ({layout})")
    if any(not 0 <= int(k) < len(steps) for k in exit_steps):
        raise ValueError(f"exit steps {list(exit_steps)} must index the {len(steps)} steps {steps}")
    grad_from = R - (R if grad_frames is None else int(grad_frames))
    want_grad = torch.is_grad_enabled()
    cache = RolloutKVCache(cache_grad, sink_chunks=sink_chunks, window_chunks=window_chunks)
    cross = CrossAttnCache()
    out = []

    def forward(x, t_val, f0, n, grad):
        t = torch.full((B, n), float(t_val), device=noise.device)
        with torch.set_grad_enabled(grad):
            v = model(x, t, None if (cross.ready and not grad) else cond, kv_cache=cache, start_frame=f0,
                      cross_cache=None if grad else cross)
            return S.x0_from_flow(x, v, t)

    for c, ((f0, f1), k) in enumerate(zip(chunks, exit_steps)):
        n, k = f1 - f0, int(k)
        grad = want_grad and f0 >= grad_from
        x = noise[:, f0:f1]
        for j in range(k + 1):
            x0 = forward(x, steps[j], f0, n, grad and j == k)
            if j < k:
                eps = renoise[:, f0:f1, j] if renoise is not None else _fresh(x.shape, generator, x.device, x.dtype)
                x = S.add_noise(x0, eps, torch.full((B, n), steps[j + 1], device=x.device))
        exit_kv = cache.record
        out.append(x0)
        if c + 1 == len(chunks):
            break  # the last chunk's refresh would only serve a next chunk
        with torch.no_grad():
            xc = x0.detach()
            if context_noise > 0:
                xc = S.add_noise(xc, _fresh(xc.shape, generator, xc.device, xc.dtype),
                                 torch.full((B, n), float(context_noise), device=xc.device))
            forward(xc, context_noise, f0, n, False)
        cache.commit(f0, f1, cache.record, exit_kv)
    return torch.cat(out, dim=1)


def draw_exit_steps(seed: int, step: int, update: str, num_chunks: int, num_steps: int, *,
                    same_step_across_blocks: bool = True, last_step_only: bool = False) -> list[int]:
    """The exit step of every chunk for trainer step ``step`` and update ``update`` ("generator" / "critic").

    A pure function of its arguments (no rank, no micro-batch, no global RNG): every process draws the same
    exit steps without communication, and a resumed run draws the ones the uninterrupted run drew.
    """
    if last_step_only:
        return [num_steps - 1] * num_chunks
    g = torch.Generator().manual_seed(mix_seed("self-forcing-exit", seed, step, update))
    if same_step_across_blocks:
        return [int(torch.randint(0, num_steps, (1,), generator=g))] * num_chunks
    return [int(k) for k in torch.randint(0, num_steps, (num_chunks,), generator=g)]


def exit_interval(steps: Sequence[float], k: int, shift: float, num_train_timesteps: int = S.T_MAX) -> tuple[int, int]:
    """The uniform (pre-shift) timestep range ``[lo, hi)`` between exit step ``k`` and the next level (0 after
    the last step): the reference's ``denoised_timestep_to`` / ``denoised_timestep_from`` (§9.2, ``ts_schedule``).

    ``u = T unshift(t / T)`` inverts ``t = T shift(u / T)``; drawing ``u`` in ``[lo, hi)`` and shifting gives DMD /
    critic timesteps inside ``[t_{k+1}, t_k]``.
    """
    T = num_train_timesteps

    def unshift(t: float) -> int:
        s = t / T
        return int(round(T * s / (shift - (shift - 1) * s))) if s < 1 else T

    hi = unshift(float(steps[k]))
    lo = unshift(float(steps[k + 1])) if k + 1 < len(steps) else 0
    return lo, max(hi, lo + 1)
