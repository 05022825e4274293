"""Atomic, resumable checkpoints (DESIGN.md section 6; docs/reliability.md).

Layout of ``<output_dir>/checkpoint-{step}/`` (``step`` = number of completed training steps):

    {name}.safetensors        each trainable module, unwrapped full state dict
    ema_{name}.safetensors    the fp32 EMA shadow of the EMA target (if enabled)
    optimizer_{name}.pt       each optimizer's ``state_dict()`` (``torch.save`` of tensors and plain
                              containers; loaded with ``weights_only=True``)
    rng_state_{rank}.pt       per-rank RNG states: torch (CPU + CUDA) as tensors, numpy and Python
                              ``random`` as tensors / plain lists (no pickled objects)
    trainer_state.json        step, data cursor, update and non-finite counters, config hash, versions,
                              run id (the lineage) and whether every weight was finite
    config.yaml               the resolved run config
    COMPLETE                  written last, after a barrier (every rank wrote its part): JSON with the
                              step and the size and sha256 of every other file (the manifest)

``<output_dir>/run_id`` names the current run lineage (a fresh start writes a new id, a resume
adopts its checkpoint's id). Pruning only removes checkpoints of that lineage, so a
``train.resume=never`` run in a used folder never deletes its own new checkpoints, and
``auto`` / ``latest`` resume the current lineage. The run lock is :mod:`causvid.train.run_lock`.

A checkpoint is written into ``checkpoint-{step}.tmp/`` and renamed only once ``COMPLETE`` is in
it, so a folder named ``checkpoint-{step}`` without the marker can only be a manual leftover, and
:func:`latest_complete` ignores it. Single files are written atomically (temporary file, fsync,
``os.replace``). Pruning to the last K runs only *after* a successful save, never removes the
newest complete checkpoint, and deletes the ``COMPLETE`` marker (durably) before any other file, so a
kill during pruning leaves a folder that is not a checkpoint rather than a marked, half-deleted one.
Every file is verified against the manifest on read (:func:`verify`); ``auto`` / ``latest`` fall back
to the newest intact checkpoint with a warning naming the bad ones.

Fault injection for tests: ``CAUSVID_FAULT_SAVE="<step>:<raise|exit>"`` (``*`` for any step) makes the
save of that step raise ``RuntimeError`` or ``os._exit(17)`` in the middle of writing (after the first
model file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from typing import Any, Mapping, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from causvid.models.weights import file_sha256, load_into, load_safetensors, save_safetensors

from . import parallel

__all__ = [
    "COMPLETE", "CheckpointError", "checkpoint_dir", "is_complete", "list_checkpoints", "latest_complete",
    "latest_intact", "verify", "current_run_id", "set_current_run_id", "checkpoint_run_id", "resolve_resume", "prune", "save_checkpoint", "load_checkpoint", "config_hash", "config_diff",
    "atomic_write_text", "atomic_write_json", "atomic_torch_save", "torch_load", "get_rng_state", "set_rng_state",
]

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
FAULT_ENV = "CAUSVID_FAULT_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run. The message names the path."""


# ------------------------------------------------------------------------------------- atomic files
def fsync_dir(path: str) -> None:
    """Make a rename / creation inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def torch_load(path: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"corrupt or unsafe checkpoint file {path}: {err}") from None


# ------------------------------------------------------------------------------------------ listing
RUN_ID_FILE = "run_id"


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{int(step)}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def checkpoint_step(path: str) -> int:
    m = _CKPT_RE.match(os.path.basename(os.path.normpath(path)))
    if not m:
        raise CheckpointError(f"not a checkpoint folder name (checkpoint-<step>): {path}")
    return int(m.group(1))


def list_checkpoints(output_dir: str, complete_only: bool = True, run_id: Optional[str] = None) -> list[tuple[int, str]]:
    """``(step, path)`` of the checkpoint folders in ``output_dir``, oldest first (of lineage ``run_id`` if given)."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for entry in os.listdir(output_dir):
        m = _CKPT_RE.match(entry)
        path = os.path.join(output_dir, entry)
        if m and os.path.isdir(path) and (is_complete(path) or not complete_only):
            if run_id is None or checkpoint_run_id(path) == run_id:
                out.append((int(m.group(1)), path))
    return sorted(out)


