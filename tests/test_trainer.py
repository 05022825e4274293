"""The generic trainer: data order, exact resume, EMA, gradient accumulation, update ratio, config errors, export.

In-process runs of the tiny :class:`DummyStage` (tests/helpers_dummy_stage.py); a short run of the real
DMD stage at the tiny size when ``causvid.train.stages`` is importable. docs/reliability.md maps each
guarantee to its test.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from omegaconf import OmegaConf

from causvid.config import ConfigError, load_config
from causvid.models.weights import load_safetensors
from causvid.train import checkpoint as ckpt
from causvid.train.data import ResumableLoader, ResumableSampler, collate, epoch_permutation
from causvid.train.ema import EMA
from causvid.train.lr import lr_multiplier
from causvid.train.trainer import LossLog, Trainer, export_config, main, run
from tests.helpers_dummy_stage import DummyDataset, DummyStage


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps a process-wide singleton."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_cfg(out, **over):
    base = {
        "train.output_dir": str(out), "train.max_steps": 7, "train.batch_size": 2, "train.grad_accum": 2,
        "train.checkpoint_every": 3, "train.keep_last": 10, "train.ema_decay": 0.9, "train.ema_start_step": 2,
        "train.optim.lr": 0.01, "train.optim.warmup_steps": 2, "dmd.critic_optim.lr": 0.02, "train.log_every": 1,
        "train.resume": "auto",
    }
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def records(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_time"} for r in LossLog.read(os.path.join(out, "losses.jsonl"))]


def assert_same_tree(a, b, where=""):
    """torch.equal on every tensor of two nested containers (optimizer state dicts)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_checkpoint(p, q):
    for name in ("generator", "critic", "ema_generator"):
        sa, sb = load_safetensors(os.path.join(p, f"{name}.safetensors")), load_safetensors(os.path.join(q, f"{name}.safetensors"))
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"
    for name in ("generator", "critic"):
        assert_same_tree(ckpt.torch_load(os.path.join(p, f"optimizer_{name}.pt")),
                         ckpt.torch_load(os.path.join(q, f"optimizer_{name}.pt")), name)
    sa, sb = ckpt.read_trainer_state(p), ckpt.read_trainer_state(q)
    for key in ("step", "data", "updates", "nonfinite_total", "nonfinite_consecutive"):
        assert sa[key] == sb[key], key


# ------------------------------------------------------------------------------------------ data order
def test_sampler_windows_ranks_and_epochs():
    n, batch, world = 7, 2, 2
    perm0, perm1 = epoch_permutation(n, 5, 0).tolist(), epoch_permutation(n, 5, 1).tolist()
    assert sorted(perm0) == list(range(n)) and perm0 != perm1 and perm0 == epoch_permutation(n, 5, 0).tolist()
    samplers = [ResumableSampler(n, batch, seed=5, rank=r, world_size=world) for r in range(world)]
    got = [[s.next_indices() for _ in range(3)] for s in samplers]
    # window 0 = perm0[0:4], rank r takes positions r::2; the 3 leftover items of epoch 0 are dropped
    assert got[0][0] == [perm0[0], perm0[2]] and got[1][0] == [perm0[1], perm0[3]]
    assert got[0][1] == [perm1[0], perm1[2]] and got[1][1] == [perm1[1], perm1[3]]
    assert samplers[0].state_dict() == {"epoch": 2, "position": 4}
    # a restored cursor continues exactly
    fresh = ResumableSampler(n, batch, seed=5, rank=1, world_size=world)
    fresh.next_indices()
    state = fresh.state_dict()
    again = ResumableSampler(n, batch, seed=5, rank=1, world_size=world)
    again.load_state_dict(state)
    assert [again.next_indices() for _ in range(2)] == got[1][1:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(3, 2, world_size=2)


def test_loader_with_workers_keeps_order_and_cursor():
    ds = DummyDataset(16)
    a = ResumableLoader(ds, ResumableSampler(16, 3, seed=1))
    b = ResumableLoader(ds, ResumableSampler(16, 3, seed=1), num_workers=1)
    ids_a = [a.next()["idx"].tolist() for _ in range(7)]
    ids_b = [b.next()["idx"].tolist() for _ in range(7)]
    assert ids_a == ids_b and a.state_dict() == b.state_dict() == {"epoch": 1, "position": 6}


def test_collate_keeps_ragged_entries_as_lists():
    out = collate([{"v": torch.ones(2), "objs": [1, 2], "c": "a"}, {"v": torch.zeros(2), "objs": [3], "c": "b"}])
    assert out["v"].shape == (2, 2) and out["c"] == ["a", "b"] and out["objs"] == [[1, 2], [3]]


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_hand_computed():
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = EMA(m, decay=0.5, start_step=1)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m, step=0)  # before start_step: copy
    assert ema.shadow["weight"].item() == 3.0
    with torch.no_grad():
        m.weight.fill_(5.0)
    ema.update(m, step=1)  # 0.5 * 3 + 0.5 * 5
    assert ema.shadow["weight"].item() == 4.0 and ema.shadow["weight"].dtype == torch.float32
    target = torch.nn.Linear(1, 1, bias=False)
    ema.copy_to(target)
    assert target.weight.item() == 4.0


