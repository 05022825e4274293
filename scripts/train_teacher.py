#!/usr/bin/env python
"""Train the bidirectional (or causal) flow-matching teacher (docs/training.md).

    accelerate launch scripts/train_teacher.py --config configs/toy/teacher.yaml [--resume latest] [key=value ...]

Options: --config FILE (YAML deltas), --resume auto|latest|never|PATH (sets train.resume), --dry-run
(validate the config, resolve the resume decision, print the plan; builds nothing), then dotlist
overrides (``train.max_steps=10 model.size=tiny``). The stage comes from ``train.stage`` and must be teacher or causal_teacher.
Everything else (checkpoints, resume, SIGTERM, logging, multi-GPU / multi-node): docs/training.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from causvid.train.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(allowed_stages=("teacher", "causal_teacher"), description=__doc__.splitlines()[0]))
