"""Reliability, second pass (docs/reliability.md, guarantees 17-23): preemption through ``accelerate launch``,
one run per output folder, lineage-aware pruning that invalidates before deleting, exact resume with prompts
encoded during training, the pre-flight validation pass, checksums with fallback, and "last good" never
naming a checkpoint with non-finite weights.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from causvid.config import ConfigError, load_config
from causvid.models.weights import load_safetensors
from causvid.train import checkpoint as ckpt
from causvid.train.trainer import NonFiniteError, Trainer, main, run
from tests.helpers_dummy_stage import DummyStage
from tests.test_reliability import (
    HELPER,
    cfg_from_args,
    dummy_args,
    finish,
    free_port,
    launch,
    n_records,
    reset_accelerate,
    sub_env,
    wait_for,
)
from tests.test_trainer import _fresh_accelerate_state, assert_same_checkpoint, make_cfg, records  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def ckpt_names(out) -> list[str]:
    return sorted((p for p in os.listdir(out) if ckpt._CKPT_RE.match(p)), key=lambda p: int(p.split("-")[1]))


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------- 1. signals via launchers
def _launch_one(out) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", HELPER]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,how", [(1, "launcher:SIGTERM"), (1, "group:SIGINT"), (2, "launcher:SIGTERM"),
                                       (2, "group:SIGINT"), (1, "wrapper:SIGTERM"), (2, "wrapper:SIGINT")])
def test_signal_through_accelerate_launch_checkpoints_and_leaves_no_process(tmp_path, nproc, how):
    """A bare launcher's own status is accelerate's (killed / 1); through ``python -m causvid.train.launch`` it is 0."""
    out = tmp_path / "run"
    cmd = (_launch_one(out) if nproc == 1 else launch(2, free_port())) + dummy_args(
        out, **{"train.max_steps": 100000, "train.checkpoint_every": 0})
    if how.startswith("wrapper"):
        cmd = [sys.executable, "-m", "causvid.train.launch", *cmd[3:]]
    log_file = tmp_path / "launch.log"  # a file, not a pipe: an orphan holding a pipe would block the reader
    with open(log_file, "w") as sink:
        proc = subprocess.Popen(cmd, env=sub_env(DUMMY_SLEEP="0.02"), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    worlds, survivors = [], []
    try:
        wait_for(lambda: n_records(out) >= 3 and (out / f"world_{nproc - 1}.json").is_file(), 180, proc, "3 steps")
        worlds = [json.loads((out / f"world_{r}.json").read_text()) for r in range(nproc)]
        assert [w["world_size"] for w in worlds] == [nproc] * nproc
        where, sig = how.split(":")
        if where == "group":
            os.killpg(proc.pid, getattr(signal, sig))
        else:
            proc.send_signal(getattr(signal, sig))
        rc = proc.wait(timeout=120)
        deadline = time.time() + 60
        while time.time() < deadline and not all(gone(w["pid"]) for w in worlds):
            time.sleep(0.1)
    finally:
        survivors = [w["pid"] for w in worlds if not gone(w["pid"])]
        for pid in survivors:  # never leave an orphan behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    log = log_file.read_text()
    assert not survivors, "a training process outlived its launcher"
    step = n_records(out)
    for r in range(nproc):  # every training process returned from run() normally (exit path 0) after the checkpoint
        summary = json.loads((out / f"seen_{r}.json").read_text())["summary"]
        assert summary["stopped"] and summary["step"] == step, log[-3000:]
    assert ckpt.latest_complete(str(out)) == str(out / f"checkpoint-{step}")
    ckpt.verify(str(out / f"checkpoint-{step}"))
    if how.startswith("wrapper"):
        assert rc == 0, log[-3000:]


def test_stop_request_repeated_signals_and_launcher_detection():
    from causvid.train.preemption import StopRequest, under_launcher

    assert under_launcher({"LOCAL_RANK": "0"}) and under_launcher({"ACCELERATE_USE_CPU": "False"})
    assert not under_launcher({"HOME": "/root"})
    direct = StopRequest(launched=False)
    direct.handle(signal.SIGTERM)
    assert direct.signal == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C in a terminal aborts
        direct.handle(signal.SIGINT)
    launched = StopRequest(launched=True)
    launched.handle(signal.SIGINT)
    launched.handle(signal.SIGINT)  # the group's copy and the agent's copy: one request
    launched.handle(signal.SIGTERM)
    assert launched.signal == signal.SIGINT


# ---------------------------------------------------------------------------------------- 2. run lock
def test_second_run_on_a_folder_is_refused_naming_the_holder(tmp_path, capsys):
    from causvid.train.run_lock import RunLock, RunLockError

    out = tmp_path / "run"
    with RunLock(str(out)):
        with pytest.raises(RunLockError, match=rf"in use by another run \(pid {os.getpid()} on host"):
            run(make_cfg(out), stage=DummyStage(None))
        rc = main([f"train.output_dir={out}", "train.stage=teacher", "model.size=tiny", "vae.size=tiny",
                   "data.height=16", "data.width=16", "data.num_frames=13", "model.chunk_size=2"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and "in use by another run" in err
    reset_accelerate()
    assert run(make_cfg(out, **{"train.max_steps": 2}), stage=DummyStage(None))["step"] == 2  # released


def test_a_lock_holder_killed_with_sigkill_leaves_no_stale_lock(tmp_path):
    from causvid.train.run_lock import RunLock, RunLockError

    out = tmp_path / "run"
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from causvid.train.run_lock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=f"pid {proc.pid}"):
            RunLock(str(out)).acquire()
    finally:
        proc.kill()
        proc.wait()
    RunLock(str(out)).acquire().release()


@pytest.mark.slow
def test_two_concurrent_runs_second_refused_first_unharmed(tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    args = {"train.max_steps": 8, "train.checkpoint_every": 2, "train.keep_last": 2}
    first = subprocess.Popen([sys.executable, HELPER, *dummy_args(out, **args)], env=sub_env(DUMMY_SLEEP="0.1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: n_records(out) >= 1, 120, first, "the first run's first step")
        with pytest.raises(RuntimeError, match=f"in use by another run .pid {first.pid}"):  # RunLockError
            run(cfg_from_args(out, **args), stage=DummyStage(None))
        rc, log = finish(first, 120)
    finally:
        if first.poll() is None:
            first.kill()
    assert rc == 0, log[-3000:]
    reset_accelerate()
    run(cfg_from_args(ref, **args), stage=DummyStage(None))
    assert records(out) == records(ref)
    assert_same_checkpoint(str(ref / "checkpoint-8"), str(out / "checkpoint-8"))


# ------------------------------------------------------------------------------- 3. pruning by lineage
def test_resume_never_in_a_used_folder_keeps_its_own_checkpoints(tmp_path):
    out = tmp_path / "run"
    run(make_cfg(out, **{"train.max_steps": 6, "train.checkpoint_every": 2, "train.keep_last": 1}),
        stage=DummyStage(None))
    reset_accelerate()
    run(make_cfg(out, **{"train.max_steps": 4, "train.checkpoint_every": 1, "train.keep_last": 2,
                         "train.resume": "never"}), stage=DummyStage(None))
    assert ckpt_names(out) == ["checkpoint-3", "checkpoint-4", "checkpoint-6"]  # 2 of the new run, the old run's
    old_id, new_id = ckpt.checkpoint_run_id(str(out / "checkpoint-6")), ckpt.checkpoint_run_id(str(out / "checkpoint-4"))
    assert new_id and old_id and new_id != old_id
    assert ckpt.resolve_resume(str(out), "auto") == str(out / "checkpoint-4")  # the current lineage


# ----------------------------------------------------------------------- 4. pruning invalidates first
class Killed(BaseException):
    pass


def test_a_kill_during_pruning_never_leaves_a_marked_partial_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(make_cfg(out, **{"train.max_steps": 4, "train.checkpoint_every": 2, "train.keep_last": 1}),
        stage=DummyStage(None))
    assert ckpt_names(out) == ["checkpoint-4"]
    reset_accelerate()
    real_rmtree = ckpt.shutil.rmtree

    def rmtree_killed_midway(path, ignore_errors=False, **kw):  # deletes one data file, then "the power fails"
        if os.path.basename(path) in ("checkpoint-4", "checkpoint-4.deleting") and os.path.isdir(path):
            victim = sorted(f for f in os.listdir(path) if f != ckpt.COMPLETE)[0]
            os.remove(os.path.join(path, victim))
            raise Killed()
        return real_rmtree(path, ignore_errors=ignore_errors, **kw)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree_killed_midway)
    with pytest.raises(Killed):
        run(make_cfg(out, **{"train.max_steps": 6, "train.checkpoint_every": 2, "train.keep_last": 1}),
            stage=DummyStage(None))
    monkeypatch.undo()
    assert not ckpt.is_complete(str(out / "checkpoint-4"))  # the marker went first
    assert ckpt.latest_complete(str(out)) == str(out / "checkpoint-6")
    with pytest.raises(ckpt.CheckpointError, match="incomplete|not found"):
        ckpt.resolve_resume(str(out), str(out / "checkpoint-4"))
    reset_accelerate()
    run(make_cfg(out, **{"train.max_steps": 8, "train.checkpoint_every": 2, "train.keep_last": 1}),
        stage=DummyStage(None))
    assert [p for p in sorted(os.listdir(out)) if p.startswith("checkpoint")] == ["checkpoint-8"]  # no leftovers


# ------------------------------------------------------------------- 5. text encoding is batch-free
def test_prompt_embedding_does_not_depend_on_the_batch_or_the_cache():
    from causvid.models.text import ToyTextEncoder

    prompts = ["a red circle moving left", "a big blue square moving up and a small green diamond",
               "a yellow triangle", "a red circle"]
    alone = {p: ToyTextEncoder(seed=3).encode([p])[0][0] for p in prompts}
    together, _ = ToyTextEncoder(seed=3).encode(prompts)
    for b, p in enumerate(prompts):
        assert torch.equal(together[b], alone[p]), p


# the toy sizes: their 16-token text length leaves toy-world captions of different lengths (the tiny DiT's 8 tokens
# truncate nearly all of them to one length, which hides batch effects); one frame keeps the VAE cheap
TEACHER = ["train.stage=teacher", "data.source=toyworld", "model.size=toy", "vae.size=toy", "data.height=16",
           "data.width=16", "data.num_frames=1", "model.chunk_size=1", "data.toyworld.num_videos=8",
           "train.batch_size=2", "train.optim.lr=1e-3", "train.cond_dropout=0.2", "dmd.negative_prompt=''",
           "train.sample_every=0", "train.log_every=1", "train.ema_decay=0.9"]


@pytest.mark.slow
def test_toyworld_teacher_resumes_bit_exactly_from_every_checkpoint(tmp_path):
    """40 steps with prompts encoded during training; a resume from every checkpoint k reproduces step k + 1
    (hence, by induction, every later step) exactly: weights, EMA, optimizer state, losses."""
    torch.manual_seed(0)
    ref = tmp_path / "ref"
    n = 40
    cfg = load_config(None, TEACHER + [f"train.output_dir={ref}", f"train.max_steps={n}",
                                       "train.checkpoint_every=1", f"train.keep_last={n}"])
    run(cfg)
    ref_records = {r["step"]: r for r in records(ref)}
    bad = []
    for k in range(1, n):
        reset_accelerate()
        out = tmp_path / f"resume{k}"
        run(load_config(None, TEACHER + [f"train.output_dir={out}", f"train.max_steps={k + 1}",
                                         f"train.resume={ref / f'checkpoint-{k}'}", "train.checkpoint_every=0"]))
        a, b = ref / f"checkpoint-{k + 1}", out / f"checkpoint-{k + 1}"
        for name in ("model", "ema_model"):
            sa, sb = load_safetensors(str(a / f"{name}.safetensors")), load_safetensors(str(b / f"{name}.safetensors"))
            if any(not torch.equal(sa[key], sb[key]) for key in sa):
                bad.append((k, name))
        if records(out)[-1] != ref_records[k]:
            bad.append((k, "loss record"))
    assert not bad, f"resumes that diverged: {bad}"


# ------------------------------------------------------------------------- 6. the pre-flight pass
class _NeverBuilt(AssertionError):
    pass


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail loudly if anything builds a model, a stage's networks or an accelerator."""
    from causvid.train import parallel
    from causvid.train.stages import TeacherStage

    def boom(*a, **k):
        raise _NeverBuilt("something was built before the input was validated")

    monkeypatch.setattr(parallel, "make_accelerator", boom)
    monkeypatch.setattr(TeacherStage, "setup", boom)
    monkeypatch.setattr("causvid.train.stages.load_network", boom)
    monkeypatch.setattr("causvid.models.text.text_encoder_from_config", boom)
    monkeypatch.setattr("causvid.models.vae.vae_from_config", boom)


