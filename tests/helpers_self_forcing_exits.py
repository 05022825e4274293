"""``accelerate launch tests/helpers_self_forcing_exits.py --config ... [overrides]``: the DMD trainer in
self-forcing mode, recording on every rank the exit steps of every rollout (and a digest of its text condition,
which differs per rank) to ``<train.output_dir>/exits_rank{RANK}.jsonl`` (tests/test_self_forcing.py)."""

from __future__ import annotations

import json
import os
import sys

from causvid.train import stages
from causvid.train.trainer import main

_sample = stages.DMDStage.self_forcing_sample


def _recording(self, models, ctx, rng, step, name):
    out = _sample(self, models, ctx, rng, step, name)
    path = os.path.join(str(self.cfg.train.output_dir), f"exits_rank{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "name": name, "exits": self.exit_steps(step, name),
                            "captions": round(float(ctx.double().sum()), 6)}) + "\n")
    return out


stages.DMDStage.self_forcing_sample = _recording

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
