"""Command line of ``scripts/train_decoder.py``: arguments -> videos + frozen VAE -> :func:`train_decoder`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from causvid.config import ConfigError, load_config
from causvid.train.decoder_trainer import DecoderTrainOptions, train_decoder


def _videos(cfg, folder: Optional[str], n_train: int, n_eval: int):
    """(training videos, held-out videos), each a list of ``[T, 3, H, W]`` in [-1, 1]."""
    if folder:
        from causvid.train.stages import _video_source

        cfg.data.source, cfg.data.path = "videos", folder
        ds = _video_source(cfg)
        if len(ds) < 2:
            raise ConfigError(f"--videos {folder}: need at least 2 videos (training and held-out), found {len(ds)}")
        n_eval = min(n_eval, len(ds) // 2)
        train = [ds[i]["video"] for i in range(min(n_train, len(ds) - n_eval))]
        return train, [ds[len(ds) - 1 - i]["video"] for i in range(n_eval)]
    from causvid.data.toyworld import ToyWorld, toyworld_from_config

    d, t = cfg.data, cfg.data.toyworld
    world = toyworld_from_config(d)
    held = ToyWorld(height=d.height, width=d.width, num_frames=d.num_frames, fps=d.fps, seed=t.seed + 1,
                    num_videos=max(n_eval, 1), max_objects=t.max_objects,
                    textured_background_prob=t.textured_background_prob)
    return [world[i]["video"] for i in range(min(n_train, len(world)))], [held[i]["video"] for i in range(n_eval)]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Train a tiny streaming decoder on a frozen VAE's latents.")
    p.add_argument("--vae", required=True, help="VAE weights (ours, Wan2.1_VAE.pth or a diffusers folder)")
    p.add_argument("--config", default=None, help="config YAML for data.* (default: causvid.config defaults)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--videos", default=None, help="a folder of videos instead of the config's toy world")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("options", nargs="*", help="decoder options NAME=VALUE (steps, batch_size, lr, channels, ...) "
                   "and config overrides data.KEY=VALUE / vae.size=NAME")
    args = p.parse_args(argv)
    opts = dict(o.split("=", 1) for o in args.options if "=" in o and "." not in o.split("=", 1)[0])
    rest = [o for o in args.options if o.split("=", 1)[0] not in opts]
    bad = [o for o in rest if "=" not in o]
    try:
        if bad:
            raise ValueError(f"expected NAME=VALUE, got {bad}")
        opt = DecoderTrainOptions.from_mapping(opts)
        cfg = load_config(args.config, rest)
        if not os.path.exists(args.vae):
            raise ValueError(f"--vae {args.vae}: no such file or folder")
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from causvid.models.vae import load_vae
    from causvid.models.weights import WeightsError

    try:
        vae = load_vae(args.vae, size=cfg.vae.size)
        train, held = _videos(cfg, args.videos, opt.pool_videos, opt.eval_videos)
    except (WeightsError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = train_decoder(vae, train, held, args.out, opt, device=args.device, progress=not args.no_progress,
                            provenance={"vae": os.path.abspath(args.vae), "command": " ".join(sys.argv)})
    keys = ("psnr_tiny", "psnr_vae", "psnr_tiny_vs_vae", "train_seconds", "parameters")
    print(json.dumps({k: metrics.get(k) for k in keys}), flush=True)
    return 0
