"""Reliability of the trainer (docs/reliability.md): atomic checkpoints and crash during save, keep-last-K,
resume modes, non-finite guards, SIGTERM (one and two processes) and a two-machine launch on loopback.

Multi-process tests start real ``accelerate launch --multi_gpu`` runs (two CPU processes on gloo) and
assert the world size each process saw (``world_{rank}.json`` written by tests/helpers_dummy_stage.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from causvid.models.weights import load_safetensors
from causvid.train import checkpoint as ckpt
from causvid.train.trainer import LossLog, NonFiniteError, run
from tests.helpers_dummy_stage import DummyStage
from tests.test_trainer import _fresh_accelerate_state, assert_same_checkpoint, make_cfg, records  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
HELPER = str(REPO / "tests" / "helpers_dummy_stage.py")


def reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def sub_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.pop("CAUSVID_FAULT_SAVE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, port: int, *, machines: int = 1, rank: int = 0) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", HELPER]


def dummy_args(out, **over) -> list[str]:
    base = {"train.max_steps": 6, "train.batch_size": 2, "train.grad_accum": 1, "train.checkpoint_every": 2,
            "train.keep_last": 10, "train.ema_decay": 0.9, "train.optim.lr": 0.01, "dmd.critic_optim.lr": 0.02,
            "train.resume": "auto"}
    base.update(over)
    return [str(out)] + [f"{k}={v}" for k, v in base.items()]


def cfg_from_args(out, **over):
    """The config the helper script builds from ``dummy_args(out, **over)``, for in-process runs."""
    from causvid.config import load_config

    return load_config(None, [f"train.output_dir={out}", *dummy_args(out, **over)[1:]])


def wait_for(pred, timeout: float, proc=None, what: str = "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def n_records(out) -> int:
    path = os.path.join(out, "losses.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.endswith("\n"))


def finish(proc, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"process timed out; output tail:\n{out[-3000:]}") from None
    return proc.returncode, out


# ----------------------------------------------------------------------------------- listing / prune
def _fake_ckpt(root: Path, step: int, complete: bool) -> Path:
    p = root / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "trainer_state.json").write_text(json.dumps({"step": step}))
    if complete:
        (p / ckpt.COMPLETE).write_text(f"step {step} 2026-01-01T00:00:00\n")  # a marker from before manifests
    return p


def test_latest_complete_and_prune_never_remove_the_newest_complete(tmp_path):
    for step, complete in [(1, True), (2, True), (3, True), (4, False)]:
        _fake_ckpt(tmp_path, step, complete)
    (tmp_path / "checkpoint-5.tmp").mkdir()
    assert ckpt.latest_complete(str(tmp_path)) == str(tmp_path / "checkpoint-3")  # 4 has no marker, 5 is a .tmp
    removed = ckpt.prune(str(tmp_path), keep_last=0)  # clamped to 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4"]
    assert str(tmp_path / "checkpoint-1") in removed and str(tmp_path / "checkpoint-5.tmp") in removed
    assert ckpt.latest_complete(str(tmp_path)) == str(tmp_path / "checkpoint-3")


def test_resolve_resume_modes(tmp_path):
    assert ckpt.resolve_resume(str(tmp_path), "auto") is None and ckpt.resolve_resume(str(tmp_path), "never") is None
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path), "latest")
    good, bad = _fake_ckpt(tmp_path, 2, True), _fake_ckpt(tmp_path, 3, False)
    assert ckpt.resolve_resume(str(tmp_path), "auto") == str(good) == ckpt.resolve_resume(str(tmp_path), "latest")
    assert ckpt.resolve_resume(str(tmp_path), "never") is None
    assert ckpt.resolve_resume(str(tmp_path), str(good)) == str(good)
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve_resume(str(tmp_path), str(bad))
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.resolve_resume(str(tmp_path), str(tmp_path / "checkpoint-9"))


# ------------------------------------------------------------------------------------ crash in save
def test_save_that_raises_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    ref_dir, out = tmp_path / "ref", tmp_path / "run"
    over = {"train.max_steps": 6, "train.checkpoint_every": 2, "train.keep_last": 1}
    run(make_cfg(ref_dir, **over), stage=DummyStage(None))
    reset_accelerate()

    monkeypatch.setenv(ckpt.FAULT_ENV, "4:raise")
    with pytest.raises(RuntimeError, match="injected checkpoint fault at step 4"):
        run(make_cfg(out, **over), stage=DummyStage(None))
    assert ckpt.latest_complete(str(out)) == str(out / "checkpoint-2")  # keep_last=1 did not prune it
    assert (out / "checkpoint-4.tmp").is_dir() and not (out / "checkpoint-4.tmp" / ckpt.COMPLETE).exists()
    assert not (out / "checkpoint-4").exists()
    monkeypatch.delenv(ckpt.FAULT_ENV)
    reset_accelerate()

    summary = run(make_cfg(out, **over), stage=DummyStage(None))  # train.resume=auto picks checkpoint-2
    assert summary["step"] == 6
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-6"]  # pruned after success
    assert_same_checkpoint(str(ref_dir / "checkpoint-6"), str(out / "checkpoint-6"))
    assert records(ref_dir) == records(out)


@pytest.mark.slow
def test_process_killed_mid_save_resumes_from_the_newest_complete(tmp_path):
    out, ref_dir = tmp_path / "run", tmp_path / "ref"
    proc = subprocess.run([sys.executable, HELPER, *dummy_args(out)], env=sub_env(CAUSVID_FAULT_SAVE="4:exit"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]  # os._exit in the middle of checkpoint-4
    partial = out / "checkpoint-4.tmp"
    assert (partial / "generator.safetensors").is_file() and not (partial / ckpt.COMPLETE).exists()
    assert ckpt.latest_complete(str(out)) == str(out / "checkpoint-2")
    assert n_records(out) == 4  # steps 0..3 were logged before the crash

    resumed = DummyStage(None)
    summary = run(cfg_from_args(out, **{"train.resume": "latest"}), stage=resumed)
    assert summary["step"] == 6 and resumed.seen[0][0] == 2  # continued from checkpoint-2
    assert [r["step"] for r in records(out)] == list(range(6))  # records 2, 3 replaced, not duplicated
    reset_accelerate()
    run(cfg_from_args(ref_dir), stage=DummyStage(None))
    assert_same_checkpoint(str(ref_dir / "checkpoint-6"), str(out / "checkpoint-6"))
    assert records(ref_dir) == records(out)


# ---------------------------------------------------------------------------------------- non-finite
class SnapshotStage(DummyStage):
    """Records the critic's weights at every critic loss call (= after the previous step's update)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.critic_at: dict[int, torch.Tensor] = {}

    def loss(self, name, batch, models, step, rng):
        if name == "critic":
            self.critic_at.setdefault(step, self.critic[0].weight.detach().clone())
        return super().loss(name, batch, models, step, rng)


