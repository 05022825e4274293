"""Sample videos with a trained causal student: a thin CLI over :class:`causvid.sampler.CausalSampler`
(library code: causvid/sampler/cli.py).

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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from causvid.sampler.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
