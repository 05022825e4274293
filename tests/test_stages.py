"""The four training stages on tiny models: one loss() per stage, update schedules, inputs, CFG, export."""

import os

import pytest
import torch
from torch import nn

from causvid import schedule as S
from causvid.config import ConfigError, load_config
from causvid.data import shards as SH
from causvid.models.dit import WanDiT
from causvid.models.registry import dit_config
from causvid.models.text import ToyTextEncoder
from causvid.models.weights import load_dit, save_dit
from causvid.train.stages import (
    CausalTeacherStage,
    DMDStage,
    ODEStage,
    TeacherStage,
    build_stage,
    draw_chunk_levels,
    gather_levels,
)

STEPS = [1000.0, 750.0, 0.0]
BASE = ["model.size=tiny", "vae.size=tiny", "data.height=16", "data.width=16", "data.num_frames=13",
        "model.chunk_size=2", "dmd.negative_prompt=''", "train.sample_every=0",
        "schedule.denoising_step_list=[1000,750,0]"]  # 4 latent frames [4, 4, 4] in 2 chunks of 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny teacher, a latent-shard folder and an ODE-pair folder with synthetic content."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("stages")
    m = WanDiT(dit_config("tiny"))
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.05)
    save_dit(m, str(root / "teacher.safetensors"))
    enc = ToyTextEncoder(dim=24, text_len=8)
    caps = ["a red circle moving left", "a blue square", "a green diamond moving up", "a red square"]
    emb, lens = enc.encode(caps)
    ctx, ctx_lens = SH.pack_context(emb, lens)
    plan = SH.latent_plan(4, 4, {"text_len": 8, "text_dim": 24})
    SH.prepare_folder(str(root / "lat"), plan)
    SH.write_shard(str(root / "lat"), plan, 0, {"latents": torch.randn(4, 4, 4, 4, 4), "context": ctx,
                                                "context_lens": ctx_lens}, {"captions": caps})
    SH.finalize_index(str(root / "lat"), plan)
    # ODE pairs whose level k is the constant k (so inputs reveal which level each chunk drew)
    states = torch.arange(3.0).reshape(1, 3, 1, 1, 1, 1).expand(4, 3, 4, 4, 4, 4).contiguous()
    oplan = SH.ShardPlan(SH.ODE_KIND, 4, 4, {"step_list": STEPS, "text_len": 8, "text_dim": 24})
    SH.prepare_folder(str(root / "ode"), oplan)
    SH.write_shard(str(root / "ode"), oplan, 0, {"states": states, "context": ctx, "context_lens": ctx_lens},
                   {"captions": caps})
    SH.finalize_index(str(root / "ode"), oplan)
    return root


def _cfg(run, *extra):
    t = str(run / "teacher.safetensors")
    return load_config(overrides=BASE + [f"train.init_from={t}", f"train.teacher_path={t}", "data.source=ode_pairs",
                                         f"data.path={run / 'ode'}", *extra])


def _stage(cfg):
    st = build_stage(cfg)
    st.setup(cfg, "cpu")
    ds = st.dataset()
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    return st, batch, {**st.trainable(), **st.frozen()}


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


def _grads(module):
    return [p.grad for p in module.parameters()]


