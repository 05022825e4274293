"""Write toy-world videos as mp4 files with captions, and/or a prompt file (docs/toyworld.md §5).

    python scripts/make_toyworld.py --out data/toy_videos --num 1000
    python scripts/make_toyworld.py --prompts data/toy_prompts.txt --num-prompts 256 --seed 1

The folder gets 000000.mp4 ... plus captions.jsonl and metadata.csv, readable by
causvid.data.video.VideoDataset (config: data.source=videos data.path=<folder>).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from causvid.data.prompts import write_prompts
from causvid.data.toyworld import ToyWorld, export_videos, toyworld_prompts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for the videos (omit to write only a prompt file)")
    p.add_argument("--num", type=int, default=100, help="number of videos")
    p.add_argument("--start", type=int, default=0, help="first item index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=33)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--max-objects", type=int, default=2)
    p.add_argument("--textured-prob", type=float, default=0.5)
    p.add_argument("--crf", type=int, default=12, help="x264 quality (lower is better)")
    p.add_argument("--txt", action="store_true", help="also write a same-stem .txt caption per video")
    p.add_argument("--prompts", help="write captions of --num-prompts items (of --seed) to this file")
    p.add_argument("--num-prompts", type=int, default=256)
    args = p.parse_args(argv)
    if not args.out and not args.prompts:
        p.error("nothing to do: give --out and/or --prompts")
    if args.out:
        world = ToyWorld(height=args.height, width=args.width, num_frames=args.num_frames, fps=args.fps,
                         seed=args.seed, num_videos=args.start + args.num, max_objects=args.max_objects,
                         textured_background_prob=args.textured_prob)
        rows = export_videos(world, args.out, range(args.start, args.start + args.num), crf=args.crf,
                             write_txt=args.txt, progress=True)
        print(f"wrote {len(rows)} videos with captions.jsonl and metadata.csv to {args.out}")
    if args.prompts:
        prompts = toyworld_prompts(args.num_prompts, seed=args.seed, max_objects=args.max_objects,
                                   textured_background_prob=args.textured_prob)
        write_prompts(args.prompts, prompts, header=f"toy-world captions, seed {args.seed}")
        print(f"wrote {len(prompts)} prompts to {args.prompts}")


if __name__ == "__main__":
    main()
