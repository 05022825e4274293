"""Shipped pretrained toy models (pretrained/toy, causvid/pretrained.py): provenance, hashes, folder-relative paths,
and the recorded teacher score reproduced."""

import hashlib
import json
import os

import pytest
import torch

from causvid.pretrained import (
    PROVENANCE,
    REQUIRED,
    TOY_DIR,
    TOY_MODELS,
    PretrainedError,
    available,
    package,
    read_provenance,
    shipped,
    total_bytes,
    toy_model_path,
    update_scores,
    verify,
)

INFO = dict(command="python make.py", commit="0" * 40, steps=3, wall_seconds=1.5, machine="test", made="2026-12-02")


def _pkg(tmp_path, name="w.bin", payload=b"weights"):
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    out = tmp_path / "model"
    prov = package("vae", {name: str(src)}, out, scores={"psnr": 30.0}, texts={"config.yaml": "a: 1\n"}, **INFO)
    return out, prov


def test_package_then_verify_round_trip(tmp_path):
    out, prov = _pkg(tmp_path)
    assert set(prov["files"]) == {"w.bin", "config.yaml"}
    assert prov["files"]["w.bin"]["size"] == len(b"weights")
    # hand-computed sha256 of b"weights"
    assert prov["files"]["w.bin"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert verify(out) == read_provenance(out) == json.loads((out / PROVENANCE).read_text())
    assert update_scores(out, {"ceiling": 0.8})["scores"] == {"psnr": 30.0, "ceiling": 0.8}


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "config"])
def test_a_damaged_file_is_a_named_error(tmp_path, damage):
    out, _ = _pkg(tmp_path)
    w = out / "w.bin"
    if damage == "flip":
        w.write_bytes(b"weighTs")  # same size, other bytes
    elif damage == "truncate":
        w.write_bytes(b"weigh")
    elif damage == "delete":
        w.unlink()
    else:
        (out / "config.yaml").write_text("a: 2\n")
    with pytest.raises(PretrainedError, match="w.bin|config.yaml") as err:
        verify(out)
    assert "\n" not in str(err.value)


def test_incomplete_provenance_is_refused(tmp_path):
    out, prov = _pkg(tmp_path)
    del prov["commit"]
    (out / PROVENANCE).write_text(json.dumps(prov))
    with pytest.raises(PretrainedError, match="commit"):
        verify(out)
    (out / PROVENANCE).write_text("{not json")
    with pytest.raises(PretrainedError, match="unreadable"):
        verify(out)
    with pytest.raises(PretrainedError, match="no provenance"):
        verify(tmp_path)
    with pytest.raises(PretrainedError, match="unknown pretrained"):
        toy_model_path("unet")


def test_export_folder_paths_may_be_relative_to_the_folder(tmp_path, monkeypatch):
    from causvid.config import load_config, resolve_folder_paths

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "vae.safetensors").write_bytes(b"x")
    (tmp_path / "teacher").mkdir()
    monkeypatch.chdir(tmp_path / "teacher")  # a path valid from the working directory is kept as given
    cfg = resolve_folder_paths(load_config(None, ["vae.path=../vae/vae.safetensors", "text.path=/abs/t.safetensors"]),
                               str(tmp_path / "teacher"))
    assert cfg.vae.path == "../vae/vae.safetensors" and cfg.text.path == "/abs/t.safetensors"
    monkeypatch.chdir(tmp_path.parent)
    cfg = resolve_folder_paths(load_config(None, ["vae.path=../vae/vae.safetensors"]), str(tmp_path / "teacher"))
    assert cfg.vae.path == str(tmp_path / "vae" / "vae.safetensors")


# ------------------------------------------------------------------------------ the shipped files
needs_shipped = pytest.mark.skipif(not available(), reason="no shipped toy models in pretrained/toy")


@needs_shipped
def test_shipped_files_match_their_provenance_and_fit_the_budget():
    assert set(REQUIRED) <= set(shipped())
    for name in shipped():
        sub = TOY_MODELS[name][0]
        prov = verify(os.path.join(TOY_DIR, sub))
        assert prov["model"] == name and prov["commit"] and prov["command"]
        assert os.path.exists(toy_model_path(name))
    assert total_bytes() <= 25 * 2**20


@needs_shipped
def test_shipped_teacher_reproduces_its_recorded_score():
    """The first held-out prompts sampled as recorded (seeds, steps, CFG): per-prompt totals within 0.05."""
    from causvid.eval import toy_eval as E
    from causvid.eval import toyworld_metrics as M

    folder = toy_model_path("teacher")
    scores = read_provenance(folder)["scores"]
    ev, want = scores["eval"], scores["per_prompt_total"]
    torch.manual_seed(0)
    runner = E.TeacherRunner(folder)
    n = 2
    prompts, _ = E.heldout_set(n, runner.cfg)
    seed0 = int(ev["seeds"].split("..")[0])
    videos, _ = runner.generate(prompts, [seed0 + i for i in range(n)], num_steps=ev["num_steps"],
                                guidance=ev["guidance"], shift=ev["shift"])
    got = [M.score_video(v, p, fps=runner.cfg.data.fps)["total"] for v, p in zip(videos, prompts)]
    assert got == pytest.approx(want[:n], abs=0.05)