class RecordingZeroFlow(nn.Module):
    """Stand-in generator (tests only): flow 0, so x0_pred = x_in; records its inputs."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, ctx, layout=None, **kw):
        self.calls.append((x.detach().clone(), t.clone(), layout))
        return x * self.w


def test_teacher_stage_loss_dropout_export(run, tmp_path):
    cfg = _cfg(run, "train.stage=teacher", "data.source=latents", f"data.path={run / 'lat'}", "train.init_from=null")
    st, batch, models = _stage(cfg)
    assert isinstance(st, TeacherStage) and st.name == "teacher" and list(st.trainable()) == ["model"]
    assert st.ema_target() == "model" and st.updates(0) == ["model"]
    loss, logs = st.loss("model", batch, models, 0, _rng())
    loss.backward()
    assert torch.isfinite(loss) and "loss/diffusion" in logs
    assert all(g is not None for g in _grads(st.model))
    # condition dropout: p = 1 -> every context is the negative-prompt embedding; p = 0 -> untouched
    ctx = batch["context"]
    neg = ToyTextEncoder(dim=24, text_len=8).encode([""])[0]
    st.cfg.train.cond_dropout = 1.0
    assert torch.equal(st.drop_condition(ctx, _rng()), neg.expand(2, -1, -1))
    st.cfg.train.cond_dropout = 0.0
    assert torch.equal(st.drop_condition(ctx, _rng()), ctx)
    st.cfg.schedule.shift = 3.0  # t = 1000 shift(u), u ~ U(0, 1), one per video
    t = st.timesteps(_rng(3), 500, 4, "cpu")
    u = torch.rand(500, generator=_rng(3), dtype=torch.float64)
    assert t.shape == (500,) and torch.allclose(t.double(), 1000 * 3 * u / (1 + 2 * u), atol=1e-3)
    st.export({"model": st.model}, str(tmp_path))
    back = load_dit(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), st.model.state_dict().values()))


def test_causal_teacher_per_chunk_t_on_the_fly_data(run):
    with pytest.raises(ConfigError, match="train.init_from"):
        build_stage(_cfg(run, "train.stage=causal_teacher", "data.source=toyworld", "train.init_from=null"))
    st, batch, models = _stage(_cfg(run, "train.stage=causal_teacher", "data.source=toyworld"))
    assert isinstance(st, CausalTeacherStage) and {"vae", "text_encoder"} <= set(st.frozen())
    assert batch["video"].shape == (2, 13, 3, 16, 16)
    t = st.timesteps(_rng(), 64, 4, "cpu")  # [B, F]: one t per chunk of 2 frames
    assert t.shape == (64, 4) and torch.equal(t[:, 0], t[:, 1]) and torch.equal(t[:, 2], t[:, 3])
    assert not torch.equal(t[:, 0], t[:, 2])
    loss, _ = st.loss("model", batch, models, 0, _rng())
    loss.backward()
    assert torch.isfinite(loss) and all(g is not None for g in _grads(st.model))


def test_ode_stage_loss_is_the_hand_computation(run):
    st, batch, models = _stage(_cfg(run, "train.stage=ode"))
    assert isinstance(st, ODEStage) and list(st.trainable()) == ["generator"]
    stub = RecordingZeroFlow()
    for seed in range(6):
        loss, logs = st.loss("generator", batch, {"generator": stub}, 0, _rng(seed))
        x, t, layout = stub.calls[-1]
        assert layout.chunk_size == 2
        level = x[:, :, 0, 0, 0].long()  # [B, F]: which stored level each frame got
        assert torch.equal(t, torch.tensor(STEPS)[level])  # t = the level's value of the step list
        assert torch.equal(level[:, 0], level[:, 1]) and torch.equal(level[:, 2], level[:, 3])  # per chunk
        # zero flow: x0_pred = x_in = level; target = last level (2); t = 0 frames are ignored
        keep = t != 0
        want = ((level[keep] - 2.0) ** 2).mean().item() if keep.any() else 0.0
        assert loss.item() == pytest.approx(want)
    # the real generator: a loss with gradients
    loss, _ = st.loss("generator", batch, models, 0, _rng())
    loss.backward()
    assert torch.isfinite(loss) and all(g is not None for g in _grads(st.generator))


def test_level_helpers():
    g = _rng(1)
    from causvid.models.attention import ChunkLayout

    idx = draw_chunk_levels(g, 5, ChunkLayout(2, independent_first_frame=True), 5, 3)  # chunks [0], [1,2], [3,4]
    assert idx.shape == (5, 5) and torch.equal(idx[:, 1], idx[:, 2]) and torch.equal(idx[:, 3], idx[:, 4])
    states = torch.randn(5, 3, 5, 2, 1, 1)
    x = gather_levels(states, idx)
    for b in range(5):
        for f in range(5):
            assert torch.equal(x[b, f], states[b, idx[b, f], f])


def test_dmd_updates_optimizers_and_gradient_routing(run):
    cfg = _cfg(run, "train.stage=dmd", "dmd.critic_optim.lr=3e-7")
    st, batch, models = _stage(cfg)
    assert isinstance(st, DMDStage) and set(st.trainable()) == {"generator", "critic"}
    assert set(st.frozen()) == {"teacher"} and st.ema_target() == "generator"
    assert [st.updates(s) for s in range(6)] == [["generator", "critic"]] + [["critic"]] * 4 + [["generator", "critic"]]
    assert st.optim_config("critic").lr == 3e-7 and st.optim_config("generator").lr == 2e-6
    assert not any(p.requires_grad for p in st.teacher.parameters())
    loss, logs = st.loss("generator", batch, models, 0, _rng())
    loss.backward()
    assert torch.isfinite(loss) and logs["dmd_grad_norm"] > 0
    assert all(g is not None for g in _grads(st.generator)) and all(g is None for g in _grads(st.critic))
    st.generator.zero_grad(set_to_none=True)
    loss, logs = st.loss("critic", batch, models, 1, _rng())
    loss.backward()
    assert torch.isfinite(loss) and "loss/critic" in logs
    assert all(g is not None for g in _grads(st.critic)) and all(g is None for g in _grads(st.generator))


def test_dmd_real_score_cfg_convention(run):
    st, batch, models = _stage(_cfg(run, "train.stage=dmd", "dmd.real_guidance=4.5"))
    x_t, t, ctx = torch.randn(2, 4, 4, 4, 4), torch.tensor([300.0, 800.0]), batch["context"]
    neg = st._uncond(2, "cpu")
    with torch.no_grad():
        x0c = S.x0_from_flow(x_t, st.teacher(x_t, t, ctx), t)
        x0u = S.x0_from_flow(x_t, st.teacher(x_t, t, neg), t)
        got = st._score_x0(st.teacher, x_t, t, ctx, 4.5)
    assert torch.allclose(got, x0u + 4.5 * (x0c - x0u), atol=1e-5)  # = cond + 3.5 (cond - uncond), official s = 3.5


def test_dmd_data_input_noises_clean_latents_per_chunk(run):
    cfg = _cfg(run, "train.stage=dmd", "data.source=latents", f"data.path={run / 'lat'}")
    st, batch, models = _stage(cfg)
    other = dict(batch, latents=batch["latents"] + 5.0)
    seen = set()
    for seed in range(8):
        ctx = batch["context"]
        x, t = st.generator_inputs(batch, models, ctx, _rng(seed), _rng(100 + seed))
        x2, t2 = st.generator_inputs(other, models, ctx, _rng(seed), _rng(100 + seed))
        assert torch.equal(t, t2) and torch.equal(t[:, 0], t[:, 1]) and torch.equal(t[:, 2], t[:, 3])
        for b in range(2):
            for f in range(4):
                lv = float(t[b, f])
                seen.add(lv)
                if lv == 0:
                    assert torch.equal(x[b, f], batch["latents"][b, f])  # clean context chunk
                elif lv == 1000:
                    assert torch.equal(x[b, f], x2[b, f])  # pure noise: independent of the data
                else:
                    assert torch.allclose(x2[b, f] - x[b, f], torch.full_like(x[b, f], 5.0 * (1 - lv / 1000)))
    assert seen == set(STEPS)
    loss, logs = st.loss("generator", batch, models, 0, _rng())
    assert torch.isfinite(loss) and logs["t_gen_mean"] >= 0


def test_dmd_without_teacher_is_ode_regression(run):
    ode, batch, models = _stage(_cfg(run, "train.stage=ode"))
    st, batch2, models2 = _stage(_cfg(run, "train.stage=dmd", "dmd.teacher=none", "train.teacher_path=null"))
    assert list(st.trainable()) == ["generator"] and st.updates(0) == st.updates(3) == ["generator"]
    assert "teacher" not in st.frozen()
    a, _ = ode.loss("generator", batch, models, 0, _rng(5))
    b, _ = st.loss("generator", batch2, models2, 0, _rng(5))
    assert a.item() == b.item()


def test_dmd_causal_teacher_and_backward_simulation(run, tmp_path):
    st, batch, models = _stage(_cfg(run, "train.stage=dmd", "dmd.teacher=causal"))
    t = st.score_timesteps(_rng(), 16, 4, "cpu")
    assert t.shape == (16, 4) and torch.equal(t[:, 0], t[:, 1]) and (t >= 20).all() and (t <= 980).all()
    for name in ("generator", "critic"):
        loss, _ = st.loss(name, batch, models, 0, _rng())
        assert torch.isfinite(loss)
    st, batch, models = _stage(_cfg(run, "train.stage=dmd", "dmd.generator_input=backward_simulation"))
    assert st.score_layout is None and st.score_timesteps(_rng(), 3, 4, "cpu").shape == (3,)
    levels = set()
    for seed in range(6):
        x, t = st.generator_inputs(batch, models, batch["context"], _rng(seed), _rng(50 + seed))
        assert x.shape == (2, 4, 4, 4, 4) and t.unique().numel() == 1
        levels.add(float(t[0, 0]))
    assert levels == {1000.0, 750.0}  # exit steps drawn from the sampler's steps (no 0)
    for name in ("generator", "critic"):
        loss, _ = st.loss(name, batch, models, 0, _rng())
        loss.backward()
        assert torch.isfinite(loss)
    st.export(st.trainable(), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["critic.safetensors", "model.safetensors"]
    crit = load_dit(str(tmp_path / "critic.safetensors"))
    assert torch.equal(crit.head.head.weight, st.critic.head.head.weight)


def test_config_errors_name_the_key(run):
    with pytest.raises(ConfigError, match="train.teacher_path"):
        build_stage(_cfg(run, "train.stage=dmd", "train.teacher_path=null"))
    with pytest.raises(ConfigError, match="data.source"):
        build_stage(_cfg(run, "train.stage=dmd", "dmd.generator_input=ode", "data.source=latents"))
    with pytest.raises(ConfigError, match="data.source"):
        build_stage(_cfg(run, "train.stage=ode", "data.source=latents"))
    st = build_stage(_cfg(run, "train.stage=ode", "schedule.denoising_step_list=[1000,500,0]"))
    st.setup(st.cfg, "cpu")
    with pytest.raises(ConfigError, match="store the levels"):
        st.dataset()
    st = build_stage(_cfg(run, "train.stage=ode", "model.size=toy", "model.chunk_size=2"))
    with pytest.raises(ConfigError, match="model.size"):
        st.setup(st.cfg, "cpu")


def test_dmd_backward_simulation_from_a_prompt_file(run, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle moving left\na blue square\n")
    st, batch, models = _stage(_cfg(run, "train.stage=dmd", "dmd.generator_input=backward_simulation",
                                    "data.source=prompts", f"data.path={tmp_path / 'prompts.txt'}"))
    assert batch == {"caption": ["a red circle moving left", "a blue square"]}  # text only, no video data
    assert "text_encoder" in st.frozen() and "vae" not in st.frozen()
    loss, logs = st.loss("critic", batch, models, 1, _rng())
    loss.backward()
    assert torch.isfinite(loss) and all(g is not None for g in _grads(st.critic))
