"""Learning-rate multiplier shared by the trainers: linear warm-up, a constant plateau, then a cosine decay.

A pure function of the step, so nothing about it is checkpointed and a run resumed with a larger ``total`` continues
on the same curve (warm-up-stable-decay: the plateau is the same whatever the run length, only the decay moves).
"""
from __future__ import annotations

import math

__all__ = ["lr_multiplier"]


def lr_multiplier(step: int, total: int, warmup: int = 0, decay_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at 0-based ``step`` of a ``total``-step run.

    * ``step < warmup``: ``(step + 1) / warmup``;
    * then 1 until the last ``decay_steps`` steps (never before the warm-up ends);
    * then a cosine from 1 down to ``min_ratio``, reached at ``step = total`` (``decay_steps = 0``: no decay).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay_steps <= 0:
        return 1.0
    start = max(warmup, total - decay_steps)
    progress = min(1.0, max(0.0, (step - start) / max(1, total - start)))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