def checkpoint_run_id(path: str) -> Optional[str]:
    """The run id recorded in a checkpoint's ``trainer_state.json`` (None if absent or unreadable)."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            rid = json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return str(rid) if rid else None


def current_run_id(output_dir: str) -> Optional[str]:
    """The lineage named by ``<output_dir>/run_id`` (None: no run recorded one)."""
    try:
        with open(os.path.join(output_dir, RUN_ID_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def set_current_run_id(output_dir: str, run_id: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, RUN_ID_FILE), f"{run_id}\n")


def _candidates(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, newest first: the current lineage's if it has any, else all."""
    rid = current_run_id(output_dir)
    found = list_checkpoints(output_dir, run_id=rid) if rid else []
    return list(reversed(found or list_checkpoints(output_dir)))


def latest_complete(output_dir: str) -> Optional[str]:
    """The newest checkpoint folder (of the current lineage if it has one) with its ``COMPLETE`` marker, or None."""
    found = _candidates(output_dir)
    return found[0][1] if found else None


def latest_intact(output_dir: str, *, finite_only: bool = False) -> Optional[str]:
    """The newest complete checkpoint (current lineage first) whose files match its manifest, or None.

    Each skipped one is logged as a warning naming it and why. ``finite_only`` also skips checkpoints
    whose ``trainer_state.json`` says some weight was NaN/Inf when it was saved.
    """
    for _, path in _candidates(output_dir):
        try:
            verify(path)
            state = read_trainer_state(path)
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", path, err)
            continue
        if finite_only and state.get("weights_finite") is False:
            log.warning("skipping checkpoint %s: it holds non-finite weights", path)
            continue
        return path
    return None


def resolve_resume(output_dir: str, resume: str) -> Optional[str]:
    """Which checkpoint to resume from (``train.resume``): a path, or None to start fresh.

    ``never``: None. ``latest``: the newest intact complete one (current lineage first, weights
    finite), an error if there is none. ``auto``: the same if any, else None. Anything else is a
    path that must be an intact complete checkpoint. Broken newer checkpoints are skipped with a
    warning naming them.
    """
    resume = str(resume or "auto")
    if resume == "never":
        return None
    if resume in ("latest", "auto"):
        path = latest_intact(output_dir, finite_only=True)
        if path is None and resume == "latest":
            raise CheckpointError(
                f"train.resume=latest but {output_dir} holds no complete checkpoint (checkpoint-<step>/{COMPLETE}) that "
                f"passes its checksums"
            )
        return path
    if not os.path.isdir(resume):
        raise CheckpointError(f"train.resume: checkpoint folder not found: {resume}")
    if not is_complete(resume):
        raise CheckpointError(f"train.resume: {resume} is incomplete (no {COMPLETE} marker); it cannot be resumed")
    verify(resume)
    read_trainer_state(resume)
    return resume


def _invalidate_and_remove(path: str) -> None:
    """Delete ``COMPLETE`` first (durably), then rename the folder to ``*.deleting`` and delete it: a kill at
    any point leaves no marked half-checkpoint, and the next prune finishes the job."""
    marker = os.path.join(path, COMPLETE)
    if os.path.exists(marker):
        os.remove(marker)
        fsync_dir(path)
        _fault_point(None, f"pruning {path}", "prune")
    doomed = f"{path}.deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    fsync_dir(os.path.dirname(path) or ".")
    shutil.rmtree(doomed, ignore_errors=True)