def test_adamw_state_roundtrips_with_weights_only(tmp_path):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, betas=(0.8, 0.95), weight_decay=0.1)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    ckpt.atomic_torch_save(opt.state_dict(), str(tmp_path / "o.pt"))
    loaded = ckpt.torch_load(str(tmp_path / "o.pt"))  # weights_only=True
    assert_same_tree(opt.state_dict(), loaded)
    opt2 = torch.optim.AdamW(m.parameters(), lr=0.1)
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)


# --------------------------------------------------------------------------------------- exact resume
def test_exact_resume_equals_uninterrupted_run(tmp_path):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full = DummyStage(make_cfg(full_dir))
    run(make_cfg(full_dir), stage=full)

    first = DummyStage(make_cfg(split_dir, **{"train.max_steps": 4}))
    s1 = run(make_cfg(split_dir, **{"train.max_steps": 4}), stage=first)
    assert s1["step"] == 4 and ckpt.latest_complete(str(split_dir)).endswith("checkpoint-4")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    second = DummyStage(make_cfg(split_dir, **{"train.resume": "latest"}))
    s2 = run(make_cfg(split_dir, **{"train.resume": "latest"}), stage=second)
    assert s2["step"] == 7 and not s2["stopped"]

    assert_same_checkpoint(str(full_dir / "checkpoint-7"), str(split_dir / "checkpoint-7"))
    assert records(full_dir) == records(split_dir)
    assert [r["step"] for r in records(split_dir)] == list(range(7))
    assert full.seen == first.seen + second.seen  # the data order continues exactly
    assert [s for s, _, _ in second.seen][0] == 4
    for name in ("generator", "critic"):  # the exports (EMA generator) agree too
        a, b = (load_safetensors(str(d / "final" / f"{name}.safetensors")) for d in (full_dir, split_dir))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_decay_resumed_from_the_plateau_equals_one_run(tmp_path):
    """Warm-up-stable-decay: a constant-lr run continued with a longer max_steps and a decay equals one run with it."""
    decay = {"train.optim.decay_steps": 4, "train.optim.min_lr_ratio": 0.1, "dmd.critic_optim.decay_steps": 4}
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    run(make_cfg(full_dir, **decay), stage=DummyStage(make_cfg(full_dir, **decay)))
    from accelerate.state import AcceleratorState

    for over in ({"train.max_steps": 3}, {"train.resume": "latest", **decay}):
        AcceleratorState._reset_state(True)
        run(make_cfg(split_dir, **over), stage=DummyStage(make_cfg(split_dir, **over)))
    assert_same_checkpoint(str(full_dir / "checkpoint-7"), str(split_dir / "checkpoint-7"))
    assert records(full_dir) == records(split_dir)
    # hand-computed: warm-up over 2 steps, plateau, cosine over the last 4 of 7 steps (progress (s - 3) / 4)
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    lr = {s: r for s, r in enumerate(records(split_dir))}
    assert [lr[s]["lr/generator"] for s in (0, 2, 4, 6)] == pytest.approx([0.005, 0.01, 0.01 * cos[1], 0.01 * cos[3]])
    cos0 = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # the critic's min_lr_ratio is 0
    assert [lr[s]["lr/critic"] for s in range(7)] == pytest.approx([0.02] * 4 + [0.02 * c for c in cos0[1:]])


