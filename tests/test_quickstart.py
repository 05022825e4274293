"""The README's run command, end to end on the smallest preset (the whole chain: VAE, latents, teacher, ODE pairs,
ODE init, DMD, samples, metrics, plots, report), then reproduce_ablation.py on the same run folder."""

import json
import os

import pytest

from causvid.ablation import CONTROL_ROWS, ROWS, SWITCH_KEYS, Ablation, write_results
from causvid.config import load_config
from causvid.quickstart import PRESETS, Pipeline, preset_with


@pytest.mark.slow
def test_quickstart_smoke_end_to_end(tmp_path):
    root = tmp_path / "qs"
    Pipeline(str(root), "smoke").run_all()
    for rel in ("vae/vae.safetensors", "latents/index.json", "teacher/final/model.safetensors",
                "ode_pairs/index.json", "ode/final/model.safetensors", "dmd/final/model.safetensors",
                "dmd/final/config.yaml", "index.md", "index.html", "metrics.json", "plots/dmd_losses.png",
                "plots/samples_grid.png"):
        assert (root / rel).exists(), rel
    summary = json.loads((root / "metrics.json").read_text())
    names = list(summary["metrics"])
    assert names[0] == "ground truth" and any(n.startswith("DMD student") for n in names)
    gt = summary["metrics"]["ground truth"]["mean"]["total"]
    assert gt > 0.8  # the metric recognises the real thing even on the smallest preset
    assert summary["latency"]["student_first_chunk_s"] > 0
    vids = os.listdir(root / "videos")
    assert any(v.endswith(".gif") for v in vids) and any(v.endswith(".mp4") for v in vids)
    # the teacher's fit on training vs held-out latents (same t, same noise)
    from causvid.eval.toy_eval import TeacherRunner

    fit = TeacherRunner(str(root / "teacher" / "final")).fit_check(str(root / "latents"), n=4, timesteps=(300, 700))
    assert set(fit) == {"train", "heldout"} and all(list(v) == [300.0, 700.0] for v in fit.values())
    assert all(0 < x < 10 for v in fit.values() for x in v.values())
    # a re-run skips every finished stage
    p = Pipeline(str(root), "smoke")
    p.run_all()
    assert set(p.times) == {"total"}

    # the ablation (Table 4, Figure 8, streaming) reuses the finished stages and trains only its extra networks
    ab = Ablation(str(root), "smoke", seeds=2, long_factor=2, stream_factor=3)
    ab.run_ablation()
    for rel in ("causal_teacher/final/model.safetensors", "dmd_no_ode/final/model.safetensors",
                "dmd_causal/final/model.safetensors", "teacher_ft/final/model.safetensors",
                "dmd_ft/final/model.safetensors", "plots/long_rollout.png", "plots/error_accumulation.png"):
        assert (root / rel).exists(), rel
    # the equal-training control: the causal teacher's fine-tune without the chunk mask, and a DMD student of it
    ct, ft = (load_config(str(root / k / "final" / "config.yaml")) for k in ("causal_teacher", "teacher_ft"))
    assert (ct.train.stage, ft.train.stage) == ("causal_teacher", "teacher")
    assert ft.train.max_steps == ct.train.max_steps and ft.train.init_from == ct.train.init_from
    assert ft.train.optim == ct.train.optim
    assert load_config(str(root / "dmd_ft" / "final" / "config.yaml")).train.teacher_path.startswith(str(root / "teacher_ft"))
    table = json.loads((root / "ablation.json").read_text())
    for name, _ in ROWS + CONTROL_ROWS:
        assert len(table[name]["per_seed"]) == 2, name
        assert set(table[name]["summary"]) == {"temporal_quality", "frame_quality", "text_alignment", "total"}
    # rows are measured once: a missing row is added, the others are kept as they were
    dropped = CONTROL_ROWS[1][0]
    kept = {k: v for k, v in table.items() if k != dropped}
    (root / "ablation.json").write_text(json.dumps(kept))
    again = ab.table()
    assert {k: again[k]["per_seed"] for k in kept} == {k: v["per_seed"] for k, v in kept.items()}
    assert again[dropped]["per_seed"] == table[dropped]["per_seed"]  # same seeds, same network: same scores
    long = json.loads((root / "long_rollout.json").read_text())
    assert len(long["curves"]) == 3 and all(len(c["windows"]) == 2 for c in long["curves"].values())
    stream = json.loads((root / "streaming.json").read_text())
    assert stream["factor"] == 3 and len(stream["windows"]) == 3 == len(stream["windows_no_sink"])
    assert len(stream["switch"]) == 3 * 2  # eval_videos 2 -> 2 videos of 3 segments
    assert all(set(r[k]) == {"own", "other"} for r in stream["switch"] for k in SWITCH_KEYS)
    md = write_results(str(root), str(tmp_path / "results.md"), str(tmp_path / "img"), preset="smoke")
    text = open(md).read()
    assert "CausVid Table 4" in text and "Prompt switching" in text
    assert (tmp_path / "img" / "long_rollout.png").exists() and (tmp_path / "img" / "samples_grid.png").exists()


