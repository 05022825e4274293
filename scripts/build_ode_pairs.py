#!/usr/bin/env python
"""Generate the teacher's ODE trajectories for the ODE-regression initialisation (docs/method.md §3).

    python scripts/build_ode_pairs.py --config configs/toy/ode_pairs.yaml [--dry-run] [key=value ...]
    accelerate launch scripts/build_ode_pairs.py --config configs/wan2.1_1.3b/ode_pairs.yaml

For every (prompt, seed) the teacher (``train.teacher_path``) samples with ``ode_pairs.num_steps`` Euler steps
on the shift-``ode_pairs.shift`` grid and CFG ``ode_pairs.guidance`` against ``dmd.negative_prompt``; the states
at the levels of the student's step list (``schedule.denoising_step_list``; stored indices derived from the
grid, shown by ``--dry-run``) are written to ``ode_pairs.output_dir`` as sharded safetensors + ``index.json``.
Resumable (finished shards are skipped); under ``accelerate launch`` each process writes its own shards.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from causvid.config import ConfigError, load_config  # noqa: E402
from causvid.validate import check_count, check_output_dir, check_run  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run config YAML")
    p.add_argument("--out", default=None, help="output folder (default: ode_pairs.output_dir)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per teacher batch (default: train.batch_size)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="storage dtype of the states (the official LMDB uses float16)")
    p.add_argument("--limit", type=int, default=None, help="write at most this many shards per process, then stop")
    p.add_argument("--dry-run", action="store_true", help="print the plan (prompts, seeds, stored levels, shards)")
    p.add_argument("--no-progress", action="store_true")
    from causvid.train.memory_plan import add_arguments

    add_arguments(p)  # the per-device memory plan printed by --dry-run
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. ode_pairs.num_prompts=16")
    return p.parse_args(argv)


def _check_files(cfg) -> None:
    """Fail before loading anything when a file the run needs is absent."""
    need = [("train.teacher_path", cfg.train.teacher_path)]
    if cfg.text.kind == "umt5":
        need += [("text.path", cfg.text.path), ("text.tokenizer_path", cfg.text.tokenizer_path)]
    elif cfg.text.path:
        need.append(("text.path", cfg.text.path))
    if cfg.ode_pairs.prompts:
        need.append(("ode_pairs.prompts", cfg.ode_pairs.prompts))
    for key, path in need:
        if not path:
            raise ConfigError(f"config key '{key}' is required to build ODE pairs")
        if not os.path.exists(path):
            raise ConfigError(f"config key '{key}' = {path!r}: no such file or folder")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # denormals slow CPU kernels several-fold (environment.md)
    from accelerate import PartialState

    from causvid import ode_pairs as OP
    from causvid.data import shards as SH

    try:
        cfg = load_config(args.config, args.overrides)
        for name in ("--batch-size", "--limit"):
            check_count(name, getattr(args, name[2:].replace("-", "_")))
        # --dry-run plans without the weights (they may not be downloaded yet); a real run needs them
        check_run(cfg, paths=("ode_pairs.prompts",) if args.dry_run else (
            "train.teacher_path", "text.path", "text.tokenizer_path", "ode_pairs.prompts"), output_key=None)
        check_output_dir(args.out or cfg.ode_pairs.output_dir, "--out" if args.out else "ode_pairs.output_dir")
        settings = OP.settings_from_config(cfg, batch_size=args.batch_size)
        settings.levels()  # fails early (with the distance) when the grid does not contain the levels
        if cfg.ode_pairs.prompts and not os.path.isfile(cfg.ode_pairs.prompts):
            raise ConfigError(f"config key 'ode_pairs.prompts' = {cfg.ode_pairs.prompts!r}: no such file")
        prompts = OP.prompts_from_config(cfg)
        if args.dry_run:
            from causvid.train import memory_plan as MP

            mem = MP.plan_ode_pairs(cfg, MP.launch_from_args(args), batch_size=args.batch_size,
                                    device_memory=MP.dry_run_plan_size(args))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or cfg.ode_pairs.output_dir
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo for multi-process CPU launches
    if args.dry_run:
        print(f"output: {out}")
        print(OP.describe_plan(prompts, settings, world=state.num_processes))
        if os.path.isdir(out):
            from causvid.models.registry import dit_config

            d = dit_config(cfg.model.size, cfg.model.num_layers)
            plan = OP.ode_plan(prompts, settings, d.text_len, d.text_dim)
            print(f"already done: {plan.num_shards - len(SH.missing_shards(out, plan))} of {plan.num_shards} shards")
        if state.is_main_process:
            MP.print_plan(mem)
        return 0
    try:
        _check_files(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from causvid.models.registry import dit_config
    from causvid.models.text import text_encoder_from_config
    from causvid.train.parallel import device_of
    from causvid.train.stages import load_network

    dev = device_of(state)  # a plain torch.device("cpu") under a CPU launch: .to() does not copy the weights
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the official generator (fp32 weights, TF32 matmuls)
        torch.backends.cudnn.allow_tf32 = True
    d = dit_config(cfg.model.size, cfg.model.num_layers)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    teacher = load_network(cfg, "train.teacher_path", device=dev, dtype=dtype, trainable=False)
    enc = text_encoder_from_config(cfg.text, device=dev, dim=d.text_dim, text_len=d.text_len)
    levels = settings.levels()
    if state.is_main_process:
        print("stored levels:\n" + levels.describe(), flush=True)
    written = OP.build_ode_pairs(out, teacher, enc, prompts, settings, rank=state.process_index,
                                 world=state.num_processes, limit=args.limit, progress=not args.no_progress,
                                 device=dev, dtype=DTYPES[args.dtype])
    print(f"rank {state.process_index}: wrote shards {written}", flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        plan = OP.ode_plan(prompts, settings, enc.text_len, enc.dim)
        index = SH.finalize_index(out, plan)
        if index is None:
            missing = SH.missing_shards(out, plan)
            print(f"{len(missing)} of {plan.num_shards} shards still missing ({missing[:10]}...): re-run to continue")
        else:
            print(f"complete: {index['num_samples']} pairs in {len(index['shards'])} shards -> "
                  f"{os.path.join(out, SH.INDEX_NAME)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