TINY = ["model.size=tiny", "vae.size=tiny", "data.height=16", "data.width=16", "data.num_frames=13",
        "model.chunk_size=2"]


def _train_cases(tmp):
    a_file = tmp / "a_file"
    a_file.write_text("x")
    missing = str(tmp / "missing.safetensors")
    empty = tmp / "no_videos"
    empty.mkdir(exist_ok=True)
    no_prompts = tmp / "prompts.txt"
    no_prompts.write_text("# only a comment\n\n")
    return [
        (["train.stage=teacher", "data.height=0"], "data.height"),
        (["train.stage=teacher", "data.width=-16"], "data.width"),
        (["train.stage=teacher", "data.width=12"], "data.width"),
        (["train.stage=teacher", "data.fps=0"], "data.fps"),
        (["train.stage=teacher", f"train.init_from={missing}"], "train.init_from"),
        (["train.stage=dmd", f"train.init_from={a_file}", f"train.teacher_path={missing}"], "train.teacher_path"),
        (["train.stage=teacher", f"vae.path={missing}"], "vae.path"),
        (["train.stage=teacher", f"text.path={missing}"], "text.path"),
        (["train.stage=teacher", "data.source=latents", f"data.path={missing}"], "data.path"),
        (["train.stage=teacher", "data.toyworld.num_videos=0"], "data.toyworld.num_videos"),
        (["train.stage=teacher", f"train.output_dir={a_file}"], "train.output_dir"),
        (["train.stage=teacher", f"train.output_dir={a_file}/sub"], "train.output_dir"),
        (["train.stage=teacher", "data.max_bad_fraction=2"], "data.max_bad_fraction"),
        # a data path that exists but is not what data.source reads (found before, not after, the build)
        (["train.stage=teacher", "data.source=latents", f"data.path={tmp}"], "data.path"),
        (["train.stage=teacher", "data.source=videos", f"data.path={empty}"], "data.path"),
        (["train.stage=dmd", f"train.init_from={a_file}", f"train.teacher_path={a_file}", "data.source=prompts",
          f"data.path={no_prompts}"], "data.path"),
    ]


