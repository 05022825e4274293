#!/usr/bin/env python
"""Encode videos (the toy world, or mp4 + captions) into latent shards for teacher training / DMD data.

    python scripts/encode_latents.py --config configs/toy/teacher.yaml [--num-videos 2048] [key=value ...]
    accelerate launch scripts/encode_latents.py --config configs/wan2.1_1.3b/dmd.yaml \
        --source videos --videos data/mixkit
    python scripts/encode_latents.py --config configs/toy/teacher.yaml --dry-run

Writes ``shard-XXXXX.safetensors`` (VAE latents, text embeddings, captions) and, once every shard exists,
``index.json`` into ``--out`` (default: ``data.path`` when ``data.source`` is ``latents``, else
``runs/toy/latents``). Resumable: finished shards are skipped, so re-run the same command after an
interruption. Under ``accelerate launch`` each process writes its own shards (round-robin).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from causvid.config import ConfigError, load_config  # noqa: E402
from causvid.data import shards as SH  # noqa: E402
from causvid.validate import check_count, check_output_dir, check_run  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run config YAML (model/vae/text/data settings)")
    p.add_argument("--out", default=None, help="output folder (default: data.path if data.source=latents)")
    p.add_argument("--source", choices=("toyworld", "videos"), default=None,
                   help="what to encode (default: data.source if it is toyworld/videos, else toyworld)")
    p.add_argument("--videos", default=None, help="video folder / csv / jsonl for --source videos "
                                                  "(default: data.path)")
    p.add_argument("--num-videos", type=int, default=None,
                   help="how many videos (default: 2048 toy-world items, or every video of --videos)")
    p.add_argument("--shard-size", type=int, default=256, help="videos per shard")
    p.add_argument("--batch-size", type=int, default=8, help="videos per VAE call")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype of latents/context")
    p.add_argument("--limit", type=int, default=None, help="write at most this many shards per process, then stop")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what is already done; write nothing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data.num_frames=33")
    return p.parse_args(argv)


def _source(cfg, args):
    src = args.source or (cfg.data.source if cfg.data.source in ("toyworld", "videos") else "toyworld")
    if src == "toyworld":
        from causvid.data.toyworld import toyworld_from_config

        world = toyworld_from_config(cfg.data)
        check_count("--num-videos", args.num_videos, available=len(world))
        n = min(args.num_videos or 2048, len(world))
        t = cfg.data.toyworld
        desc = {"source": "toyworld", "seed": int(t.seed), "max_objects": int(t.max_objects),
                "textured_background_prob": float(t.textured_background_prob)}
        return world, n, desc
    from causvid.train.stages import _video_source

    path = args.videos or cfg.data.path
    if not path:
        raise ConfigError("--source videos needs --videos PATH or config key 'data.path'")
    cfg.data.path = path
    ds = _video_source(cfg)
    check_count("--num-videos", args.num_videos, available=len(ds))
    n = args.num_videos or len(ds)
    return ds, n, {"source": "videos", "path": os.path.abspath(path)}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # denormals slow CPU kernels several-fold (environment.md)
    out = None
    try:
        cfg = load_config(args.config, args.overrides)
        for name in ("--num-videos", "--shard-size", "--batch-size", "--limit"):
            check_count(name, getattr(args, name[2:].replace("-", "_")))
        # --dry-run plans without the weights (they may not exist yet); a real run needs them
        check_run(cfg, paths=() if args.dry_run else ("vae.path", "text.path", "text.tokenizer_path"), output_key=None)
        out = args.out or (cfg.data.path if cfg.data.source == "latents" and cfg.data.path else "runs/toy/latents")
        check_output_dir(out, "--out")
        videos, n, desc = _source(cfg, args)
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    from causvid.models.registry import dit_config
    from causvid.train.stages import VideoCaptionDataset

    d = dit_config(cfg.model.size, cfg.model.num_layers)
    settings = {**desc, "height": int(cfg.data.height), "width": int(cfg.data.width),
                "num_frames": int(cfg.data.num_frames), "fps": float(cfg.data.fps), "vae_size": str(cfg.vae.size),
                "vae_path": os.path.abspath(cfg.vae.path) if cfg.vae.path else None, "text_kind": str(cfg.text.kind),
                "text_path": os.path.abspath(cfg.text.path) if cfg.text.path else None,
                "text_len": int(d.text_len), "text_dim": int(d.text_dim), "dtype": args.dtype}
    plan = SH.latent_plan(n, args.shard_size, settings)
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo for multi-process CPU launches
    if args.dry_run:
        done = [s for s in range(plan.num_shards) if SH.shard_done(out, plan, s)] if os.path.isdir(out) else []
        print(f"output: {out}\nitems: {n} ({desc}), {plan.num_shards} shards of {args.shard_size}; "
              f"done: {len(done)}")
        for r in range(state.num_processes):
            print(f"  rank {r}: shards {plan.shards_for_rank(r, state.num_processes)[:12]}")
        return 0

    if not cfg.vae.path or not os.path.isfile(cfg.vae.path):
        print(f"error: config key 'vae.path' = {cfg.vae.path!r} is not a file (train the toy VAE first with "
              "scripts/train_vae.py, or point it at Wan2.1_VAE.pth)", file=sys.stderr)
        return 2
    if cfg.text.path and not os.path.exists(cfg.text.path):
        print(f"error: config key 'text.path' = {cfg.text.path!r} does not exist", file=sys.stderr)
        return 2
    from causvid.models.text import text_encoder_from_config
    from causvid.models.vae import vae_from_config
    from causvid.train.parallel import device_of

    dev = device_of(state)  # a plain torch.device("cpu") under a CPU launch: .to() does not copy the weights
    vae = vae_from_config(cfg.vae, device=dev).eval()
    enc = text_encoder_from_config(cfg.text, device=dev, dim=d.text_dim, text_len=d.text_len)
    written = SH.encode_latent_shards(out, VideoCaptionDataset(videos), vae, enc, plan, rank=state.process_index,
                                      world=state.num_processes, batch_size=args.batch_size,
                                      dtype=DTYPES[args.dtype], limit=args.limit,
                                      progress=not args.no_progress, device=dev)
    print(f"rank {state.process_index}: wrote shards {written}", flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        index = SH.finalize_index(out, plan)
        if index is None:
            missing = SH.missing_shards(out, plan)
            print(f"{len(missing)} of {plan.num_shards} shards still missing ({missing[:10]}...): re-run to continue")
        else:
            print(f"complete: {index['num_samples']} samples in {len(index['shards'])} shards -> "
                  f"{os.path.join(out, SH.INDEX_NAME)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
