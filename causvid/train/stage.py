"""The training-stage contract: one training method the generic trainer can run (DESIGN.md section 6).

A :class:`Stage` knows *what* to train (networks, data, losses, export format). The trainer
(:mod:`causvid.train.trainer`) owns *how*: accelerate, device placement, optimizers (AdamW built from
:meth:`Stage.optim_config`), gradient clipping and accumulation, EMA, checkpoints and resume, data
order, per-step RNG, SIGTERM handling, non-finite guards and logging. Stages never touch any of that.

Stages are registered by name (``cfg.train.stage``: teacher | causal_teacher | ode | dmd) with
:func:`register_stage`; :func:`build_stage` imports :mod:`causvid.train.stages` lazily (that module
holds the concrete stages) and instantiates the one the config names::

    @register_stage("dmd")
    class DMDStage(Stage):
        ...

    stage = build_stage(cfg)          # DMDStage(cfg)
    stage.setup(cfg, device)
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["Stage", "STAGES", "register_stage", "build_stage", "available_stages"]


class Stage:
    """One training method. Subclasses override the methods that raise ``NotImplementedError``.

    Life cycle (driven by the trainer):

    1. ``stage = cls(cfg)``; ``cls.check_config(cfg)`` runs first, before any network is built, and
       raises :class:`causvid.config.ConfigError` naming the offending key.
    2. ``stage.setup(cfg, device)`` builds networks (on :meth:`network_device`: the CPU under FSDP2, set by the
       trainer in ``weights_device``, else ``device``), loads weights, encodes fixed prompts (encoders on
       ``device``) and releases encoders.
    3. The trainer reads :meth:`trainable` / :meth:`frozen`, builds one AdamW per trainable module from
       :meth:`optim_config`, wraps the trainables for the distributed setup and moves frozen modules
       to the device (``eval()``, ``requires_grad_(False)``).
    4. For every step: for every ``name`` in :meth:`updates` (step): for every micro-batch:
       ``loss, logs = stage.loss(name, batch, models, step, rng)``, backward, then one optimizer step
       of ``name``. After the update of :meth:`ema_target` the trainer updates its EMA.
    5. At the end: ``stage.export(models, folder)`` with unwrapped modules (the EMA weights in place
       of the EMA target's weights when the EMA is enabled).
    """

    #: Registry name (set by :func:`register_stage`).
    name: str = "stage"

    #: Passed to DDP (``find_unused_parameters``): set True only if a trainable's loss may leave some of
    #: its parameters without a gradient (slower; the default stages do not need it).
    ddp_find_unused_parameters: bool = False

    #: Where :meth:`setup` builds and loads the networks the trainer will wrap (set by the trainer before ``setup``:
    #: ``causvid.train.parallel.weights_device``, the CPU under FSDP2 so that only shards reach the accelerator).
    #: None: the ``device`` passed to ``setup``.
    weights_device: Optional[torch.device] = None

    def __init__(self, cfg=None):
        self.cfg = cfg

    # ----------------------------------------------------------------------------------- config
    @classmethod
    def check_config(cls, cfg) -> None:
        """Stage-specific config validation; runs before anything is built.

        Raise :class:`causvid.config.ConfigError` naming the key (e.g. a missing ``train.teacher_path``).
        Default: nothing to check.
        """

    # ------------------------------------------------------------------------------------ build
    def setup(self, cfg, device: torch.device) -> None:
        """Build networks, load weights, encode fixed prompts (negative prompt) and release encoders."""
        raise NotImplementedError(f"{type(self).__name__}.setup")

    def network_device(self, device) -> torch.device:
        """Where :meth:`setup` puts the networks it returns from :meth:`trainable` / :meth:`frozen`."""
        return torch.device(self.weights_device if self.weights_device is not None else device)

    def trainable(self) -> dict[str, nn.Module]:
        """Modules trained and checkpointed, e.g. ``{"generator": g}`` or ``{"generator": g, "critic": c}``.

        Must return the same module objects on every call (the trainer wraps them once).
        """
        raise NotImplementedError(f"{type(self).__name__}.trainable")

    def frozen(self) -> dict[str, nn.Module]:
        """Frozen modules (e.g. ``{"teacher": t}``): eval(), requires_grad False, never checkpointed."""
        return {}

    def optim_config(self, name: str):
        """The :class:`causvid.config.OptimConfig` for trainable ``name`` (default ``cfg.train.optim``).

        DMD overrides it so the critic uses ``cfg.dmd.critic_optim``.
        """
        if self.cfg is None:
            raise NotImplementedError(f"{type(self).__name__}.optim_config needs self.cfg")
        return self.cfg.train.optim

    def updates(self, step: int) -> list[str]:
        """Trainable names updated at ``step``, in order (default: every trainable, once).

        DMD: ``["generator", "critic"]`` if ``step % cfg.dmd.update_ratio == 0`` else ``["critic"]``.
        """
        return list(self.trainable())

    def dataset(self) -> torch.utils.data.Dataset:
        """Map-style data set; items are dicts of tensors / strings / numbers (default collate)."""
        raise NotImplementedError(f"{type(self).__name__}.dataset")

    # ------------------------------------------------------------------------------------- loss
    def loss(
        self,
        name: str,
        batch: dict,
        models: dict[str, nn.Module],
        step: int,
        rng: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss for updating trainable ``name`` plus plain floats to log.

        ``batch``: one collated micro-batch, tensors already on the device.
        ``models``: trainer-prepared modules: trainables maybe DDP/FSDP-wrapped (call them, do not
        reach into ``.module``), frozen modules on the device. Modules other than ``name`` must be
        run under ``torch.no_grad()`` where their gradients are not needed (e.g. the generator's
        forward inside the critic loss).
        ``rng``: a generator (on the device) seeded from (train.seed, rank, step, update index,
        micro-batch): draw every random number from it so a resumed run draws the same numbers.
        Logged values: by convention ``"loss/<name>"`` style keys; a DMD stage reports the norm of
        its distribution-matching gradient as ``"dmd_grad_norm"``.
        """
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def ema_target(self) -> Optional[str]:
        """Which trainable gets an EMA (the generator), or None. Used only if ``cfg.train.ema_decay > 0``."""
        return None

    # ----------------------------------------------------------------------------------- output
    def export(self, models: dict[str, nn.Module], folder: str) -> None:
        """Write the final folder (interfaces C): ``model.safetensors`` (+ ``critic.safetensors`` for DMD).

        ``models``: unwrapped trainable modules (the EMA target holds its EMA weights when the EMA is
        enabled) and frozen modules. The trainer writes ``config.yaml`` itself, after this call.
        Called on the main process only.
        """
        raise NotImplementedError(f"{type(self).__name__}.export")

    def sample(self, models: dict[str, nn.Module], step: int) -> Optional[dict[str, torch.Tensor]]:
        """Optional preview videos ``{caption_or_key: video [T, 3, H, W] in [-1, 1]}``; None for none."""
        return None


# ---------------------------------------------------------------------------------- registry
STAGES: dict[str, type[Stage]] = {}


def register_stage(*names: str) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator registering a :class:`Stage` subclass under one or more names."""
    if not names:
        raise ValueError("register_stage needs at least one name")

    def deco(cls: type[Stage]) -> type[Stage]:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise TypeError(f"register_stage({names}): {cls!r} is not a Stage subclass")
        for n in names:
            other = STAGES.get(n)
            if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
                raise ValueError(f"stage name {n!r} already registered by {other.__module__}.{other.__qualname__}")
            STAGES[n] = cls
        if cls.__dict__.get("name") is None:
            cls.name = names[0]
        return cls

    return deco


def _import_stages() -> None:
    """Import the module holding the concrete stages (lazily: it pulls in models and data)."""
    importlib.import_module("causvid.train.stages")


def available_stages() -> list[str]:
    """Registered stage names (after importing :mod:`causvid.train.stages`)."""
    _import_stages()
    return sorted(STAGES)


def get_stage_class(name: str) -> type[Stage]:
    """The registered class for ``name``; imports the concrete stages on a miss."""
    if name not in STAGES:
        try:
            _import_stages()
        except ModuleNotFoundError as err:
            if err.name != "causvid.train.stages":
                raise
    if name not in STAGES:
        from causvid.config import ConfigError

        raise ConfigError(f"invalid value for config key 'train.stage': {name!r}; registered: {sorted(STAGES)}")
    return STAGES[name]


def build_stage(cfg) -> Stage:
    """Instantiate the stage named by ``cfg.train.stage`` and run its :meth:`Stage.check_config`."""
    cls = get_stage_class(str(cfg.train.stage))
    cls.check_config(cfg)
    return cls(cfg)