def test_losslog_truncates_records_after_the_resume_step(tmp_path):
    path = str(tmp_path / "losses.jsonl")
    with open(path, "w") as f:
        for s in range(6):
            f.write(json.dumps({"step": s, "loss": s}) + "\n")
        f.write('{"step": 6, "lo')  # torn line from a crash
    log = LossLog(path, start_step=3, enabled=True)
    log.append({"step": 3, "loss": 30})
    log.close()
    assert [(r["step"], r["loss"]) for r in LossLog.read(path)] == [(0, 0), (1, 1), (2, 2), (3, 30)]


# ------------------------------------------------------------------------- ratio, accumulation, export
def test_update_ratio_and_counts(tmp_path):
    stage = DummyStage(make_cfg(tmp_path), ratio=3)
    summary = run(make_cfg(tmp_path, **{"train.max_steps": 8, "train.sample_every": 4}), stage=stage)
    assert summary["updates"] == {"generator": 3, "critic": 8}  # steps 0, 3, 6
    assert sorted(os.listdir(tmp_path / "samples")) == ["step-0000004", "step-0000008"]
    assert os.listdir(tmp_path / "samples" / "step-0000004") == ["00_generator_weights.gif"]
    gen_steps = [s for s, name, _ in stage.seen if name == "generator"]
    assert gen_steps == [0, 0, 3, 3, 6, 6]  # two micro-batches per update
    # the updates of one step share its micro-batches (official CausVid, docs/method.md); steps do not
    ids = {(s, name): [] for s, name, _ in stage.seen}
    for s, name, i in stage.seen:
        ids[(s, name)].append(i)
    assert all(ids[(s, "generator")] == ids[(s, "critic")] for s in (0, 3, 6))
    assert ids[(0, "critic")] != ids[(1, "critic")]
    assert ckpt.read_trainer_state(str(tmp_path / "checkpoint-8"))["updates"] == {"generator": 3, "critic": 8}
    # the Adam step counters agree with the number of updates
    opt = ckpt.torch_load(str(tmp_path / "checkpoint-8" / "optimizer_generator.pt"))
    assert all(float(s["step"]) == 3.0 for s in opt["state"].values())


def test_grad_accum_matches_a_larger_batch(tmp_path):
    def train(out, batch, accum):
        stage = DummyStage(None, noise=0.0, global_rng=False)
        cfg = make_cfg(out, **{"train.batch_size": batch, "train.grad_accum": accum, "train.max_steps": 3,
                               "train.ema_decay": 0.0})
        stage.cfg = cfg
        run(cfg, stage=stage)
        return load_safetensors(str(out / "checkpoint-3" / "critic.safetensors"))

    a = train(tmp_path / "a", 4, 1)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    b = train(tmp_path / "b", 2, 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_export_uses_ema_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "vae.safetensors").write_bytes(b"")  # a relative path that exists (paths are checked)
    out = tmp_path / "run"
    cfg = make_cfg(out, **{"vae.path": "rel/vae.safetensors"})
    stage = DummyStage(cfg)
    summary = run(cfg, stage=stage)
    final = out / "final"
    assert summary["final"] == str(final)
    ema = load_safetensors(str(out / "checkpoint-7" / "ema_generator.safetensors"))
    exported = load_safetensors(str(final / "generator.safetensors"))
    trained = load_safetensors(str(out / "checkpoint-7" / "generator.safetensors"))
    assert all(torch.equal(ema[k], exported[k]) for k in ema)
    assert not torch.equal(ema["weight"], trained["weight"])
    assert torch.equal(stage.generator.weight.detach(), trained["weight"])  # trained weights restored after export
    saved = OmegaConf.load(str(final / "config.yaml"))
    assert saved.vae.path == os.path.abspath("rel/vae.safetensors")
    assert export_config(cfg).vae.path == saved.vae.path


