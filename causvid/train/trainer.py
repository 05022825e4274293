"""The generic accelerate trainer: runs any :class:`causvid.train.stage.Stage` (DESIGN.md section 6).

One loop for every stage (teacher | causal_teacher | ode | dmd)::

    for step in range(start, max_steps):
        (stop agreed by all ranks?  -> checkpoint, exit 0)
        batches = grad_accum batches from the loader            # one set per step, shared by its updates
        for u, name in enumerate(stage.updates(step)):        # e.g. ["generator", "critic"]
            zero grads of `name`
            for m in range(grad_accum):                        # no_sync on all but the last micro-batch
                loss, logs = stage.loss(name, batches[m], models, step, rng(seed, m * world + rank, step, u))
                backward(loss / grad_accum)
            grad norm (clipped to optim.grad_clip); loss and grad norm finite on every rank?
              yes: optimizer step; EMA update if `name` is the EMA target
              no:  zero grads, skip (parameters unchanged), count; stop after N in a row
        one record per step -> <output_dir>/losses.jsonl (+ trackers every log_every steps)
        checkpoint every checkpoint_every steps (atomic, keep-last-K)
    final checkpoint, stage.export(...) -> <output_dir>/final/ (+ config.yaml)

The numbers a step draws come from ``rng`` (seeded from the step, never from global state) and the
data order from a cursor saved in the checkpoint, so ``N`` steps in one go and ``k`` steps + resume
to ``N`` give identical weights, optimizer states, EMA and losses (tests/test_trainer.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import uuid
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from causvid.config import ConfigError, load_config, validate
from causvid.data.shards import ShardError
from causvid.models.weights import WeightsError
from causvid.validate import check_data, check_run, train_path_keys

from . import checkpoint as ckpt
from . import memory_plan, parallel
from .data import ResumableLoader, ResumableSampler, mix_seed
from .ema import EMA
from .lr import lr_multiplier
from .preemption import StopRequest
from .run_lock import RunLock, RunLockError
from .stage import Stage, build_stage

__all__ = ["Trainer", "run", "main", "NonFiniteError", "LossLog", "check_train_config", "step_rng"]

log = logging.getLogger("causvid.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite (NaN/Inf) losses or gradients; the message names the module."""


# ------------------------------------------------------------------------------------------ config
def check_train_config(cfg: DictConfig) -> None:
    """Trainer-level checks on top of :func:`causvid.config.validate` and the pre-flight
    :func:`causvid.validate.check_run` (paths, sizes, ranges) and :func:`causvid.validate.check_data` (the data
    folder opens as its source); raise ConfigError naming the key."""
    validate(cfg)
    check_run(cfg, paths=train_path_keys(cfg))
    check_data(cfg)
    t = cfg.train
    rules = [
        (t.checkpoint_every >= 0, "train.checkpoint_every", ">= 0 (0: only the final checkpoint)"),
        (t.log_every >= 1, "train.log_every", ">= 1"),
        (t.sample_every >= 0, "train.sample_every", ">= 0"),
        (t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", ">= 1"),
        (0.0 <= t.ema_decay < 1.0, "train.ema_decay", "in [0, 1) (0 disables the EMA)"),
        (t.ema_start_step >= 0, "train.ema_start_step", ">= 0"),
        (cfg.data.num_workers >= 0, "data.num_workers", ">= 0"),
        (bool(str(t.output_dir)), "train.output_dir", "a folder path"),
    ]
    for prefix, o in (("train.optim", t.optim), ("dmd.critic_optim", cfg.dmd.critic_optim)):
        rules += [
            (o.lr >= 0 and math.isfinite(o.lr), f"{prefix}.lr", ">= 0"),
            (o.weight_decay >= 0, f"{prefix}.weight_decay", ">= 0"),
            (o.eps > 0, f"{prefix}.eps", "> 0"),
            (all(0.0 <= b < 1.0 for b in o.betas), f"{prefix}.betas", "two values in [0, 1)"),
            (o.grad_clip >= 0, f"{prefix}.grad_clip", ">= 0 (0: no clipping)"),
            (o.warmup_steps >= 0, f"{prefix}.warmup_steps", ">= 0"),
            (o.decay_steps >= 0, f"{prefix}.decay_steps", ">= 0 (0: no decay)"),
            (0.0 <= o.min_lr_ratio <= 1.0, f"{prefix}.min_lr_ratio", "in [0, 1]"),
        ]
    for ok, key, what in rules:
        if not ok:
            raise ConfigError(f"invalid value for config key '{key}': {OmegaConf.select(cfg, key)!r}; must be {what}")


def step_rng(seed: int, slot: int, step: int, update: int, device: torch.device) -> torch.Generator:
    """The generator handed to ``Stage.loss``: a pure function of (seed, step, update, slot).

    ``slot = micro * world_size + rank`` is the micro-batch's index in the step's global batch, the same index
    the data order gives it (causvid/train/data.py): N processes x A micro-batches draw the same numbers and
    the same samples as 1 process x N*A micro-batches, so runs agree across process counts (tests/test_sharding.py).
    """
    dev = torch.device(device)
    g = torch.Generator(device="cpu" if dev.type == "cpu" else dev)
    return g.manual_seed(mix_seed("step", seed, slot, step, update))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _as_float(v: Any) -> Optional[float]:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean().item()) if v.numel() else None
    if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
        return float(v)
    return None


