"""Self-Forcing (``dmd.generator_input: self_forcing``, causvid/train/rollout.py): the training rollout equals the
inference sampler, gradient reaches the generator only through the exit-step forwards, both cache-gradient rules
equal a hand-built autograd reference, exit steps agree across processes and resume, bad combinations are config
errors before any model is built."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from causvid import schedule as S
from causvid.config import ConfigError, load_config
from causvid.models.attention import ChunkLayout, CrossAttnCache, sdpa
from causvid.models.dit import WanDiT
from causvid.models.registry import dit_config
from causvid.models.weights import load_safetensors, save_dit
from causvid.sampler import causal_sample, causal_sample_chunks, denoise_chunk
from causvid.train.rollout import draw_exit_steps, exit_interval, self_forcing_rollout

REPO = os.path.join(os.path.dirname(__file__), "..")
STEPS = [1000.0, 750.0, 500.0]  # the sampler's list (no final 0)
LAYOUT = ChunkLayout(2)
B, F, C, H, W = 2, 6, 4, 4, 4  # 3 chunks of 2 latent frames


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine the conftest's 2 threads made
    these tests ~15x slower (spin-waiting); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(checkpointing=False, seed=0):
    torch.manual_seed(seed)
    m = WanDiT(dit_config("tiny"), gradient_checkpointing=checkpointing)
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.3)  # a fresh head is zero (flow 0): make every forward matter
    return m


def _inputs(frames=F, seed=1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, frames, C, H, W, generator=g)
    renoise = torch.randn(B, frames, len(STEPS) - 1, C, H, W, generator=g)
    cond = torch.randn(B, 5, 24, generator=g)
    return noise, renoise, cond


def _hand_sampler(model, noise, cond, renoise, exits, layout=LAYOUT):
    """The sampler's own pieces (KVCache, CrossAttnCache, denoise_chunk) with a per-chunk step list."""
    kv = model.new_kv_cache(noise.shape[0], noise.shape[1], model.tokens_per_frame(H, W))
    cc = CrossAttnCache()

    def flow(x, t, a):
        return model(x, t, cond, kv_cache=kv, start_frame=a, cross_cache=cc)

    out = []
    with torch.no_grad():
        for (f0, f1), k in zip(layout.chunks(noise.shape[1]), exits):
            x0 = denoise_chunk(flow, noise[:, f0:f1], STEPS[:k + 1], f0, lambda j, f0=f0, f1=f1: renoise[:, f0:f1, j])
            out.append(x0)
            flow(x0, torch.zeros(noise.shape[0], f1 - f0), f0)
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------ rollout == sampler
@pytest.mark.parametrize("rule", ["straight_through", "detached"])
def test_rollout_frames_equal_the_sampler(rule):
    model = _model()
    noise, renoise, cond = _inputs()
    for k in range(len(STEPS)):  # one exit step for all chunks: the sampler run with the first k + 1 steps
        want = causal_sample(model, noise, cond, layout=LAYOUT, steps=STEPS[:k + 1], renoise=renoise[:, :, :k])
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                got = self_forcing_rollout(model, noise, cond, layout=LAYOUT, steps=STEPS, exit_steps=[k] * 3,
                                           renoise=renoise, cache_grad=rule)
            assert got.requires_grad == grad
            assert (got.detach() - want).abs().max() <= 1e-5, (k, grad)
    exits = [2, 0, 1]  # one exit step per chunk
    with torch.enable_grad():
        got = self_forcing_rollout(model, noise, cond, layout=LAYOUT, steps=STEPS, exit_steps=exits, renoise=renoise,
                                   cache_grad=rule)
    assert (got.detach() - _hand_sampler(model, noise, cond, renoise, exits)).abs().max() <= 1e-5