@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_training_inputs_exit_2_with_one_line_before_anything_is_built(tmp_path, capsys, nothing_built,
                                                                           dry_run):
    cases = _train_cases(tmp_path)
    for over, key in cases:
        argv = (["--dry-run"] if dry_run else []) + [f"train.output_dir={tmp_path / 'out'}", *TINY, *over]
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and key in err and err.count("\n") == 0 and err.startswith("error: "), (over, rc, err)


def _script(name: str, argv: list[str], monkeypatch) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}", str(REPO / "scripts" / f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def test_bad_data_script_inputs_exit_2_with_one_line(tmp_path, capsys, monkeypatch, nothing_built):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"")
    out = ["--out", str(tmp_path / "lat")]
    world = ["data.toyworld.num_videos=4"]
    cases = [
        ("encode_latents", [*out, "--num-videos", "0", *TINY], "--num-videos"),
        ("encode_latents", [*out, "--num-videos", "-3", *TINY], "--num-videos"),
        ("encode_latents", [*out, "--num-videos", "10", *TINY, *world], "only 4 available"),
        ("encode_latents", [*out, "--shard-size", "0", *TINY], "--shard-size"),
        ("encode_latents", [*out, "--batch-size", "-1", *TINY], "--batch-size"),
        ("encode_latents", [*out, "--limit", "0", *TINY], "--limit"),
        ("encode_latents", ["--out", str(a_file), *TINY], "--out"),
        ("encode_latents", [*out, *TINY, "data.height=0"], "data.height"),
        ("encode_latents", [*out, *TINY, f"vae.path={tmp_path / 'nope.pth'}"], "vae.path"),
        ("build_ode_pairs", ["--batch-size", "0", *TINY, f"train.teacher_path={teacher}"], "--batch-size"),
        ("build_ode_pairs", ["--limit", "-2", *TINY, f"train.teacher_path={teacher}"], "--limit"),
        ("build_ode_pairs", [*TINY, f"train.teacher_path={teacher}", "ode_pairs.num_prompts=0"],
         "ode_pairs.num_prompts"),
        ("build_ode_pairs", [*TINY, f"train.teacher_path={teacher}", "ode_pairs.shard_size=-1"],
         "ode_pairs.shard_size"),
        ("build_ode_pairs", [*TINY, f"train.teacher_path={tmp_path / 'nope'}"], "train.teacher_path"),
        ("build_ode_pairs", ["--out", str(a_file), *TINY, f"train.teacher_path={teacher}"], "--out"),
    ]
    for name, argv, key in cases:
        rc = _script(name, argv, monkeypatch)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and key in err and err.count("\n") == 0, (name, argv, rc, err)


