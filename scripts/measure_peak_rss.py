"""Run a trainer entry point and record each rank's peak resident memory per phase (docs/memory_plan.md).

    MEASURE_OUT=/tmp/rss accelerate launch --config_file configs/accelerate/cpu_2proc_fsdp.yaml \\
        scripts/measure_peak_rss.py --config configs/wan2.1_1.3b/dmd.yaml ... train.max_steps=2

Writes ``$MEASURE_OUT/rss_rank<R>.json``: ``baseline`` (RSS once torch, accelerate and causvid are imported,
before anything is built), then the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` at the start of
each phase) of ``setup`` (accelerator, networks, sharding, optimizers, data), ``train`` (the optimizer updates)
and ``save`` / ``export``; ``*_above_baseline`` = peak - baseline, what ``causvid.train.memory_plan`` estimates
for a CPU run (``--plan-device cpu``). Linux only.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

# everything a trainer imports before it builds anything is part of the baseline
import accelerate  # noqa: F401
import torch  # noqa: F401

from causvid.models import dit, text, vae, weights  # noqa: F401
from causvid.train import stages  # noqa: F401
from causvid.train import trainer as T


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS


def main() -> int:
    out = os.environ.get("MEASURE_OUT", ".")
    rank = int(os.environ.get("RANK", "0"))
    record: dict = {"rank": rank, "baseline": _status_bytes("VmRSS"), "phases": {}}

    def phase(name: str, fn):
        def wrapped(*a, **kw):
            _reset_peak()
            try:
                return fn(*a, **kw)
            finally:
                peak = _status_bytes("VmHWM")
                record["phases"][name] = max(record["phases"].get(name, 0), peak)
                record.setdefault("probes", []).append(
                    {"after": name, **{k: _status_bytes(k) for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}})
        return wrapped

    def probe(name: str, fn):  # RSS (anonymous / file-backed) after ``fn``, inside a phase: no reset
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            record.setdefault("probes", []).append(
                {"after": name, **{k: _status_bytes(k) for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}})
            return out
        return wrapped

    from causvid.train import parallel

    stages.DMDStage.setup = probe("DMDStage.setup", stages.DMDStage.setup)
    stages.ODEStage.setup = probe("ODEStage.setup", stages.ODEStage.setup)
    T.parallel.prepare_trainable = probe("prepare_trainable", parallel.prepare_trainable)
    T.parallel.prepare_frozen = probe("prepare_frozen", parallel.prepare_frozen)
    T.Trainer._build = phase("setup", T.Trainer._build)
    T.Trainer._update = phase("train", T.Trainer._update)
    T.Trainer.save = phase("save", T.Trainer.save)
    T.Trainer.export = phase("export", T.Trainer.export)

    def write() -> None:
        record.update({f"{k}_above_baseline": v - record["baseline"] for k, v in record["phases"].items()})
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rss_rank{rank}.json"), "w") as f:
            json.dump(record, f, indent=1)

    atexit.register(write)
    return T.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
