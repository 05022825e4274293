"""ODE pairs: stored levels derived from the grid, states equal direct teacher sampling, resumable, disjoint ranks."""

import dataclasses
import importlib.util
import os

import pytest
import torch

from causvid import ode_pairs as OP
from causvid import schedule as S
from causvid.config import load_config
from causvid.data import shards as SH
from causvid.models.dit import WanDiT
from causvid.models.registry import dit_config
from causvid.models.text import ToyTextEncoder
from causvid.sampler import teacher_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle moving left", "a blue square moving up slowly", "a green triangle on black"]
NUM_STEPS, SHIFT = 2, 3.0  # grid: 1000, 750, 0


def test_official_levels_are_derived_not_hard_coded():
    lv = OP.stored_levels([1000, 757, 522, 0], 50, 8.0)
    assert lv.indices == [0, 36, 44, 50]  # causvid_reference.md §4.1
    assert lv.grid_timesteps[1] == pytest.approx(756.7568, abs=1e-3)
    assert lv.grid_timesteps[2] == pytest.approx(521.7391, abs=1e-3)
    assert max(lv.distances) < 0.3
    # Self-Forcing: the shift-8 warp of [1000, 750, 500, 250] lies on the 48-step grid at 0/12/24/36
    warped = S.warp_denoising_steps([1000, 750, 500, 250, 0], 8.0)
    assert OP.stored_levels(warped, 48, 8.0).indices == [0, 12, 24, 36, 48]
    with pytest.raises(ValueError, match="timesteps from the nearest point"):
        OP.stored_levels(warped, 50, 8.0)
    with pytest.raises(ValueError, match="end with 0"):
        OP.stored_levels([1000, 500], 50, 8.0)


