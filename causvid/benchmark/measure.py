"""Device set-up, clocks (CUDA events / perf_counter), peak memory and the timing loop."""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

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


def _malloc_trim() -> None:
    """glibc ``malloc_trim(0)`` where available (a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
            _malloc_trim()  # freed heap pages go back to the OS, so the reset peak starts at what is in use
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def current_bytes(self) -> int:
        """What is in use now (CUDA allocated / CPU resident set): the baseline a peak is read against."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        _malloc_trim()
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "cpu_peak_rss":
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def torch_cpu_alloc_peak(fn: Callable[[], Any], allocations: Optional[list] = None) -> tuple[int, Any]:
    """``(peak bytes held by new torch CPU tensors during fn(), fn's result)``, from the profiler's memory events.

    Exact at op granularity, independent of the C allocator's caching (which makes the resident set a poor
    meter for a few MiB): each op's net allocation is added at its start, frees outside ops when they happen.
    ``allocations`` (a list) receives every op's positive net allocation in bytes.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    deltas = []
    for e in prof.events():
        d = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if d:
            deltas.append((e.time_range.start, d))
            if allocations is not None and d > 0:
                allocations.append(d)
    cur = peak = 0
    for _, d in sorted(deltas, key=lambda x: x[0]):
        cur += d
        peak = max(peak, cur)
    return peak, out


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
