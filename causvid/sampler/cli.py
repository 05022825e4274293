"""The command line of ``scripts/sample.py``: parse, build a :class:`~causvid.sampler.CausalSampler`, stream, write.

Not imported by ``causvid.sampler`` itself (a notebook needs none of it). Options: ``python scripts/sample.py -h``
and docs/sampling.md.
"""

from __future__ import annotations

import argparse
import os
import sys

USAGE = """Sample videos with a trained causal student (scripts/sample.py) over :class:`causvid.sampler.CausalSampler`.

Examples::

    python scripts/sample.py --model runs/toy/dmd/final --prompt "a red circle moving left" --out out.mp4
    python scripts/sample.py --model runs/toy/dmd/final --prompts prompts.txt --num-frames 65 --out videos/ --gif
    python scripts/sample.py --model runs/toy/dmd/final --prompt "a red circle" --switch "4:a blue square" \
        --num-chunks 40 --window 6 --sink 1 --out long.mp4                        # long video, prompt switch
    python scripts/sample.py --model runs/toy/dmd/final --prompt "..." --image first.png --out i2v.mp4
    python scripts/sample.py --model runs/toy/dmd/final --prompt "..." --video in.mp4 --t-start 600 --out v2v.mp4
    python scripts/sample.py --config configs/wan2.1_1.3b/dmd.yaml --dit student.safetensors --prompt "..."

See ``docs/sampling.md``.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--model", help="export folder (model.safetensors + config.yaml), e.g. runs/toy/dmd/final")
    src.add_argument("--config", help="run config YAML (instead of --model), with --dit / --vae / --text")
    src.add_argument("--dit", help="DiT weights (our safetensors or an official Wan folder) for --config")
    src.add_argument("--vae", help="VAE weights (overrides vae.path)")
    src.add_argument("--text", help="text encoder weights (overrides text.path)")
    src.add_argument("--tokenizer", help="tokenizer folder (overrides text.tokenizer_path)")
    src.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (dotlist)")
    src.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    src.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="DiT dtype (default: config)")

    what = p.add_argument_group("what to sample")
    what.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    what.add_argument("--prompts", help="a text file with one prompt per line (a batch)")
    what.add_argument("--switch", action="append", default=[], metavar="CHUNK:PROMPT",
                      help="switch to PROMPT at chunk CHUNK (repeatable); single prompt only")
    what.add_argument("--recache", action="store_true", help="re-encode the cached context under the new prompt")
    what.add_argument("--num-frames", type=int, default=None, help="pixel frames, 1 + 4n (default: config)")
    what.add_argument("--num-chunks", type=int, default=None, help="number of chunks (instead of --num-frames)")
    what.add_argument("--seed", type=int, default=0, help="seed of the first sample (sample b uses seed + b)")
    what.add_argument("--steps", default=None, help="comma-separated timesteps, e.g. 1000,757,522 (default: config)")
    what.add_argument("--window", type=int, default=None, help="rolling KV cache: most recent chunks kept (0: all)")
    what.add_argument("--sink", type=int, default=None, help="rolling KV cache: first chunks kept")
    what.add_argument("--image", help="image-to-video: the first frame (png/jpg)")
    what.add_argument("--video", help="video-to-video: the input video")
    what.add_argument("--t-start", type=float, default=None, help="video-to-video noise level in [0, 1000]")
    what.add_argument("--overlap", action="store_true", help="CausVid's overlap-restart long-video mode")
    what.add_argument("--rollouts", type=int, default=3, help="--overlap: number of rollouts")

    out = p.add_argument_group("output")
    out.add_argument("--out", default="samples/sample.mp4", help="output .mp4 file, or a folder")
    out.add_argument("--gif", action="store_true", help="also write a .gif next to every .mp4")
    out.add_argument("--fps", type=float, default=None, help="frames per second (default: config data.fps)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.config):
        p.error("give exactly one of --model (an export folder) or --config (with --dit)")
    return args


def read_prompt_list(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        from causvid.data.prompts import read_prompts

        prompts += list(read_prompts(args.prompts))
    if not prompts:
        raise SystemExit("no prompt: give --prompt or --prompts")
    return prompts


def build_sampler(args):
    from causvid.sampler import CausalSampler

    kw = {}
    if args.steps:
        kw["steps"] = [float(s) for s in args.steps.split(",")]
    if args.window is not None:
        kw["window_chunks"] = args.window
    if args.sink is not None:
        kw["sink_chunks"] = args.sink
    if args.fps is not None:
        kw["fps"] = args.fps
    if args.model:
        return CausalSampler.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                             overrides=list(args.set), vae_path=args.vae, text_path=args.text,
                                             tokenizer_path=args.tokenizer, **kw)
    from causvid.config import load_config

    cfg = load_config(args.config, list(args.set))
    return CausalSampler.from_config(cfg, dit_path=args.dit, vae_path=args.vae, text_path=args.text,
                                     tokenizer_path=args.tokenizer, device=args.device, dtype=args.dtype, **kw)


def load_image(path: str, height: int, width: int):
    import numpy as np
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    return np.asarray(img)


def load_video(path: str, height: int, width: int):
    import torch
    import torch.nn.functional as F

    from causvid.video_io import read_video

    v = torch.from_numpy(read_video(path))  # [T, H, W, 3] uint8
    t = (v.shape[0] - 1) // 4 * 4 + 1  # 1 + 4n frames
    v = v[:t].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [T, 3, H, W]
    if v.shape[-2:] != (height, width):
        v = F.interpolate(v, size=(height, width), mode="bilinear", align_corners=False).clamp(-1, 1)
    return v


def output_paths(out: str, n: int) -> list[str]:
    if out.endswith((".mp4", ".gif")) and n == 1:
        return [out]
    if out.endswith((".mp4", ".gif")):
        stem, ext = os.path.splitext(out)
        return [f"{stem}_{i:03d}{ext}" for i in range(n)]
    return [os.path.join(out, f"sample_{i:03d}.mp4") for i in range(n)]


def check_args(args) -> None:
    """What can be checked before any weight is read; ValueError naming the option."""
    if args.num_chunks is not None and args.num_chunks < 1:
        raise ValueError(f"--num-chunks must be >= 1, got {args.num_chunks}")
    if args.num_frames is not None and (args.num_frames < 1 or (args.num_frames - 1) % 4):
        raise ValueError(f"--num-frames must be 1 + 4n (>= 1), got {args.num_frames}")
    if args.steps:
        try:
            steps = [float(s) for s in args.steps.split(",")]
        except ValueError:
            raise ValueError(f"--steps must be comma-separated numbers, got {args.steps!r}") from None
        if not all(0.0 <= s <= 1000.0 for s in steps):  # config.schedule.num_train_timesteps (1000 in every config)
            raise ValueError(f"--steps must lie in [0, 1000], got {args.steps}")
    if args.t_start is not None and not 0.0 <= args.t_start <= 1000.0:
        raise ValueError(f"--t-start must lie in [0, 1000], got {args.t_start}")
    for item in args.switch:
        chunk, _, text = item.partition(":")
        if not chunk.strip().isdigit() or not text:
            raise ValueError(f"--switch {item!r}: expected CHUNK:PROMPT, e.g. 4:a blue square")
        if args.num_chunks is not None and int(chunk) >= args.num_chunks:
            raise ValueError(f"--switch {item!r}: chunk {int(chunk)} lies past the stream's end "
                             f"(--num-chunks {args.num_chunks})")
    for opt in ("rollouts", "window", "sink"):
        v = getattr(args, opt)
        if v is not None and v < (1 if opt == "rollouts" else 0):
            raise ValueError(f"--{opt} must be >= {1 if opt == 'rollouts' else 0}, got {v}")


def main(argv=None) -> list[str]:
    """The CLI: bad input is one line on stderr and exit status 2 (arguments are checked before any weight is
    read; what needs the model's config, e.g. a --switch past --num-frames, right after loading)."""
    from causvid.config import ConfigError
    from causvid.models.weights import WeightsError

    args = parse_args(argv)
    try:
        check_args(args)
        return _sample(args)
    except (ValueError, ConfigError, WeightsError, FileNotFoundError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


def _sample(args) -> list[str]:
    import numpy as np

    prompts = read_prompt_list(args)
    if args.switch and len(prompts) != 1:
        raise SystemExit("--switch needs exactly one prompt")
    sampler = build_sampler(args)
    batched = len(prompts) > 1
    spec = prompts if batched else prompts[0]
    if args.switch:
        spec = {0: prompts[0]}
        for item in args.switch:
            chunk, _, text = item.partition(":")
            spec[int(chunk)] = text
    kw = {}
    if args.image:
        kw["image"] = load_image(args.image, sampler.height, sampler.width)
    if args.video:
        if args.t_start is None:
            raise SystemExit("--video needs --t-start (e.g. 600)")
        kw["video"], kw["t_start"] = load_video(args.video, sampler.height, sampler.width), args.t_start
    if args.recache:
        kw["recache"] = True

    if args.overlap:
        chunks_iter, total = sampler.stream_overlap(spec, args.rollouts, args.seed), None
    else:
        num_frames = args.num_frames
        if num_frames is None and args.num_chunks is None and "video" in kw:
            num_frames = kw["video"].shape[0]
        F = sampler.latent_frames(num_frames, args.num_chunks)
        total = len(sampler.layout.chunks(F))
        chunks_iter = sampler.stream(spec, num_chunks=args.num_chunks, num_frames=num_frames, seed=args.seed, **kw)
    if not args.no_progress:
        from tqdm.auto import tqdm

        chunks_iter = tqdm(chunks_iter, total=total, desc="sampling", unit="chunk")
    parts = list(chunks_iter)
    video = np.concatenate(parts, axis=1 if batched else 0)  # [B, T, H, W, 3] or [T, H, W, 3]
    videos = list(video) if batched else [video]
    written = []
    for v, path in zip(videos, output_paths(args.out, len(videos))):
        written.append(sampler.save(v, path))
        if args.gif and path.endswith(".mp4"):
            written.append(sampler.save(v, path[:-4] + ".gif"))
    for w in written:
        print(w)
    return written
