"""Randomised ``kill -9`` driver for tests/test_run_safety.py (one interpreter start for many crashes).

    python tests/helpers_crash_driver.py OUT_DIR SEED KILLS [dotlist overrides...]

Imports torch / accelerate once, then repeatedly forks a child that trains the dummy stage
(``tests/helpers_dummy_stage.py``) in ``OUT_DIR`` with ``train.resume=auto`` and SIGKILLs it after a random
delay drawn from ``random.Random(SEED)`` (so kills land in building, training steps, saves and pruning).
Before the random kills, one child per save phase (``write``, ``marker``, ``prune``) runs with
``CAUSVID_FAULT_SAVE=*:exit:<phase>`` and must exit 17 inside that phase. After ``KILLS`` kills a last child
runs to the end. Prints one JSON line: kills, the fault children's exit codes, children that finished on
their own (must be 0) and the last child's exit status.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _child(out_dir: str, overrides: list[str], fault: str = "") -> None:
    if fault:
        os.environ["CAUSVID_FAULT_SAVE"] = f"*:exit:{fault}"
    try:
        from accelerate.state import AcceleratorState, GradientState

        from causvid.config import load_config
        from causvid.train.trainer import run
        from tests.helpers_dummy_stage import DummyStage

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        cfg = load_config(None, [f"train.output_dir={out_dir}", *overrides])
        run(cfg, stage=DummyStage(cfg))
    except BaseException as err:  # noqa: BLE001 - report and leave without running the parent's code
        print(f"child error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)


def main(argv: list[str]) -> int:
    out_dir, seed, kills_wanted, overrides = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    torch.set_num_threads(1)
    import accelerate  # noqa: F401  (warm the imports once, before forking)

    import causvid.train.trainer  # noqa: F401
    import tests.helpers_dummy_stage  # noqa: F401

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo once
    rnd = random.Random(seed)
    faults = {}
    for phase in ("write", "marker", "prune"):
        pid = os.fork()
        if pid == 0:
            _child(out_dir, overrides, phase)
        faults[phase] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    kills, finished_early, delays = 0, 0, []
    while kills < kills_wanted:
        delay = rnd.uniform(0.05, 0.6)
        pid = os.fork()
        if pid == 0:
            _child(out_dir, overrides)
        time.sleep(delay)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            finished_early += 1
            break
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        delays.append(round(delay, 3))
    pid = os.fork()
    if pid == 0:
        _child(out_dir, overrides)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"kills": kills, "faults": faults, "finished_early": finished_early, "last_status": os.waitstatus_to_exitcode(status),
                      "delays": delays}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