def test_rollout_equals_the_sampler_with_context_noise_long_rollouts_and_a_rolling_cache():
    model = _model()
    noise, renoise, cond = _inputs(frames=10)  # 5 chunks
    # refresh at context_noise > 0: both draw its noise from the same generator, in chunk order
    want = causal_sample(model, noise, cond, layout=LAYOUT, steps=STEPS, renoise=renoise, context_noise=200.0,
                         generator=torch.Generator().manual_seed(7))
    with torch.enable_grad():
        got = self_forcing_rollout(model, noise, cond, layout=LAYOUT, steps=STEPS, exit_steps=[2] * 5,
                                   renoise=renoise, context_noise=200.0, generator=torch.Generator().manual_seed(7),
                                   grad_frames=4)  # a rollout longer than the clip: grad only for the last 4 frames
    assert (got.detach() - want).abs().max() <= 1e-5
    # a rolling cache (1 sink chunk + 2 recent chunks) as the streaming sampler allocates it
    kv = model.new_kv_cache(B, 1 * 2 + 2 * 2, model.tokens_per_frame(H, W), sink_frames=2)
    with torch.no_grad():
        want = torch.cat([x for _, _, x in causal_sample_chunks(model, noise, cond, layout=LAYOUT, steps=STEPS,
                                                                 renoise=renoise, kv_cache=kv)], dim=1)
        got = self_forcing_rollout(model, noise, cond, layout=LAYOUT, steps=STEPS, exit_steps=[2] * 5,
                                   renoise=renoise, sink_chunks=1, window_chunks=2)
        full = causal_sample(model, noise, cond, layout=LAYOUT, steps=STEPS, renoise=renoise)
    assert (got - want).abs().max() <= 1e-5
    assert (got - full).abs().max() > 1e-3  # the window changed the later chunks: the comparison is not vacuous


# ------------------------------------------------------------------------------ gradient routing (hooks)
class _CallLog:
    """Hooks: which model forward is running, and which forwards' self-attention K projections (layer 0)
    and outputs receive a gradient."""

    def __init__(self, model):
        self.calls, self.k_grad, self.out_grad = [], set(), set()
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)
        model.blocks[0].self_attn.k.register_forward_hook(self._k)

    def _pre(self, mod, args):
        self.calls.append({"t": float(args[1].flatten()[0]), "grad": torch.is_grad_enabled(), "frame": None})

    def _post(self, mod, args, out):
        i = len(self.calls) - 1
        self.calls[i]["out_requires_grad"] = out.requires_grad
        if out.requires_grad:
            out.register_hook(lambda g, i=i: self.out_grad.add(i) if g.abs().sum() > 0 else None)

    def _k(self, mod, args, out):
        i = len(self.calls) - 1
        if out.requires_grad:
            out.register_hook(lambda g, i=i: self.k_grad.add(i) if g.abs().sum() > 0 else None)


@pytest.mark.parametrize("rule", ["straight_through", "detached"])
def test_gradient_reaches_the_generator_only_through_exit_step_forwards(rule):
    model = _model()
    log = _CallLog(model)
    noise, renoise, cond = _inputs()
    exits = [1, 2, 0]
    with torch.enable_grad():
        x = self_forcing_rollout(model, noise, cond, layout=LAYOUT, steps=STEPS, exit_steps=exits, renoise=renoise,
                                 cache_grad=rule)
    # call order: per chunk the steps 0..k, then the refresh (t = 0) except after the last chunk
    expect_t = [1000.0, 750.0, 0.0, 1000.0, 750.0, 500.0, 0.0, 1000.0]
    assert [c["t"] for c in log.calls] == expect_t
    exit_calls = {1, 5, 7}
    assert {i for i, c in enumerate(log.calls) if c["grad"]} == exit_calls
    assert {i for i, c in enumerate(log.calls) if c["out_requires_grad"]} == exit_calls
    (x[:, 4:] * 1.0).sum().backward()  # a loss on the last chunk only
    assert log.out_grad == {7}
    # across chunks only through the cache: the earlier exit-step K/V (straight-through) or nothing (detached)
    assert log.k_grad == ({1, 5, 7} if rule == "straight_through" else {7})
    assert all(p.grad is not None for p in model.parameters())


def test_long_rollout_gives_no_gradient_before_the_last_clip():
    model = _model()
    log = _CallLog(model)
    noise, renoise, cond = _inputs(frames=8)
    with torch.enable_grad():
        x = self_forcing_rollout(model, noise, cond, layout=LAYOUT, steps=STEPS, exit_steps=[0] * 4, renoise=renoise,
                                 grad_frames=4)
    assert [c["grad"] for c in log.calls] == [False, False, False, False, True, False, True]
    x[:, 4:].sum().backward()
    assert log.k_grad == {4, 6}


def test_activation_checkpointing_keeps_the_gradients():
    noise, renoise, cond = _inputs()
    w = torch.randn(B, F, C, H, W, generator=torch.Generator().manual_seed(3))
    grads = []
    for ckpt in (False, True):
        model = _model(checkpointing=ckpt)
        with torch.enable_grad():
            x = self_forcing_rollout(model, noise, cond, layout=LAYOUT, steps=STEPS, exit_steps=[1, 2, 0],
                                     renoise=renoise)
            (x * w).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ cache-gradient rules vs a hand reference
