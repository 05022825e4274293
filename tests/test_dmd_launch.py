"""`accelerate launch scripts/train_dmd.py --config configs/toy/dmd.yaml` with two CPU processes (tiny sizes): runs a
few steps, checkpoints, exports, and resumes. ``--multi_gpu`` is what starts two gloo processes on a CPU machine
(``--cpu --num_processes 2`` starts one), so the world size is asserted."""

import json
import os
import subprocess
import sys

import pytest
from test_reliability import free_port
from test_stages import BASE, run  # noqa: F401  (the tiny teacher + latent shards fixture)

REPO = os.path.join(os.path.dirname(__file__), "..")


def _launch(run, out, steps):  # noqa: F811
    t = str(run / "teacher.safetensors")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(REPO, "scripts", "train_dmd.py"), "--config", os.path.join(REPO, "configs", "toy", "dmd.yaml"),
           *BASE, "vae.path=null", "text.path=null", "data.source=latents", f"data.path={run / 'lat'}",
           f"train.init_from={t}", f"train.teacher_path={t}", f"train.output_dir={out}", f"train.max_steps={steps}",
           "train.batch_size=1", "train.checkpoint_every=2", "train.log_every=1", "dmd.update_ratio=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=REPO)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")][-1]
    return summary


@pytest.mark.slow
def test_accelerate_launch_two_processes_checkpoints_and_resumes(run, tmp_path):  # noqa: F811
    out = tmp_path / "dmd"
    s = _launch(run, out, 4)
    assert s["world_size"] == 2 and s["step"] == 4
    assert s["updates"] == {"generator": 2, "critic": 4}  # 1 generator update per 2 critic updates
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "COMPLETE").exists()
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "critic.safetensors").exists()
    s = _launch(run, out, 6)  # the same command with more steps resumes from checkpoint-4
    assert s["world_size"] == 2 and s["step"] == 6
    steps = [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert steps == list(range(6))
