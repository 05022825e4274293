"""The per-device memory plan (causvid/train/memory_plan.py, docs/memory_plan.md): the activation table against the
tensors autograd really saves, a small config computed line by line by hand, what each stage builds, the launch
setup, fits / does not fit, and bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from causvid.config import ConfigError, load_config
from causvid.models.attention import ChunkLayout
from causvid.models.dit import WanDiT
from causvid.models.registry import DiTConfig, dit_config
from causvid.train import memory_plan as MP
from causvid.train.stages import build_stage
from causvid.train.trainer import main
from tests.test_stages import BASE, run  # noqa: F401  (the fixture: a tiny teacher, latent and ODE shards)

GiB = 1024 ** 3


# ------------------------------------------------------------------------------ activations: the table
def saved_bytes(model: WanDiT, x, t, ctx, layout, bf16: bool) -> int:
    """Bytes autograd saves in one forward (unique storages), without parameters and autocast's weight copies."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tn):
        st = tn.untyped_storage()
        is_weight_copy = tn.dtype == torch.bfloat16 and tuple(tn.shape) in weight_shapes and tn.dim() >= 2
        if st.data_ptr() not in params and not is_weight_copy:
            seen[st.data_ptr()] = st.nbytes()
        return tn

    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tn: tn), ac:
        model(x, t, ctx, layout=layout)
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("causal", [False, "sdpa", "sdpa_mask"])
@pytest.mark.parametrize("shape", [(2, 4, 6, 10), (1, 3, 4, 14)])  # B, latent F, h, w
def test_activation_table_equals_what_autograd_saves(bf16, causal, shape):
    """root + layers x block bytes of the formula == the bytes saved_tensors_hooks sees, exactly (no mask / per-chunk
    prefix SDPA / the chunk mask; fp32 / bf16 autocast; two shapes, so every coefficient is pinned)."""
    d = DiTConfig(dim=48, ffn_dim=80, num_heads=2, num_layers=3, freq_dim=16, text_dim=24, text_len=7, in_dim=4, out_dim=4)
    torch.manual_seed(0)
    model = WanDiT(d, attention=causal or "sdpa")
    B, F, h, w = shape
    x, t, ctx = torch.randn(B, F, 4, h, w), torch.rand(B) * 1000, torch.randn(B, 5, 24)
    layout = ChunkLayout(1) if causal else None
    got = saved_bytes(model, x, t, ctx, layout, bf16)
    acts = MP.dit_activations(d, B, (F, 4, h, w), bf16=bf16, attention={False: "full", "sdpa": "prefix", "sdpa_mask": "mask"}[causal])
    assert acts.full == got


def test_activation_table_fails_when_a_tensor_is_dropped():
    """The check above can fail: one [N, D] fp32 tensor fewer in the table is seen."""
    d = DiTConfig(dim=48, ffn_dim=80, num_heads=2, num_layers=2, freq_dim=16, text_dim=24, text_len=7, in_dim=4, out_dim=4)
    model = WanDiT(d, attention="sdpa")
    got = saved_bytes(model, torch.randn(1, 3, 4, 4, 6), torch.rand(1) * 1000, torch.randn(1, 5, 24), None, False)
    full = MP.dit_activations(d, 1, (3, 4, 4, 6), bf16=False, attention="full").full
    N = 3 * 2 * 3
    assert full - 2 * N * 48 * 4 != got and full == got


# --------------------------------------------------------------------------------- a plan by hand
def small_cfg(*extra):
    return load_config(overrides=[
        "model.size=tiny", "vae.size=tiny", "text.kind=tiny-umt5", "data.height=16", "data.width=16",
        "data.num_frames=9", "model.chunk_size=3", "train.stage=dmd", "data.source=latents", "data.path=x",
        "train.init_from=x", "train.teacher_path=x", "train.batch_size=2", "train.mixed_precision=no",
        "model.dtype=float32", "sampler.num_frames=33", *extra])


