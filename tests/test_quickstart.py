"""The README's run command, end to end on the smallest preset (the whole chain: VAE, latents, teacher, ODE pairs,
ODE init, DMD, samples, metrics, plots, report)."""

import json
import os

import pytest

from causvid.quickstart import PRESETS, Pipeline


@pytest.mark.slow
def test_quickstart_smoke_end_to_end(tmp_path):
    root = tmp_path / "qs"
    Pipeline(str(root), "smoke").run_all()
    for rel in ("vae/vae.safetensors", "latents/index.json", "teacher/final/model.safetensors",
                "ode_pairs/index.json", "ode/final/model.safetensors", "dmd/final/model.safetensors",
                "dmd/final/config.yaml", "index.md", "index.html", "metrics.json", "plots/dmd_losses.png"):
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


def test_presets_are_ordered():
    s, f, d = PRESETS["smoke"], PRESETS["fast"], PRESETS["default"]
    assert s.teacher_steps < f.teacher_steps < d.teacher_steps
    with pytest.raises(ValueError):
        Pipeline("/tmp/x", "huge")