class _LeafCache:
    """Hand-built reference: every committed chunk's K/V is a *leaf* (the refresh values); the exit-step K/V are
    kept so a caller can push the leaves' gradients into them by hand. Same kv_cache protocol as the model's."""

    def __init__(self):
        self.leaves, self.exit_kv, self.record = [], [], None

    def plan(self, start_frame, n):
        self.record = {}
        self.attend = functools.partial(self._attend, list(self.leaves), self.record)

    @staticmethod
    def _attend(prefix, record, layer, q, k, v):
        record[layer] = (k, v)
        keys = torch.cat([p[layer][0] for p in prefix] + [k], dim=1)
        values = torch.cat([p[layer][1] for p in prefix] + [v], dim=1)
        return sdpa(q, keys, values)


def _reference_grads(model, noise, cond, renoise, exits, w, rule):
    """Rollout with leaf caches, loss.backward(), then (straight-through) for chunks last-to-first: backward the
    chunk's exit-step K/V with its leaves' gradients (which by then include every later chunk's contribution)."""
    cache = _LeafCache()
    chunks = LAYOUT.chunks(noise.shape[1])
    out = []
    for c, ((f0, f1), k) in enumerate(zip(chunks, exits)):
        n = f1 - f0
        x = noise[:, f0:f1]
        for j in range(k + 1):
            t = torch.full((B, n), STEPS[j])
            with torch.set_grad_enabled(j == k):
                x0 = S.x0_from_flow(x, model(x, t, cond, kv_cache=cache, start_frame=f0), t)
            if j < k:
                x = S.add_noise(x0, renoise[:, f0:f1, j], torch.full((B, n), STEPS[j + 1]))
        cache.exit_kv.append(cache.record)
        out.append(x0)
        if c + 1 < len(chunks):
            with torch.no_grad():
                model(x0, torch.zeros(B, n), cond, kv_cache=cache, start_frame=f0)
            cache.leaves.append({i: (kk.detach().clone().requires_grad_(True), vv.detach().clone().requires_grad_(True))
                                 for i, (kk, vv) in cache.record.items()})
    loss = (torch.cat(out, dim=1) * w).sum()
    loss.backward(retain_graph=True)
    if rule == "straight_through":
        for c in range(len(chunks) - 2, -1, -1):
            ex, lv = cache.exit_kv[c], cache.leaves[c]
            tensors = [t for i in ex for t in ex[i]]
            grads = [g for i in ex for g in (lv[i][0].grad, lv[i][1].grad)]
            torch.autograd.backward(tensors, grads, retain_graph=True)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_cache_gradient_rules_equal_a_hand_built_autograd_reference():
    noise, renoise, cond = _inputs()
    w = torch.randn(B, F, C, H, W, generator=torch.Generator().manual_seed(3))
    exits = [1, 2, 0]
    got = {}
    for rule in ("straight_through", "detached"):
        model = _model()
        with torch.enable_grad():
            x = self_forcing_rollout(model, noise, cond, layout=LAYOUT, steps=STEPS, exit_steps=exits,
                                     renoise=renoise, cache_grad=rule)
            (x * w).sum().backward()
        got[rule] = torch.cat([p.grad.flatten() for p in model.parameters()])
        ref = _reference_grads(_model(), noise, cond, renoise, exits, w, rule)
        err = (got[rule] - ref).norm() / ref.norm()
        assert err < 1e-5, (rule, float(err))
    diff = (got["straight_through"] - got["detached"]).norm() / got["detached"].norm()
    assert diff > 1e-3  # the two rules differ: each comparison above can tell them apart


# ----------------------------------------------------------------------------------- exit steps, ranges
def test_exit_steps_are_a_function_of_seed_step_and_update():
    a = [draw_exit_steps(0, s, "generator", 7, 4) for s in range(40)]
    assert a == [draw_exit_steps(0, s, "generator", 7, 4) for s in range(40)]
    assert all(len(set(e)) == 1 for e in a) and {e[0] for e in a} == {0, 1, 2, 3}
    assert a != [draw_exit_steps(0, s, "critic", 7, 4) for s in range(40)]
    per_chunk = draw_exit_steps(0, 3, "generator", 7, 4, same_step_across_blocks=False)
    assert len(per_chunk) == 7 and len(set(per_chunk)) > 1
    assert draw_exit_steps(0, 3, "generator", 7, 4, last_step_only=True) == [3] * 7


