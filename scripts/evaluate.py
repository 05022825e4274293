#!/usr/bin/env python
"""Score a folder of generated videos: CLIP text-video score (and the toy-world metrics for toy videos).

    python scripts/evaluate.py runs/toy/samples --clip-weights weights/clip/open_clip_model.safetensors
    python scripts/evaluate.py runs/toy/samples --no-clip                 # toy metrics only (no CLIP weights)

Library code: causvid/eval/evaluate.py (scoring, outputs) and causvid/eval/captions.py (caption files).
Definitions: docs/evaluation.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from causvid.eval.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
