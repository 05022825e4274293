"""The command line of ``scripts/demo.py``: load the model once, then serve the page with uvicorn (docs/demo.md)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Optional

USAGE = """A live streaming demo in the browser: type a prompt, watch it play, change it mid-stream.

    python scripts/demo.py --model runs/quickstart-fast/dmd/final          # then open http://127.0.0.1:7860
    python scripts/demo.py --model runs/quickstart-fast --max-streams 4 --format png

--model takes an export folder (model.safetensors + config.yaml) or a run folder holding final/ or dmd/final/.
See docs/demo.md.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export folder, or a run folder with final/ or dmd/final/")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (dotlist)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="DiT dtype (default: config)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-streams", type=int, default=2, help="streams generating at once (each has a KV cache)")
    p.add_argument("--max-prompt-chars", type=int, default=1000)
    p.add_argument("--lead", type=float, default=1.0, help="seconds generation may run ahead of playback")
    p.add_argument("--record-seconds", type=float, default=600.0, help="seconds kept per tab for the mp4 download")
    p.add_argument("--max-seconds", type=float, default=600.0, help="seconds of video after which a stream ends")
    p.add_argument("--format", default="jpeg", choices=["jpeg", "png"], help="frame encoding on the wire")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (1-100)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be in [1, 65535], got {args.port}")
    if not 1 <= args.quality <= 100:
        p.error(f"--quality must be in [1, 100], got {args.quality}")
    if args.max_streams < 1 or args.max_prompt_chars < 1 or args.lead < 0 or args.record_seconds <= 0 \
            or args.max_seconds <= 0:
        p.error("--max-streams and --max-prompt-chars must be >= 1, --lead >= 0, --record-seconds and "
                "--max-seconds > 0")
    return args


def resolve_model(path: str) -> str:
    """The export folder named by ``path``: itself, or ``path/final``, or ``path/dmd/final``."""
    for cand in (path, os.path.join(path, "final"), os.path.join(path, "dmd", "final")):
        if os.path.isfile(os.path.join(cand, "config.yaml")) and os.path.isfile(os.path.join(cand, "model.safetensors")):
            return cand
    raise SystemExit(f"--model {path}: no export folder (config.yaml + model.safetensors) there, "
                     "nor in its final/ or dmd/final/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_manager(args):
    """Load the model once and start the stream manager."""
    import torch

    from causvid.demo.settings import Limits
    from causvid.demo.streams import StreamManager
    from causvid.sampler import CausalSampler

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    sampler = CausalSampler.from_pretrained(folder, device=args.device, dtype=args.dtype, overrides=list(args.set))
    limits = Limits(max_streams=args.max_streams, max_prompt_chars=args.max_prompt_chars, lead_seconds=args.lead,
                    record_seconds=args.record_seconds, max_stream_seconds=args.max_seconds)
    return StreamManager(sampler, limits, frame_format=args.format, quality=args.quality,
                         model_name=os.path.basename(os.path.abspath(folder)) if folder != args.model
                         else os.path.abspath(folder))


def main(argv: Optional[list] = None) -> int:
    import uvicorn

    from causvid.demo.app import create_app

    args = parse_args(argv)
    if not is_loopback(args.host):
        print(f"demo: serving on {args.host}: anyone who can reach this address can use the model", file=sys.stderr)
    manager = build_manager(args)
    app = create_app(manager)
    print(f"demo: open http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws_max_size=1 << 20)
    return 0