def test_exit_interval_brackets_the_exit_step():
    steps = S.warp_denoising_steps([1000, 750, 500, 250], 5.0)  # [1000, 937.5, 833.3, 625]
    assert [exit_interval(steps, k, 5.0) for k in range(4)] == [(750, 1000), (500, 750), (250, 500), (0, 250)]
    for k in range(4):
        lo, hi = exit_interval(steps, k, 5.0)
        t = S.sample_training_timesteps((2000,), 5.0, 0.0, 1.0, u_range=(lo, hi),
                                        generator=torch.Generator().manual_seed(k))
        nxt = steps[k + 1] if k + 1 < 4 else 0.0
        assert t.min() >= nxt - 1e-3 and t.max() <= steps[k] + 1e-3


# ------------------------------------------------------------------------------------------ the DMD stage
BASE = ["model.size=tiny", "vae.size=tiny", "data.height=16", "data.width=16", "data.num_frames=13",
        "model.chunk_size=2", "dmd.negative_prompt=''", "train.sample_every=0", "text.path=null", "vae.path=null",
        "schedule.denoising_step_list=[1000,750,500,0]", "train.stage=dmd", "dmd.generator_input=self_forcing",
        "data.source=toyworld", "data.toyworld.num_videos=16"]  # 4 latent frames in 2 chunks of 2


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("sf") / "teacher.safetensors"
    save_dit(_model(seed=4), str(path))
    return str(path)


def _cfg(teacher, *extra):
    return load_config(overrides=BASE + [f"train.init_from={teacher}", f"train.teacher_path={teacher}", *extra])


def test_dmd_stage_self_forcing_losses_and_timestep_restriction(teacher):
    from causvid.train.stages import build_stage

    cfg = _cfg(teacher, "dmd.self_forcing.ts_schedule=true", "dmd.self_forcing.ts_schedule_max=true",
               "schedule.shift=5.0", "dmd.self_forcing.rollout_frames=6")
    st = build_stage(cfg)
    st.setup(cfg, "cpu")
    batch = {"caption": ["a red circle", "a blue square"]}
    models = {**st.trainable(), **st.frozen()}
    steps = st.steps[:-1]
    for step in range(4):
        k = st.exit_steps(step, "generator")
        assert len(k) == 3 and len(set(k)) == 1  # 6 rolled-out frames = 3 chunks, one exit step
        loss, logs = st.loss("generator", batch, models, step, torch.Generator().manual_seed(step))
        loss.backward()
        assert logs["t_gen_mean"] == pytest.approx(steps[k[0]])
        nxt = steps[k[0] + 1] if k[0] + 1 < len(steps) else 0.0
        assert max(nxt, 20) - 1.0 <= logs["t_dmd_mean"] <= min(steps[k[0]], 980) + 1e-3
        assert all(p.grad is not None for p in st.generator.parameters())
        assert all(p.grad is None for p in st.critic.parameters())
        st.generator.zero_grad(set_to_none=True)
    loss, _ = st.loss("critic", batch, models, 1, torch.Generator().manual_seed(9))
    loss.backward()
    assert all(p.grad is not None for p in st.critic.parameters())
    assert all(p.grad is None for p in st.generator.parameters())