def test_wan_config_plan_dry_run(capsys):
    cfg = load_config(os.path.join(ROOT, "configs/wan2.1_1.3b/ode_pairs.yaml"))
    s = OP.settings_from_config(cfg)
    assert s.latent_shape == (21, 16, 60, 104)
    assert (s.num_steps, s.shift, s.guidance, s.solver) == (50, 8.0, 6.0, "euler")
    assert s.levels().indices == [0, 36, 44, 50]
    spec = importlib.util.spec_from_file_location("build_ode_pairs", os.path.join(ROOT, "scripts/build_ode_pairs.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--config", os.path.join(ROOT, "configs/wan2.1_1.3b/ode_pairs.yaml"), "ode_pairs.prompts=null",
            "ode_pairs.num_prompts=3"]
    assert script.main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "grid step  36 (t =  756.757" in out and "3 x 1 seeds = 3 pairs" in out
    # without the official weights: a clear error naming the key, nothing loaded
    assert script.main(argv + ["train.teacher_path=/nonexistent/Wan2.1-T2V-1.3B"]) == 2
    assert "train.teacher_path" in capsys.readouterr().err


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    teacher = WanDiT(dit_config("tiny")).eval()
    with torch.no_grad():
        teacher.head.head.weight.normal_(std=0.05)  # a non-trivial flow (the official init zeroes the head)
    enc = ToyTextEncoder(dim=24, text_len=8)
    grid = S.sampling_timesteps(NUM_STEPS, SHIFT)
    settings = OP.ODEPairSettings(step_list=[1000.0, float(grid[1]), 0.0], latent_shape=(4, 4, 4, 4),
                                  num_steps=NUM_STEPS, shift=SHIFT, guidance=3.0, seeds_per_prompt=2,
                                  base_seed=7, shard_size=2, batch_size=1, negative_prompt="")
    return teacher, enc, settings


def _build(folder, parts, **kw):
    teacher, enc, settings = parts
    settings = kw.pop("settings", settings)
    seen = []
    on_pair = kw.pop("on_pair", seen.append)
    written = OP.build_ode_pairs(folder, teacher, enc, PROMPTS, settings, progress=False, on_pair=on_pair, **kw)
    return written, seen


def _finalize(folder, parts, settings=None):
    _, enc, default = parts
    settings = settings or default
    return SH.finalize_index(folder, OP.ode_plan(PROMPTS, settings, enc.text_len, enc.dim))


def test_pairs_equal_direct_teacher_sampling(tmp_path, parts):
    teacher, enc, settings = parts
    written, seen = _build(str(tmp_path), parts)
    assert written == [0, 1, 2] and seen == list(range(6))  # 3 prompts x 2 seeds
    index = _finalize(str(tmp_path), parts)
    assert index["settings"]["stored_step_indices"] == [0, 1, 2]
    ds = SH.ODEPairDataset(str(tmp_path))
    assert len(ds) == 6 and ds.step_list == settings.step_list
    for item in (3, 4):
        pair = ds[item]
        prompt = PROMPTS[item // 2]
        assert pair["caption"] == prompt
        noise = OP.pair_noise(OP.pair_seed(7, item), (4, 4, 4, 4))
        cond, _ = enc.encode([prompt])
        uncond, _ = enc.encode([""])
        ref = teacher_sample(teacher, noise, cond, uncond, num_steps=NUM_STEPS, shift=SHIFT, guidance=3.0,
                             keep_steps=[1])
        assert pair["states"].shape == (3, 4, 4, 4, 4)
        assert torch.equal(pair["states"][0], noise[0])  # level 1000 = the initial noise
        assert torch.equal(pair["states"][1], ref.states[1][0])  # the state before grid step 1
        assert torch.equal(pair["states"][-1], ref.x0[0])  # the final sample
        assert torch.equal(pair["context"], cond[0])
        assert pair["timesteps"].tolist() == pytest.approx(settings.step_list)
    # the two seeds of one prompt differ
    assert not torch.equal(ds[2]["states"][-1], ds[3]["states"][-1])


def test_killed_midway_then_rerun_gives_every_pair_once(tmp_path, parts):
    folder = str(tmp_path)

    def die_after_three(item, seen=[]):  # noqa: B006 - a counter across calls
        seen.append(item)
        if len(seen) == 3:
            raise KeyboardInterrupt("simulated kill")

    fast = dataclasses.replace(parts[2], guidance=1.0)  # no CFG: half the forwards
    with pytest.raises(KeyboardInterrupt):
        _build(folder, parts, on_pair=die_after_three, settings=fast)
    assert _finalize(folder, parts, fast) is None
    written, seen = _build(folder, parts, settings=fast)
    assert written == [1, 2] and seen == [2, 3, 4, 5]  # shard 0 (items 0, 1) was finished before the kill
    index = _finalize(folder, parts, fast)
    assert [i for sh in index["shards"] for i in sh["ids"]] == list(range(6))
    ds = SH.ODEPairDataset(folder)
    seeds = []
    for sh in index["shards"]:
        seeds += SH.read_shard_header(os.path.join(folder, sh["file"]))["seeds"]
    assert seeds == [OP.pair_seed(7, i) for i in range(6)]
    assert len(ds) == 6
    assert _build(folder, parts, settings=fast)[0] == []  # done: nothing regenerated


def test_two_ranks_cover_prompts_disjointly_and_completely(tmp_path, parts):
    folder = str(tmp_path)
    fast = dataclasses.replace(parts[2], guidance=1.0)
    w0, s0 = _build(folder, parts, rank=0, world=2, settings=fast)
    w1, s1 = _build(folder, parts, rank=1, world=2, settings=fast)
    assert w0 == [0, 2] and w1 == [1]
    assert not set(s0) & set(s1) and sorted(s0 + s1) == list(range(6))
    ds = SH.ODEPairDataset(folder) if _finalize(folder, parts, fast) else None
    assert sorted(ds[i]["caption"] for i in range(6)) == sorted(PROMPTS * 2)
    text = OP.describe_plan(PROMPTS, parts[2], world=2)
    assert "rank 0: 2 shards [0, 2]" in text and "rank 1: 1 shards [1]" in text


def test_changed_settings_refuse_to_mix(tmp_path, parts):
    teacher, enc, settings = parts
    _build(str(tmp_path), parts, limit=1)
    other = OP.ODEPairSettings(**{**settings.__dict__, "guidance": 5.0})
    with pytest.raises(SH.ShardError, match="guidance"):
        OP.build_ode_pairs(str(tmp_path), teacher, enc, PROMPTS, other, progress=False)