def test_small_plan_line_by_line_by_hand():
    """DMD, tiny DiT, FSDP2 on 2 CPU processes, fp32, batch 2, 9 frames of 16x16 (latent [3, 4, 4, 4])."""
    plan = MP.plan_memory(small_cfg(), MP.LaunchSetup(world_size=2, fsdp=True, device="cpu"))
    # the tiny DiT (dim 32, ffn 64, 2 heads, 2 layers, freq 16, text 24 x 8, 4 channels, patch 1x2x2)
    root = (4 * 32 * 4 + 32) + (24 * 32 + 32 + 32 * 32 + 32) + (16 * 32 + 32 + 32 * 32 + 32) + (32 * 192 + 192) \
        + (32 * 16 + 16 + 2 * 32)  # patch, text, time embeddings, time projection, head
    block = 2 * (4 * (32 * 32 + 32) + 2 * 32) + 2 * 32 + (32 * 64 + 64 + 64 * 32 + 32) + 6 * 32
    P = root + 2 * block
    assert (root, block, P) == (10928, 13024, 36976)
    umt5 = 512 * 24 + 2 * (24 + 4 * 24 * 24 + 24 + 3 * 24 * 48 + 32 * 2) + 24  # tiny umT5, fp32
    # activations: B 2, 3 frames x 2x2 tokens: L 12, N 24; D 32, Fd 64, H 2, Lc 8, head_dim 16
    blk_full = 24 * 32 * 22 * 4 + 24 * 64 * 2 * 4 + 2 * 8 * 32 * 4 * 4 + 4 * 24 * (9 + 4) + 4 * 2 * 8 + 4 * 2 * 3 * 8 * 32
    # the generator is block-causal: on the CPU one SDPA per chunk over its key prefix (attention "sdpa"), which keeps
    # the chunk outputs and their concatenation (the output projection's input): one more [N, D] fp32
    blk_causal = blk_full + 24 * 32 * 4
    root_act = 2 * 3 * 4 * 4 * 4 * 4 + (2 * 3 * (16 + 4 * 32) * 4 + 2 * 3 * 32 * 4) \
        + (2 * 8 * (24 + 64) * 4 + 2 * 8 * 32 * 4) + (24 * 32 * 12 + 24 * 8) + 12 * 16 * 4
    assert (blk_full, blk_causal, root_act) == (95520, 98592, 23616)
    acts_off = root_act + 2 * blk_causal
    acts_on = root_act + 2 * 24 * 32 * 4 + blk_causal
    expect = {
        ("resident", "weights: generator"): P * 4 // 2,
        ("resident", "weights: critic"): P * 4 // 2,
        ("resident", "weights: teacher"): P * 4 // 2,
        ("resident", "AdamW moments (exp_avg, exp_avg_sq)"): 2 * 2 * P * 4 // 2,
        ("update", "gradients (the network being updated)"): P * 4 // 2,
        ("update", "activations, checkpointing off"): acts_off,
        ("update", "activations, checkpointing on"): acts_on,
        ("update", "one block's working set (forward / backward)"): blk_causal,
        ("update", "FSDP2: gathered root + 2 blocks, 1 block's grads"): (root + 2 * block) * 4 + block * 4,
        # glibc's default allocator keeps the freed all-gathered parameters in the heap (the CPU plan only)
        ("update", "glibc heap kept after FSDP2's gathered parameters are freed"): (root + 2 * block) * 4,
        ("update", "AdamW step workspace"): 2 * 64 * 32 * 4,
        # the weight paths ("x") cannot be read: the plan cannot tell that they are mapped, every network is whole
        ("setup", "generator (whole)"): P * 4,
        ("setup", "critic (whole)"): P * 4,
        ("setup", "teacher (whole)"): P * 4,
        ("setup", "text encoder (released after encoding)"): umt5 * 4,
        ("setup", "generator (shard)"): P * 4 // 2,
        ("setup", "critic (shard)"): P * 4 // 2,
        ("setup", "teacher (shard)"): P * 4 // 2,
        # under FSDP2 rank 0 gathers one network's full AdamW state (2 x fp32) for a checkpoint, the generator and the
        # critic whole (fp32) for the export: the same 2 x 4 P here
        ("save", "full state on rank 0 (one AdamW state / every trainable's weights)"): 2 * P * 4,
        # sampling 33 frames: 9 latent frames x 4 tokens, one branch (guidance 1)
        ("sampling", "student weights"): P * 4,
        ("sampling", "KV cache"): 2 * 2 * 9 * 4 * 32 * 4,
        ("sampling", "cross-attention cache"): 2 * 2 * 8 * 32 * 4,
    }
    assert {(x.section, x.name): x.bytes for x in plan.lines} == expect
    resident = 3 * P * 2 + 2 * P * 4 + (root + 2 * block) * 4  # shards, moments, the heap kept by glibc
    fsdp = (root + 2 * block) * 4 + block * 4
    assert plan.peaks == {
        "train (checkpointing off)": resident + fsdp + blk_causal + max(acts_off, P * 2),
        "train (checkpointing on)": resident + fsdp + blk_causal + max(acts_on, P * 2),
        # every network whole on the host, then the text encoder, or the first shard being made beside them
        "setup": 3 * P * 4 + max(umt5 * 4, P * 2),
        "save / export (rank 0)": resident + 2 * P * 4,
    }
    assert plan.reserve == MP.CPU_RUNTIME and plan.peak == plan.peaks["train (checkpointing off)"] + MP.CPU_RUNTIME