# ------------------------------------------------------------------------------------------ bad configs
def test_bad_configs_fail_before_any_model_is_built(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_config(None, ["train.max_stepz=3"])
    stage = DummyStage(make_cfg(tmp_path))
    for over, key in [({"train.log_every": 0}, "train.log_every"), ({"train.ema_decay": 1.5}, "train.ema_decay"),
                      ({"dmd.critic_optim.eps": 0.0}, "dmd.critic_optim.eps"),
                      ({"train.batch_size": 9}, "train.batch_size"),
                      ({"train.optim.min_lr_ratio": 1.5}, "train.optim.min_lr_ratio"),
                      ({"dmd.critic_optim.decay_steps": -1}, "dmd.critic_optim.decay_steps")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            Trainer(make_cfg(tmp_path, **over), stage=stage)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        Trainer(make_cfg(tmp_path, **{"train.resume": str(tmp_path / "checkpoint-9")}), stage=stage)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        Trainer(make_cfg(tmp_path, **{"train.resume": "latest"}), stage=stage)
    assert stage.setup_calls == 0
    # the CLI reports the key and exits 2; a teacher script refuses a dmd config
    assert main(["train.log_every=0", f"train.output_dir={tmp_path}"]) == 2
    assert "train.log_every" in capsys.readouterr().err
    assert main([f"train.output_dir={tmp_path}", "train.stage=dmd"], allowed_stages=("teacher",)) == 2
    assert "train.stage" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ real DMD stage
def test_real_dmd_stage_exact_resume(tmp_path):
    """The real DMD stage (tiny DiT, toy text encoder, backward simulation) under the trainer: 2 steps in one
    go equal 1 step + resume, the update ratio holds and the export folder is complete (interfaces C)."""
    stages = pytest.importorskip("causvid.train.stages", reason="causvid/train/stages.py not written yet")
    from accelerate.state import AcceleratorState

    from causvid.models.dit import WanDiT
    from causvid.models.registry import dit_config
    from causvid.models.weights import save_dit

    torch.manual_seed(0)
    teacher = str(tmp_path / "teacher.safetensors")
    save_dit(WanDiT(dit_config("tiny")), teacher)

    def cfg_for(out, steps, resume):
        return load_config(None, [
            "model.size=tiny", "vae.size=tiny", f"train.teacher_path={teacher}", f"train.init_from={teacher}",
            "train.stage=dmd", "dmd.generator_input=backward_simulation", "data.source=toyworld", "data.num_frames=9",
            "data.height=32", "data.width=32", "dmd.update_ratio=2", "train.ema_decay=0.5", "train.optim.lr=1e-3",
            "dmd.critic_optim.lr=1e-3", f"train.max_steps={steps}", "train.checkpoint_every=1",
            f"train.output_dir={out}", f"train.resume={resume}"])

    full = run(cfg_for(tmp_path / "full", 2, "never"))
    assert isinstance(stages.build_stage(cfg_for(tmp_path / "x", 1, "never")), stages.DMDStage)
    assert full["updates"] == {"generator": 1, "critic": 2}
    AcceleratorState._reset_state(True)
    run(cfg_for(tmp_path / "split", 1, "never"))
    AcceleratorState._reset_state(True)
    run(cfg_for(tmp_path / "split", 2, "latest"))
    a, b = tmp_path / "full" / "checkpoint-2", tmp_path / "split" / "checkpoint-2"
    for name in ("generator", "critic", "ema_generator"):
        sa, sb = load_safetensors(str(a / f"{name}.safetensors")), load_safetensors(str(b / f"{name}.safetensors"))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert records(tmp_path / "full") == records(tmp_path / "split")
    assert {"model.safetensors", "critic.safetensors", "config.yaml"} <= set(os.listdir(tmp_path / "full" / "final"))


# ------------------------------------------------------------------------------- parallel policy
ACCELERATE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "accelerate")


@pytest.mark.parametrize("name,dist,nproc", [("1gpu", "NO", 1), ("8gpu_fsdp", "FSDP", 8), ("2nodes", "FSDP", 16),
                                             ("cpu_2proc", "MULTI_GPU", 2), ("cpu_2proc_fsdp", "FSDP", 2)])
def test_accelerate_configs_parse_and_wrap_the_dit_blocks(name, dist, nproc):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin

    from causvid.models.dit import DiTBlock, WanDiT
    from causvid.models.registry import dit_config

    c = load_config_from_file(os.path.join(ACCELERATE_DIR, f"{name}.yaml"))
    assert c.distributed_type.value == dist and c.num_processes == nproc
    if dist == "FSDP":
        f = c.fsdp_config
        assert f["fsdp_version"] == 2 and c.mixed_precision == ("no" if name.startswith("cpu") else "bf16")
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy=f["fsdp_auto_wrap_policy"].lower(),
            transformer_cls_names_to_wrap=[f["fsdp_transformer_layer_cls_to_wrap"]])
        plugin.set_auto_wrap_policy(WanDiT(dit_config("tiny")))  # raises if the class is not in the model
        assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {DiTBlock}