def _json_float(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------ losses.jsonl
class LossLog:
    """``<output_dir>/losses.jsonl``: one JSON record per step (main process only).

    On (re)start at step ``k`` records with ``step >= k`` are dropped (they belong to steps that the
    resumed run repeats), so the file always holds exactly one record per completed step.
    """

    def __init__(self, path: str, start_step: int, enabled: bool):
        self.path, self.enabled, self._f = path, enabled, None
        if not enabled:
            return
        kept = []
        if os.path.isfile(path) and start_step > 0:
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a torn last line from a crash
                        continue
                    if rec.get("step", -1) < start_step:
                        kept.append(line)
        ckpt.atomic_write_text(path, "".join(k + "\n" for k in kept))
        self._f = open(path, "a")

    def append(self, record: Mapping[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record, sort_keys=True) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    @staticmethod
    def read(path: str) -> list[dict]:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Runs one stage. ``Trainer(cfg).train()``; everything that can be checked is checked in ``__init__``,
    before any network is built."""

    def __init__(self, cfg: DictConfig, stage: Optional[Stage] = None):
        check_train_config(cfg)
        if stage is None:
            stage = build_stage(cfg)  # runs the stage's check_config
        else:
            type(stage).check_config(cfg)
            if getattr(stage, "cfg", None) is None:
                stage.cfg = cfg
        self.cfg, self.stage = cfg, stage
        self.output_dir = str(cfg.train.output_dir)
        self.resume_path = ckpt.resolve_resume(self.output_dir, str(cfg.train.resume))
        self.stop = StopRequest()
        self.lock = RunLock(self.output_dir)
        self.run_id: Optional[str] = None
        self.accelerator = None
        self.world_size = 1

    @property
    def _stop_signal(self) -> int:
        return self.stop.signal

    def request_stop(self, signum: int = signal.SIGTERM, frame=None) -> None:
        """Signal handler: only records the request; the loop acts on it at the next step boundary."""
        self.stop.handle(signum, frame)

    def acquire_lock(self) -> None:
        """Lock ``train.output_dir`` for this run (global rank 0 only, before anything is built) and decide
        the resume checkpoint again under the lock. Raises :class:`RunLockError` naming the holder."""
        if int(os.environ.get("RANK", "0")) == 0:
            self.lock.acquire()
        self.resume_path = ckpt.resolve_resume(self.output_dir, str(self.cfg.train.resume))

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([float(self._stop_signal)], device=self.device)
        return bool(parallel.all_reduce_max(self.accelerator, flag).item() > 0)

    # ------------------------------------------------------------------------------------ build
    def _trackers(self) -> Optional[str]:
        kind = str(self.cfg.train.log_with)
        if kind == "none":
            return None
        if kind == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                log.warning("train.log_with=wandb but wandb is not installed: logging to losses.jsonl only")
                return None
            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"  # never requires an account or the network
            os.environ.setdefault("WANDB_DIR", os.path.abspath(self.output_dir))
            return "wandb"
        for mod in ("torch.utils.tensorboard", "tensorboardX"):
            try:
                __import__(mod)
                import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)

                return "tensorboard"
            except ImportError:
                continue
        log.warning("train.log_with=tensorboard but tensorboard is not installed: logging to losses.jsonl only")
        return None

    def _build(self) -> None:
        cfg, stage = self.cfg, self.stage
        os.makedirs(self.output_dir, exist_ok=True)
        trackers = self._trackers()
        acc = parallel.make_accelerator(
            cfg, find_unused_parameters=bool(getattr(stage, "ddp_find_unused_parameters", False)),
            log_with=trackers, project_dir=self.output_dir,
        )
        self.accelerator, self.world_size, self.rank = acc, acc.num_processes, acc.process_index
        self.resume_path = parallel.broadcast_object(acc, self.resume_path)  # rank 0's decision, made under the lock
        self.main = acc.is_main_process
        if trackers:
            acc.init_trackers(str(cfg.train.project), config=_flat_config(cfg))
        self.trackers = trackers

        self.device = parallel.device_of(acc)  # a plain torch.device("cpu") on CPUs: .to() does not copy
        _seed_all(int(cfg.train.seed))  # identical initial weights on every rank
        # networks are built on parallel.weights_device (the CPU under FSDP2: sharded before they reach the device)
        stage.weights_device = parallel.weights_device(acc)
        stage.setup(cfg, self.device)
        trainable, frozen = dict(stage.trainable()), dict(stage.frozen())
        if not trainable:
            raise ValueError(f"stage '{stage.name}' has no trainable module")
        clash = sorted(set(trainable) & set(frozen))
        if clash:
            raise ValueError(f"stage '{stage.name}': modules {clash} are both trainable and frozen")
        self.ema_name = stage.ema_target() if cfg.train.ema_decay > 0 else None
        if self.ema_name is not None and self.ema_name not in trainable:
            raise ValueError(f"stage '{stage.name}': ema_target {self.ema_name!r} is not a trainable {sorted(trainable)}")
        if cfg.train.ema_decay > 0 and self.ema_name is None:
            log.warning("train.ema_decay=%s but stage '%s' has no EMA target: no EMA", cfg.train.ema_decay, stage.name)

        if self.resume_path is not None:
            ckpt.load_models(self.resume_path, trainable)  # into the unwrapped modules, before wrapping
        self.modules: dict[str, nn.Module] = {}  # unwrapped
        self.wrapped: dict[str, nn.Module] = {}
        self.optimizers: dict[str, Any] = {}
        self.base_lr: dict[str, float] = {}
        for name, module in trainable.items():
            parallel.set_activation_checkpointing(module, bool(cfg.model.gradient_checkpointing))
            oc = stage.optim_config(name)
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"stage '{stage.name}': trainable '{name}' has no parameter with requires_grad")
            opt = torch.optim.AdamW(params, lr=float(oc.lr), betas=(float(oc.betas[0]), float(oc.betas[1])),
                                    eps=float(oc.eps), weight_decay=float(oc.weight_decay))
            # the optimizer holds the parameters now: no other reference to them, so that under FSDP2 a network's
            # whole weights (memory-mapped file pages on CPUs) are released as soon as its shards are made, not
            # while the next network is sharded (docs/memory_plan.md, setup)
            del params
            self.base_lr[name] = float(oc.lr)
            self.wrapped[name], self.optimizers[name] = parallel.prepare_trainable(acc, module, opt)
            self.modules[name] = parallel.unwrap(acc, self.wrapped[name])
        self.frozen = {name: parallel.prepare_frozen(acc, m) for name, m in frozen.items()}
        self.models = {**self.wrapped, **self.frozen}  # what Stage.loss receives
        self.emas: dict[str, EMA] = {}
        if self.ema_name is not None:
            self.emas[self.ema_name] = EMA(self.modules[self.ema_name], float(cfg.train.ema_decay),
                                           int(cfg.train.ema_start_step))

        dataset = stage.dataset()
        self.loader = None
        if dataset is not None:
            sampler = ResumableSampler(len(dataset), int(cfg.train.batch_size), seed=int(cfg.train.seed),
                                       rank=self.rank, world_size=self.world_size)
            self.loader = ResumableLoader(dataset, sampler, num_workers=int(cfg.data.num_workers))

        # counters (restored on resume)
        self.start_step = 0
        self.update_counts = {n: 0 for n in trainable}
        self.nonfinite_total = {n: 0 for n in trainable}
        self.nonfinite_consecutive = {n: 0 for n in trainable}
        _seed_all(mix_seed("rank", int(cfg.train.seed), self.rank))  # per-rank global RNG (dropout etc.)
        if self.resume_path is not None:
            self._restore(self.resume_path)
            if self.main:
                log.info("resuming from %s at step %d", self.resume_path, self.start_step)
        elif self.main:
            log.info("starting fresh in %s (train.resume=%s)", self.output_dir, self.cfg.train.resume)
        self.run_id = parallel.broadcast_object(acc, self.run_id or uuid.uuid4().hex)  # the lineage of this run
        if self.main:
            ckpt.set_current_run_id(self.output_dir, self.run_id)

    def _restore(self, path: str) -> None:
        state = ckpt.load_checkpoint(self.accelerator, path, models=self.wrapped, optimizers=self.optimizers,
                                     emas=self.emas)
        self.start_step = int(state["step"])
        self.run_id = state.get("run_id")
        if self.loader is not None and state.get("data") is not None:
            self.loader.load_state_dict(state["data"])
        for key, target in (("updates", self.update_counts), ("nonfinite_total", self.nonfinite_total),
                            ("nonfinite_consecutive", self.nonfinite_consecutive)):
            target.update({k: int(v) for k, v in state.get(key, {}).items() if k in target})
        if state.get("config_hash") != ckpt.config_hash(self.cfg) and self.main:
            saved = os.path.join(path, "config.yaml")
            changed = ckpt.config_diff(OmegaConf.load(saved), self.cfg) if os.path.isfile(saved) else ["?"]
            log.warning("resuming %s with a changed config: %s", path, ", ".join(changed))
        if int(state.get("world_size", self.world_size)) != self.world_size and self.main:
            log.warning("resuming %s written by %s processes with %d: data order continues from the same global "
                        "position, per-rank random streams change", path, state.get("world_size"), self.world_size)

    # ------------------------------------------------------------------------------------- state
    def trainer_state(self, step: int) -> dict:
        import accelerate

        import causvid

        return {
            "step": int(step),
            "data": self.loader.state_dict() if self.loader is not None else None,
            "updates": dict(self.update_counts),
            "nonfinite_total": dict(self.nonfinite_total),
            "nonfinite_consecutive": dict(self.nonfinite_consecutive),
            "config_hash": ckpt.config_hash(self.cfg),
            "run_id": self.run_id,
            "weights_finite": self._weights_finite(),
            "stage": self.stage.name,
            "world_size": self.world_size,
            "version": {"causvid": causvid.__version__, "torch": torch.__version__, "accelerate": accelerate.__version__},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _weights_finite(self) -> bool:
        """Every trainable weight finite on every rank (a collective: local shards under FSDP)."""
        bad = any(not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                  for m in self.modules.values() for p in m.parameters())
        flag = torch.tensor([float(bad)], device=self.device)
        return not bool(parallel.all_reduce_max(self.accelerator, flag).item() > 0)

    def save(self, step: int) -> str:
        """Checkpoint after ``step`` completed steps (every rank calls this)."""
        path = ckpt.save_checkpoint(
            self.accelerator, self.output_dir, step, models=self.wrapped, optimizers=self.optimizers,
            emas=self.emas, trainer_state=self.trainer_state(step), cfg=self.cfg, keep_last=int(self.cfg.train.keep_last),
        )
        self.last_saved = step
        if self.main:
            log.info("saved %s", path)
        return path

    # -------------------------------------------------------------------------------------- step
    def _lr(self, name: str, step: int) -> float:
        o = self.stage.optim_config(name)
        return self.base_lr[name] * lr_multiplier(step, int(self.cfg.train.max_steps), int(o.warmup_steps),
                                                  int(o.decay_steps), float(o.min_lr_ratio))

    def _next_batches(self) -> list:
        """The step's ``grad_accum`` micro-batches. Every update of a step sees the same ones (the generator
        and critic updates of a DMD iteration share a batch, as the official CausVid trainer, docs/method.md)."""
        if self.loader is None:
            return [{}] * int(self.cfg.train.grad_accum)
        return [_to_device(self.loader.next(), self.device) for _ in range(int(self.cfg.train.grad_accum))]

    def _update(self, name: str, step: int, u: int, record: dict, batches: list) -> None:
        """One optimizer update of ``name`` on the step's micro-batches, guarded against NaN/Inf."""
        cfg, acc = self.cfg, self.accelerator
        wrapped, opt = self.wrapped[name], self.optimizers[name]
        accum = int(cfg.train.grad_accum)
        lr = self._lr(name, step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        logs_sum: dict[str, float] = {}
        for m in range(accum):
            batch = batches[m]
            rng = step_rng(int(cfg.train.seed), m * self.world_size + self.rank, step, u, self.device)
            sync = contextlib.nullcontext() if m == accum - 1 else parallel.no_sync(acc, wrapped)
            with sync:
                with acc.autocast():
                    loss, logs = self.stage.loss(name, batch, self.models, step, rng)
                if loss.dim() != 0:
                    raise ValueError(f"stage '{self.stage.name}'.loss('{name}') returned shape {tuple(loss.shape)}, "
                                     "expected a scalar")
                acc.backward(loss / accum)
            loss_sum = loss_sum + loss.detach().float()
            for k, v in (logs or {}).items():
                fv = _as_float(v)
                if fv is not None:
                    logs_sum[k] = logs_sum.get(k, 0.0) + fv / accum
        grad_norm = parallel.clip_grad_norm(acc, wrapped, float(self.stage.optim_config(name).grad_clip))
        bad = (~torch.isfinite(loss_sum)) | (~torch.isfinite(grad_norm))
        stats = torch.stack([torch.nan_to_num(loss_sum / accum, nan=0.0, posinf=0.0, neginf=0.0), bad.float()])
        stats = parallel.all_reduce_sum(acc, stats.to(self.device))  # [mean loss * world, ranks that saw NaN/Inf]
        nonfinite = bool(stats[1].item() > 0)
        if nonfinite:
            opt.zero_grad(set_to_none=True)  # skip: parameters and optimizer state unchanged
            self.nonfinite_total[name] += 1
            self.nonfinite_consecutive[name] += 1
            record.setdefault("skipped", []).append(name)
            record[f"loss/{name}"] = None
            if self.main:
                log.warning("step %d: non-finite loss or gradient of '%s' on %d rank(s): update skipped (%d in a row, "
                            "%d total)", step, name, int(stats[1].item()), self.nonfinite_consecutive[name],
                            self.nonfinite_total[name])
            limit = int(cfg.train.max_consecutive_nonfinite)
            if self.nonfinite_consecutive[name] >= limit:
                good = ckpt.latest_intact(self.output_dir, finite_only=True)
                raise NonFiniteError(
                    f"{limit} consecutive non-finite updates of '{name}' (train.max_consecutive_nonfinite={limit}) "
                    f"at step {step}; stopping. Last good checkpoint: {good or 'none'}. Lower the learning rate "
                    f"or check the data, then resume with train.resume={good or 'never'}."
                )
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.update_counts[name] += 1
            self.nonfinite_consecutive[name] = 0
            if name in self.emas:
                self.emas[name].update(self.modules[name], step)
            record[f"loss/{name}"] = float(stats[0].item()) / self.world_size
        record[f"grad_norm/{name}"] = _json_float(float(grad_norm.item()))
        record[f"lr/{name}"] = lr
        record[f"nonfinite/{name}"] = self.nonfinite_total[name]
        for k, v in logs_sum.items():
            record[f"{name}/{k}"] = _json_float(v)

    # ------------------------------------------------------------------------------------ export
    def export(self) -> str:
        """``stage.export`` into ``<output_dir>/final`` (via ``final.tmp``, renamed) and ``config.yaml``."""
        acc = self.accelerator
        final = os.path.join(self.output_dir, "final")
        tmp = final + ".tmp"
        backup = None
        if self.ema_name is not None:  # export the EMA weights in place of the trained ones
            backup = {k: v.detach().clone() for k, v in self.modules[self.ema_name].state_dict().items()}
            self.emas[self.ema_name].copy_to(self.modules[self.ema_name])
        try:
            models = {**_export_modules(acc, self.wrapped, self.modules), **self.frozen}
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                self.stage.export(models, tmp)
                ckpt.atomic_write_text(os.path.join(tmp, "config.yaml"), OmegaConf.to_yaml(export_config(self.cfg)))
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
                ckpt.fsync_dir(self.output_dir)
                log.info("exported %s", final)
        finally:
            if backup is not None:
                self.modules[self.ema_name].load_state_dict(backup)
        parallel.barrier(acc)
        return final

    def _samples(self, step: int) -> None:
        models = {**self.modules, **self.frozen}
        videos = self.stage.sample(models, step) if (self.main or parallel.is_fsdp(self.accelerator)) else None
        if not self.main or not videos:
            return
        from causvid.video_io import write_gif

        folder = os.path.join(self.output_dir, "samples", f"step-{step:07d}")
        os.makedirs(folder, exist_ok=True)
        for i, (key, video) in enumerate(videos.items()):
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(key))[:60] or f"sample{i}"
            write_gif(os.path.join(folder, f"{i:02d}_{safe}.gif"), video.detach().float().cpu(), fps=float(self.cfg.data.fps))

    # -------------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        """Run to ``train.max_steps`` (or until SIGTERM/SIGINT). Returns a summary dict."""
        self.acquire_lock()
        try:
            return self._train()
        finally:
            self.lock.release()

    def _train(self) -> dict:
        self._build()
        cfg, acc = self.cfg, self.accelerator
        max_steps = int(cfg.train.max_steps)
        self.last_saved = self.start_step if self.resume_path is not None else -1
        losses = LossLog(os.path.join(self.output_dir, "losses.jsonl"), self.start_step, self.main)
        stopped, step = False, self.start_step
        progress = _progress(self.main, self.start_step, max_steps)
        try:
            with self.stop.installed():
                for step in range(self.start_step, max_steps):
                    if self._stop_agreed():
                        stopped = True
                        break
                    t0 = time.perf_counter()
                    record: dict[str, Any] = {"step": step}
                    names = list(self.stage.updates(step))
                    unknown = sorted(set(names) - set(self.wrapped))
                    if unknown:
                        raise ValueError(f"stage '{self.stage.name}'.updates({step}) names {unknown}, not trainable "
                                         f"({sorted(self.wrapped)})")
                    batches = self._next_batches()
                    for u, name in enumerate(names):
                        self._update(name, step, u, record, batches)
                    record["step_time"] = time.perf_counter() - t0
                    losses.append(record)
                    if (step + 1) % int(cfg.train.log_every) == 0 and self.trackers:
                        acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix({k[5:]: f"{v:.4g}" for k, v in record.items()
                                              if k.startswith("loss/") and v is not None})
                    every = int(cfg.train.checkpoint_every)
                    if every > 0 and (step + 1) % every == 0 and step + 1 < max_steps:
                        self.save(step + 1)
                    if int(cfg.train.sample_every) > 0 and (step + 1) % int(cfg.train.sample_every) == 0:
                        self._samples(step + 1)
                else:
                    step = max(max_steps, self.start_step)  # a resume past max_steps trains nothing
                if stopped:
                    if self.main:
                        log.info("stop requested (signal %d): checkpoint at step %d and exit", self._stop_signal, step)
                if self.last_saved != step:
                    self.save(step)
                final = None if stopped else self.export()
        finally:
            losses.close()
            if progress is not None:
                progress.close()
        if self.trackers:
            acc.end_training()
        return {
            "step": step, "stopped": stopped, "world_size": self.world_size,
            "distributed": "FSDP2" if parallel.is_fsdp(acc) else "DDP" if self.world_size > 1 else "none",
            "checkpoint": ckpt.checkpoint_dir(self.output_dir, step), "final": final,
            "updates": dict(self.update_counts), "nonfinite": dict(self.nonfinite_total),
        }


def _progress(main: bool, start: int, total: int):
    if not main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, disable=not sys.stderr.isatty())


