"""The FLOP model of ``docs/performance.md`` §2.2-2.4 (1 multiply-add = 2 FLOP), exact for our
:class:`~causvid.models.dit.WanDiT` (checked against ``torch.utils.flop_counter`` in ``tests/test_benchmark.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from causvid.models.attention import ChunkLayout
from causvid.models.registry import DiTConfig

# ------------------------------------------------------------------------------------------------
# FLOP model (performance.md §2.2-2.4). 1 multiply-add = 2 FLOP.
# ------------------------------------------------------------------------------------------------


@dataclass
class Flops:
    """FLOPs split as in performance.md: token-stream matmuls, self- and cross-attention, and the rest
    (patch embedding, head, time MLP and modulation projection, text MLP and cross-attention K/V)."""

    linear: float = 0.0
    self_attn: float = 0.0
    cross_attn: float = 0.0
    other: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.self_attn + self.cross_attn + self.other

    def __add__(self, o: "Flops") -> "Flops":
        return Flops(self.linear + o.linear, self.self_attn + o.self_attn, self.cross_attn + o.cross_attn,
                     self.other + o.other)

    def __mul__(self, k: float) -> "Flops":
        return Flops(self.linear * k, self.self_attn * k, self.cross_attn * k, self.other * k)

    __rmul__ = __mul__

    def to_dict(self) -> dict[str, float]:
        return {"linear": self.linear, "self_attn": self.self_attn, "cross_attn": self.cross_attn,
                "other": self.other, "total": self.total}


def linear_flops_per_token(cfg: DiTConfig) -> float:
    """Per token, all layers: self q,k,v,o (4 d^2) + cross q,o (2 d^2) + FFN (2 d f) MACs -> ``2 L (6d^2 + 2df)``.

    2.501 GFLOP for Wan2.1-1.3B (performance.md §2.2)."""
    d, f = cfg.dim, cfg.ffn_dim
    return 2.0 * cfg.num_layers * (6 * d * d + 2 * d * f)


def cross_kv_flops(cfg: DiTConfig, batch: int) -> float:
    """Text MLP on ``text_len`` rows plus every layer's cross-attention K and V projections (once per
    prompt when a :class:`CrossAttnCache` is used)."""
    d, lc = cfg.dim, cfg.text_len
    return batch * (2.0 * lc * (cfg.text_dim * d + d * d) + cfg.num_layers * 2 * 2.0 * lc * d * d)


def dit_forward_flops(cfg: DiTConfig, *, batch: int, frames: int, tokens_per_frame: int,
                      attn_pairs: Optional[float] = None, cross_kv: bool = True) -> Flops:
    """One DiT forward over ``frames`` latent frames of ``tokens_per_frame`` tokens each.

    ``attn_pairs``: (query, key) token pairs per sample and layer; default ``L^2`` (bidirectional). A KV-
    cached chunk has ``L x cache tokens``; block-causal attention the pairs its mask keeps.
    ``cross_kv``: the context K/V are projected in this forward (no cross-attention cache).
    """
    d, L = cfg.dim, frames * tokens_per_frame
    pairs = float(L) * L if attn_pairs is None else float(attn_pairs)
    patch = math.prod(cfg.patch_size)
    grid_frames = frames // cfg.patch_size[0]
    other = batch * (2.0 * L * cfg.in_dim * patch * d  # patch embedding (conv3d)
                     + 2.0 * L * d * patch * cfg.out_dim  # head
                     + 2.0 * grid_frames * (cfg.freq_dim * d + d * d + 6 * d * d))  # time MLP + projection
    if cross_kv:
        other += cross_kv_flops(cfg, batch)
    return Flops(linear=batch * L * linear_flops_per_token(cfg),
                 self_attn=batch * cfg.num_layers * 4.0 * d * pairs,
                 cross_attn=batch * cfg.num_layers * 4.0 * d * L * cfg.text_len,
                 other=other)


def block_causal_pairs(layout: ChunkLayout, num_frames: int, tokens_per_frame: int) -> float:
    """Token pairs kept by the chunk mask: each chunk's queries see every frame up to its chunk's end."""
    return float(sum((b - a) * tokens_per_frame * b * tokens_per_frame for a, b in layout.chunks(num_frames)))


def student_sampling_flops(cfg: DiTConfig, *, batch: int, num_frames: int, tokens_per_frame: int,
                           layout: ChunkLayout, steps: int, refresh: bool = True) -> Flops:
    """KV-cached chunk-wise sampling: per chunk ``steps`` (+1 refresh) forwards of the chunk against a
    cache holding every frame up to the chunk's end; cross-attention K/V projected once per prompt."""
    total = Flops(other=cross_kv_flops(cfg, batch))
    for a, b in layout.chunks(num_frames):
        per = dit_forward_flops(cfg, batch=batch, frames=b - a, tokens_per_frame=tokens_per_frame,
                                attn_pairs=float((b - a) * tokens_per_frame * b * tokens_per_frame), cross_kv=False)
        total = total + per * (steps + (1 if refresh else 0))
    return total


