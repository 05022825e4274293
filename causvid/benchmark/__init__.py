"""Speed benchmarks: the KV-cached causal student against the bidirectional teacher, KV cache against
recomputation, batching, and the DMD training step with its model FLOPs utilisation.

``scripts/benchmark.py`` is the command line (:mod:`.cli`); a notebook calls :func:`run_benchmark` directly.
The package, by responsibility: :mod:`.options` (sizes, step lists, :class:`BenchOptions`), :mod:`.measure`
(device set-up, clocks, peak memory, the timing loop), :mod:`.flops` (the FLOP model), :mod:`.workload` (models
built on the target device, the timed units of work), :mod:`.sections` (what gets measured, and
:func:`run_benchmark`), :mod:`.report` (targets, JSON, markdown, plots, merging runs), and the optional sections
:mod:`.peer` (diffusers' DiT on the same work) and :mod:`.decoder` (the tiny streaming decoder vs the VAE decoder). The FLOP model is the one of ``docs/performance.md`` §2.2-2.4 (linear,
self-attention ``4 Lq Lk d`` and cross-attention ``4 Lq Lc d`` per layer; backward = 2x forward), made
exact by also counting the small embedding / head / time-MLP matmuls, so it equals
``torch.utils.flop_counter`` on our :class:`~causvid.models.dit.WanDiT` (``tests/test_benchmark.py``).

Timing protocol: ``warmup`` untimed runs, then ``reps`` timed runs, the median is reported. On CUDA
time is read from CUDA events and the device is synchronised only at measurement boundaries (before a
timed run starts and once after the last one); on the CPU ``time.perf_counter``. Peak memory is CUDA
``max_memory_allocated`` or, on the CPU, the process's peak resident set (``VmHWM``, reset per run via
``/proc/self/clear_refs``; ``ru_maxrss`` as a fallback, which never resets).

Models get random weights (speed does not depend on them; ``--vae-path`` / ``--tiny-decoder`` load trained ones) and are built directly on the target device
and dtype, so a 1.3B DiT never materialises on the CPU when the benchmark runs on a GPU. The student and
the teacher share one network (same architecture; the student runs it chunk by chunk with a KV cache).

Layouts: latents ``[B, F, C, H, W]``, videos ``[B, T, 3, H, W]`` with ``T = 1 + 4 (F - 1)``.
"""

from causvid.benchmark.cli import build_arg_parser, main
from causvid.benchmark.flops import (
    Flops,
    block_causal_pairs,
    count_flops,
    cross_kv_flops,
    dit_forward_flops,
    dmd_step_flops,
    kv_cache_bytes,
    linear_flops_per_token,
    recompute_sampling_flops,
    sdpa_flops,
    student_sampling_flops,
    teacher_sampling_flops,
)
from causvid.benchmark.measure import Clock, MemoryMeter, Recorder, Stats, measure_matmul_peak, time_runs
from causvid.benchmark.options import SECTIONS, SIZE_DEFAULTS, STEP_LISTS, BenchOptions, step_list
from causvid.benchmark.report import merge_results, render_markdown, targets, write_plots, write_reports
from causvid.benchmark.sections import DMDBench, SelfForcingBench, run_benchmark
from causvid.benchmark.workload import Geometry, Workload, build_dit, build_vae

__all__ = [
    "BenchOptions", "Clock", "DMDBench", "SelfForcingBench", "Flops", "Geometry", "MemoryMeter", "Recorder", "SECTIONS", "SIZE_DEFAULTS",
    "STEP_LISTS", "Stats", "Workload", "block_causal_pairs", "build_arg_parser", "build_dit", "build_vae", "count_flops",
    "cross_kv_flops", "dit_forward_flops", "dmd_step_flops", "kv_cache_bytes", "linear_flops_per_token", "main",
    "measure_matmul_peak", "merge_results", "recompute_sampling_flops", "render_markdown", "run_benchmark", "sdpa_flops",
    "student_sampling_flops", "targets", "teacher_sampling_flops", "time_runs", "step_list", "write_plots",
    "write_reports",
]