def test_bad_sampler_arguments_are_refused_by_name():
    from causvid.sampler import CausalSampler
    from tests.test_sampler import STEPS, make_sampler

    s = make_sampler()
    cases = [
        (dict(prompts="a red circle", seed=None), "seed"),
        (dict(prompts="a red circle", seed="3"), "seed"),
        (dict(prompts="a red circle", seed=1.5), "seed"),
        (dict(prompts=[3], seed=0), "prompt"),
        (dict(prompts=["a", None], seed=0), "prompt"),
        (dict(prompts={0: "a red circle", 1: 7}, seed=0), "prompt"),
        (dict(prompts={0: "a red circle", 50: "a blue square"}, seed=0, num_chunks=3), "past the stream's end"),
    ]
    for kw, what in cases:
        with pytest.raises(ValueError, match=what):
            next(iter(s.stream_latents(**kw, **({} if "num_chunks" in kw else {"num_chunks": 2}))))
    for steps in ([1200.0, 500.0, 0.0], [999.0, -5.0]):
        with pytest.raises(ValueError, match=r"steps must lie in \[0, 1000\]"):
            CausalSampler(s.model, s.vae, s.text_encoder, layout=s.layout, steps=steps)
    assert STEPS  # the valid steps of the fixture still build


# ------------------------------------------------------------------------------ 7. checksums, fallback
def _flip_byte(path: Path, at: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    out = tmp_path / "run"
    run(make_cfg(out, **{"train.max_steps": 6, "train.checkpoint_every": 2}), stage=DummyStage(None))
    _flip_byte(out / "checkpoint-6" / "critic.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-6: file critic.safetensors does not match"):
        ckpt.resolve_resume(str(out), str(out / "checkpoint-6"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume(str(out), "latest") == str(out / "checkpoint-4")
    assert "checkpoint-6" in caplog.text and "critic.safetensors" in caplog.text
    (out / "checkpoint-4" / "trainer_state.json").write_text("{garbage")
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume(str(out), "latest") == str(out / "checkpoint-2")
    reset_accelerate()
    summary = run(make_cfg(out, **{"train.max_steps": 6, "train.resume": "latest"}), stage=DummyStage(None))
    assert summary["step"] == 6


def test_garbage_trainer_state_is_a_named_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    run(make_cfg(out, **{"train.max_steps": 2, "train.checkpoint_every": 2}), stage=DummyStage(None))
    reset_accelerate()
    state = out / "checkpoint-2" / "trainer_state.json"
    state.write_text("\x00\x01 not json")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-2.*trainer_state.json"):
        ckpt.read_trainer_state(str(out / "checkpoint-2"))
    rc = main(["--resume", str(out / "checkpoint-2"), f"train.output_dir={out}", "train.stage=teacher", *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "checkpoint-2" in err and err.count("\n") == 0


def test_a_shard_with_a_flipped_bit_is_refused_by_name(tmp_path):
    from causvid.data import shards as SH

    plan = SH.latent_plan(4, 2, {"text_len": 4, "text_dim": 8})
    SH.prepare_folder(str(tmp_path), plan)
    for s in range(2):
        SH.write_shard(str(tmp_path), plan, s, {"latents": torch.randn(2, 1, 4, 2, 2), "context": torch.randn(2, 4, 8),
                                                "context_lens": torch.tensor([4, 4])}, {"captions": ["a", "b"]})
    SH.finalize_index(str(tmp_path), plan)
    assert len(SH.LatentShardDataset(str(tmp_path))) == 4
    _flip_byte(tmp_path / SH.shard_name(1), at=-3)
    ds = SH.LatentShardDataset(str(tmp_path))
    ds[0]  # shard 0 is intact
    with pytest.raises(SH.ShardError, match=r"shard-00001.safetensors does not match its checksum"):
        ds[2]


class PoisonStage(DummyStage):
    """At ``poison_step`` the critic's weights become NaN (a finite-gradient update that overflowed)."""

    poison_step = 3

    def loss(self, name, batch, models, step, rng):
        if name == "critic" and step == self.poison_step:
            with torch.no_grad():
                self.critic[0].weight.fill_(float("nan"))
        return super().loss(name, batch, models, step, rng)


def test_nonfinite_stop_never_names_a_checkpoint_holding_nan_weights_last_good(tmp_path):
    cfg = make_cfg(tmp_path, **{"train.max_steps": 20, "train.checkpoint_every": 1,
                                "train.max_consecutive_nonfinite": 3})
    with pytest.raises(NonFiniteError, match=r"Last good checkpoint: \S*checkpoint-3\b"):
        run(cfg, stage=PoisonStage(None))
    newest = ckpt.list_checkpoints(str(tmp_path))[-1][1]
    assert newest.endswith("checkpoint-5") and ckpt.read_trainer_state(newest)["weights_finite"] is False
    assert ckpt.resolve_resume(str(tmp_path), "latest") == str(tmp_path / "checkpoint-3")


def test_trainer_refuses_nothing_valid(tmp_path):
    """Control: the valid tiny config passes the pre-flight pass (so the bad-input cases are not vacuous)."""
    Trainer(load_config(None, [f"train.output_dir={tmp_path / 'o'}", "train.stage=teacher", *TINY]))
    with pytest.raises(ConfigError, match="data.height"):
        Trainer(load_config(None, [f"train.output_dir={tmp_path / 'o'}", "train.stage=teacher", *TINY,
                                   "data.height=0"]))


# ------------------------------------------------------------------------- randomized kill -9 test
@pytest.mark.slow
def test_random_sigkills_including_saves_and_pruning_end_equal_to_an_uninterrupted_run(tmp_path):
    """>= 20 ``kill -9`` at random moments (fixed seed) of a run that saves and prunes every step, plus one
    process exit injected at each of the three save phases (mid-write, before ``COMPLETE``, mid-prune); the
    run finished afterwards equals one uninterrupted run exactly."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    args = {"train.max_steps": 400, "train.checkpoint_every": 1, "train.keep_last": 2, "train.log_every": 1}
    driver = str(REPO / "tests" / "helpers_crash_driver.py")
    proc = subprocess.run([sys.executable, driver, str(out), "1234", "20", *dummy_args(out, **args)[1:]],
                          env=sub_env(DUMMY_SLEEP="0.002"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["faults"] == {"write": 17, "marker": 17, "prune": 17}, proc.stderr[-3000:]
    assert report["kills"] >= 20 and report["finished_early"] == 0, report
    assert report["last_status"] == 0, proc.stderr[-3000:]
    run(cfg_from_args(ref, **{**args, "train.checkpoint_every": 0}), stage=DummyStage(None))
    assert_same_checkpoint(str(ref / "checkpoint-400"), str(out / "checkpoint-400"))
    assert records(out) == records(ref)
    for name in ("generator", "critic"):
        a, b = load_safetensors(str(ref / "final" / f"{name}.safetensors")), load_safetensors(
            str(out / "final" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt_names(out) == ["checkpoint-399", "checkpoint-400"]  # pruning caught up with every leftover


def test_a_data_path_the_source_does_not_read_is_not_checked(tmp_path):
    """configs/toy/teacher.yaml names a latent folder; with data.source=toyworld it is not read, so a missing one
    must not stop the run (the hand tries of the verification pass found this)."""
    over = [f"train.output_dir={tmp_path / 'o'}", "train.stage=teacher", *TINY, f"data.path={tmp_path / 'nope'}"]
    Trainer(load_config(None, over + ["data.source=toyworld"]))
    with pytest.raises(ConfigError, match="data.path"):
        Trainer(load_config(None, over + ["data.source=latents"]))


def test_an_output_dir_that_cannot_be_created_is_one_line_before_anything_is_built(tmp_path, capsys, nothing_built):
    from causvid.train.run_lock import RunLock, RunLockError

    with pytest.raises(RunLockError, match=r"cannot create run.lock"):
        RunLock("/proc/causvid-no-such-dir/run").acquire()
    rc = main(["train.output_dir=/proc/causvid-no-such-dir/run", "train.stage=teacher", *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "cannot create run.lock" in err, (rc, err)


def test_a_weight_file_that_does_not_read_is_one_line_exit_2(tmp_path, capsys):
    """It exists (so the pre-flight pass lets it through) but holds no weights: found while building, still one line."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    rc = main([f"train.output_dir={tmp_path / 'o'}", "train.stage=teacher", *TINY, f"train.init_from={junk}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("error: ") and "junk.safetensors" in err, (rc, err)


def test_a_damaged_complete_marker_is_an_error_not_a_legacy_marker(tmp_path, caplog):
    out = tmp_path / "run"
    run(make_cfg(out, **{"train.max_steps": 4, "train.checkpoint_every": 2}), stage=DummyStage(None))
    marker = out / "checkpoint-4" / ckpt.COMPLETE
    for damaged in (marker.read_bytes()[:-20], b"\xff\xfe" + marker.read_bytes()):  # cut short; not UTF-8
        marker.write_bytes(damaged)
        with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-4: COMPLETE is corrupt"):
            ckpt.resolve_resume(str(out), str(out / "checkpoint-4"))
        assert ckpt.resolve_resume(str(out), "latest") == str(out / "checkpoint-2")  # the fallback
    marker.write_text("step 4 2025-01-01T00:00:00\n")  # written before manifests: accepted, unverified
    assert ckpt.resolve_resume(str(out), "latest") == str(out / "checkpoint-4")


def test_bad_sample_cli_arguments_are_one_line_exit_2_before_any_weight_is_read(tmp_path, capsys, monkeypatch):
    from causvid.models.weights import WeightsError
    from causvid.sampler import cli

    def boom(args):
        raise AssertionError("weights were read before the arguments were checked")

    monkeypatch.setattr(cli, "build_sampler", boom)
    base = ["--model", str(tmp_path), "--prompt", "a red circle", "--out", str(tmp_path / "s.mp4")]
    cases = [(["--num-chunks", "0"], "--num-chunks"), (["--num-frames", "6"], "--num-frames"),
             (["--steps", "1200,500"], r"--steps must lie in \[0, 1000\]"), (["--steps", "900,x"], "--steps"),
             (["--num-chunks", "3", "--switch", "5:a blue square"], "past the stream's end"),
             (["--switch", "two:a blue square"], "--switch"), (["--t-start", "-1"], "--t-start"),
             (["--overlap", "--rollouts", "0"], "--rollouts"), (["--window", "-2"], "--window")]
    for extra, what in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(base + extra)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.count("\n") == 0 and re.search(what, err), (extra, err)

    def unreadable(args):
        raise WeightsError(f"{args.model} is not an export folder: config.yaml is missing")

    monkeypatch.setattr(cli, "build_sampler", unreadable)  # an error found while loading: one line as well
    with pytest.raises(SystemExit) as exc:
        cli.main(base)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and "not an export folder" in err


def test_training_does_not_check_the_ode_pair_builders_prompt_file(tmp_path):
    """``ode_pairs.prompts`` is read by build_ode_pairs.py only; the Wan configs carry it into every stage, so the
    trainer must not refuse a run whose prompt file is not on this machine (the rehearsal found this)."""
    from causvid.config import ConfigError, load_config
    from causvid.train.trainer import check_train_config

    cfg = load_config(None, ["model.size=tiny", "vae.size=tiny", "data.height=16", "data.width=16",
                             f"train.output_dir={tmp_path / 'run'}", "ode_pairs.prompts=data/not_here.txt"])
    check_train_config(cfg)
    with pytest.raises(ConfigError, match="train.init_from"):
        check_train_config(load_config(None, ["model.size=tiny", "vae.size=tiny", "data.height=16",
                                              "data.width=16", f"train.output_dir={tmp_path / 'run'}",
                                              "train.init_from=not_here.safetensors"]))
