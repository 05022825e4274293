"""Pretrained toy-world models shipped with the repository (``pretrained/toy/``), checked against their provenance.

The embedded default distils a teacher the user already has, as the real use does with Wan2.1: the quickstart
starts from these files (``scripts/quickstart.py``; ``--from-scratch`` trains every model itself). Each model is a
folder with its weight files and ``provenance.json``::

    {"model": "vae", "files": {"vae.safetensors": {"size": 7372000, "sha256": "..."}},
     "command": "python scripts/train_vae.py ...", "commit": "<git sha of the code that trained it>",
     "steps": 3000, "wall_seconds": 3600.0, "machine": "...", "made": "2026-12-02", "scores": {...}, "notes": "..."}

Every file is verified (size and sha256) before it is used, so a truncated or edited file is a named error, never
a silently different model. The models are loaded by path like any other weights (``vae.path``, ``text.path``,
``train.teacher_path``, ``sampler.tiny_decoder_path``). ``scripts/package_pretrained.py`` writes a folder from a run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from causvid.models.weights import file_sha256

REPO = Path(__file__).resolve().parents[1]
TOY_DIR = REPO / "pretrained" / "toy"
PROVENANCE = "provenance.json"
# model name -> (folder under TOY_DIR, the file that other code loads)
TOY_MODELS = {
    "text": ("text", "text_encoder.safetensors"),
    "vae": ("vae", "vae.safetensors"),
    "tiny_decoder": ("tiny_decoder", "decoder.safetensors"),
    "teacher": ("teacher", "model.safetensors"),
    "causal_teacher": ("causal_teacher", "model.safetensors"),
}
REQUIRED = ("text", "vae", "teacher")  # what the quickstart's default path needs; the others are optional
PROVENANCE_KEYS = ("model", "files", "command", "commit", "steps", "wall_seconds", "machine", "made", "scores")


class PretrainedError(RuntimeError):
    """A shipped model is missing, incomplete, or does not match its provenance."""


def read_provenance(folder: str | os.PathLike) -> dict:
    path = os.path.join(folder, PROVENANCE)
    if not os.path.isfile(path):
        raise PretrainedError(f"{folder}: no {PROVENANCE} (not a pretrained model folder)")
    try:
        with open(path) as f:
            prov = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise PretrainedError(f"{path}: unreadable ({err})") from None
    missing = [k for k in PROVENANCE_KEYS if k not in prov]
    if missing or not isinstance(prov.get("files"), dict) or not prov["files"]:
        raise PretrainedError(f"{path}: incomplete provenance, missing {missing or ['files']}")
    return prov


def verify(folder: str | os.PathLike) -> dict:
    """Check every file of ``folder`` against its ``provenance.json`` (size and sha256); the provenance."""
    prov = read_provenance(folder)
    for name, want in prov["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise PretrainedError(f"{path}: missing (listed in {PROVENANCE})")
        size = os.path.getsize(path)
        if size != want.get("size"):
            raise PretrainedError(f"{path}: {size} bytes, provenance says {want.get('size')} (truncated or replaced; "
                                  "restore it with `git checkout -- pretrained/`)")
        if file_sha256(path) != want.get("sha256"):
            raise PretrainedError(f"{path}: sha256 differs from {PROVENANCE} (edited or corrupt; restore it with "
                                  "`git checkout -- pretrained/`)")
    return prov


def toy_model_path(name: str, root: str | os.PathLike = TOY_DIR, check: bool = True) -> str:
    """The verified path of shipped toy model ``name`` (:data:`TOY_MODELS`): a weight file, or for the teachers
    their export folder (``model.safetensors`` + ``config.yaml``)."""
    if name not in TOY_MODELS:
        raise PretrainedError(f"unknown pretrained toy model {name!r}; valid: {sorted(TOY_MODELS)}")
    sub, file = TOY_MODELS[name]
    folder = os.path.join(root, sub)
    if check:
        verify(folder)
    return folder if name.endswith("teacher") else os.path.join(folder, file)


def available(root: str | os.PathLike = TOY_DIR, names: Sequence[str] = REQUIRED) -> bool:
    """Whether every model of ``names`` has a provenance file under ``root`` (not verified)."""
    return all(os.path.isfile(os.path.join(root, TOY_MODELS[n][0], PROVENANCE)) for n in names)


def package(model: str, files: Mapping[str, str], out: str | os.PathLike, *, command: str, commit: str,
            steps: int | None, wall_seconds: float | None, machine: str, made: str,
            scores: Mapping[str, Any] | None = None, notes: str = "",
            texts: Mapping[str, str] | None = None) -> dict:
    """Copy ``files`` (name in the folder -> source path) into ``out``, add ``texts`` (name -> content, e.g. a
    ``config.yaml`` with relative paths) and write ``provenance.json``. Returns the provenance."""
    os.makedirs(out, exist_ok=True)
    for name, src in files.items():
        if not os.path.isfile(src):
            raise PretrainedError(f"{src}: no such file")
        shutil.copyfile(src, os.path.join(out, name))
    for name, text in (texts or {}).items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    names = sorted([*files, *(texts or {})])
    prov = {"model": model,
            "files": {n: {"size": os.path.getsize(os.path.join(out, n)), "sha256": file_sha256(os.path.join(out, n))}
                      for n in names},
            "command": command, "commit": commit, "steps": steps, "wall_seconds": wall_seconds, "machine": machine,
            "made": made, "scores": dict(scores or {}), "notes": notes}
    _write_provenance(out, prov)
    return prov


def _write_provenance(out: str | os.PathLike, prov: dict) -> None:
    from causvid.train.checkpoint import atomic_write_json

    atomic_write_json(os.path.join(out, PROVENANCE), prov)


def update_scores(out: str | os.PathLike, scores: Mapping[str, Any]) -> dict:
    """Add measured ``scores`` to a packaged folder's provenance (after verifying its files)."""
    prov = verify(out)
    prov["scores"] = {**prov["scores"], **scores}
    _write_provenance(out, prov)
    return prov


def shipped(root: str | os.PathLike = TOY_DIR) -> list[str]:
    """The models of :data:`TOY_MODELS` that have a folder with a provenance file under ``root``."""
    return [n for n in TOY_MODELS if available(root, [n])]


def total_bytes(root: str | os.PathLike = TOY_DIR) -> int:
    """Size of every shipped file under ``root`` (the budget is 25 MB)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
