"""LoRA training with peft (``model.lora.*``, causvid/train/lora.py): DMD and ODE runs at the tiny size with
adapters on bases shared with the teacher, adapter-only checkpoints, exact resume, merged and direct exports
(the direct one read by diffusers), config errors."""

import re
import shutil

import pytest
import torch

from causvid.config import ConfigError, load_config
from causvid.data import shards as SH
from causvid.models.dit import WanDiT
from causvid.models.registry import dit_config
from causvid.models.text import ToyTextEncoder
from causvid.models.weights import load_dit, load_safetensors, save_dit
from causvid.train.trainer import run

peft = pytest.importorskip("peft")  # the `interop` extra

from causvid.train import lora  # noqa: E402
from causvid.train.stages import DMDStage, ODEStage, build_stage  # noqa: E402

BASE = ["model.size=tiny", "vae.size=tiny", "data.height=16", "data.width=16", "data.num_frames=13",
        "model.chunk_size=2", "dmd.negative_prompt=''", "train.sample_every=0", "train.log_every=1",
        "schedule.denoising_step_list=[1000,750,0]", "data.source=ode_pairs", "train.checkpoint_every=1",
        "train.keep_last=10", "train.optim.lr=1e-2", "dmd.critic_optim.lr=1e-2", "dmd.update_ratio=2",
        "dmd.generator_input=ode"]
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[self_attn,cross_attn,ffn]"]
TIMESTEPS = (999.0, 500.0, 10.0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny teacher (non-zero head, so gradients reach the blocks) and a folder of random ODE pairs."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lora")
    m = WanDiT(dit_config("tiny"))
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.05)
    save_dit(m, str(root / "base.safetensors"))
    enc = ToyTextEncoder(dim=24, text_len=8)
    emb, lens = enc.encode(["a red circle moving left", "a blue square", "a green diamond moving up", "a red square"])
    ctx, ctx_lens = SH.pack_context(emb, lens)
    plan = SH.ShardPlan(SH.ODE_KIND, 4, 4, {"step_list": [1000.0, 750.0, 0.0], "text_len": 8, "text_dim": 24})
    SH.prepare_folder(str(root / "ode"), plan)
    SH.write_shard(str(root / "ode"), plan, 0, {"states": torch.randn(4, 3, 4, 4, 4, 4), "context": ctx,
                                                "context_lens": ctx_lens}, {"captions": ["a"] * 4})
    SH.finalize_index(str(root / "ode"), plan)
    return root


def cfg_for(data, out, stage="dmd", steps=3, resume="never", init=None, extra=()):
    base = str(data / "base.safetensors")
    return load_config(overrides=BASE + LORA + [
        f"train.stage={stage}", f"train.init_from={init or base}", f"train.teacher_path={base}",
        f"data.path={data / 'ode'}", f"train.max_steps={steps}", f"train.output_dir={out}", f"train.resume={resume}",
        *extra])


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, cfg.in_dim, 4, 6, generator=g)  # [B, F, C, H, W]
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    return x, ctx


def out_of(model, x, ctx, t):
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), t), ctx)  # [B, F, C, H, W]


def adapted(base_file, cfg, adapter_file, role="generator"):
    """The base with the adapter file's A / B loaded into a fresh peft adapter (the model the adapters define)."""
    tensors, meta = lora.read_adapter(str(adapter_file))
    return lora.SharedBase(load_dit(str(base_file)).eval(), str(base_file)).add(role, lora.peft_config(cfg),
                                                                                 init=tensors)


