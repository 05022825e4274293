"""Speed benchmarks: the KV-cached causal student against the bidirectional teacher, KV cache against
recomputation, batching, and the DMD training step with its model FLOPs utilisation.

``scripts/benchmark.py`` is the command line; everything lives here so a notebook can call
:func:`run_benchmark` directly. The FLOP model is the one of ``docs/performance.md`` §2.2-2.4 (linear,
self-attention ``4 Lq Lk d`` and cross-attention ``4 Lq Lc d`` per layer; backward = 2x forward), made
exact by also counting the small embedding / head / time-MLP matmuls, so it equals
``torch.utils.flop_counter`` on our :class:`~causvid.models.dit.WanDiT` (``tests/test_benchmark.py``).

Timing protocol: ``warmup`` untimed runs, then ``reps`` timed runs, the median is reported. On CUDA
time is read from CUDA events and the device is synchronised only at measurement boundaries (before a
timed run starts and once after the last one); on the CPU ``time.perf_counter``. Peak memory is CUDA
``max_memory_allocated`` or, on the CPU, the process's peak resident set (``VmHWM``, reset per run via
``/proc/self/clear_refs``; ``ru_maxrss`` as a fallback, which never resets).

Models get random weights (speed does not depend on them) and are built directly on the target device
and dtype, so a 1.3B DiT never materialises on the CPU when the benchmark runs on a GPU. The student and
the teacher share one network (same architecture; the student runs it chunk by chunk with a KV cache).

Layouts: latents ``[B, F, C, H, W]``, videos ``[B, T, 3, H, W]`` with ``T = 1 + 4 (F - 1)``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from causvid import schedule as S
from causvid.models.attention import ChunkLayout, CrossAttnCache
from causvid.models.dit import WanDiT
from causvid.models.registry import DiTConfig, dit_config
from causvid.sampler import causal_sample_chunks, guided_flow, teacher_sample

log = logging.getLogger(__name__)

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

SECTIONS = ("flops", "student", "teacher", "kv", "steps", "batch", "dmd")

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
        bad = [s for s in o.sections if s not in SECTIONS]
        if bad:
            raise ValueError(f"unknown sections {bad}; valid: {list(SECTIONS)}")
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


# ------------------------------------------------------------------------------------------------
# Device, clocks, memory
# ------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
    return dev


def setup_backend(device: torch.device, threads: Optional[int]) -> None:
    """Process-wide speed settings: flush denormals and use all cores on CPU; TF32 + cuDNN autotune on CUDA."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        torch.set_num_threads(threads or os.cpu_count() or 1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.cuda.set_device(device)
        raise_recompile_limits()  # the compiled FlexAttention kernel specialises on every sequence length


def raise_recompile_limits(limit: int = 256) -> None:
    """Dynamo falls back to eager after ``recompile_limit`` (8) shapes; eager FlexAttention materialises
    the full score matrix, so a length sweep must never hit the limit."""
    import torch._dynamo as dynamo

    for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                "accumulated_recompile_limit"):
        if hasattr(dynamo.config, key):
            setattr(dynamo.config, key, max(getattr(dynamo.config, key), limit))


class Clock:
    """Timestamps: CUDA events on a GPU (read after a synchronisation), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Recorder:
    """Named marks inside one timed run; durations are measured from the ``start`` mark."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = self.clock.now()

    def durations(self) -> dict[str, float]:
        start = self.marks["start"]
        return {k: self.clock.seconds(start, v) for k, v in self.marks.items() if k != "start"}


@dataclass
class Stats:
    """Summary of repeated measurements (seconds or bytes)."""

    median: float
    min: float
    max: float
    n: int
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        if not values:
            raise ValueError("Stats.of needs at least one value")
        v = [float(x) for x in values]
        return cls(statistics.median(v), min(v), max(v), len(v), v)