@pytest.mark.slow
def test_quickstart_default_path_distils_pretrained_models(tmp_path):
    """The README's default: the shipped VAE, text encoder and teacher (pretrained/toy) -> ODE pairs -> ODE init ->
    DMD -> samples, at the smoke size; no VAE or teacher is trained. Without shipped files (a checkout that lacks
    them) the smoke chain's own models are packaged first with scripts/package_pretrained.py."""
    from causvid.pretrained import TOY_DIR, available, verify
    from causvid.pretrained_cli import main as package_main

    root = TOY_DIR
    if not available():
        scratch = tmp_path / "scratch"
        Pipeline(str(scratch), "smoke").run_all()
        root = tmp_path / "pretrained"
        common = ["--command", "quickstart smoke", "--commit", "0" * 40, "--out", str(root), "--eval-videos", "1"]
        assert package_main(["text", *common]) == 0
        assert package_main(["vae", "--run", str(scratch / "vae"), *common]) == 0
        assert package_main(["teacher", "--run", str(scratch / "teacher"), *common]) == 0
        for sub in ("text", "vae", "teacher"):
            verify(root / sub)
    out = tmp_path / "qs"
    p = Pipeline(str(out), "smoke", pretrained=str(root))
    p.run_all()
    assert not (out / "vae").exists() and not (out / "teacher").exists()
    assert {"latents", "ode_pairs", "ode", "dmd"} <= set(p.times)
    for rel in ("dmd/final/model.safetensors", "index.md", "metrics.json", "plots/samples_grid.png"):
        assert (out / rel).exists(), rel
    cfg = load_config(str(out / "dmd" / "final" / "config.yaml"))
    assert cfg.train.teacher_path == os.path.join(str(root), "teacher")
    assert "pretrained/toy" in (out / "index.md").read_text()


def test_pretrained_path_refuses_a_damaged_model_before_running(tmp_path):
    from causvid.pretrained import PretrainedError, package

    info = dict(command="c", commit="0", steps=0, wall_seconds=0.0, machine="m", made="d")
    for sub in ("text", "vae", "teacher"):
        src = tmp_path / f"{sub}.bin"
        src.write_bytes(b"x")
        package(sub, {"f.bin": str(src)}, tmp_path / "pre" / sub, **info)
    (tmp_path / "pre" / "vae" / "f.bin").write_bytes(b"y")
    with pytest.raises(PretrainedError, match="vae"):
        Pipeline(str(tmp_path / "run"), "smoke", pretrained=str(tmp_path / "pre"))
    assert not (tmp_path / "run").exists()


def test_presets_are_ordered():
    s, f, d = PRESETS["smoke"], PRESETS["fast"], PRESETS["default"]
    assert s.teacher_steps < f.teacher_steps < d.teacher_steps
    with pytest.raises(ValueError):
        Pipeline("/tmp/x", "huge")


def test_preset_overrides_are_checked(tmp_path):
    p = preset_with("default", ["teacher_steps=1800", "teacher_decay_steps=600"])
    assert (p.teacher_steps, p.teacher_decay_steps, p.dmd_steps) == (1800, 600, PRESETS["default"].dmd_steps)
    assert PRESETS["default"].teacher_steps != 1800  # the registry is not modified
    assert Pipeline(str(tmp_path / "r"), "default", overrides=["ode_steps=7"]).p.ode_steps == 7
    for bad in (["teacher_stepz=3"], ["teacher_steps"], ["teacher_steps=1.5"]):
        with pytest.raises(ValueError, match="bad preset override"):
            preset_with("default", bad)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_with("huge")