def test_nonfinite_updates_are_skipped_counted_and_logged(tmp_path):
    nan = {(2, "critic"): "loss", (3, "critic"): "grad", (2, "generator"): "grad"}
    stage = SnapshotStage(None, nan=nan)
    cfg = make_cfg(tmp_path, **{"train.max_steps": 6, "train.max_consecutive_nonfinite": 3})
    summary = run(cfg, stage=stage)
    # steps 2 and 3 left the critic unchanged; steps 1 and 4 changed it
    assert torch.equal(stage.critic_at[3], stage.critic_at[2]) and torch.equal(stage.critic_at[4], stage.critic_at[3])
    assert not torch.equal(stage.critic_at[2], stage.critic_at[1]) and not torch.equal(stage.critic_at[5], stage.critic_at[4])
    assert summary["nonfinite"] == {"critic": 2, "generator": 1}
    assert summary["updates"] == {"critic": 4, "generator": 2}  # 6 - 2 and 3 - 1
    recs = {r["step"]: r for r in records(tmp_path)}
    assert recs[2]["skipped"] == ["generator", "critic"] and recs[2]["loss/critic"] is None
    assert recs[3]["skipped"] == ["critic"] and recs[3]["grad_norm/critic"] is None and recs[3]["nonfinite/critic"] == 2
    assert "skipped" not in recs[4] and recs[4]["loss/critic"] is not None
    state = ckpt.read_trainer_state(str(tmp_path / "checkpoint-6"))
    assert state["nonfinite_total"] == {"critic": 2, "generator": 1} and state["nonfinite_consecutive"]["critic"] == 0
    opt = ckpt.torch_load(str(tmp_path / "checkpoint-6" / "optimizer_critic.pt"))
    assert all(float(s["step"]) == 4.0 for s in opt["state"].values())  # Adam never stepped on the skipped ones


