"""Driver of tests/test_fsdp_setup.py: build a DMD trainer (no step) under the launch it is started with and write,
per rank, what setup left in memory: ``$SETUP_OUT/rank<R>.json``.

    accelerate launch --config_file configs/accelerate/cpu_2proc_fsdp.yaml tests/helpers_fsdp_setup.py \\
        --config configs/toy/dmd.yaml OVERRIDES...

Recorded: the device the trainer moves things to and the one the stage built its networks on; for each network
(generator, critic, teacher) right after ``stage.setup`` its parameters' devices and total size, and after the
trainer has wrapped everything: whether each parameter is a DTensor, its local and full element counts, its device,
and how many of the parameter objects ``stage.setup`` created are still alive anywhere (a whole, unsharded copy);
and, when the frozen teacher starts being sharded, how many of the trainables' setup parameters are still alive (none:
their mapped / whole weights must be released once their shards are made, not held while the next network is sharded);
and whether rank 0's export (``trainer._export_modules``) holds exactly the gathered full weights.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from causvid.config import load_config  # noqa: E402
from causvid.train.trainer import Trainer  # noqa: E402

NETS = ("generator", "critic", "teacher")


def main(argv) -> int:
    assert argv[0] == "--config"
    cfg = load_config(argv[1], list(argv[2:]))
    trainer = Trainer(cfg)
    stage = trainer.stage
    rank = int(os.environ.get("RANK", "0"))
    record: dict = {"rank": rank, "after_setup": {}, "after_build": {}}
    refs: dict[str, list] = {}
    setup = stage.setup

    def recording_setup(cfg, device):
        setup(cfg, device)
        record["setup_device"] = str(device)
        record["weights_device"] = str(stage.weights_device)
        for name in NETS:
            params = list(getattr(stage, name).parameters())
            refs[name] = [weakref.ref(p) for p in params]
            record["after_setup"][name] = {"devices": sorted({str(p.device) for p in params}),
                                           "numel": sum(p.numel() for p in params)}
            del params

    stage.setup = recording_setup
    from causvid.train import parallel

    prepare_frozen = parallel.prepare_frozen

    def recording_prepare_frozen(acc, module):
        if module is getattr(stage, "teacher", None):
            record["alive_when_teacher_sharded"] = {n: sum(r() is not None for r in refs[n]) for n in ("generator", "critic")}
        return prepare_frozen(acc, module)

    parallel.prepare_frozen = recording_prepare_frozen
    trainer.acquire_lock()
    try:
        trainer._build()
    finally:
        trainer.lock.release()
    del stage.setup  # the wrapper holds the stage and the weak references, not the parameters
    parallel.prepare_frozen = prepare_frozen
    gc.collect()
    import torch
    from torch.distributed.tensor import DTensor

    for name in NETS:
        module = trainer.models[name]
        params = []
        for pname, p in module.named_parameters():
            params.append({"name": pname, "dtensor": isinstance(p, DTensor), "device": str(p.device),
                           "local": (p.to_local() if isinstance(p, DTensor) else p).numel(), "full": p.numel()})
        record["after_build"][name] = {"params": params, "alive_from_setup": sum(r() is not None for r in refs[name])}
    record["trainer_device"] = repr(trainer.device)
    # the export's full networks (rank 0; collective): built on meta and given the gathered tensors, equal to them
    from causvid.train.trainer import _export_modules

    exported = _export_modules(trainer.accelerator, trainer.wrapped, trainer.modules)
    record["export"] = {}
    for name, module in trainer.wrapped.items():
        full = {k: parallel.full_tensor(v) for k, v in module.state_dict().items()}  # collective, every rank
        if name in exported:
            got = exported[name].state_dict()
            record["export"][name] = {"same": got.keys() == full.keys() and all(
                torch.equal(got[k], full[k]) for k in full), "meta": sum(v.is_meta for v in got.values())}
    out = os.environ["SETUP_OUT"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    trainer.accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
