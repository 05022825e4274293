"""Sample videos with a trained causal student: a thin CLI over :class:`causvid.sampler.CausalSampler`.

    python scripts/sample.py --model runs/toy/dmd/final --prompt "a red circle moving left" --out out.mp4

Every option and more examples: ``python scripts/sample.py -h`` (library code: causvid/sampler/cli.py) and
docs/sampling.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from causvid.sampler.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