def _export_modules(acc, wrapped: Mapping[str, nn.Module], modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Plain (unwrapped, full-weight) trainables for ``Stage.export``; gathered on the main process under FSDP."""
    if not parallel.is_fsdp(acc):
        return dict(modules)
    out = {}
    for name, w in wrapped.items():
        sd = parallel.model_state_dict(acc, w)  # collective
        if acc.is_main_process:
            m = modules[name]
            if not hasattr(m, "cfg"):
                raise TypeError(f"FSDP export of '{name}' needs a module rebuildable as type(m)(m.cfg)")
            with torch.device("meta"):  # no weights of its own: it takes the gathered tensors (no second copy)
                copy = type(m)(m.cfg)
            copy.load_state_dict(sd, assign=True)
            out[name] = copy
        del sd
    return out


_PATH_KEYS = ("vae.path", "text.path", "text.tokenizer_path", "train.init_from", "train.teacher_path")


def export_config(cfg: DictConfig) -> DictConfig:
    """The resolved config with the weight paths made absolute (interfaces C: final/config.yaml)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in _PATH_KEYS:
        value = OmegaConf.select(out, key)
        if value:
            OmegaConf.update(out, key, os.path.abspath(str(value)))
    return out


def _flat_config(cfg: DictConfig) -> dict:
    flat = ckpt._flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}


