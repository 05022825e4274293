"""Where setup puts the networks: a plain ``torch.device("cpu")`` on CPUs (``.to("cpu:0")`` would copy every weight
file), and under FSDP2 every network built on the CPU and sharded before it reaches the device, with no whole copy
left on any rank (tests/helpers_fsdp_setup.py under the 2-process CPU FSDP2 launch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from test_reliability import free_port
from test_stages import BASE, run  # noqa: F401  (the tiny teacher + latent shards fixture)

from causvid.train import parallel

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _acc(device, kind=DistributedType.NO, world=1):
    return SimpleNamespace(device=torch.device(device), distributed_type=kind, num_processes=world)


def test_device_of_a_cpu_launch_is_plain_cpu_and_moves_without_copying():
    acc = _acc("cpu:0", DistributedType.MULTI_CPU, 2)  # what accelerate reports under a multi-process CPU launch
    dev = parallel.device_of(acc)
    assert dev == torch.device("cpu") and dev.index is None
    t = torch.randn(64)
    assert t.to(dev).data_ptr() == t.data_ptr()  # no copy ...
    assert t.to(acc.device).data_ptr() != t.data_ptr()  # ... where accelerate's own device copies
    m = torch.nn.Linear(8, 8)
    ptr = m.weight.data_ptr()
    assert m.to(dev).weight.data_ptr() == ptr
    assert parallel.device_of(_acc("cuda:3", DistributedType.MULTI_GPU, 8)) == torch.device("cuda:3")


def test_weights_device_is_the_cpu_under_fsdp2_only(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert parallel.weights_device(_acc("cuda:1", DistributedType.FSDP, 8)) == torch.device("cpu")
    assert parallel.weights_device(_acc("cuda:1", DistributedType.MULTI_GPU, 8)) == torch.device("cuda:1")
    assert parallel.weights_device(_acc("cuda:0")) == torch.device("cuda:0")
    assert parallel.weights_device(_acc("cpu:0", DistributedType.MULTI_CPU, 2)) == torch.device("cpu")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert parallel.is_fsdp(_acc("cpu:0", DistributedType.MULTI_CPU, 2))  # the CPU FSDP2 rehearsal
    assert parallel.weights_device(_acc("cpu:0", DistributedType.MULTI_CPU, 2)) == torch.device("cpu")


@pytest.mark.slow
def test_fsdp2_setup_holds_only_shards_on_every_rank(run, tmp_path):  # noqa: F811
    t = str(run / "teacher.safetensors")
    out = tmp_path / "records"
    out.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "configs", "accelerate", "cpu_2proc_fsdp.yaml"), "--main_process_port", str(free_port()),
           os.path.join(REPO, "tests", "helpers_fsdp_setup.py"), "--config", os.path.join(REPO, "configs", "toy", "dmd.yaml"),
           *BASE, "vae.path=null", "text.path=null", "data.source=latents", f"data.path={run / 'lat'}",
           f"train.init_from={t}", f"train.teacher_path={t}", f"train.output_dir={tmp_path / 'run'}",
           "train.batch_size=1", "train.mixed_precision=no", "model.dtype=float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=REPO, SETUP_OUT=str(out))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    per_param, whole = {}, {}
    for rec in records:
        assert rec["trainer_device"] == "device(type='cpu')"  # not cpu:0: .to() does not copy the weights
        assert rec["weights_device"] == "cpu"
        # the trainer keeps no reference to a trainable's whole parameters once it is sharded (docs/memory_plan.md)
        assert rec["alive_when_teacher_sharded"] == {"generator": 0, "critic": 0}, rec["alive_when_teacher_sharded"]
        for name in ("generator", "critic", "teacher"):
            built = rec["after_setup"][name]
            assert built["devices"] == ["cpu"], (name, built)  # built on the CPU, before any sharding
            after = rec["after_build"][name]
            assert after["alive_from_setup"] == 0, f"rank {rec['rank']} still holds {name}'s whole parameters"
            params = after["params"]
            assert params and all(q["dtensor"] for q in params), [q["name"] for q in params if not q["dtensor"]][:4]
            assert all(q["device"] == "cpu" for q in params)
            assert sum(q["full"] for q in params) == built["numel"]
            for q in params:  # the two ranks' dim-0 shards of each parameter add up to it, once
                per_param[(name, q["name"])] = per_param.get((name, q["name"]), 0) + q["local"]
                whole[(name, q["name"])] = q["full"]
            local = sum(q["local"] for q in params)
            assert local <= 0.55 * built["numel"], (name, local, built["numel"])  # about half on each rank
    assert per_param == whole
    assert records[0]["export"] == {n: {"same": True, "meta": 0} for n in ("generator", "critic")}  # rank 0 exports
