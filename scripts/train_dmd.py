#!/usr/bin/env python
"""Train any causvid stage; the entry point for DMD distillation (docs/training.md).

    accelerate launch scripts/train_dmd.py --config configs/toy/dmd.yaml [--resume latest] [key=value ...]

Options: --config FILE (YAML deltas), --resume auto|latest|never|PATH (sets train.resume), --dry-run
(validate the config, resolve the resume decision, print the plan; builds nothing), then dotlist
overrides (``train.max_steps=10 model.size=tiny``). The stage comes from ``train.stage`` (any stage: teacher, causal_teacher, ode, dmd).
Everything else (checkpoints, resume, SIGTERM, logging, multi-GPU / multi-node): docs/training.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from causvid.train.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(allowed_stages=None, description=__doc__.splitlines()[0]))