def run(cfg: DictConfig, *, stage: Optional[Stage] = None) -> dict:
    """Train ``cfg`` (the stage named by ``cfg.train.stage`` unless one is given). Returns a summary."""
    torch.set_flush_denormal(True)  # denormals slow CPU kernels several-fold (environment.md); no effect on CUDA
    return Trainer(cfg, stage=stage).train()


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None, description: str = "Train a causvid stage") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="run config YAML (deltas from causvid/config.py defaults)")
    p.add_argument("--resume", help="auto | latest | never | <path to checkpoint-N> (sets train.resume)")
    p.add_argument("--dry-run", action="store_true", help="validate the config and print the plan (with the per-device "
                   "memory plan, causvid/train/memory_plan.py); build nothing")
    memory_plan.add_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.max_steps=10 model.size=tiny")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, *, allowed_stages: Optional[Sequence[str]] = None,
         description: str = "Train a causvid stage") -> int:
    """The body of ``scripts/train_*.py``: config -> :func:`run`. Returns the exit status."""
    args = parse_args(argv, description)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        if allowed_stages is not None and cfg.train.stage not in allowed_stages:
            raise ConfigError(f"invalid value for config key 'train.stage': {cfg.train.stage!r}; this script trains "
                              f"{list(allowed_stages)} (set train.stage=... or use scripts/train_dmd.py)")
        torch.set_flush_denormal(True)
        trainer = Trainer(cfg)
        plan = memory_plan.dry_run_plan(cfg, args) if args.dry_run else None
    except (ConfigError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        print(f"stage: {trainer.stage.name} ({type(trainer.stage).__name__})")
        print(f"output_dir: {trainer.output_dir}")
        print(f"resume: {trainer.resume_path or 'fresh start'} (train.resume={cfg.train.resume})")
        memory_plan.print_plan(plan)
        return 0
    try:
        trainer.acquire_lock()
    except (RunLockError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    except (WeightsError, ShardError) as err:  # a weight / data file that exists but does not read as one
        print(f"error: {err}", file=sys.stderr)
        return 2
    if trainer.main:
        print(json.dumps(summary, default=str))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