def test_too_many_nonfinite_in_a_row_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    nan = {(s, "critic"): "loss" for s in range(4, 100)}
    cfg = make_cfg(tmp_path, **{"train.max_steps": 20, "train.checkpoint_every": 4, "train.max_consecutive_nonfinite": 3})
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite updates of 'critic'.*step 6.*checkpoint-4"):
        run(cfg, stage=DummyStage(None, nan=nan))
    assert ckpt.latest_complete(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert [r["step"] for r in records(tmp_path)] == [0, 1, 2, 3, 4, 5]  # the failing step is not logged
    reset_accelerate()
    summary = run(make_cfg(tmp_path, **{"train.max_steps": 6, "train.resume": "latest"}), stage=DummyStage(None))
    assert summary["step"] == 6 and summary["nonfinite"] == {"critic": 0, "generator": 0}


# -------------------------------------------------------------------------------------------- SIGTERM
@pytest.mark.slow
def test_sigterm_single_process_checkpoints_and_exits_0(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, HELPER, *dummy_args(out, **{"train.max_steps": 100000,
                                                                         "train.checkpoint_every": 0})],
                            env=sub_env(DUMMY_SLEEP="0.02"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: n_records(out) >= 3, 120, proc, "3 training steps")
        proc.send_signal(signal.SIGTERM)
        rc, log = finish(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log[-3000:]
    done = json.loads((out / "seen_0.json").read_text())["summary"]
    step = n_records(out)
    assert done["stopped"] and done["step"] == step and 3 <= step < 100000
    assert ckpt.latest_complete(str(out)) == str(out / f"checkpoint-{step}")
    assert ckpt.read_trainer_state(str(out / f"checkpoint-{step}"))["step"] == step
    assert not (out / "final").exists()
    summary = run(cfg_from_args(out, **{"train.max_steps": step + 2, "train.resume": "latest", "train.checkpoint_every": 0}),
                  stage=DummyStage(None))
    assert summary["step"] == step + 2 and [r["step"] for r in records(out)] == list(range(step + 2))


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    cmd = launch(2, free_port()) + dummy_args(out, **{"train.max_steps": 100000, "train.checkpoint_every": 0})
    proc = subprocess.Popen(cmd, env=sub_env(DUMMY_SLEEP="0.02"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: n_records(out) >= 3 and (out / "world_1.json").is_file(), 180, proc, "3 steps on 2 ranks")
        worlds = [json.loads((out / f"world_{r}.json").read_text()) for r in (0, 1)]
        assert [w["world_size"] for w in worlds] == [2, 2] and [w["rank"] for w in worlds] == [0, 1]
        os.kill(worlds[1]["pid"], signal.SIGTERM)  # only rank 1 gets the signal; the ranks must agree
        rc, log = finish(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log[-3000:]
    sums = [json.loads((out / f"seen_{r}.json").read_text())["summary"] for r in (0, 1)]
    step = n_records(out)
    assert all(s["stopped"] and s["step"] == step and s["world_size"] == 2 for s in sums)
    path = out / f"checkpoint-{step}"
    assert ckpt.latest_complete(str(out)) == str(path)
    assert (path / "rng_state_0.pt").is_file() and (path / "rng_state_1.pt").is_file()
    assert ckpt.read_trainer_state(str(path))["world_size"] == 2


# ---------------------------------------------------------------------------------------- multi-node
@pytest.mark.slow
def test_two_machines_on_loopback_match_one_machine_with_two_processes(tmp_path):
    args = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.grad_accum": 2}  # no_sync under DDP
    one = tmp_path / "one"
    rc, log = finish(subprocess.Popen(launch(2, free_port()) + dummy_args(one, **args), env=sub_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), 240)
    assert rc == 0, log[-3000:]

    two, port = tmp_path / "two", free_port()
    procs = [subprocess.Popen(launch(2, port, machines=2, rank=r) + dummy_args(two, **args), env=sub_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        results = [finish(p, 240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, log in results:
        assert rc == 0, log[-3000:]
    for d in (one, two):
        worlds = [json.loads((d / f"world_{r}.json").read_text()) for r in (0, 1)]
        assert [(w["world_size"], w["rank"]) for w in worlds] == [(2, 0), (2, 1)]
    assert len(records(one)) == 4 and records(one) == records(two)
    assert_same_checkpoint(str(one / "checkpoint-4"), str(two / "checkpoint-4"))
    for d in (one, two):  # DDP kept the replicas identical although the ranks saw different data
        digests = [json.loads((d / f"seen_{r}.json").read_text())["digest"] for r in (0, 1)]
        assert digests[0] == digests[1]
    seen = [json.loads((two / f"seen_{r}.json").read_text())["seen"] for r in (0, 1)]
    ids = [set(i for _, _, b in s for i in b) for s in seen]
    assert ids[0] and ids[1] and len(seen[0]) == len(seen[1])  # both ranks trained, on their own data
    first = [b for s, n, b in seen[0] if s == 0 and n == "critic"][0] + [b for s, n, b in seen[1] if s == 0 and n == "critic"][0]
    assert len(set(first)) == 4  # one global window of 2 x 2 distinct items
    g = load_safetensors(str(two / "final" / "generator.safetensors"))
    assert all(torch.isfinite(v).all() for v in g.values())
    assert LossLog.read(str(two / "losses.jsonl"))[0]["step"] == 0