def _tiny_files(tmp_path):
    """The tiny DiT saved as the run's fp32 weight files (init_from, teacher_path): what the loaders map."""
    from causvid.models.weights import save_dit

    path = str(tmp_path / "tiny.safetensors")
    save_dit(WanDiT(dit_config("tiny")), path)
    return [f"train.init_from={path}", f"train.teacher_path={path}"]


def test_cpu_setup_reads_mapped_files_lazily(tmp_path):
    """CPU plans, files in the dtype the networks are loaded in: nothing is read at load (mapped pages); the text
    encoder encodes before anything is sharded; FSDP2 shards generator, critic, teacher one after the other, each rank
    reading its half of the network being sharded beside the shards made so far. A bf16 teacher from the fp32 file is
    converted whole at load. (Fails when the lazy reading is removed: every network would be whole, 14 P bytes.)"""
    P, umt5 = 36976, 24056  # the tiny DiT's and the tiny umT5's parameters (test_small_plan_line_by_line_by_hand)
    cfg = small_cfg(*_tiny_files(tmp_path))
    assert MP.dit_file_dtypes(str(cfg.train.init_from)) == {"float32"}
    plan = MP.plan_memory(cfg, MP.LaunchSetup(world_size=2, fsdp=True, device="cpu"))
    setup = {x.name: x.bytes for x in plan.lines if x.section == "setup"}
    assert setup == {"text encoder (released after encoding)": umt5 * 4,
                     **{f"{n} (mapped file, read while sharded)": 0 for n in ("generator", "critic", "teacher")},
                     **{f"{n} (shard)": P * 2 for n in ("generator", "critic", "teacher")},
                     **{f"{n}: its 1/2 of the mapped file, read while sharding": P * 2
                        for n in ("generator", "critic", "teacher")}}
    # text: umt5 * 4; sharding the generator: 2 P + 2 P; the critic: 2 P + 2 P + 2 P; the teacher: 4 P + 2 P + 2 P
    assert plan.peaks["setup"] == max(umt5 * 4, 4 * P, 6 * P, 8 * P) == 8 * P
    one = MP.plan_memory(cfg, MP.LaunchSetup(device="cpu"))  # one process: read at the first forward
    assert one.peaks["setup"] == umt5 * 4
    assert {x.name: x.bytes for x in one.lines if x.section == "setup"}["generator (mapped file, read at the first forward)"] == 0
    bf16 = MP.plan_memory(small_cfg(*_tiny_files(tmp_path), "model.dtype=bfloat16"),
                          MP.LaunchSetup(world_size=2, fsdp=True, device="cpu"))
    lines = {x.name: x.bytes for x in bf16.lines if x.section == "setup"}
    assert lines["teacher (whole)"] == P * 2 and lines["teacher (shard)"] == P
    # text: 2 P (the converted teacher) + umt5 * 4; generator: 2 P + 2 P + 2 P; critic: 4 P + 2 P + 2 P;
    # teacher: 4 P + P + 2 P (its converted whole weights)
    assert bf16.peaks["setup"] == max(2 * P + umt5 * 4, 6 * P, 8 * P, 7 * P) == 8 * P
    ddp = MP.plan_memory(cfg, MP.LaunchSetup(world_size=2, fsdp=False, device="cpu"))  # DDP's broadcast writes all
    assert ddp.peaks["setup"] == 3 * P * 4 + umt5 * 4


