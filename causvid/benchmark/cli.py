"""``scripts/benchmark.py``: the command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Optional

from causvid.benchmark.options import OPTIONAL_SECTIONS, SECTIONS, SIZE_DEFAULTS, BenchOptions
from causvid.benchmark.report import merge_results, render_markdown, write_reports
from causvid.benchmark.sections import run_benchmark
from causvid.models.weights import WeightsError

log = logging.getLogger(__name__)

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
    p.add_argument("--attention", default=d.attention, choices=["auto", "sdpa", "sdpa_mask", "flex"],
                   help="block-causal mask backend (training, recomputation); auto: flex on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks")
    p.add_argument("--compile-mode", default=None, help="e.g. max-autotune-no-cudagraphs")
    p.add_argument("--no-text-encoder", dest="text_encoder", action="store_false",
                   help="skip the text encoder (umT5-XXL is 5.7B parameters)")
    p.add_argument("--no-vae", dest="vae", action="store_false")
    p.add_argument("--vae-path", default=None, metavar="PATH",
                   help="trained VAE weights (causvid.models.vae.load_vae; default: random weights)")
    p.add_argument("--tiny-decoder", default=None, metavar="PATH",
                   help="a trained decoder.safetensors (scripts/train_decoder.py): the student pipeline decodes with "
                        "it (the teacher keeps the VAE), and the decoder section runs by default")
    p.add_argument("--decoder-videos", type=int, default=d.decoder_videos,
                   help="held-out toy-world videos of the decoder section's PSNR (with --vae-path)")
    p.add_argument("--no-mp4", dest="write_mp4", action="store_false", help="do not write the mp4")
    p.add_argument("--mp4-preset", default=d.mp4_preset, help="libx264 preset of the written mp4")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s for MFU (default: 989 on CUDA, a measured matmul peak on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--sections", default=None,
                   help=f"comma list of {','.join(SECTIONS + OPTIONAL_SECTIONS)} (default: all but "
                        f"{','.join(OPTIONAL_SECTIONS)}, plus decoder with --tiny-decoder; peer: the same work on "
                        "diffusers.WanTransformer3DModel; decoder: tiny decoder vs VAE decoder, needs --tiny-decoder)")
    p.add_argument("--peer-cases", default=",".join(d.peer_cases),
                   help="cases of the peer section: bench (the --size DiT at the benchmark's latents), wan-mini "
                        "(dim 256, 4 layers, 21x24x24 latents)")
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
    if args.sections is None:
        kw["sections"] = SECTIONS + (("decoder",) if args.tiny_decoder else ())
    else:
        kw["sections"] = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    kw["peer_cases"] = tuple(s.strip() for s in args.peer_cases.split(",") if s.strip())
    kw["command"] = "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    opts = BenchOptions(**kw)
    try:
        opts.resolved()
    except ValueError as err:
        p.error(str(err))
    try:
        results = run_benchmark(opts)
    except WeightsError as err:  # a --vae-path file whose format only loading can check
        p.error(str(err))
    out_dir = args.out_dir or os.path.join("runs", "benchmark", f"{opts.size}_{results['meta']['device_type']}")
    paths = write_reports(results, out_dir, args.plots_dir)
    print(render_markdown(results))
    log.info("wrote %s and %s%s", paths["json"], paths["markdown"], f"; plots {results['plots']}" if results["plots"] else "")
    return 0
