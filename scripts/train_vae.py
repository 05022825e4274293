#!/usr/bin/env python
"""Train the toy VAE on toy-world videos (docs/vae.md).

    python scripts/train_vae.py --config configs/toy/vae.yaml --output runs/toy/vae \
        [--steps N] [key=value ...] [vae.train.clip_frames=5 ...]

Writes ``<output>/vae.safetensors`` (load with ``causvid.models.vae.load_vae``) and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from causvid.config import ConfigError, load_config  # noqa: E402
from causvid.train.vae_trainer import options_from, split_vae_train_overrides, train_vae  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run config YAML (deltas from causvid.config defaults)")
    p.add_argument("--output", default=None, help="output folder (default: train.output_dir)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: train.max_steps)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a CPU shared with other jobs)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.batch_size=4 vae.train.crop=32")
    args = p.parse_args(argv)
    rest, cli_opts = split_vae_train_overrides(args.overrides)
    try:
        cfg = load_config(args.config, rest)
        options = options_from(cfg, cli_opts)
    except (ConfigError, ValueError) as err:
        p.error(str(err))
    output = args.output or cfg.train.output_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals can slow CPU convolutions several-fold (environment.md)
    metrics = train_vae(cfg, output, steps=args.steps, options=options, progress=not args.no_progress)
    if metrics:
        keys = ("psnr_mean", "psnr_min", "train_seconds", "steps")
        print(json.dumps({k: metrics.get(k) for k in keys}), flush=True)
        print(f"wrote {os.path.join(output, 'vae.safetensors')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
