"""Benchmark options: sizes, step lists, sections and :class:`BenchOptions`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------

# Per DiT size: default pixel resolution, VAE size, text encoder kind, (temporal, spatial) VAE factors.
SIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(height=32, width=32, frames=13, vae="tiny", text="toy", factors=(4, 4)),
    "toy": dict(height=64, width=64, frames=81, vae="toy", text="toy", factors=(4, 4)),
    "wan2.1-1.3b": dict(height=480, width=832, frames=81, vae="wan2.1", text="umt5", factors=(4, 8)),
    "wan2.1-14b": dict(height=480, width=832, frames=81, vae="wan2.1", text="umt5", factors=(4, 8)),
}

# Student step lists by step count (``causvid_reference.md`` §3; CausVid-Wan uses 3, Self-Forcing 4).
STEP_LISTS: dict[int, list[float]] = {
    1: [1000.0],
    2: [1000.0, 500.0],
    3: [1000.0, 757.0, 522.0],
    4: [1000.0, 750.0, 500.0, 250.0],
}

SECTIONS = ("flops", "student", "teacher", "kv", "steps", "batch", "dmd", "self_forcing")
# Run only when named in ``--sections``: ``peer`` needs diffusers (the ``interop`` extra).
OPTIONAL_SECTIONS = ("peer",)

H100_BF16_DENSE_TFLOPS = 989.0  # datasheet dense bf16 (H100 / H200 SXM), performance.md §1.4


@dataclass
class BenchOptions:
    """Everything a run needs; ``scripts/benchmark.py`` fills it from the command line."""

    size: str = "toy"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    height: Optional[int] = None
    width: Optional[int] = None
    frames: Optional[int] = None  # pixel frames, 1 + 4n
    chunk: int = 3  # latent frames per causal chunk
    steps: int = 3  # student denoising steps per chunk (+ 1 cache-refresh pass)
    teacher_steps: int = 50
    guidance: float = 6.0  # teacher CFG weight (true w; 2 forwards per step when != 1)
    shift: float = 8.0
    batch: int = 4  # N of the batch 1 vs N comparison
    lengths: Sequence[int] = (6, 9, 12, 21, 42)  # latent frames of the KV-vs-recompute sweep
    sweep_steps: Sequence[int] = (1, 2, 3, 4)
    warmup: int = 1
    reps: int = 3
    teacher_reps: int = 2
    batch_reps: int = 2
    dmd_batch: int = 1
    dmd_guidance: float = 4.5  # real-score CFG weight of the DMD generator update
    grad_ckpt: Optional[bool] = None  # None: on for Wan sizes, off otherwise
    optimizer_step: bool = True  # include AdamW + grad clipping in the DMD step
    attention: str = "auto"  # auto | sdpa | flex (block-causal masks: training and recomputation)
    compile: bool = False
    compile_mode: Optional[str] = None
    text_encoder: bool = True
    vae: bool = True
    write_mp4: bool = True
    mp4_preset: str = "medium"
    prompt: str = "a red circle moving left"
    prompt_tokens: int = 512  # umT5 tokens timed when no tokenizer is available (Wan pads to 512)
    peak_tflops: Optional[float] = None
    threads: Optional[int] = None
    sections: Sequence[str] = SECTIONS
    peer_cases: Sequence[str] = ("bench", "wan-mini")  # cases of the ``peer`` section (causvid/benchmark/peer.py)
    seed: int = 0
    quick: bool = False
    command: str = ""

    def resolved(self) -> "BenchOptions":
        """Fill size-dependent defaults; ``quick`` shrinks repetitions and sweeps (CI smoke run)."""
        if self.size not in SIZE_DEFAULTS:
            raise ValueError(f"unknown size {self.size!r}; valid: {sorted(SIZE_DEFAULTS)}")
        d = SIZE_DEFAULTS[self.size]
        o = dataclasses.replace(self, height=self.height or d["height"], width=self.width or d["width"],
                                frames=self.frames or d["frames"])
        if o.grad_ckpt is None:
            o.grad_ckpt = o.size.startswith("wan")
        if o.quick:
            o.warmup, o.reps, o.teacher_reps, o.batch_reps = min(o.warmup, 1), 1, 1, 1
            o.lengths = tuple(o.lengths)[:2]
            o.sweep_steps = tuple(sorted({1, o.steps}))
            o.batch = min(o.batch, 2)
        bad = [s for s in o.sections if s not in SECTIONS + OPTIONAL_SECTIONS]
        if bad:
            raise ValueError(f"unknown sections {bad}; valid: {list(SECTIONS + OPTIONAL_SECTIONS)}")
        bad = [c for c in o.peer_cases if c not in ("bench", "wan-mini")]
        if bad:
            raise ValueError(f"unknown peer cases {bad}; valid: ['bench', 'wan-mini']")
        tf, sf = d["factors"]
        if (o.frames - 1) % tf:
            raise ValueError(f"--frames must be 1 + {tf}n (the VAE compresses time {tf}x), got {o.frames}")
        if o.height % (2 * sf) or o.width % (2 * sf):
            raise ValueError(f"--height/--width must be multiples of {2 * sf} (VAE x{sf}, patch 2), "
                             f"got {o.height}x{o.width}")
        if o.steps < 1 or o.chunk < 1 or o.teacher_steps < 1 or o.batch < 1:
            raise ValueError("--steps, --chunk, --teacher-steps and --batch must be >= 1")
        return o


def step_list(k: int) -> list[float]:
    """The student's timesteps for ``k`` steps (without the final 0)."""
    if k in STEP_LISTS:
        return list(STEP_LISTS[k])
    return [1000.0 * (1 - i / k) for i in range(k)]
