#!/usr/bin/env python
"""Write random weights in the official Wan2.1 layout, to rehearse a real run on a CPU (docs/wan2.1.md).

    python scripts/make_random_weights.py --arch wan2.1-1.3b --layers 2 --out weights/rehearsal-1.3b
    python scripts/make_random_weights.py --arch wan2.1-1.3b --layers 2 --layout diffusers --out DIR

The folder loads through the same loaders as the official download; only the DiT's and umT5's layer
counts and umT5's vocabulary rows differ from the real files (causvid/models/random_weights.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from causvid.models.random_weights import ARCHS, write_random_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wan2.1-1.3b", choices=ARCHS)
    p.add_argument("--layers", type=int, default=2, help="DiT blocks (the real model: 30 / 40)")
    p.add_argument("--text-layers", type=int, default=None, help="umT5 blocks (default: --layers; the real: 24)")
    p.add_argument("--layout", default="original", choices=("original", "diffusers"), help="DiT and VAE file layout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write")
    args = p.parse_args(argv)
    if args.layers < 1 or (args.text_layers is not None and args.text_layers < 1):
        p.error("--layers and --text-layers must be >= 1")
    t0 = time.time()
    written = write_random_weights(args.out, args.arch, layers=args.layers, text_layers=args.text_layers,
                                   layout=args.layout, seed=args.seed)
    for role, path in written.items():
        print(f"{role:9s} {path} ({os.path.getsize(path) / 2**20:.0f} MiB)")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
