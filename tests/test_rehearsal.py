"""The "rehearse before you rent" chain of docs/wan2.1.md at Wan2.1-1.3B widths with 2 layers, on CPU:
random official-layout weights -> latents -> ODE pairs (2 processes) -> ODE init -> DMD under FSDP2 on
2 processes with a checkpoint and a resume -> export -> CausalSampler.from_pretrained writing an mp4.

The configs are the real ones (configs/wan2.1_1.3b/*.yaml); the command line overrides only paths, the
resolution, step counts, the layer count and the precision (fp32: bf16 matmuls are ~10x slower on CPUs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_reliability import free_port

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CFG = os.path.join(REPO, "configs", "wan2.1_1.3b")
ACC = os.path.join(REPO, "configs", "accelerate")


def _run(args, *, launch: str | None = None, timeout=420) -> list[dict]:
    """Run a script (under ``accelerate launch --config_file launch`` when given); the JSON lines it printed."""
    cmd = [sys.executable]
    if launch:
        cmd += ["-m", "accelerate.commands.launch", "--config_file", os.path.join(ACC, launch),
                "--main_process_port", str(free_port())]
    env = dict(os.environ, OMP_NUM_THREADS="1" if launch else os.environ.get("OMP_NUM_THREADS", "2"),
               WANDB_MODE="offline", PYTHONPATH=REPO)
    p = subprocess.run(cmd + [os.path.join(REPO, "scripts", args[0]), *args[1:]], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_rehearsal_chain_at_real_widths(tmp_path):
    w, d = tmp_path / "Wan2.1-T2V-1.3B", tmp_path / "data"
    _run(["make_random_weights.py", "--arch", "wan2.1-1.3b", "--layers", "2", "--out", str(w)])
    _run(["make_toyworld.py", "--out", str(d / "videos"), "--num", "2", "--height", "32", "--width", "64",
          "--num-frames", "21", "--prompts", str(d / "prompts.txt"), "--num-prompts", "2"])
    common = [f"train.teacher_path={w}", f"vae.path={w}/Wan2.1_VAE.pth",
              f"text.path={w}/models_t5_umt5-xxl-enc-bf16.pth", f"text.tokenizer_path={w}/google/umt5-xxl",
              "model.num_layers=2", "data.height=32", "data.width=64", "data.num_frames=21"]
    fp32 = ["model.dtype=float32", "train.mixed_precision=no"]
    _run(["encode_latents.py", "--config", f"{CFG}/dmd.yaml", "--source", "videos", "--videos", str(d / "videos"),
          "--out", str(d / "latents"), "--no-progress", *common])
    _run(["build_ode_pairs.py", "--config", f"{CFG}/ode_pairs.yaml", "--out", str(d / "ode"), "--no-progress",
          *common, f"ode_pairs.prompts={d / 'prompts.txt'}", "ode_pairs.num_prompts=2", "ode_pairs.shard_size=1"],
         launch="cpu_2proc.yaml")
    assert json.loads((d / "ode" / "index.json").read_text())["num_items"] == 2
    ode = tmp_path / "ode_init"
    s = _run(["train_dmd.py", "--config", f"{CFG}/ode_init.yaml", *common, *fp32, f"data.path={d / 'ode'}",
              f"train.init_from={w}", f"train.output_dir={ode}", "train.max_steps=1"])[-1]
    assert s["final"] and s["updates"] == {"generator": 1}
    shutil.rmtree(ode / "checkpoint-1")  # ~1.7 GB a stage at these widths: keep the disk peak low
    dmd = tmp_path / "dmd"
    args = ["train_dmd.py", "--config", f"{CFG}/dmd.yaml", *common, *fp32, f"data.path={d / 'latents'}",
            f"train.init_from={ode / 'final'}", f"train.output_dir={dmd}", "train.checkpoint_every=1", "train.keep_last=1"]
    s = _run(args + ["train.max_steps=1"], launch="cpu_2proc_fsdp.yaml")[-1]
    assert (s["distributed"], s["world_size"], s["updates"]) == ("FSDP2", 2, {"generator": 1, "critic": 1})
    assert (dmd / "checkpoint-1" / "COMPLETE").exists()
    s = _run(args + ["train.max_steps=2"], launch="cpu_2proc_fsdp.yaml")[-1]  # resumes from checkpoint-1
    assert (s["distributed"], s["step"], s["updates"]) == ("FSDP2", 2, {"generator": 1, "critic": 2})
    steps = [json.loads(line)["step"] for line in (dmd / "losses.jsonl").read_text().splitlines()]
    assert steps == [0, 1]
    assert (dmd / "final" / "model.safetensors").exists() and (dmd / "final" / "critic.safetensors").exists()
    _run(["sample.py", "--model", str(dmd / "final"), "--prompt", "a red circle moving left", "--num-frames", "21",
          "--out", str(tmp_path / "out.mp4")])
    assert (tmp_path / "out.mp4").stat().st_size > 1000