@pytest.mark.parametrize("extra,key", [
    (["model.chunk_size=4"], "model.chunk_size"),  # one chunk over the 4 latent frames: a bidirectional generator
    (["dmd.teacher=none"], "dmd.teacher"),
    (["dmd.self_forcing.rollout_frames=3"], "dmd.self_forcing.rollout_frames"),
    (["dmd.self_forcing.rollout_frames=7"], "dmd.self_forcing.rollout_frames"),
    (["dmd.self_forcing.ts_schedule=true", "dmd.self_forcing.same_step_across_blocks=false"], "ts_schedule"),
    (["data.source=videos"], "data.source"),
])
def test_invalid_combinations_are_config_errors_before_any_model_is_built(teacher, monkeypatch, extra, key, tmp_path):
    from causvid.train import stages
    from causvid.train.trainer import Trainer

    def no_build(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(stages, "load_network", no_build)
    monkeypatch.setattr(stages, "new_network", no_build)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Trainer(_cfg(teacher, f"train.output_dir={tmp_path}", *extra))
    with pytest.raises(ConfigError, match="cache_grad"):
        _cfg(teacher, "dmd.self_forcing.cache_grad=full")


def test_exact_resume_in_self_forcing_mode(teacher, tmp_path):
    """2 steps in one go equal 1 step + resume (weights, critic, EMA, losses), per-chunk exit steps, EMA on."""
    from accelerate.state import AcceleratorState

    from causvid.train.trainer import LossLog, run

    def cfg_for(out, steps, resume):
        return _cfg(teacher, "dmd.update_ratio=1", "train.ema_decay=0.5", "train.optim.lr=1e-3",
                    "dmd.critic_optim.lr=1e-3", "dmd.self_forcing.same_step_across_blocks=false",
                    "model.gradient_checkpointing=true", f"train.max_steps={steps}", "train.checkpoint_every=1",
                    f"train.output_dir={out}", f"train.resume={resume}")

    full = run(cfg_for(tmp_path / "full", 2, "never"))
    assert full["updates"] == {"generator": 2, "critic": 2}
    AcceleratorState._reset_state(True)
    run(cfg_for(tmp_path / "split", 1, "never"))
    AcceleratorState._reset_state(True)
    run(cfg_for(tmp_path / "split", 2, "latest"))
    AcceleratorState._reset_state(True)
    a, b = tmp_path / "full" / "checkpoint-2", tmp_path / "split" / "checkpoint-2"
    for name in ("generator", "critic", "ema_generator"):
        sa, sb = load_safetensors(str(a / f"{name}.safetensors")), load_safetensors(str(b / f"{name}.safetensors"))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name

    def recs(out):
        return [{k: v for k, v in r.items() if k != "step_time"} for r in LossLog.read(str(out / "losses.jsonl"))]

    assert recs(tmp_path / "full") == recs(tmp_path / "split")
    s0 = load_safetensors(str(tmp_path / "full" / "checkpoint-1" / "generator.safetensors"))
    assert any(not torch.equal(s0[k], sa[k]) for k in s0)  # training moved the weights


def _latent_folder(root):
    """Latent shards with stored text contexts (4 items of 4 latent frames)."""
    from causvid.data import shards as SH
    from causvid.models.text import ToyTextEncoder

    caps = ["a red circle moving left", "a blue square", "a green diamond moving up", "a red square"]
    ctx, lens = SH.pack_context(*ToyTextEncoder(dim=24, text_len=8).encode(caps))
    plan = SH.latent_plan(4, 4, {"text_len": 8, "text_dim": 24})
    SH.prepare_folder(str(root), plan)
    SH.write_shard(str(root), plan, 0, {"latents": torch.randn(4, 4, C, H, W), "context": ctx, "context_lens": lens},
                   {"captions": caps})
    SH.finalize_index(str(root), plan)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["ddp", "fsdp2"])
def test_exit_steps_equal_across_two_processes(teacher, tmp_path, dist):
    """2 CPU processes under ``accelerate launch``: DDP with captions encoded on the fly, FSDP2 (every DiT block
    sharded, activation checkpointing of the exit-step forwards) with stored contexts."""
    from test_reliability import free_port

    out = tmp_path / "sf"
    if dist == "ddp":
        launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_ip", "127.0.0.1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]
        extra = []
    else:  # FSDP2 (the toy text encoder is not usable under FSDP2 yet: stored contexts)
        launch = ["--config_file", os.path.join(REPO, "configs", "accelerate", "cpu_2proc_fsdp.yaml")]
        extra = ["data.source=latents", f"data.path={_latent_folder(tmp_path / 'lat')}",
                 "model.gradient_checkpointing=true"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", str(free_port()),
           os.path.join(REPO, "tests", "helpers_self_forcing_exits.py"),
           "--config", os.path.join(REPO, "configs", "toy", "self_forcing.yaml"), *BASE,
           f"train.init_from={teacher}", f"train.teacher_path={teacher}", f"train.output_dir={out}",
           "train.max_steps=6", "train.batch_size=1", "train.checkpoint_every=0", "train.log_every=1",
           "dmd.update_ratio=2", "dmd.self_forcing.same_step_across_blocks=false", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=REPO)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")][-1]
    assert summary["world_size"] == 2 and summary["updates"] == {"generator": 3, "critic": 6}
    assert summary["distributed"] == {"ddp": "DDP", "fsdp2": "FSDP2"}[dist]
    seen = [[json.loads(line) for line in (out / f"exits_rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    calls = [[(s["step"], s["name"], s["exits"]) for s in rank] for rank in seen]
    assert calls[0] == calls[1] and len(calls[0]) >= 9  # every rollout of every step, both ranks alike
    assert len({tuple(e) for _, _, e in calls[0]}) > 1  # and they are random draws, not a constant
    assert [s["captions"] for s in seen[0]] != [s["captions"] for s in seen[1]]  # while the data differ per rank
