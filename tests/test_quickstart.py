"""The README's run command, end to end on the smallest preset (the whole chain: VAE, latents, teacher, ODE pairs,
ODE init, DMD, samples, metrics, plots, report), then reproduce_ablation.py on the same run folder."""

import json
import os

import pytest

from causvid.ablation import ROWS, SWITCH_KEYS, Ablation, write_results
from causvid.quickstart import PRESETS, Pipeline


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
    # a re-run skips every finished stage
    p = Pipeline(str(root), "smoke")
    p.run_all()
    assert set(p.times) == {"total"}

    # the ablation (Table 4, Figure 8, streaming) reuses the finished stages and trains only its extra networks
    ab = Ablation(str(root), "smoke", seeds=2, long_factor=2, stream_factor=3)
    ab.run_ablation()
    for rel in ("causal_teacher/final/model.safetensors", "dmd_no_ode/final/model.safetensors",
                "dmd_causal/final/model.safetensors", "plots/long_rollout.png", "plots/error_accumulation.png"):
        assert (root / rel).exists(), rel
    table = json.loads((root / "ablation.json").read_text())
    for name, _ in ROWS:
        assert len(table[name]["per_seed"]) == 2, name
        assert set(table[name]["summary"]) == {"temporal_quality", "frame_quality", "text_alignment", "total"}
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


def test_presets_are_ordered():
    s, f, d = PRESETS["smoke"], PRESETS["fast"], PRESETS["default"]
    assert s.teacher_steps < f.teacher_steps < d.teacher_steps
    with pytest.raises(ValueError):
        Pipeline("/tmp/x", "huge")