# ---------------------------------------------------------------------------------------------- config
def test_bad_lora_keys_are_config_errors(data, tmp_path):
    for over, key in ((["model.lora.rank=-1"], "model.lora.rank"), (["model.lora.alpha=0"], "model.lora.alpha"),
                      (["model.lora.rank=4", "model.lora.targets=[self_attn,mlp]"], "model.lora.targets"),
                      (["model.lora.rank=4", "model.lora.targets=[]"], "model.lora.targets"),
                      (["model.lora.rank=4", "train.stage=teacher"], "model.lora.rank"),
                      (["model.lora.ranks=4"], "model.lora.ranks")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(overrides=over)
    assert not lora.enabled(load_config(overrides=["model.lora.alpha=3"]))  # rank 0: off
    # DMD shares the teacher's weights: activation checkpointing would recompute with another role's adapter
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        cfg_for(data, tmp_path, extra=["model.gradient_checkpointing=true"])
    cfg_for(data, tmp_path, stage="ode", extra=["model.gradient_checkpointing=true"])  # one adapter, nothing shared


def test_resume_onto_another_base_is_refused():
    cfg = load_config(overrides=["model.size=tiny", *LORA])
    torch.manual_seed(0)
    a = lora.SharedBase(WanDiT(dit_config("tiny")), "a").add("generator", lora.peft_config(cfg))
    b = lora.SharedBase(WanDiT(dit_config("tiny")), "b").add("generator", lora.peft_config(cfg))
    b.load_state_dict(b.state_dict())
    with pytest.raises(ValueError, match="trained on a base with sha256"):
        b.load_state_dict(a.state_dict())


# ------------------------------------------------------------------------------------------------- DMD
def test_lora_dmd_shares_the_teacher_checkpoints_adapters_only_resumes_exactly_and_exports(data, tmp_path, caplog):
    cfg = cfg_for(data, tmp_path / "full", extra=["train.ema_decay=0.5"])
    stage = DMDStage(cfg)
    summary = run(cfg, stage=stage)
    assert summary["updates"] == {"generator": 2, "critic": 3}
    g, c, t = stage.generator, stage.critic, stage.teacher
    assert isinstance(g, lora.LoRANetwork) and g.shared is c.shared is t.shared  # one copy of the teacher's weights
    # the teacher is the untouched base (adapters off): bit-equal to the file
    teacher = load_dit(str(data / "base.safetensors")).eval()
    x, ctx = inputs(teacher.cfg)
    assert torch.equal(out_of(t, x, ctx, 500.0), out_of(teacher, x, ctx, 500.0))
    for role in (g, c):  # both adapters trained (B starts at 0) and the roles differ
        assert max(float(p.detach().abs().max()) for k, p in role.lora.items() if k.endswith("/B")) > 0
    assert (out_of(g, x, ctx, 500.0) - out_of(c, x, ctx, 500.0)).abs().max() > 1e-4

    # checkpoints: adapter tensors only (+ the base's sha256): r (in + out) numbers per adapted layer
    adapted_layers = [k for k in teacher.state_dict() if re.fullmatch(r"blocks\.\d+\.(self_attn|cross_attn|ffn)\.[qkvo02]"
                                                                       r"\.weight", k)]
    n_layers = len(adapted_layers)
    assert n_layers == 10 * dit_config("tiny").num_layers
    n_adapter = sum(4 * sum(teacher.state_dict()[k].shape) for k in adapted_layers)
    for name in ("generator", "critic", "ema_generator"):
        sd = load_safetensors(str(tmp_path / "full" / "checkpoint-3" / f"{name}.safetensors"))
        adapters = sorted(k for k in sd if k != "lora_base_sha256")
        assert all(k.startswith("lora.") and k.endswith(("/A", "/B")) for k in adapters), adapters[:3]
        assert len(adapters) == 2 * n_layers and ("lora_base_sha256" in sd) == (name != "ema_generator")
        assert sum(sd[k].numel() for k in adapters) == n_adapter
    digest = load_safetensors(str(tmp_path / "full" / "checkpoint-3" / "critic.safetensors"))["lora_base_sha256"]
    assert bytes(digest.tolist()).hex() == lora.weights_sha256(teacher)  # the pointer to the base

    # 1 step + resume to 3 = 3 steps in one go (weights, EMA, optimizer states, losses)
    from tests.test_trainer import assert_same_checkpoint, records

    run(cfg_for(data, tmp_path / "split", steps=1, extra=["train.ema_decay=0.5"]))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    run(cfg_for(data, tmp_path / "split", steps=3, resume="latest", extra=["train.ema_decay=0.5"]))
    assert_same_checkpoint(str(tmp_path / "full" / "checkpoint-3"), str(tmp_path / "split" / "checkpoint-3"))
    assert records(tmp_path / "full") == records(tmp_path / "split")

    # final/: merged weights = the base with the exported (EMA) adapters, which are the EMA shadow
    final = tmp_path / "full" / "final"
    ema = load_safetensors(str(tmp_path / "full" / "checkpoint-3" / "ema_generator.safetensors"))
    exported, meta = lora.read_adapter(str(final / "model.lora.safetensors"))
    assert meta["base_sha256"] == lora.weights_sha256(teacher) and meta["rank"] == "4" and float(meta["alpha"]) == 8
    for k, v in ema.items():
        path, ab = k[len("lora."):].rsplit("/", 1)
        leaf = {"A": "lora_down", "B": "lora_up"}[ab]
        assert torch.equal(exported[f"diffusion_model.{path.replace('/', '.')}.{leaf}.weight"], v), k
    for file, adapter in (("model", "model.lora"), ("critic", "critic.lora")):
        want = adapted(data / "base.safetensors", cfg, final / f"{adapter}.safetensors")
        merged = load_dit(str(final / f"{file}.safetensors")).eval()
        for ts in TIMESTEPS:
            torch.testing.assert_close(out_of(merged, x, ctx, ts), out_of(want, x, ctx, ts), rtol=0, atol=1e-5)

    # --format wan merges (it is the merged final model); --format lora emits the trained adapters exactly
    from causvid.export import export, open_source

    export(open_source(str(tmp_path / "full")), str(tmp_path / "wan"), "wan")
    want = adapted(data / "base.safetensors", cfg, final / "model.lora.safetensors")
    torch.testing.assert_close(out_of(load_dit(str(tmp_path / "wan")).eval(), x, ctx, 500.0),
                               out_of(want, x, ctx, 500.0), rtol=0, atol=1e-5)
    diffusers = pytest.importorskip("diffusers")  # noqa: F841
    from tests.test_export import LORA_RULES, diffusers_with_lora, theirs

    files = export(open_source(str(tmp_path / "full")), str(tmp_path / "lora"), "lora")
    assert "causvid_lora_rank4_float32.safetensors" in files
    emitted = load_safetensors(str(tmp_path / "lora" / "causvid_lora_rank4_float32.safetensors"))
    for key, v in emitted.items():  # the written rules of the format; alpha = the trained alpha (scale 8 / 4)
        assert any(re.match(rule, key) for rule in LORA_RULES), key
        assert not key.endswith(".alpha") or (v.dim() == 0 and float(v) == 8.0)
        assert torch.equal(v, exported[key])
    readme = (tmp_path / "lora" / "README.md").read_text()
    assert "trained with peft (rank 4, alpha 8.0)" in readme
    shutil.copy(data / "base.safetensors", tmp_path / "base.safetensors")  # where the helper finds the base
    model = diffusers_with_lora(tmp_path, None, tmp_path / "lora" / "causvid_lora_rank4_float32.safetensors", caplog)
    for ts in TIMESTEPS:
        torch.testing.assert_close(theirs(model, x, ctx, ts), out_of(want, x, ctx, ts), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ ODE -> DMD
def test_lora_ode_run_then_dmd_continues_its_adapters_on_the_teacher(data, tmp_path):
    cfg = cfg_for(data, tmp_path / "ode", stage="ode", steps=2)
    stage = ODEStage(cfg)
    run(cfg, stage=stage)
    final = tmp_path / "ode" / "final"
    sd = load_safetensors(str(tmp_path / "ode" / "checkpoint-2" / "generator.safetensors"))
    assert all(k.startswith("lora.") or k == "lora_base_sha256" for k in sd)
    teacher = load_dit(str(data / "base.safetensors")).eval()
    x, ctx = inputs(teacher.cfg)
    merged = load_dit(str(final / "model.safetensors")).eval()
    assert (out_of(merged, x, ctx, 500.0) - out_of(teacher, x, ctx, 500.0)).abs().max() > 1e-4  # it trained
    for ts in TIMESTEPS:  # the merged export is the trained adapted model (no EMA here)
        torch.testing.assert_close(out_of(merged, x, ctx, ts), out_of(stage.generator, x, ctx, ts), rtol=0, atol=1e-5)

    # DMD from the ODE run: the generator continues the ODE adapters on the teacher's (shared) weights
    dcfg = cfg_for(data, tmp_path / "dmd", init=str(final))
    dmd = build_stage(dcfg)
    dmd.setup(dcfg, "cpu")
    assert dmd.generator.shared is dmd.teacher.shared is dmd.critic.shared
    for k, p in stage.generator.lora.items():
        assert torch.equal(dmd.generator.lora[k], p), k
    torch.testing.assert_close(out_of(dmd.generator, x, ctx, 500.0), out_of(merged, x, ctx, 500.0), rtol=0, atol=1e-5)
    assert torch.equal(out_of(dmd.teacher, x, ctx, 500.0), out_of(teacher, x, ctx, 500.0))

    # a generator initialised from other weights keeps its own frozen base (the critic still shares the teacher's)
    other = tmp_path / "other.safetensors"
    save_dit(merged, str(other))
    dcfg = cfg_for(data, tmp_path / "dmd2", init=str(other))
    dmd = build_stage(dcfg)
    dmd.setup(dcfg, "cpu")
    assert dmd.generator.shared is not dmd.teacher.shared and dmd.critic.shared is dmd.teacher.shared
    assert dmd.generator.shared.sha256 == lora.weights_sha256(merged)