def recompute_sampling_flops(cfg: DiTConfig, *, batch: int, num_frames: int, tokens_per_frame: int,
                             layout: ChunkLayout, steps: int, executed_dense: bool = False) -> Flops:
    """No KV cache: every step of chunk i re-runs the clean prefix plus the chunk with the block-causal
    mask. ``executed_dense``: count all ``L^2`` pairs (what a dense masked SDPA computes)."""
    total = Flops(other=cross_kv_flops(cfg, batch))
    for _, b in layout.chunks(num_frames):
        pairs = float(b * tokens_per_frame) ** 2 if executed_dense else block_causal_pairs(layout, b, tokens_per_frame)
        per = dit_forward_flops(cfg, batch=batch, frames=b, tokens_per_frame=tokens_per_frame, attn_pairs=pairs,
                                cross_kv=False)
        total = total + per * steps
    return total


def teacher_sampling_flops(cfg: DiTConfig, *, batch: int, num_frames: int, tokens_per_frame: int, steps: int,
                           guidance: float) -> Flops:
    """``steps`` bidirectional forwards, two per step with CFG; context K/V once per branch."""
    branches = 1 if guidance == 1.0 else 2
    per = dit_forward_flops(cfg, batch=batch, frames=num_frames, tokens_per_frame=tokens_per_frame, cross_kv=False)
    return per * (steps * branches) + Flops(other=branches * cross_kv_flops(cfg, batch))


def dmd_step_flops(cfg: DiTConfig, *, batch: int, num_frames: int, tokens_per_frame: int, layout: ChunkLayout,
                   guidance: float) -> dict[str, Flops]:
    """Model FLOPs of the two DMD updates (CausVid recipe: data inputs, one block-causal generator forward).

    generator update = generator fwd + bwd (3x) + fake score fwd + real score fwd (x2 with CFG);
    critic update = generator fwd (no grad) + fake score fwd + bwd (3x). Activation-checkpoint
    recomputation is executed but, as usual for MFU, not counted.
    """
    kw = dict(batch=batch, frames=num_frames, tokens_per_frame=tokens_per_frame, cross_kv=True)
    gen = dit_forward_flops(cfg, attn_pairs=block_causal_pairs(layout, num_frames, tokens_per_frame), **kw)
    bidir = dit_forward_flops(cfg, **kw)
    real = bidir * (1 if guidance == 1.0 else 2)
    return {"generator": gen * 3 + bidir + real, "critic": gen + bidir * 3,
            "generator_forward": gen, "bidirectional_forward": bidir}


def kv_cache_bytes(cfg: DiTConfig, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """K and V of every layer for ``tokens`` tokens (288 MB per latent frame for Wan-1.3B in bf16)."""
    return 2 * cfg.num_layers * batch * tokens * cfg.dim * torch.finfo(dtype).bits // 8


def sdpa_flops(q_shape: torch.Size, k_shape: torch.Size, v_shape: torch.Size) -> float:
    """Forward FLOPs of ``softmax(q k^T) v`` for every (query, key) pair, mask or not (what a dense masked
    kernel computes): ``2 Lq Lk Dqk + 2 Lq Lk Dv`` per batch-and-head row of ``q``."""
    rows = math.prod(q_shape[:-2])
    lq, lk = q_shape[-2], k_shape[-2]
    return 2.0 * rows * lq * lk * (q_shape[-1] + v_shape[-1])


class _AttentionCounter(TorchFunctionMode):
    """Counts every ``F.scaled_dot_product_attention`` call from its shapes and records what ``counter`` saw
    inside the call, so that the caller can replace the one by the other."""

    def __init__(self, counter: FlopCounterMode):
        super().__init__()
        self.counter, self.model, self.seen = counter, 0.0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        self.seen += self.counter.get_total_flops() - before
        q, k, v = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key", "value")))
        self.model += sdpa_flops(q.shape, k.shape, v.shape)
        return out


def count_flops(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Forward FLOPs of the matmuls, convolutions and attention executed in ``fn()``, equal on every torch version.

    Matmuls and convolutions are counted by ``torch.utils.flop_counter``. What it sees of attention differs by
    release and kernel (2.15 counts the CPU ``scaled_dot_product_attention`` kernel; 2.14 counts nothing of the
    fused kernel and the ``bmm`` of the math fallback), so every ``F.scaled_dot_product_attention`` call is
    counted from its shapes (:func:`sdpa_flops`, the counter's own convention) and whatever the counter saw
    inside the call is taken out of its total. Only forward attention is counted: do not call ``backward``
    inside ``fn``.
    """
    counter = FlopCounterMode(display=False)
    attention = _AttentionCounter(counter)
    with counter, attention:
        out = fn()
    return float(counter.get_total_flops() - attention.seen) + attention.model, out