def test_activation_checkpointing_policy_keeps_gradients():
    from causvid.train.parallel import set_activation_checkpointing

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.GELU()) for _ in range(2))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x.sum()

    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 3)
    net(x).backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    set_activation_checkpointing(net, True)
    assert all(type(b).__name__ == "CheckpointWrapper" for b in net.blocks)
    net(x).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(want, net.parameters()))

    from causvid.models.dit import WanDiT
    from causvid.models.registry import dit_config

    dit = WanDiT(dit_config("tiny"))
    set_activation_checkpointing(dit, True)
    assert dit.gradient_checkpointing is True


def test_lr_multiplier_hand_computed():
    assert [lr_multiplier(s, 10, warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier(9, 10, warmup=4) == 1.0  # decay_steps=0: constant after warm-up
    # decay over the last 4 of 10 steps: start 6, progress (s - 6) / 4, cosine to 0
    assert [lr_multiplier(s, 10, 0, 4) for s in (5, 6, 8, 10)] == pytest.approx([1.0, 1.0, 0.5, 0.0], abs=1e-12)
    # a decay longer than the run starts at the end of the warm-up (the VAE trainer's warm-up + cosine)
    assert lr_multiplier(2, 10, 2, 100, 0.2) == 1.0
    assert lr_multiplier(6, 10, 2, 100, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    # warm-up-stable-decay: the plateau does not depend on the run length, so a longer resumed run agrees before it
    assert all(lr_multiplier(s, 100, 5, 20) == lr_multiplier(s, 200, 5, 20) for s in range(80))


def test_check_sharded_names_what_fsdp2_left_whole():
    from causvid.models.dit import WanDiT
    from causvid.models.registry import dit_config
    from causvid.train.parallel import check_sharded

    with pytest.raises(RuntimeError, match=r"WanDiT \['root', 'blocks.0', 'blocks.1'\] not sharded"):
        check_sharded(WanDiT(dit_config("tiny")))