def test_glibc_heap_term_only_on_cpu_fsdp2_with_the_default_allocator():
    """The freed all-gathered parameters kept in glibc's heap: counted on CPU FSDP2 launches, not when the environment
    fixes the mmap threshold (read by launch_from_args), not on GPUs, not without FSDP2. (Fails when removed.)"""
    root, block = 10928, 13024
    name = "glibc heap kept after FSDP2's gathered parameters are freed"
    p = argparse.ArgumentParser()
    MP.add_arguments(p)
    args = p.parse_args(["--num-processes", "2", "--fsdp", "--plan-device", "cpu"])
    default = MP.plan_memory(small_cfg(), MP.launch_from_args(args, env={}))
    assert {x.name: x.bytes for x in default.lines}[name] == (root + 2 * block) * 4
    for env in ({"MALLOC_MMAP_THRESHOLD_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}):
        la = MP.launch_from_args(args, env=env)
        assert la.malloc_fixed
        fixed = MP.plan_memory(small_cfg(), la)
        assert name not in {x.name for x in fixed.lines}
        for k in ("train (checkpointing on)", "train (checkpointing off)"):
            assert default.peaks[k] - fixed.peaks[k] == (root + 2 * block) * 4
    for la in (MP.LaunchSetup(2, True, "cuda"), MP.LaunchSetup(1, False, "cpu"), MP.LaunchSetup(2, False, "cpu")):
        assert name not in {x.name for x in MP.plan_memory(small_cfg(), la).lines}


def test_cpu_runtime_reserve_is_what_a_tiny_training_step_adds(tmp_path):
    """CPU_RUNTIME, the CPU plans' reserve, measured again: a fresh process imports what scripts/measure_peak_rss.py
    imports (the baseline), runs two training steps of a tiny DiT (block-causal SDPA, checkpointing, AdamW) and
    reports its RSS above the baseline less its live tensors; within 40 % of the constant. (Fails with the term 0.)"""
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/self/status"):
        pytest.skip("RSS from /proc (Linux)")
    code = """
import accelerate, torch
from causvid.models import dit, text, vae, weights
from causvid.train import stages, trainer
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
base = rss()
from causvid.models.attention import ChunkLayout
from causvid.models.registry import dit_config
d = dit_config("tiny")
torch.manual_seed(0)
m = dit.WanDiT(d, attention="sdpa", gradient_checkpointing=True)
opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
for _ in range(2):
    x, t, ctx = torch.randn(1, 6, d.in_dim, 4, 8), torch.rand(1) * 1000, torch.randn(1, d.text_len, d.text_dim)
    m(x, t, ctx, layout=ChunkLayout(3)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
live = 3 * 4 * sum(p.numel() for p in m.parameters())  # weights + AdamW's two moments
print(rss() - base - live)
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    measured = int(out.stdout.split()[-1])
    assert abs(measured - MP.CPU_RUNTIME) <= 0.4 * MP.CPU_RUNTIME, (measured / GiB, MP.CPU_RUNTIME / GiB)


def test_fsdp2_gpu_setup_loads_on_the_host_and_shards():
    """FSDP2 on 2 GPUs: the device holds the text encoder (negative prompt), then the shards + one unit whole being
    sharded (a block: 13,024 parameters > the root's 10,928); the whole networks are a host line, not device memory."""
    plan = MP.plan_memory(small_cfg(), MP.LaunchSetup(world_size=2, fsdp=True, device="cuda"))
    P, block = 36976, 13024
    umt5 = 512 * 24 + 2 * (24 + 4 * 24 * 24 + 24 + 3 * 24 * 48 + 32 * 2) + 24
    setup = {x.name: x.bytes for x in plan.lines if x.section == "setup"}
    assert setup == {"text encoder (released after encoding)": umt5 * 4, "generator (shard)": P * 4 // 2,
                     "critic (shard)": P * 4 // 2, "teacher (shard)": P * 4 // 2,
                     "one unit whole while fully_shard moves and chunks it": block * 4}
    assert plan.peaks["setup"] == max(umt5 * 4, 3 * (P * 4 // 2) + block * 4)
    assert [(x.name, x.bytes) for x in plan.lines if x.section == "host"] == [
        ("save / export: full state on rank 0's host", 2 * P * 4),
        ("every network whole on the host before sharding (per process)", 3 * P * 4)]
    assert "save / export (rank 0)" not in plan.peaks  # host memory on GPUs, not the device's
    ddp = MP.plan_memory(small_cfg(), MP.LaunchSetup(world_size=2, fsdp=False, device="cuda"))
    assert ddp.peaks["setup"] == 3 * P * 4 + umt5 * 4  # DDP: every network whole on each device


def test_single_gpu_bf16_lines():
    """1 CUDA process, bf16: autocast keeps bf16 copies of both trainables; AdamW's foreach workspace; the reserve;
    a bf16 teacher; gradient accumulation keeps gradients beside the activations."""
    cfg = small_cfg("train.mixed_precision=bf16", "model.dtype=bfloat16", "train.grad_accum=2")
    plan = MP.plan_memory(cfg, MP.LaunchSetup())
    lines = {x.name: x.bytes for x in plan.lines}
    P = 36976
    assert lines["weights: teacher"] == P * 2 and lines["weights: generator"] == P * 4
    assert lines["autocast bf16 copies of fp32 trainable weights"] == 2 * P * 2
    assert lines["AdamW step workspace"] == P * 4
    resident = 2 * P * 4 + P * 2 + 2 * 2 * P * 4
    assert plan.peaks["train (checkpointing on)"] == resident + 2 * P * 2 + lines[
        "one block's working set (forward / backward)"] + lines["activations, checkpointing on"] + P * 4
    assert plan.reserve == MP.CUDA_RESERVE


# ------------------------------------------------------------------------------- what each stage builds
@pytest.mark.parametrize("extra", [
    ["data.source=ode_pairs"],  # DMD, data inputs from ODE pairs: text encoder only at setup
    ["data.source=prompts", "data.path=null", "dmd.generator_input=backward_simulation"],  # encoder resident
    ["train.stage=ode"],
    ["train.stage=dmd", "dmd.teacher=none"],
    ["train.stage=teacher", "data.source=toyworld", "data.path=null"],  # encoder and VAE resident
    ["train.stage=causal_teacher", "data.source=latents", "train.cond_dropout=0"],
])
def test_plan_names_the_networks_the_stage_builds(run, extra):  # noqa: F811
    t = str(run / "teacher.safetensors")
    cfg = load_config(overrides=BASE + [f"train.init_from={t}", f"train.teacher_path={t}", "data.source=ode_pairs",
                                        f"data.path={run / 'ode'}", "data.num_frames=13", *extra])
    if cfg.data.source == "latents":
        cfg.data.path = str(run / "lat")
    stage = build_stage(cfg)
    stage.setup(cfg, "cpu")
    roles = MP._stage_roles(cfg)
    frozen = set(stage.frozen())
    assert set(stage.trainable()) == set(roles["trainables"])
    assert ("teacher" in frozen) == roles["teacher"]
    assert ("text_encoder" in frozen) == roles["text_resident"]
    assert ("vae" in frozen) == roles["vae"]


# ------------------------------------------------------------------------------------- launch setup
def test_launch_from_environment_file_and_flags(tmp_path):
    env = {"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert MP.LaunchSetup.from_env(env).shards == 8
    assert MP.LaunchSetup.from_env({"WORLD_SIZE": "4"}).ddp
    la = MP.LaunchSetup.from_accelerate_config("configs/accelerate/8gpu_fsdp.yaml")
    assert (la.world_size, la.fsdp) == (8, True)
    p = argparse.ArgumentParser()
    MP.add_arguments(p)
    la = MP.launch_from_args(p.parse_args(["--launch-config", "configs/accelerate/8gpu_fsdp.yaml",
                                           "--num-processes", "64"]), env={})
    assert (la.world_size, la.fsdp, la.shards) == (64, True, 64)
    la = MP.launch_from_args(p.parse_args(["--num-processes", "2", "--no-fsdp"]), env=env)
    assert (la.world_size, la.ddp) == (2, True)
    with pytest.raises(ConfigError, match="FSDP2 only"):
        MP.LaunchSetup.from_env({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


def test_sharding_divides_weights_gradients_and_moments():
    one = {x.name: x.bytes for x in MP.plan_memory(small_cfg(), MP.LaunchSetup(device="cpu")).lines}
    eight = {x.name: x.bytes for x in MP.plan_memory(small_cfg(), MP.LaunchSetup(8, True, "cpu")).lines}
    for k in ("weights: generator", "weights: teacher", "AdamW moments (exp_avg, exp_avg_sq)",
              "gradients (the network being updated)"):
        assert eight[k] == one[k] // 8


# ------------------------------------------------------------------------------ --dry-run, fits, bad input
def _dry(run, capsys, *flags):  # noqa: F811
    t = str(run / "teacher.safetensors")
    code = main(["--dry-run", *flags] + BASE + [f"train.init_from={t}", f"train.teacher_path={t}",
                                               "data.source=ode_pairs", f"data.path={run / 'ode'}",
                                               f"train.output_dir={run / 'out'}"])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_prints_the_plan_and_says_whether_it_fits(run, capsys):  # noqa: F811
    code, out, _ = _dry(run, capsys, "--device-memory", "80GB", "--plan-device", "cpu")
    assert code == 0 and "memory plan per device: stage dmd" in out and "fits in 80.00 GiB" in out
    js = json.loads([line for line in out.splitlines() if line.startswith('{"memory_plan"')][0])["memory_plan"]
    assert js["fits"] is True and js["device_memory"] == 80 * GiB and js["peak"] < 80 * GiB
    code, out, _ = _dry(run, capsys, "--device-memory", "100KB", "--plan-device", "cpu", "--num-processes", "2", "--fsdp")
    js = json.loads([line for line in out.splitlines() if line.startswith('{"memory_plan"')][0])["memory_plan"]
    assert code == 0 and js["fits"] is False and js["peak"] > 100 * 1024 and "does NOT fit in 0.10 MiB" in out
    assert (js["world_size"], js["fsdp"]) == (2, True)


@pytest.mark.parametrize("bad", ["80XB", "eighty", "0GB", "80"])
def test_bad_device_memory_is_one_line_exit_2(run, capsys, bad):  # noqa: F811
    code, out, err = _dry(run, capsys, "--device-memory", bad)
    assert code == 2 and "memory plan" not in out
    assert err.strip().count("\n") == 0 and err.startswith("error: --device-memory")


def test_memory_sizes():
    assert MP.parse_memory_size("80GB") == MP.parse_memory_size("80 GiB") == 80 * GiB
    assert MP.parse_memory_size("141g") == 141 * GiB and MP.parse_memory_size("512MB") == 512 * 1024 ** 2
    assert MP.parse_memory_size("1.5TB") == int(1.5 * 1024 ** 4)


def test_wan_sizes_match_the_official_parameter_counts():
    """wan_architecture.md section 1: 1,418,996,800 and 14,288,491,584 parameters (counted on meta)."""
    assert MP.dit_param_counts(dit_config("wan2.1-1.3b")).total == 1_418_996_800
    assert MP.dit_param_counts(dit_config("wan2.1-14b")).total == 14_288_491_584


def test_build_ode_pairs_dry_run_prints_the_teacher_plan(capsys):
    """The Wan2.1-1.3B ODE-pair config, without its files: whole fp32 teacher + umT5-XXL (bf16) per process."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("build_ode_pairs", os.path.join("scripts", "build_ode_pairs.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--config", "configs/wan2.1_1.3b/ode_pairs.yaml", "--dry-run", "--device-memory", "24GB",
                        "ode_pairs.prompts=null", "ode_pairs.num_prompts=2"]) == 0
    out = capsys.readouterr().out
    js = json.loads([line for line in out.splitlines() if line.startswith('{"memory_plan"')][0])["memory_plan"]
    lines = {x["name"]: x["bytes"] for x in js["lines"]}
    assert lines["weights: teacher"] == 1_418_996_800 * 4 and lines["weights: text encoder"] % 2 == 0
    assert js["fits"] is True and "fits in 24.00 GiB" in out
    assert script.main(["--config", "configs/wan2.1_1.3b/ode_pairs.yaml", "--dry-run", "--device-memory", "lots",
                        "ode_pairs.prompts=null"]) == 2
    assert capsys.readouterr().err.startswith("error: --device-memory 'lots'")