def prune(output_dir: str, keep_last: int, run_id: Optional[str] = None) -> list[str]:
    """Delete complete checkpoints of lineage ``run_id`` older than its newest ``keep_last``, markerless
    leftovers of that lineage (an interrupted prune) and stale ``*.tmp`` / ``*.deleting`` folders.

    ``run_id`` None: every lineage counts as one (legacy). Call only after a successful save, on the
    main process, with no save in progress. Never removes the newest complete checkpoint of the
    lineage (``keep_last`` is clamped to >= 1), nor any checkpoint of another lineage.
    """
    keep_last = max(1, int(keep_last))
    removed = []
    complete = list_checkpoints(output_dir, complete_only=True, run_id=run_id)
    for _, path in complete[:-keep_last]:
        _invalidate_and_remove(path)
        removed.append(path)
    if run_id is not None:
        for _, path in list_checkpoints(output_dir, complete_only=False, run_id=run_id):
            if not is_complete(path):
                _invalidate_and_remove(path)
                removed.append(path)
    for entry in os.listdir(output_dir):
        if entry.startswith("checkpoint-") and entry.endswith((".tmp", ".deleting")):
            shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)
            removed.append(os.path.join(output_dir, entry))
    return removed


# ----------------------------------------------------------------------------------------- manifest
def manifest_of(folder: str) -> dict[str, dict]:
    """``{file: {"size", "sha256"}}`` of every file in ``folder`` except the marker."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name != COMPLETE and os.path.isfile(path):
            out[name] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    return out


def verify(path: str) -> None:
    """Check every file of checkpoint ``path`` against the manifest in its ``COMPLETE`` marker.

    Raises :class:`CheckpointError` naming the first bad file. A marker from before manifests
    (``step <N> <time>``, plain text) is accepted unverified; any other marker that is not a manifest
    (a damaged one) is an error, never a reason to skip the checksums.
    """
    marker = os.path.join(path, COMPLETE)
    try:
        st = os.stat(marker)
        with open(marker, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot read {COMPLETE}: {err}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"checkpoint {path}: {COMPLETE} is corrupt (not text)") from None
    key = (os.path.abspath(path), st.st_ino, st.st_mtime_ns)
    if key in _VERIFIED:  # this process already read every file of this very checkpoint
        return
    try:
        manifest = json.loads(text)
    except ValueError:
        if _LEGACY_MARKER.fullmatch(text):
            return  # a marker from before manifests: nothing to check against
        raise CheckpointError(f"checkpoint {path}: {COMPLETE} is corrupt (neither a manifest nor a "
                              f"'step <N> <time>' marker)") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(w, dict) for w in files.values()):
        raise CheckpointError(f"checkpoint {path}: {COMPLETE} holds no file list")
    for name, want in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        if os.path.getsize(file) != want.get("size") or file_sha256(file) != want.get("sha256"):
            raise CheckpointError(f"checkpoint {path}: file {name} does not match its checksum (corrupt)")
    _VERIFIED.add(key)


_VERIFIED: set[tuple] = set()  # (path, marker inode, marker mtime) verified by this process
_LEGACY_MARKER = re.compile(r"step \d+ \S+\n?")  # what save_checkpoint wrote before manifests


# -------------------------------------------------------------------------------------- config hash
def config_hash(cfg) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True).encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(a, b) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa = _flatten(OmegaConf.to_container(a, resolve=True))
    fb = _flatten(OmegaConf.to_container(b, resolve=True))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


# -------------------------------------------------------------------------------------------- RNG
def get_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ------------------------------------------------------------------------------------ fault hooks
def _fault_point(step: Optional[int], where: str, point: str = "write") -> None:
    """Test hook: ``CAUSVID_FAULT_SAVE=<step|*>:<raise|exit>[:<write|marker|prune>]`` fails the save at
    that point (``write``, the default: after the first model file; ``marker``: every file written, before
    ``COMPLETE``; ``prune``: after an old checkpoint's marker was deleted, before its files)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, mode, want = (spec.split(":") + ["write"])[:3]
    if (step is not None and at not in ("*", str(step))) or want != point:
        return
    if mode == "exit":
        os._exit(17)
    raise RuntimeError(f"injected checkpoint fault at step {step if step is not None else at} ({where}; "
                       f"{FAULT_ENV}={spec})")


# ------------------------------------------------------------------------------------- save / load
def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    *,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, Any],
    emas: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    cfg,
    keep_last: int,
) -> str:
    """Write ``checkpoint-{step}`` atomically; every rank calls this (collectives under FSDP).

    ``models``: the trainer-prepared (maybe wrapped) trainables; ``emas``: ``{name: EMA}``.
    Returns the final folder. Prunes to ``keep_last`` after the save succeeded.
    """
    main = accelerator.is_main_process
    final = checkpoint_dir(output_dir, step)
    tmp = final + ".tmp"
    parallel.barrier(accelerator)
    if main:
        os.makedirs(output_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    parallel.barrier(accelerator)

    for i, (name, wrapped) in enumerate(models.items()):
        sd = parallel.model_state_dict(accelerator, wrapped)
        if main:
            save_safetensors(sd, os.path.join(tmp, f"{name}.safetensors"), {"step": str(step), "module": name})
        del sd  # full state dicts are gathered one at a time: never two on the host (rank 0) at once
        if i == 0:
            _fault_point(step, f"after {name}.safetensors")
    for name, ema in emas.items():
        sd = {k: parallel.full_tensor(v).detach().cpu() for k, v in ema.state_dict().items()}
        if main:
            save_safetensors(sd, os.path.join(tmp, f"ema_{name}.safetensors"), {"step": str(step), "module": name})
        del sd
    for name, opt in optimizers.items():
        osd = parallel.optimizer_state_dict(accelerator, models[name], opt)
        if main:
            atomic_torch_save(osd, os.path.join(tmp, f"optimizer_{name}.pt"))
        del osd
    atomic_torch_save(get_rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pt"))
    if main:
        atomic_write_json(os.path.join(tmp, "trainer_state.json"), dict(trainer_state))
        atomic_write_text(os.path.join(tmp, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))
    parallel.barrier(accelerator)  # every rank has written its part

    if main:
        marker = {"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": manifest_of(tmp)}
        _fault_point(step, "before COMPLETE", "marker")
        atomic_write_json(os.path.join(tmp, COMPLETE), marker)
        fsync_dir(tmp)
        if os.path.exists(final):  # a leftover without the marker, or an older run's (train.resume=never)
            _invalidate_and_remove(final)
        os.replace(tmp, final)
        fsync_dir(output_dir)
        for path in prune(output_dir, keep_last, run_id=trainer_state.get("run_id")):
            log.info("pruned %s", path)
    parallel.barrier(accelerator)
    return final


def read_trainer_state(path: str) -> dict:
    state_path = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_path):
        raise CheckpointError(f"checkpoint {path} has no trainer_state.json")
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: trainer_state.json is not valid JSON ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: trainer_state.json holds no integer 'step'")
    return state


def load_models(path: str, modules: Mapping[str, torch.nn.Module]) -> None:
    """Load each trainable's weights (unwrapped modules, before ``prepare``) from checkpoint ``path``."""
    for name, module in modules.items():
        file = os.path.join(path, f"{name}.safetensors")
        load_into(module, load_safetensors(file), f"checkpoint module '{name}' ({file})")


def load_checkpoint(
    accelerator,
    path: str,
    *,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, Any],
    emas: Mapping[str, Any],
) -> dict:
    """Restore optimizer states, EMA shadows and this rank's RNG state; returns ``trainer_state``.

    Model weights are loaded earlier, into the unwrapped modules (:func:`load_models`).
    """
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker)")
    verify(path)  # a no-op when resolve_resume verified it in this process
    state = read_trainer_state(path)
    for name, opt in optimizers.items():
        parallel.load_optimizer_state(accelerator, models[name], opt, torch_load(os.path.join(path, f"optimizer_{name}.pt")))
    for name, ema in emas.items():
        file = os.path.join(path, f"ema_{name}.safetensors")
        if os.path.isfile(file):
            ema.load_state_dict(load_safetensors(file))
        else:
            log.warning("checkpoint %s has no EMA of '%s' (EMA enabled after it was written): starting it from the weights",
                        path, name)
    rng_file = os.path.join(path, f"rng_state_{accelerator.process_index}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch_load(rng_file))
    else:
        log.warning("checkpoint %s has no RNG state for rank %d (different world size?): keeping fresh RNG",
                    path, accelerator.process_index)
    return state