class MemoryMeter:
    """Peak memory of a region: CUDA max allocated, or the CPU process's peak RSS (``VmHWM``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else self._cpu_kind()

    @staticmethod
    def _cpu_kind() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "cpu_peak_rss"
        except OSError:
            return "cpu_peak_rss_since_start"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "cpu_peak_rss":
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def time_runs(fns: dict[str, Callable[[Recorder], Any]], clock: Clock, *, warmup: int, reps: int,
              meter: Optional[MemoryMeter] = None, warmup_fns: Optional[dict[str, Callable]] = None
              ) -> dict[str, dict[str, Any]]:
    """Time each ``fn(recorder)`` ``reps`` times after ``warmup`` runs; functions are interleaved per rep.

    Returns ``{name: {"marks": {mark: Stats}, "peak_bytes": int | None}}``; the harness adds the
    ``start`` / ``end`` marks, a function may add its own (e.g. ``first_frames``). ``warmup_fns`` replace
    the warm-up call of a function (e.g. a cheaper one that compiles the same kernels).
    """
    warmup_fns = warmup_fns or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            (warmup_fns.get(name) or fn)(Recorder(clock))
    clock.sync()
    recs: dict[str, list[Recorder]] = {k: [] for k in fns}
    peaks: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            clock.sync()  # measurement boundary: nothing queued before the start mark
            if meter is not None:
                meter.reset()
            rec = Recorder(clock)
            rec.mark("start")
            fn(rec)
            rec.mark("end")
            recs[name].append(rec)
            if meter is not None:
                peaks[name].append(meter.peak_bytes())
    clock.sync()
    out = {}
    for name, rs in recs.items():
        per_mark: dict[str, list[float]] = {}
        for r in rs:
            for k, v in r.durations().items():
                per_mark.setdefault(k, []).append(v)
        out[name] = {"marks": {k: Stats.of(v) for k, v in per_mark.items()},
                     "peak_bytes": max(peaks[name]) if peaks[name] else None}
    return out


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best observed dense matmul rate (TFLOP/s) of an ``n x n x n`` product: the CPU's practical peak."""
    clock = Clock(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        clock.sync()
        t0 = clock.now()
        a @ b
        t1 = clock.now()
        clock.sync()
        best = min(best, clock.seconds(t0, t1))
    return 2 * n ** 3 / best / 1e12


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


def count_flops(fn: Callable[[], Any]) -> tuple[float, Any]:
    """FLOPs that ``torch.utils.flop_counter`` sees in ``fn()`` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = fn()
    return float(fc.get_total_flops()), out


# ------------------------------------------------------------------------------------------------
# Building models (random weights, directly on the target device and dtype)
# ------------------------------------------------------------------------------------------------


def build_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, *, attention: str = "auto",
              seed: int = 0) -> WanDiT:
    """A randomly initialised DiT allocated on ``device``. The official init zeroes the head (the output
    would be exactly 0); we give it small random weights so outputs and gradients are non-trivial."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanDiT(cfg, attention=attention)
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return model.to(dtype).eval().requires_grad_(False)


class _AttentionDispatch:
    """One stable callable handed to compiled blocks; the real attention function changes per forward.

    ``torch.compiler.disable`` makes it a graph break, so KV-cache bookkeeping (host-side integers)
    stays in Python and the compiled graphs do not specialise on the cache state.
    """

    def __init__(self):
        self.fn: Optional[Callable] = None

    @torch.compiler.disable
    def __call__(self, layer, q, k, v):
        return self.fn(layer, q, k, v)


def compile_dit_blocks(model: WanDiT, mode: Optional[str] = None) -> WanDiT:
    """``torch.compile`` every DiT block (fusing norms, modulation, RoPE, gating) around an uncompiled
    attention call; the module is changed in place and returned."""
    raise_recompile_limits()
    dispatch = _AttentionDispatch()
    select = model._attention_fn

    def attention_fn(*args, **kwargs):
        dispatch.fn = select(*args, **kwargs)
        return dispatch

    model._attention_fn = attention_fn  # instance attribute: only this model object is affected
    for blk in model.blocks:
        blk.compile(mode=mode)
    return model


def build_vae(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``(WanVAE, None)`` or ``(None, reason)`` when ``causvid.models.vae`` is not importable."""
    try:
        from causvid.models.vae import WanVAE
    except Exception as err:  # noqa: BLE001 - report any import problem as n/a
        return None, f"causvid.models.vae not importable: {err}"
    torch.manual_seed(seed)
    with torch.device(device):
        vae = WanVAE(size)
    return vae.to(dtype).eval().requires_grad_(False), None


class TextBench:
    """Text encoding for the benchmark: the toy encoder through its public ``encode`` (cache cleared before
    each timed call), or the umT5 encoder network on random token ids when no tokenizer is at hand."""

    def __init__(self, kind: str, cfg: DiTConfig, device: torch.device, dtype: torch.dtype, prompt_tokens: int):
        self.kind, self.cfg, self.device = kind, cfg, device
        self.prompt_tokens = min(prompt_tokens, cfg.text_len)
        if kind == "toy":
            from causvid.models.text import ToyTextEncoder

            heads = 4 if cfg.text_dim % 4 == 0 else 1
            self.encoder = ToyTextEncoder(dim=cfg.text_dim, text_len=cfg.text_len, num_heads=heads).to(device)
            self.note = "ToyTextEncoder.encode (cache cleared per call)"
        else:
            from causvid.models.text import UMT5Encoder

            if cfg.text_dim != 4096:
                raise ValueError(f"umT5-XXL outputs 4096 channels, the DiT expects text_dim {cfg.text_dim}")
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # allocate the 5.7B parameters in their final dtype
            try:
                with torch.device(device):
                    self.encoder = UMT5Encoder("umt5-xxl").eval().requires_grad_(False)
            finally:
                torch.set_default_dtype(default)
            self.note = f"UMT5Encoder (umT5-XXL, random weights) forward on {self.prompt_tokens} random token ids"

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """-> context ``[1, Lc, text_dim]`` float32 on the device."""
        if self.kind == "toy":
            self.encoder.clear_cache()
            emb, _ = self.encoder.encode([prompt], device=self.device)
            return emb
        g = torch.Generator().manual_seed(len(prompt))
        ids = torch.randint(3, self.encoder.arch.vocab_size, (1, self.prompt_tokens), generator=g).to(self.device)
        return self.encoder(ids, torch.ones_like(ids)).float()

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.encoder.parameters())

    def release(self) -> None:
        del self.encoder
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# The workload: geometry + the runs that get timed
# ------------------------------------------------------------------------------------------------


@dataclass
class Geometry:
    """Pixel and latent shapes of one benchmark video."""

    frames: int  # pixel frames
    height: int
    width: int
    latent_frames: int
    latent_h: int
    latent_w: int
    channels: int
    tokens_per_frame: int
    temporal_factor: int

    @classmethod
    def of(cls, o: BenchOptions, cfg: DiTConfig) -> "Geometry":
        tf, sf = SIZE_DEFAULTS[o.size]["factors"]
        lh, lw = o.height // sf, o.width // sf
        tpf = (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
        return cls(o.frames, o.height, o.width, 1 + (o.frames - 1) // tf, lh, lw, cfg.in_dim, tpf, tf)

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_factor * (latent_frames - 1)


class Workload:
    """Models and inputs shared by the sections; each ``*_run`` method is one timed unit of work."""

    def __init__(self, o: BenchOptions, device: torch.device):
        self.o, self.device = o, device
        self.dtype = torch.bfloat16 if o.precision == "bf16" else torch.float32
        self.cfg = dit_config(o.size)
        self.geo = Geometry.of(o, self.cfg)
        self.layout = ChunkLayout(o.chunk)
        self.clock = Clock(device)
        self.meter = MemoryMeter(device)
        self.model = build_dit(self.cfg, device, self.dtype, attention=o.attention, seed=o.seed)
        self.vae, self.vae_note = (None, "disabled (--no-vae)")
        if o.vae:
            self.vae, self.vae_note = build_vae(SIZE_DEFAULTS[o.size]["vae"], device, self.dtype, o.seed)
        self.mp4_note = "written with causvid.video_io.write_mp4 (PyAV, libx264)"
        if not o.write_mp4:
            self.mp4_note = "disabled (--no-mp4)"
        elif importlib.util.find_spec("av") is None:
            self.mp4_note = "n/a (PyAV not installed)"
        self.text: Optional[TextBench] = None
        self.text_note = "disabled (--no-text-encoder)"
        g = torch.Generator().manual_seed(o.seed + 1)
        self.cond = torch.randn(1, self.cfg.text_len, self.cfg.text_dim, generator=g).to(device)
        self.uncond = torch.randn(1, self.cfg.text_len, self.cfg.text_dim, generator=g).to(device)

    # -- inputs --------------------------------------------------------------------------------------

    def noise(self, batch: int, latent_frames: Optional[int] = None, seed: int = 0) -> torch.Tensor:
        g = self.geo
        f = latent_frames or g.latent_frames
        gen = torch.Generator(device=self.device).manual_seed(self.o.seed + seed)
        return torch.randn(batch, f, g.channels, g.latent_h, g.latent_w, generator=gen, device=self.device)

    def renoise(self, noise: torch.Tensor, steps: int, seed: int = 1) -> torch.Tensor:
        """On-device re-noising draws ``[B, F, steps - 1, C, H, W]`` (no host copies inside the loop)."""
        B, F, C, H, W = noise.shape
        gen = torch.Generator(device=self.device).manual_seed(self.o.seed + seed)
        return torch.randn(B, F, max(steps - 1, 0), C, H, W, generator=gen, device=self.device)

    def context(self, batch: int) -> torch.Tensor:
        return self.cond.expand(batch, -1, -1)

    # -- student ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def student_run(self, rec: Recorder, *, noise: torch.Tensor, renoise: torch.Tensor, steps: Sequence[float],
                    cond: Optional[torch.Tensor] = None, decode: bool = False,
                    count: Optional[dict[str, float]] = None) -> list[torch.Tensor]:
        """KV-cached chunk-wise sampling (``causal_sample_chunks``), each chunk decoded as it arrives when
        ``decode``; marks ``first_chunk`` (first latent chunk ready / first frames decoded)."""
        B, F = noise.shape[:2]
        cache = self.model.new_kv_cache(B, F, self.geo.tokens_per_frame, dtype=self.dtype, device=self.device)
        cond = self.context(B) if cond is None else cond
        decoder = self.vae.stream_decoder() if decode else None
        out = []
        chunks = causal_sample_chunks(self.model, noise, cond, layout=self.layout, steps=steps, kv_cache=cache,
                                      cross_cache=CrossAttnCache(), renoise=renoise)
        for i, (_, _, x0) in enumerate(chunks):
            if decoder is not None:
                z = x0.to(self.dtype)
                if count is not None:
                    flops, frames = count_flops(functools.partial(decoder.push, z))
                    count["vae_decode"] = count.get("vae_decode", 0.0) + flops
                else:
                    frames = decoder.push(z)
                out.append(frames)
            else:
                out.append(x0)
            if i == 0:
                rec.mark("first_chunk")
        return out

    def pipeline_run(self, rec: Recorder, *, noise: torch.Tensor, renoise: torch.Tensor, steps: Sequence[float],
                     mp4_dir: Optional[str], count: Optional[dict[str, float]] = None) -> None:
        """Prompt -> mp4: text encoding, streamed sampling + decode, frames to uint8, mp4 written.

        Marks: ``text`` (context ready), ``first_chunk`` (first frames decoded), ``decoded``, ``written``.
        """
        cond = None
        if self.text is not None:
            if count is not None:
                flops, cond = count_flops(lambda: self.text.encode(self.o.prompt))
                count["text_encode"] = flops
            else:
                cond = self.text.encode(self.o.prompt)
            cond = cond.expand(noise.shape[0], -1, -1)
        rec.mark("text")
        frames = self.student_run(rec, noise=noise, renoise=renoise, steps=steps, cond=cond,
                                  decode=self.vae is not None, count=count)
        rec.mark("decoded")
        if mp4_dir is not None and self.vae is not None:
            from causvid.video_io import write_mp4

            video = torch.cat(frames, dim=1)[0].float().cpu()  # [T, 3, H, W] in [-1, 1]
            write_mp4(os.path.join(mp4_dir, "benchmark.mp4"), video, fps=16.0, preset=self.o.mp4_preset)
        rec.mark("written")

    # -- teacher ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_run(self, rec: Recorder, *, noise: torch.Tensor, num_steps: int, decode: bool) -> None:
        """Bidirectional many-step CFG sampling (``teacher_sample``), then the VAE decode of the clip, streamed
        ``chunk`` latent frames at a time (the official Wan decode loops over latent frames; same result)."""
        B = noise.shape[0]
        x0 = teacher_sample(self.model, noise, self.context(B), self.uncond.expand(B, -1, -1), num_steps=num_steps,
                            shift=self.o.shift, guidance=self.o.guidance).x0
        rec.mark("sampled")
        if decode:
            self.vae.decode(x0.to(self.dtype), chunk_frames=self.o.chunk)

    # -- recomputation baseline ----------------------------------------------------------------------------

    @torch.no_grad()
    def recompute_run(self, rec: Recorder, *, noise: torch.Tensor, renoise: torch.Tensor,
                      steps: Sequence[float]) -> torch.Tensor:
        """No KV cache: every step of chunk i runs the whole clean prefix (t = 0) plus the noisy chunk
        with the block-causal mask and keeps the chunk's output (same maths as the cached sampler)."""
        B = noise.shape[0]
        cond, cross = self.context(B), CrossAttnCache()
        done: list[torch.Tensor] = []
        for f0, f1 in self.layout.chunks(noise.shape[1]):
            n, x = f1 - f0, noise[:, f0:f1]
            for j, t_j in enumerate(steps):
                t = torch.full((B, n), float(t_j), device=self.device)
                inp = torch.cat(done + [x], dim=1)  # [B, f1, C, H, W]
                t_all = torch.cat([torch.zeros(B, f0, device=self.device), t], dim=1)  # [B, f1]
                v = self.model(inp, t_all, cond, layout=self.layout, cross_cache=cross)[:, f0:f1]
                x0 = S.x0_from_flow(x, v, t)
                if j + 1 < len(steps):
                    x = S.add_noise(x0, renoise[:, f0:f1, j], torch.full((B, n), float(steps[j + 1]), device=self.device))
            done.append(x0)
        return torch.cat(done, dim=1)


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _med(res: dict, name: str, mark: str = "end") -> float:
    return res[name]["marks"][mark].median


def _tflops_rate(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def section_flops(w: Workload) -> dict[str, Any]:
    """The analytic model checked against ``torch.utils.flop_counter`` on one bidirectional chunk forward."""
    g, cfg = w.geo, w.cfg
    n = min(w.o.chunk, g.latent_frames)
    x = w.noise(1, n)
    t = torch.full((1, n), 500.0, device=w.device)
    with torch.no_grad():
        counted, _ = count_flops(lambda: w.model(x, t, w.cond))
    model = dit_forward_flops(cfg, batch=1, frames=n, tokens_per_frame=g.tokens_per_frame, cross_kv=True)
    params = sum(p.numel() for p in w.model.parameters())
    return {"check_forward": {"frames": n, "tokens": n * g.tokens_per_frame, "model": model.to_dict(),
                              "counted": counted, "rel_err": abs(model.total - counted) / counted},
            "dit_params": params, "linear_flops_per_token": linear_flops_per_token(cfg)}


def section_student_teacher(w: Workload, want_teacher: bool) -> dict[str, Any]:
    """Student pipeline (latency, FPS, memory, prompt-to-mp4) and, side by side, the 50-step CFG teacher."""
    o, g = w.o, w.geo
    steps = step_list(o.steps)
    noise, out = w.noise(1), {}
    ren = w.renoise(noise, len(steps))
    can_write = o.write_mp4 and w.vae is not None and w.mp4_note.startswith("written")
    tmp = tempfile.mkdtemp(prefix="causvid_bench_") if can_write else None
    counts: dict[str, float] = {}
    # Warm-up doubles as the FLOP-counting run of the VAE and text encoder (its timing is discarded).
    w.pipeline_run(Recorder(w.clock), noise=noise, renoise=ren, steps=steps, mp4_dir=tmp, count=counts)
    fns = {"dit": lambda r: w.student_run(r, noise=noise, renoise=ren, steps=steps),
           "pipeline": lambda r: w.pipeline_run(r, noise=noise, renoise=ren, steps=steps, mp4_dir=tmp)}
    res = time_runs(fns, w.clock, warmup=max(w.o.warmup - 1, 0), reps=o.reps, meter=w.meter)
    chunks = len(w.layout.chunks(g.latent_frames))
    forwards = chunks * (len(steps) + 1)
    flops = student_sampling_flops(w.cfg, batch=1, num_frames=g.latent_frames, tokens_per_frame=g.tokens_per_frame,
                                   layout=w.layout, steps=len(steps))
    dit_s = _med(res, "dit")
    text_bytes = w.text.weight_bytes if w.text is not None else 0
    pm = res["pipeline"]["marks"]
    text_s = pm["text"].median
    first = statistics.median([a - b for a, b in zip(pm["first_chunk"].values, pm["text"].values)])
    gen_decode = statistics.median([a - b for a, b in zip(pm["decoded"].values, pm["text"].values)])
    write_s = statistics.median([a - b for a, b in zip(pm["written"].values, pm["decoded"].values)])
    has_vae = w.vae is not None
    student = {
        "steps": steps, "chunks": chunks, "dit_forwards": forwards,
        "sampling_s": dit_s, "sampling_stats": dataclasses.asdict(res["dit"]["marks"]["end"]),
        "first_chunk_dit_s": res["dit"]["marks"]["first_chunk"].median,
        "first_chunk_s": first if has_vae else None,
        "sampling_decode_s": gen_decode if has_vae else None,
        "decode_s": (gen_decode - dit_s) if has_vae else None,
        "text_encode_s": text_s if w.text is not None else None,
        "mp4_write_s": write_s if tmp else None,
        "prompt_to_output_s": pm["end"].median if (has_vae and tmp) else None,
        "prompt_to_output_includes": [k for k, on in (("text", w.text is not None), ("sampling", True),
                                                       ("vae_decode", has_vae), ("mp4", bool(tmp))) if on],
        "fps_dit": g.frames / dit_s,
        "fps_with_vae": g.frames / gen_decode if has_vae else None,
        "forwards_per_s": forwards / dit_s,
        "model_flops": flops.to_dict(),
        "achieved_tflops": _tflops_rate(flops.total, dit_s),
        "peak_bytes_sampling": res["dit"]["peak_bytes"],
        "peak_bytes_pipeline": res["pipeline"]["peak_bytes"],
        # The text encoder stays resident during these runs; pipelines that release it after encoding (as the
        # official ones do) peak lower by its weights: reported separately, used for the memory target.
        "text_encoder_weight_bytes": text_bytes,
        "peak_bytes_sampling_excl_text": res["dit"]["peak_bytes"] - text_bytes,
        "peak_bytes_pipeline_excl_text": res["pipeline"]["peak_bytes"] - text_bytes,
        "kv_cache_bytes": kv_cache_bytes(w.cfg, g.latent_frames * g.tokens_per_frame, w.dtype),
        "vae_decode_flops": counts.get("vae_decode"),
        "text_encode_flops": counts.get("text_encode"),
    }
    out["student"] = student
    if want_teacher:
        out["teacher"] = _teacher(w, noise)
        out["teacher"]["peak_bytes_excl_text"] = out["teacher"]["peak_bytes"] - text_bytes
        out["comparison"] = _compare(student, out["teacher"], has_vae)
    return out


def _teacher(w: Workload, noise: torch.Tensor) -> dict[str, Any]:
    o, g = w.o, w.geo
    has_vae = w.vae is not None
    fn = {"teacher": lambda r: w.teacher_run(r, noise=noise, num_steps=o.teacher_steps, decode=has_vae)}
    warm = {"teacher": lambda r: w.teacher_run(r, noise=noise, num_steps=1, decode=has_vae)}
    res = time_runs(fn, w.clock, warmup=1 if o.warmup else 0, reps=o.teacher_reps, meter=w.meter, warmup_fns=warm)
    branches = 1 if o.guidance == 1.0 else 2
    flops = teacher_sampling_flops(w.cfg, batch=1, num_frames=g.latent_frames, tokens_per_frame=g.tokens_per_frame,
                                   steps=o.teacher_steps, guidance=o.guidance)
    dit_s, total = _med(res, "teacher", "sampled"), _med(res, "teacher")
    return {"steps": o.teacher_steps, "guidance": o.guidance, "dit_forwards": o.teacher_steps * branches,
            "sampling_s": dit_s, "sampling_stats": dataclasses.asdict(res["teacher"]["marks"]["sampled"]),
            "latency_s": total if has_vae else None, "decode_s": (total - dit_s) if has_vae else None,
            "fps_dit": g.frames / dit_s, "fps_with_vae": g.frames / total if has_vae else None,
            "forwards_per_s": o.teacher_steps * branches / dit_s, "model_flops": flops.to_dict(),
            "achieved_tflops": _tflops_rate(flops.total, dit_s), "peak_bytes": res["teacher"]["peak_bytes"]}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if (a is not None and b) else None


def _compare(st: dict, te: dict, has_vae: bool) -> dict[str, Any]:
    """Teacher / student ratios: latency = time to the first frames; throughput = frames per second."""
    return {
        "latency_ratio_dit": te["sampling_s"] / st["first_chunk_dit_s"],
        "latency_ratio_with_vae": _ratio(te["latency_s"], st["first_chunk_s"]) if has_vae else None,
        "throughput_ratio_dit": st["fps_dit"] / te["fps_dit"],
        "throughput_ratio_with_vae": _ratio(st["fps_with_vae"], te["fps_with_vae"]) if has_vae else None,
        "flop_ratio_total": te["model_flops"]["total"] / st["model_flops"]["total"],
    }


def section_kv(w: Workload) -> list[dict[str, Any]]:
    """KV cache vs full recomputation over increasing length; also checks both give the same video."""
    o, g = w.o, w.geo
    steps = step_list(o.steps)
    rows = []
    for f in o.lengths:
        noise = w.noise(1, f)
        ren = w.renoise(noise, len(steps))
        with torch.no_grad():
            a = torch.cat(w.student_run(Recorder(w.clock), noise=noise, renoise=ren, steps=steps), dim=1)
            b = w.recompute_run(Recorder(w.clock), noise=noise, renoise=ren, steps=steps)
        fns = {"kv": functools.partial(w.student_run, noise=noise, renoise=ren, steps=steps),
               "recompute": functools.partial(w.recompute_run, noise=noise, renoise=ren, steps=steps)}
        res = time_runs(fns, w.clock, warmup=0, reps=o.reps, meter=w.meter)  # the check above was the warm-up
        kw = dict(batch=1, num_frames=f, tokens_per_frame=g.tokens_per_frame, layout=w.layout, steps=len(steps))
        kv_f = student_sampling_flops(w.cfg, **kw).total
        kv_norefresh = student_sampling_flops(w.cfg, refresh=False, **kw).total
        re_f = recompute_sampling_flops(w.cfg, **kw).total
        re_exec = recompute_sampling_flops(w.cfg, executed_dense=True, **kw).total
        kv_s, re_s = _med(res, "kv"), _med(res, "recompute")
        rows.append({"latent_frames": f, "pixel_frames": g.pixel_frames(f), "kv_s": kv_s, "recompute_s": re_s,
                     "speedup": re_s / kv_s, "flop_ratio": re_f / kv_f, "flop_ratio_no_refresh": re_f / kv_norefresh,
                     "flop_ratio_executed_dense": re_exec / kv_f, "max_abs_diff": float((a - b).abs().max()),
                     "kv_peak_bytes": res["kv"]["peak_bytes"], "recompute_peak_bytes": res["recompute"]["peak_bytes"]})
    return rows


def measure_decode(w: Workload) -> float:
    """Median time of the streamed VAE decode of one sampled clip, chunk by chunk."""
    steps = step_list(w.o.steps)
    noise = w.noise(1)
    chunks = [x.to(w.dtype) for x in w.student_run(Recorder(w.clock), noise=noise, renoise=w.renoise(noise, len(steps)),
                                                  steps=steps)]

    @torch.no_grad()
    def decode(rec: Recorder) -> None:
        dec = w.vae.stream_decoder()
        for z in chunks:
            dec.push(z)

    return _med(time_runs({"d": decode}, w.clock, warmup=w.o.warmup, reps=w.o.reps), "d")


def section_steps(w: Workload, decode_s: Optional[float]) -> list[dict[str, Any]]:
    """DiT-only FPS over the number of student steps; FPS with VAE adds the decode time (of the main run,
    or measured here), which does not depend on the step count."""
    o, g = w.o, w.geo
    if decode_s is None and w.vae is not None:
        decode_s = measure_decode(w)
    noise = w.noise(1)
    rows = []
    for k in o.sweep_steps:
        steps = step_list(k)
        ren = w.renoise(noise, len(steps))
        res = time_runs({"s": functools.partial(w.student_run, noise=noise, renoise=ren, steps=steps)}, w.clock,
                        warmup=o.warmup, reps=o.reps)
        dit_s = _med(res, "s")
        forwards = len(w.layout.chunks(g.latent_frames)) * (k + 1)
        rows.append({"steps": k, "sampling_s": dit_s, "first_chunk_dit_s": _med(res, "s", "first_chunk"),
                     "fps_dit": g.frames / dit_s, "forwards_per_s": forwards / dit_s,
                     "fps_with_vae": g.frames / (dit_s + decode_s) if decode_s is not None else None})
    return rows


def section_batch(w: Workload) -> dict[str, Any]:
    """Per-video time at batch 1 and N (sampling + streamed VAE decode when a VAE is present)."""
    o, g = w.o, w.geo
    steps = step_list(o.steps)
    decode = w.vae is not None
    rows = []
    for b in (1, o.batch):
        noise = w.noise(b)
        ren = w.renoise(noise, len(steps))
        fn = lambda r, noise=noise, ren=ren: w.student_run(r, noise=noise, renoise=ren, steps=steps, decode=decode)
        warm = lambda r, noise=noise, ren=ren: w.student_run(r, noise=noise, renoise=ren, steps=steps)
        res = time_runs({"b": fn}, w.clock, warmup=1 if o.warmup else 0, reps=o.batch_reps, meter=w.meter,
                        warmup_fns={"b": warm})
        total = _med(res, "b")
        rows.append({"batch": b, "total_s": total, "per_video_s": total / b, "fps_per_stream": g.frames / total,
                     "fps_aggregate": b * g.frames / total, "first_chunk_s": _med(res, "b", "first_chunk"),
                     "peak_bytes": res["b"]["peak_bytes"]})
    return {"includes_vae_decode": decode, "rows": rows,
            "per_video_speedup": rows[0]["per_video_s"] / rows[-1]["per_video_s"]}


# -- DMD -------------------------------------------------------------------------------------------------


def _losses():
    """``causvid.losses`` or the same maths inline (reference §5.3-5.4)."""
    try:
        from causvid import losses

        return losses.dmd_generator_loss, losses.critic_flow_loss
    except ImportError:
        def dmd_generator_loss(x, real_x0, fake_x0):
            xd, r, f = x.double(), real_x0.detach().double(), fake_x0.detach().double()
            grad = torch.nan_to_num((f - r) / (xd.detach() - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True))
            return (0.5 * torch.nn.functional.mse_loss(xd, (xd - grad).detach())).float(), grad

        def critic_flow_loss(v_pred, x0, eps):
            return (v_pred.double() - (eps.double() - x0.double())).pow(2).mean().float()

        return dmd_generator_loss, critic_flow_loss


class DMDBench:
    """The two DMD updates at the benchmark size: a causal generator and a bidirectional critic (trainable,
    fp32 weights, bf16 autocast on CUDA) and the frozen bidirectional teacher (the inference network)."""

    def __init__(self, w: Workload):
        o = w.o
        self.w, self.device = w, w.device
        self.autocast = w.dtype == torch.bfloat16
        self.gen = self._trainable(o.seed + 10)
        self.critic = self._trainable(o.seed + 11)
        self.teacher = w.model
        opt = dict(lr=2e-6, betas=(0.9, 0.999), weight_decay=0.01)
        if w.device.type == "cuda":
            opt["fused"] = True
        self.opt_g = torch.optim.AdamW(self.gen.parameters(), **opt)
        self.opt_c = torch.optim.AdamW(self.critic.parameters(), **opt)
        self.rng = torch.Generator().manual_seed(o.seed + 12)
        self.dmd_loss, self.critic_loss = _losses()
        self._make_batch()

    def _trainable(self, seed: int) -> WanDiT:
        w = self.w
        m = build_dit(w.cfg, w.device, torch.float32, attention=w.o.attention, seed=seed).train().requires_grad_(True)
        m.gradient_checkpointing = bool(w.o.grad_ckpt)
        if w.o.compile:
            compile_dit_blocks(m, w.o.compile_mode)
        return m

    def _make_batch(self) -> None:
        """CausVid data inputs: clean latents noised per chunk to a level drawn from the step list + 0."""
        w, B = self.w, self.w.o.dmd_batch
        clean = w.noise(B, seed=20)
        levels = step_list(w.o.steps) + [0.0]
        chunk_ids = w.layout.chunk_ids(w.geo.latent_frames)  # [F]
        pick = torch.randint(0, len(levels), (B, int(chunk_ids.max()) + 1), generator=self.rng)
        t = torch.tensor(levels)[pick][:, chunk_ids].to(self.device)  # [B, F] constant within a chunk
        self.x_in = S.add_noise(clean, torch.randn_like(clean), t)
        self.t_in = t
        self.cond, self.uncond = w.context(B), w.uncond.expand(B, -1, -1)

    def _amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _noised(self, x0: torch.Tensor):
        B, F = x0.shape[:2]
        o = self.w.o
        t = S.sample_training_timesteps((B,), o.shift, generator=self.rng, device=self.device)[:, None].expand(B, F)
        eps = torch.randn_like(x0)
        return S.add_noise(x0, eps, t), t, eps

    def _step(self, model: WanDiT, opt, loss: torch.Tensor) -> None:
        loss.backward()
        if self.w.o.optimizer_step:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
        opt.zero_grad(set_to_none=True)

    def generator_update(self, rec: Optional[Recorder] = None) -> None:
        with self._amp():
            x0 = S.x0_from_flow(self.x_in, self.gen(self.x_in, self.t_in, self.cond, layout=self.w.layout), self.t_in)
        with torch.no_grad():
            x_t, t, _ = self._noised(x0.detach())
            with self._amp():
                fake = S.x0_from_flow(x_t, self.critic(x_t, t, self.cond), t)
                real = S.x0_from_flow(x_t, guided_flow(self.teacher, x_t, t, self.cond, self.uncond,
                                                       self.w.o.dmd_guidance), t)
        loss, _ = self.dmd_loss(x0, real, fake)
        self._step(self.gen, self.opt_g, loss)

    def critic_update(self, rec: Optional[Recorder] = None) -> None:
        with torch.no_grad(), self._amp():
            x_gen = S.x0_from_flow(self.x_in, self.gen(self.x_in, self.t_in, self.cond, layout=self.w.layout),
                                   self.t_in)
        x_t, t, eps = self._noised(x_gen)
        with self._amp():
            v = self.critic(x_t, t, self.cond)
        self._step(self.critic, self.opt_c, self.critic_loss(v, x_gen, eps))


def section_dmd(w: Workload, peak_tflops: float) -> dict[str, Any]:
    """DMD generator and critic update times, model FLOPs and MFU (``--peak-tflops``)."""
    o, g = w.o, w.geo
    bench = DMDBench(w)
    fns = {"generator": bench.generator_update, "critic": bench.critic_update}
    res = time_runs(fns, w.clock, warmup=o.warmup, reps=o.reps, meter=w.meter)
    flops = dmd_step_flops(w.cfg, batch=o.dmd_batch, num_frames=g.latent_frames, tokens_per_frame=g.tokens_per_frame,
                           layout=w.layout, guidance=o.dmd_guidance)
    out: dict[str, Any] = {"batch": o.dmd_batch, "gradient_checkpointing": bool(o.grad_ckpt),
                           "optimizer_step": o.optimizer_step, "autocast_bf16": bench.autocast,
                           "attention": o.attention, "real_guidance": o.dmd_guidance}
    for name in fns:
        sec = _med(res, name)
        f = flops[name].total
        out[name] = {"step_s": sec, "stats": dataclasses.asdict(res[name]["marks"]["end"]), "model_flops": f,
                     "achieved_tflops": _tflops_rate(f, sec), "mfu": _tflops_rate(f, sec) / peak_tflops,
                     "peak_bytes": res[name]["peak_bytes"]}
    ratio = 5  # CausVid / Self-Forcing dfake_gen_update_ratio: 1 generator update per 5 critic updates
    per_iter_s = (out["generator"]["step_s"] + ratio * out["critic"]["step_s"]) / ratio
    per_iter_f = (flops["generator"].total + ratio * flops["critic"].total) / ratio
    out["per_iteration_ratio5"] = {"step_s": per_iter_s, "model_flops": per_iter_f,
                                   "mfu": _tflops_rate(per_iter_f, per_iter_s) / peak_tflops}
    del bench
    if w.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# Targets, machine, driver
# ------------------------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue 9, reported (never asserted) for the setting they were set for."""
    meta = results["meta"]
    st, cmp_ = results.get("student") or {}, results.get("comparison") or {}
    kv = {r["latent_frames"]: r for r in results.get("kv_vs_recompute") or []}
    dmd = results.get("dmd") or {}
    rows = []

    def add(setting, what, value, op, goal, unit=""):
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        rows.append({"setting": setting, "target": f"{what} {op} {goal}{unit}", "value": value, "met": met})

    if meta["device_type"] == "cpu":
        add("CPU toy", "first-chunk latency ratio, teacher / student (DiT only)", cmp_.get("latency_ratio_dit"), ">=", 200, "x")
        add("CPU toy", "first-chunk latency ratio, teacher / student (incl. VAE)", cmp_.get("latency_ratio_with_vae"), ">=", 200, "x")
        add("CPU toy", "KV cache vs recompute speedup at 21 latent frames", (kv.get(21) or {}).get("speedup"), ">=", 2.5, "x")
    else:
        gb = st.get("peak_bytes_pipeline_excl_text")
        add("H100 1.3B", "FPS incl. VAE", st.get("fps_with_vae"), ">=", 25)
        add("H100 1.3B", "FPS DiT only", st.get("fps_dit"), ">=", 40)
        add("H100 1.3B", "first-chunk latency (s)", st.get("first_chunk_s"), "<=", 0.4)
        add("H100 1.3B", "peak memory, sampling + decode, text encoder released (GB)", gb / 1e9 if gb else None, "<=", 12)
        add("H100 1.3B", "DMD generator step MFU", (dmd.get("generator") or {}).get("mfu"), ">=", 0.40)
        add("H100 1.3B", "DMD critic step MFU", (dmd.get("critic") or {}).get("mfu"), ">=", 0.40)
    return rows


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device_type": device.type}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu_model"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=p.total_memory / 1e9, cuda=torch.version.cuda)
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def _section(results: dict, name: str, fn: Callable[[], Any]) -> Any:
    """Run one section; an exception (e.g. out of memory) is recorded and the run goes on."""
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as err:  # noqa: BLE001 - a benchmark reports failures, it does not stop at them
        results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"
        value = None
    if value is None and torch.cuda.is_available():
        torch.cuda.empty_cache()  # after the except block, so the failed frames' tensors are gone
    results.setdefault("section_wall_s", {})[name] = time.perf_counter() - t0
    log.info("%s: %.1f s%s", name, time.perf_counter() - t0, " (failed)" if value is None else "")
    return value


def run_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Run the selected sections and return the results dictionary (see :func:`write_reports`)."""
    device = pick_device(opts.device)
    o = opts.resolved()
    if o.precision == "auto":
        o.precision = "bf16" if device.type == "cuda" else "fp32"
    if o.attention == "auto":
        o.attention = "flex" if device.type == "cuda" else "sdpa"
    setup_backend(device, o.threads)
    t_start = time.perf_counter()
    w = Workload(o, device)
    results: dict[str, Any] = {"meta": machine_info(device), "options": _jsonable(dataclasses.asdict(o))}
    results["meta"].update(command=o.command, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), vae=w.vae_note or "ok",
                           dit_params=sum(p.numel() for p in w.model.parameters()), mp4=w.mp4_note,
                           memory_meter=w.meter.kind, clock="cuda_events" if device.type == "cuda" else "perf_counter")
    if o.text_encoder:
        kind = SIZE_DEFAULTS[o.size]["text"]
        w.text = _section(results, "build_text_encoder",
                          lambda: TextBench(kind, w.cfg, device, w.dtype, o.prompt_tokens))
        w.text_note = w.text.note if w.text is not None else "not available (see errors)"
    results["meta"]["text_encoder"] = w.text_note
    results["geometry"] = dataclasses.asdict(w.geo)
    dtype = torch.bfloat16 if (o.precision == "bf16") else torch.float32
    if o.peak_tflops:
        peak, src = o.peak_tflops, "--peak-tflops"
    elif device.type == "cuda":
        peak, src = H100_BF16_DENSE_TFLOPS, "H100/H200 dense bf16 datasheet (default on CUDA)"
    else:
        peak = measure_matmul_peak(device, dtype, n=1024 if o.quick else 2048)
        src = f"measured: best {dtype} {1024 if o.quick else 2048}^3 matmul on this CPU"
    results["peak"] = {"tflops": peak, "source": src}
    if device.type == "cuda":
        results["peak"]["measured_matmul_tflops"] = measure_matmul_peak(device, dtype, n=8192)
    if "flops" in o.sections:
        results["flop_model"] = _section(results, "flops", lambda: section_flops(w))
    if o.compile:
        compile_dit_blocks(w.model, o.compile_mode)
    if "student" in o.sections or "teacher" in o.sections:
        st = _section(results, "student_teacher", lambda: section_student_teacher(w, "teacher" in o.sections))
        if st:
            results.update(st)
            results["student"]["mfu"] = results["student"]["achieved_tflops"] / peak
            if "teacher" in st:
                results["teacher"]["mfu"] = results["teacher"]["achieved_tflops"] / peak
    if w.text is not None:
        w.text.release()  # like the official pipelines: the encoder leaves the device once prompts are encoded
        w.text = None
    if "kv" in o.sections:
        results["kv_vs_recompute"] = _section(results, "kv", lambda: section_kv(w))
    if "steps" in o.sections:
        decode_s = (results.get("student") or {}).get("decode_s")
        results["steps_sweep"] = _section(results, "steps", lambda: section_steps(w, decode_s))
    if "batch" in o.sections:
        results["batch"] = _section(results, "batch", lambda: section_batch(w))
    if "dmd" in o.sections:
        results["dmd"] = _section(results, "dmd", lambda: section_dmd(w, peak))
    results["targets"] = targets(results)
    if hasattr(os, "getloadavg"):
        results["meta"]["loadavg_end"] = list(os.getloadavg())
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    return results


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ------------------------------------------------------------------------------------------------
# Reports: JSON, markdown tables, plots
# ------------------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (``digits`` significant digits); ``n/a`` for missing values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _gb(b: Optional[float]) -> str:
    if b is None:
        return "n/a"
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _md_student_teacher(r: dict) -> str:
    st, te, cmp_ = r.get("student"), r.get("teacher") or {}, r.get("comparison") or {}
    if not st:
        return ""
    tflop = lambda d: (d or {}).get("model_flops", {}).get("total", 0) / 1e12 if d else None
    rows = [
        ("DiT forwards", st["dit_forwards"], te.get("dit_forwards"), None),
        ("time to first frames, DiT only (s)", st["first_chunk_dit_s"], te.get("sampling_s"), cmp_.get("latency_ratio_dit")),
        ("time to first frames, incl. VAE decode (s)", st["first_chunk_s"], te.get("latency_s"), cmp_.get("latency_ratio_with_vae")),
        ("sampling time, DiT only (s)", st["sampling_s"], te.get("sampling_s"), None),
        ("VAE decode time (s)", st["decode_s"], te.get("decode_s"), None),
        ("frames/s, DiT only", st["fps_dit"], te.get("fps_dit"), cmp_.get("throughput_ratio_dit")),
        ("frames/s, incl. VAE decode", st["fps_with_vae"], te.get("fps_with_vae"), cmp_.get("throughput_ratio_with_vae")),
        ("DiT forwards/s", st["forwards_per_s"], te.get("forwards_per_s"), None),
        ("DiT model TFLOP (FLOP model)", tflop(st), tflop(te), cmp_.get("flop_ratio_total")),
        ("achieved TFLOP/s (DiT)", st["achieved_tflops"], te.get("achieved_tflops"), None),
        ("MFU (DiT)", st.get("mfu"), te.get("mfu"), None),
        ("peak memory, sampling", _gb(st["peak_bytes_sampling"]), _gb(te.get("peak_bytes")), None),
        ("peak memory, full pipeline", _gb(st["peak_bytes_pipeline"]), "", None),
    ]
    if st.get("text_encoder_weight_bytes"):
        tb = _gb(st["text_encoder_weight_bytes"])
        rows += [(f"peak memory, sampling, excl. resident text encoder ({tb})", _gb(st["peak_bytes_sampling_excl_text"]),
                  _gb(te.get("peak_bytes_excl_text")), None),
                 (f"peak memory, full pipeline, excl. resident text encoder ({tb})",
                  _gb(st["peak_bytes_pipeline_excl_text"]), "", None)]
    hdr = ["metric", f"causal student ({len(st['steps'])} steps + refresh, KV cache)",
           f"teacher ({te.get('steps', 'n/a')} steps, CFG {te.get('guidance', 'n/a')})", "teacher/student (student/teacher for FPS)"]
    out = [_table(hdr, rows)]
    p2o = [("text encoding", st["text_encode_s"]), ("sampling + streamed VAE decode", st["sampling_decode_s"]),
           ("of which first frames", st["first_chunk_s"]), ("writing the mp4", st["mp4_write_s"]),
           ("prompt to mp4, total", st["prompt_to_output_s"])]
    out.append("\nPrompt to output (median of the pipeline runs; includes: "
               + ", ".join(st["prompt_to_output_includes"]) + "):\n\n" + _table(["stage", "seconds"], p2o))
    extra = [("VAE decode FLOP (counted)", st.get("vae_decode_flops")),
             ("text encoding FLOP (counted)", st.get("text_encode_flops")),
             ("KV cache size", _gb(st.get("kv_cache_bytes")))]
    out.append("\n" + _table(["quantity", "value"], extra))
    return "\n".join(out)


def _md_kv(rows: list) -> str:
    hdr = ["latent frames", "video frames", "KV cache (s)", "recompute (s)", "speedup", "FLOP ratio (model)",
           "FLOP ratio (executed, dense mask)", "max abs diff"]
    return _table(hdr, [(r["latent_frames"], r["pixel_frames"], r["kv_s"], r["recompute_s"], r["speedup"],
                         r["flop_ratio"], r["flop_ratio_executed_dense"], f"{r['max_abs_diff']:.2e}") for r in rows])


def _md_steps(rows: list) -> str:
    return _table(["steps", "sampling (s)", "first chunk, DiT (s)", "FPS DiT only", "FPS incl. VAE", "forwards/s"],
                  [(r["steps"], r["sampling_s"], r["first_chunk_dit_s"], r["fps_dit"], r["fps_with_vae"],
                    r["forwards_per_s"]) for r in rows])


def _md_batch(b: dict) -> str:
    t = _table(["batch", "total (s)", "per video (s)", "FPS per stream", "FPS aggregate", "first chunk (s)", "peak memory"],
               [(r["batch"], r["total_s"], r["per_video_s"], r["fps_per_stream"], r["fps_aggregate"], r["first_chunk_s"],
                 _gb(r["peak_bytes"])) for r in b["rows"]])
    return t + f"\n\nPer-video speedup from batching: {_f(b['per_video_speedup'])}x " + \
        f"({'sampling + VAE decode' if b['includes_vae_decode'] else 'DiT sampling only'})."


def _md_dmd(d: dict, peak: dict) -> str:
    rows = [(name, d[name]["step_s"], d[name]["model_flops"] / 1e12, d[name]["achieved_tflops"], d[name]["mfu"],
             _gb(d[name]["peak_bytes"])) for name in ("generator", "critic")]
    it = d["per_iteration_ratio5"]
    rows.append(("per iteration (1 generator : 5 critic)", it["step_s"], it["model_flops"] / 1e12, None, it["mfu"], ""))
    return (_table(["update", "step time (s)", "model TFLOP", "achieved TFLOP/s", "MFU", "peak memory"], rows)
            + f"\n\nPeak used for MFU: {_f(peak['tflops'])} TFLOP/s ({peak['source']}). Gradient checkpointing: "
            f"{_f(d['gradient_checkpointing'])}; optimizer step included: {_f(d['optimizer_step'])}; "
            f"bf16 autocast: {_f(d['autocast_bf16'])}; block-causal attention: {d['attention']}.")


def _md_targets(rows: list) -> str:
    return _table(["setting", "target", "measured", "met"],
                  [(r["setting"], r["target"], r["value"], "n/a" if r["met"] is None else ("yes" if r["met"] else "no"))
                   for r in rows])


def render_markdown(r: dict) -> str:
    """The results as markdown: setup, then one table per section."""
    m, o, g = r["meta"], r["options"], r.get("geometry", {})
    dev = m.get("gpu") or f"{m.get('cpu_model')} ({m.get('cpu_count')} cores, {m.get('torch_threads')} threads)"
    parts = [f"**Device**: {dev}; torch {m['torch']}; precision {o['precision']}; attention {o['attention']}; "
             f"compile {o['compile']}.",
             f"**Model**: DiT `{o['size']}` ({m.get('dit_params', 0) / 1e6:.2f} M parameters, random weights); "
             f"VAE: {m.get('vae')}; text encoder: {m.get('text_encoder')}; mp4: {m.get('mp4')}.",
             f"**Video**: {g.get('frames')} frames {g.get('height')}x{g.get('width')} -> {g.get('latent_frames')} latent "
             f"frames of {g.get('latent_h')}x{g.get('latent_w')} ({g.get('tokens_per_frame')} tokens/frame); chunk "
             f"{o['chunk']}; timing: {o['warmup']} warm-up, median of {o['reps']} (teacher {o['teacher_reps']}); "
             f"clock {m.get('clock')}; memory {m.get('memory_meter')}.",
             "**Command**: " + "; ".join(f"`{c}`" for c in (m.get("commands") or [m.get("command")])),
             f"**Load average** (1/5/15 min) at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}; "
             f"wall time {_f(m.get('wall_s'))} s."]
    sections = [("Student vs teacher", _md_student_teacher(r) if r.get("student") else None),
                ("KV cache vs recomputation", _md_kv(r["kv_vs_recompute"]) if r.get("kv_vs_recompute") else None),
                ("Frames per second vs student steps", _md_steps(r["steps_sweep"]) if r.get("steps_sweep") else None),
                ("Batching", _md_batch(r["batch"]) if r.get("batch") else None),
                ("DMD training step", _md_dmd(r["dmd"], r["peak"]) if r.get("dmd") else None),
                ("Targets (reported, not asserted)", _md_targets(r["targets"]))]
    fm = r.get("flop_model")
    if fm:
        c = fm["check_forward"]
        sections.append(("FLOP model check", f"One {c['frames']}-frame forward ({c['tokens']} tokens): model "
                         f"{_f(c['model']['total'])} FLOP, torch.utils.flop_counter {_f(c['counted'])} FLOP "
                         f"(relative difference {c['rel_err']:.2e})."))
    for name, text in (r.get("errors") or {}).items():
        sections.append((f"Error in section `{name}`", "```\n" + text.strip() + "\n```"))
    body = "\n\n".join(parts) + "\n"
    for title, text in sections:
        if text:
            body += f"\n### {title}\n\n{text}\n"
    return body


def write_plots(r: dict, out_dir: str, prefix: str) -> list[str]:
    """PNG plots (matplotlib, Agg): latency vs length for KV cache vs recompute, and FPS vs steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if r.get("kv_vs_recompute"):
        rows = r["kv_vs_recompute"]
        x = [row["latent_frames"] for row in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, [row["recompute_s"] for row in rows], "o-", label="full recomputation (block-causal mask)")
        ax.plot(x, [row["kv_s"] for row in rows], "s-", label="KV cache")
        for row in rows:
            ax.annotate(f"{row['speedup']:.1f}x", (row["latent_frames"], row["recompute_s"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set(xlabel="latent frames generated", ylabel="sampling time (s)", yscale="log",
               title=f"KV cache vs recomputation ({r['options']['size']}, {r['meta']['device_type']})")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(os.path.join(out_dir, f"{prefix}_kv_vs_recompute.png"))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if r.get("steps_sweep"):
        rows = r["steps_sweep"]
        x = [row["steps"] for row in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, [row["fps_dit"] for row in rows], "o-", label="DiT only")
        if all(row["fps_with_vae"] is not None for row in rows):
            ax.plot(x, [row["fps_with_vae"] for row in rows], "s-", label="incl. VAE decode")
        ax.set(xlabel="denoising steps per chunk (+1 cache refresh)", ylabel="video frames per second",
               title=f"Student FPS vs steps ({r['options']['size']}, {r['meta']['device_type']})", xticks=x)
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(os.path.join(out_dir, f"{prefix}_fps_vs_steps.png"))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


_RESULT_KEY = {"flops": "flop_model", "student_teacher": "student", "kv": "kv_vs_recompute", "steps": "steps_sweep",
               "batch": "batch", "dmd": "dmd"}


def merge_results(runs: Sequence[dict]) -> dict:
    """Combine the JSON of several runs of one setting (e.g. sections split over 10-minute GPU calls):
    later runs fill or replace sections; ``meta`` / ``options`` stay those of the first run, and every
    command is kept. Targets are recomputed."""
    if not runs:
        raise ValueError("merge_results needs at least one result")
    out = json.loads(json.dumps(runs[0]))
    out["meta"]["commands"] = [r["meta"].get("command") for r in runs]
    keep = {"meta", "options", "targets", "plots", "errors", "section_wall_s"}
    errors: dict[str, str] = {}
    for i, r in enumerate(runs):
        if r["options"].get("size") != out["options"].get("size") or r["meta"]["device_type"] != out["meta"]["device_type"]:
            raise ValueError("merge_results: runs differ in size or device type; merge only runs of one setting")
        errors.update(r.get("errors") or {})
        for name, key in _RESULT_KEY.items():  # a section that succeeded in this run clears its older error
            if r.get(key) is not None and name not in (r.get("errors") or {}):
                errors.pop(name, None)
        if i:
            out.update({k: v for k, v in r.items() if k not in keep and v is not None})
            out.setdefault("section_wall_s", {}).update(r.get("section_wall_s") or {})
    out["errors"] = errors
    out["targets"] = targets(out)
    return out


def write_reports(r: dict, out_dir: str, plots_dir: Optional[str] = None) -> dict[str, str]:
    """Write ``benchmark.json`` and ``benchmark.md`` to ``out_dir`` (plots to ``plots_dir`` or ``out_dir``)."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = f"{r['options']['size']}_{r['meta']['device_type']}"
    plots = write_plots(r, plots_dir or out_dir, prefix)
    r["plots"] = plots
    paths = {"json": os.path.join(out_dir, "benchmark.json"), "markdown": os.path.join(out_dir, "benchmark.md")}
    with open(paths["json"], "w") as f:
        json.dump(_jsonable(r), f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(render_markdown(r))
    return paths


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def build_arg_parser():
    import argparse

    d = BenchOptions()
    p = argparse.ArgumentParser(description="CausVid speed benchmarks (see docs/benchmarks.md).")
    p.add_argument("--size", default=d.size, choices=sorted(SIZE_DEFAULTS))
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 weights on CUDA (bf16 autocast for the trainable DMD roles), fp32 on CPU")
    p.add_argument("--height", type=int, default=None, help="pixels (default by size: toy 64, wan 480)")
    p.add_argument("--width", type=int, default=None, help="pixels (default by size: toy 64, wan 832)")
    p.add_argument("--frames", type=int, default=None, help="pixel frames, 1 + 4n (default 81 -> 21 latent frames)")
    p.add_argument("--chunk", type=int, default=d.chunk, help="latent frames per causal chunk")
    p.add_argument("--steps", type=int, default=d.steps, help="student denoising steps per chunk")
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps)
    p.add_argument("--guidance", type=float, default=d.guidance, help="teacher CFG weight (2 forwards per step)")
    p.add_argument("--batch", type=int, default=d.batch, help="N of the batch 1 vs N comparison")
    p.add_argument("--lengths", type=_ints, default=d.lengths, help="latent frames of the KV-vs-recompute sweep")
    p.add_argument("--sweep-steps", type=_ints, default=d.sweep_steps, help="student step counts of the FPS sweep")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--teacher-reps", type=int, default=d.teacher_reps)
    p.add_argument("--batch-reps", type=int, default=d.batch_reps)
    p.add_argument("--dmd-batch", type=int, default=d.dmd_batch)
    p.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=None,
                   help="activation checkpointing in the DMD step (default: on for Wan sizes)")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    p.add_argument("--no-optimizer-step", dest="optimizer_step", action="store_false",
                   help="time forward + backward only in the DMD step")
    p.add_argument("--attention", default=d.attention, choices=["auto", "sdpa", "flex"],
                   help="block-causal mask backend (training, recomputation); auto: flex on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks")
    p.add_argument("--compile-mode", default=None, help="e.g. max-autotune-no-cudagraphs")
    p.add_argument("--no-text-encoder", dest="text_encoder", action="store_false",
                   help="skip the text encoder (umT5-XXL is 5.7B parameters)")
    p.add_argument("--no-vae", dest="vae", action="store_false")
    p.add_argument("--no-mp4", dest="write_mp4", action="store_false", help="do not write the mp4")
    p.add_argument("--mp4-preset", default=d.mp4_preset, help="libx264 preset of the written mp4")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s for MFU (default: 989 on CUDA, a measured matmul peak on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="CI smoke run: 1 rep, short sweeps")
    p.add_argument("--out-dir", default=None, help="where benchmark.json / .md go (default runs/benchmark/<size>_<device>)")
    p.add_argument("--plots-dir", default=None, help="where the PNG plots go (default: --out-dir)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="do not run: merge these benchmark.json files (same size and device) into --out-dir")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = build_arg_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.merge:
        if not args.out_dir:
            p.error("--merge needs --out-dir")
        runs = []
        for path in args.merge:
            with open(path) as f:
                runs.append(json.load(f))
        results = merge_results(runs)
        paths = write_reports(results, args.out_dir, args.plots_dir)
        log.info("merged %d runs into %s and %s", len(runs), paths["json"], paths["markdown"])
        return 0
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions) if hasattr(args, f.name)}
    kw["sections"] = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    kw["command"] = "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    opts = BenchOptions(**kw)
    try:
        opts.resolved()
    except ValueError as err:
        p.error(str(err))
    results = run_benchmark(opts)
    out_dir = args.out_dir or os.path.join("runs", "benchmark", f"{opts.size}_{results['meta']['device_type']}")
    paths = write_reports(results, out_dir, args.plots_dir)
    print(render_markdown(results))
    log.info("wrote %s and %s%s", paths["json"], paths["markdown"], f"; plots {results['plots']}" if results["plots"] else "")
    return 0
