"""Atomic, resumable checkpoints (DESIGN.md section 6; docs/reliability.md).

Layout of ``<output_dir>/checkpoint-{step}/`` (``step`` = number of completed training steps):

    {name}.safetensors        each trainable module, unwrapped full state dict
    ema_{name}.safetensors    the fp32 EMA shadow of the EMA target (if enabled)
    optimizer_{name}.pt       each optimizer's ``state_dict()`` (``torch.save`` of tensors and plain
                              containers; loaded with ``weights_only=True``)
    rng_state_{rank}.pt       per-rank RNG states: torch (CPU + CUDA) as tensors, numpy and Python
                              ``random`` as tensors / plain lists (no pickled objects)
    trainer_state.json        step, data cursor, update and non-finite counters, config hash, versions
    config.yaml               the resolved run config
    COMPLETE                  written last, after a barrier (every rank wrote its part)

A checkpoint is written into ``checkpoint-{step}.tmp/`` and renamed only once ``COMPLETE`` is in
it, so a folder named ``checkpoint-{step}`` without the marker can only be a manual leftover, and
:func:`latest_complete` ignores it. Single files are written atomically (temporary file, fsync,
``os.replace``). Pruning to the last K runs only *after* a successful save and never removes the
newest complete checkpoint.

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

from causvid.models.weights import load_into, load_safetensors, save_safetensors

from . import parallel

__all__ = [
    "COMPLETE", "CheckpointError", "checkpoint_dir", "is_complete", "list_checkpoints", "latest_complete",
    "resolve_resume", "prune", "save_checkpoint", "load_checkpoint", "config_hash", "config_diff",
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
def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{int(step)}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def checkpoint_step(path: str) -> int:
    m = _CKPT_RE.match(os.path.basename(os.path.normpath(path)))
    if not m:
        raise CheckpointError(f"not a checkpoint folder name (checkpoint-<step>): {path}")
    return int(m.group(1))


def list_checkpoints(output_dir: str, complete_only: bool = True) -> list[tuple[int, str]]:
    """``(step, path)`` of the checkpoint folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for entry in os.listdir(output_dir):
        m = _CKPT_RE.match(entry)
        path = os.path.join(output_dir, entry)
        if m and os.path.isdir(path) and (is_complete(path) or not complete_only):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_complete(output_dir: str) -> Optional[str]:
    """The newest checkpoint folder that has its ``COMPLETE`` marker, or None."""
    found = list_checkpoints(output_dir, complete_only=True)
    return found[-1][1] if found else None


def resolve_resume(output_dir: str, resume: str) -> Optional[str]:
    """Which checkpoint to resume from (``train.resume``): a path, or None to start fresh.

    ``never``: None. ``latest``: the newest complete one, an error if there is none. ``auto``: the
    newest complete one if any, else None. Anything else is a path that must be a complete checkpoint.
    """
    resume = str(resume or "auto")
    if resume == "never":
        return None
    if resume in ("latest", "auto"):
        path = latest_complete(output_dir)
        if path is None and resume == "latest":
            raise CheckpointError(
                f"train.resume=latest but {output_dir} holds no complete checkpoint (checkpoint-<step>/{COMPLETE})"
            )
        return path
    if not os.path.isdir(resume):
        raise CheckpointError(f"train.resume: checkpoint folder not found: {resume}")
    if not is_complete(resume):
        raise CheckpointError(f"train.resume: {resume} is incomplete (no {COMPLETE} marker); it cannot be resumed")
    return resume


def prune(output_dir: str, keep_last: int) -> list[str]:
    """Delete complete checkpoints older than the newest ``keep_last`` and stale ``*.tmp`` folders.

    Call only after a successful save, on the main process, with no save in progress. Never removes
    the newest complete checkpoint (``keep_last`` is clamped to >= 1).
    """
    keep_last = max(1, int(keep_last))
    removed = []
    complete = list_checkpoints(output_dir, complete_only=True)
    for _, path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for entry in os.listdir(output_dir):
        if entry.startswith("checkpoint-") and entry.endswith(".tmp"):
            shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)
            removed.append(os.path.join(output_dir, entry))
    return removed


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
def _fault_point(step: int, where: str) -> None:
    """Test hook: ``CAUSVID_FAULT_SAVE=<step|*>:<raise|exit>`` fails the save mid-write."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, _, mode = spec.partition(":")
    if at not in ("*", str(step)):
        return
    if mode == "exit":
        os._exit(17)
    raise RuntimeError(f"injected checkpoint fault at step {step} ({where}; {FAULT_ENV}={spec})")


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
        if i == 0:
            _fault_point(step, f"after {name}.safetensors")
    for name, ema in emas.items():
        sd = {k: parallel.full_tensor(v).detach().cpu() for k, v in ema.state_dict().items()}
        if main:
            save_safetensors(sd, os.path.join(tmp, f"ema_{name}.safetensors"), {"step": str(step), "module": name})
    for name, opt in optimizers.items():
        osd = parallel.optimizer_state_dict(accelerator, models[name], opt)
        if main:
            atomic_torch_save(osd, os.path.join(tmp, f"optimizer_{name}.pt"))
    atomic_torch_save(get_rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pt"))
    if main:
        atomic_write_json(os.path.join(tmp, "trainer_state.json"), dict(trainer_state))
        atomic_write_text(os.path.join(tmp, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))
    parallel.barrier(accelerator)  # every rank has written its part

    if main:
        atomic_write_text(os.path.join(tmp, COMPLETE), f"step {step} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        fsync_dir(tmp)
        if os.path.exists(final):  # a leftover without the marker, or an older run's (train.resume=never)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(output_dir)
        for path in prune(output_dir, keep_last):
            log.info("pruned %s", path)
    parallel.barrier(accelerator)
    return final


def read_trainer_state(path: str) -> dict:
    state_path = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_path):
        raise CheckpointError(f"checkpoint {path} has no trainer_state.json")
    with open(state_path) as f:
        return json.load(f)


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
