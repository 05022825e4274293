"""Distribution policy: the only module that knows DDP vs FSDP2 and activation checkpointing (DESIGN.md section 6).

The trainer calls these helpers and never branches on the distributed type itself.

* **Single process / DDP** (CPU gloo in tests, GPUs with ``configs/accelerate/1gpu.yaml`` or a plain
  ``--multi_gpu`` launch): every trainable is wrapped by ``accelerator.prepare(module, optimizer)``
  separately (one DDP wrapper per trainable, so the generator and the critic reduce their own
  gradients on their own backward passes); frozen modules are moved to the device, ``eval()``, with
  ``requires_grad`` off. State dicts are full on every rank; the main process writes them.
* **Where things go**: :func:`device_of` is the device modules and tensors are moved to: accelerate's device, but a
  plain ``torch.device("cpu")`` when that is a CPU (a multi-process CPU launch reports ``cpu:0`` or similar, and
  ``Tensor.to("cpu:0")`` copies a CPU tensor, so every weight file would be held twice while it loads).
  :func:`weights_device` is where the stages build and load their networks: the CPU under FSDP2, so that no rank
  ever holds a whole network on its accelerator; ``fully_shard`` (per block, then the root) moves each unit's
  parameters to the mesh's device as it shards them (torch documents that ignored parameters are the ones *not*
  moved to the device during init), so a GPU holds at most one unit whole, for the moment it is chunked.
* **FSDP2** (``configs/accelerate/8gpu_fsdp.yaml``: ``fsdp_version: 2``, wrap class ``DiTBlock``,
  bf16): accelerate shards each trainable (one ``prepare(module, optimizer)`` per trainable, as
  accelerate's FSDP2 path handles one model per call). Frozen modules have no optimizer, which
  accelerate's FSDP2 ``prepare`` refuses, so they are sharded here with ``fully_shard`` per
  ``DiTBlock`` and at the root. Neither path moves a module to the GPU before sharding it (accelerate 1.x's FSDP2
  ``prepare`` calls ``fully_shard`` bottom-up on the module as it is). Full (unsharded) model / optimizer state dicts are gathered with
  ``torch.distributed.checkpoint.state_dict`` (a collective: every rank calls it) onto the CPU of rank 0.
  Gradient accumulation turns the reduce-scatter off with ``set_requires_gradient_sync(False)`` on
  all but the last micro-batch. On CPUs it runs over gloo (``configs/accelerate/cpu_2proc_fsdp.yaml``, the
  rehearsal of docs/wan2.1.md and tests/test_rehearsal.py); :func:`check_sharded` proves every block was sharded.
* **Activation checkpointing** per DiT block: ``WanDiT.gradient_checkpointing = True`` (non-reentrant
  ``torch.utils.checkpoint`` around each block, compatible with DDP and FSDP2); modules without that
  flag but with a ``blocks`` ``ModuleList`` get torch's ``checkpoint_wrapper`` on each block.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import nn

from causvid.train.precision import warn_if_emulated_bf16

__all__ = [
    "make_accelerator", "device_of", "weights_device", "is_fsdp", "check_sharded", "set_activation_checkpointing", "prepare_trainable", "prepare_frozen",
    "no_sync", "unwrap", "full_tensor", "model_state_dict", "optimizer_state_dict", "load_optimizer_state",
    "clip_grad_norm", "all_reduce_sum", "all_reduce_max", "barrier",
]


def _world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(cfg, *, find_unused_parameters: bool = False, log_with: Optional[str] = None, project_dir=None):
    """The ``Accelerator`` for a run: mixed precision from ``cfg.train.mixed_precision``.

    Without CUDA, a multi-process launch (``accelerate launch --multi_gpu --num_processes N`` or
    ``torchrun``) sets ``WORLD_SIZE > 1`` but accelerate only initialises gloo when told ``cpu=True``,
    so we pass it; a single process without CUDA also runs on the CPU. Gradient accumulation is done
    by the trainer itself (several models, one optimizer each), so accelerate's counter stays at 1.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = not torch.cuda.is_available()
    kwargs = dict(
        cpu=cpu,
        mixed_precision=str(cfg.train.mixed_precision),
        gradient_accumulation_steps=1,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    if log_with:
        kwargs.update(log_with=log_with, project_dir=project_dir)
    warn_if_emulated_bf16(cfg.train.mixed_precision, "cpu" if cpu else "cuda")
    return Accelerator(**kwargs)


def device_of(accelerator) -> torch.device:
    """The device the library moves modules and tensors to: ``accelerator.device``, except that any CPU device
    (``cpu:0`` under a multi-process CPU launch) is the plain ``torch.device("cpu")``, which ``Tensor.to`` treats
    as the tensor's own device (no copy; ``.to("cpu:0")`` copies every CPU tensor)."""
    dev = torch.device(accelerator.device)
    return torch.device("cpu") if dev.type == "cpu" else dev


def weights_device(accelerator) -> torch.device:
    """Where a stage builds and loads its networks (``Stage.weights_device``): the CPU under FSDP2 (each network is
    then sharded by :func:`prepare_trainable` / :func:`prepare_frozen`, which put only the shards on the device),
    else :func:`device_of`."""
    return torch.device("cpu") if is_fsdp(accelerator) else device_of(accelerator)


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or _cpu_fsdp2(accelerator)


def _cpu_fsdp2(accelerator) -> bool:
    """An FSDP2 launch (``ACCELERATE_USE_FSDP`` / ``FSDP_VERSION`` set by ``accelerate launch``) on CPUs.

    accelerate runs several CPU processes as ``MULTI_CPU`` and never selects FSDP there, so this module shards
    the trainables itself (:func:`_shard`) in that case: the same ``fully_shard`` per block + root as accelerate
    does on GPUs, over gloo (``configs/accelerate/cpu_2proc_fsdp.yaml``).
    """
    return (accelerator.device.type == "cpu" and accelerator.num_processes > 1
            and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and os.environ.get("FSDP_VERSION") == "2")


def _shard(accelerator, module: nn.Module) -> nn.Module:
    """``fully_shard`` each block class instance, then the root (in place); bf16 compute with fp32 reduction
    when the run is bf16. ``module`` may be on the CPU: ``fully_shard`` moves each unit's parameters to the
    mesh's device as it shards them (one unit whole there at a time), :func:`_on_device` checks it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {}
    if str(accelerator.mixed_precision) == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    classes = _block_classes(module)
    for sub in module.modules():
        if isinstance(sub, classes):
            fully_shard(sub, reshard_after_forward=reshard, **kw)
    fully_shard(module, reshard_after_forward=reshard, **kw)
    check_sharded(module)
    _on_device(accelerator, module)
    return module


def _on_device(accelerator, module: nn.Module) -> None:
    """After sharding: buffers (not sharded) moved to the device; an error if a parameter is not there."""
    dev = device_of(accelerator)
    for sub in unwrap_plain(module).modules():
        for k, b in sub._buffers.items():
            if b is not None and b.device.type != dev.type:
                sub._buffers[k] = b.to(dev)
    stray = [n for n, p in unwrap_plain(module).named_parameters() if p.device.type != dev.type]
    if stray:
        raise RuntimeError(f"FSDP2: parameters {stray[:4]} are not on {dev} after fully_shard")


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Per-block activation checkpointing (``cfg.model.gradient_checkpointing``)."""
    if hasattr(module, "gradient_checkpointing"):
        module.gradient_checkpointing = bool(enabled)
        return
    blocks = getattr(module, "blocks", None)
    if enabled and isinstance(blocks, nn.ModuleList):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            checkpoint_wrapper,
        )

        for i, blk in enumerate(blocks):
            if not type(blk).__name__.startswith("CheckpointWrapper"):
                blocks[i] = checkpoint_wrapper(blk, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def prepare_trainable(accelerator, module: nn.Module, optimizer: torch.optim.Optimizer):
    """Wrap one trainable and its optimizer (DDP / FSDP2 / nothing), one ``prepare`` call per model.

    Under FSDP2 every block of a network with ``blocks`` must come back sharded (an error otherwise: a
    wrap-class name in the accelerate config that matches nothing would silently replicate the blocks).
    """
    module.train()
    if _cpu_fsdp2(accelerator):
        names = {id(p): n for n, p in module.named_parameters()}
        _shard(accelerator, module)  # replaces the parameters by DTensor shards: point the optimizer at them
        new = dict(module.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [new[names[id(p)]] for p in group["params"]]
        return module, optimizer
    wrapped, optimizer = accelerator.prepare(module, optimizer)  # FSDP2: fully_shard bottom-up, module left where it is
    if is_fsdp(accelerator):
        check_sharded(wrapped)
        _on_device(accelerator, wrapped)
    return wrapped, optimizer


def check_sharded(module: nn.Module) -> None:
    """Raise unless ``module`` and each of its ``blocks`` is an FSDP2 unit (``fully_shard`` applied)."""
    from torch.distributed.fsdp import FSDPModule

    blocks = getattr(unwrap_plain(module), "blocks", None)
    units = [("root", unwrap_plain(module))] + ([(f"blocks.{i}", b) for i, b in enumerate(blocks)]
                                                if isinstance(blocks, nn.ModuleList) else [])
    missing = [name for name, m in units if not isinstance(m, FSDPModule)]
    if missing:
        raise RuntimeError(f"FSDP2: {type(unwrap_plain(module)).__name__} {missing[:4]} not sharded; check "
                           "fsdp_transformer_layer_cls_to_wrap in the accelerate config (DiTBlock)")


def unwrap_plain(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` / DDP wrappers (FSDP2 shards in place, so it is the module itself)."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def _block_classes(module: nn.Module) -> tuple[type, ...]:
    blocks = getattr(module, "blocks", None)
    return tuple({type(b) for b in blocks}) if isinstance(blocks, nn.ModuleList) else ()


def prepare_frozen(accelerator, module: nn.Module) -> nn.Module:
    """A frozen module on the device: ``eval()``, no gradients; networks with ``blocks`` sharded per block
    under FSDP2 (the others, e.g. a VAE, replicated). Objects that are not modules pass through."""
    if not isinstance(module, nn.Module):
        return module
    module.eval().requires_grad_(False)
    if is_fsdp(accelerator) and accelerator.num_processes > 1 and _block_classes(module):
        return _shard(accelerator, module)
    return module.to(device_of(accelerator))


@contextlib.contextmanager
def no_sync(accelerator, wrapped: nn.Module) -> Iterator[None]:
    """No gradient reduction for this micro-batch (all but the last of a gradient-accumulation group)."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(wrapped):
            yield


def unwrap(accelerator, wrapped: nn.Module) -> nn.Module:
    """The user's module inside a DDP / compile wrapper (same parameters)."""
    return accelerator.unwrap_model(wrapped)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard gathered to the full tensor (collective); plain tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model_state_dict(accelerator, wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on the CPU (names of the unwrapped module). Collective under FSDP.

    Under FSDP only the main process gets the tensors (others get ``{}``).
    """
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(accelerator, wrapped).state_dict().items()}


def _inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (itself an Optimizer subclass)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_dict(accelerator, wrapped: nn.Module, optimizer) -> dict:
    """The optimizer state (full; on the main process under FSDP). Collective under FSDP."""
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped, _inner_optimizer(optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(accelerator, wrapped: nn.Module, optimizer, state: dict) -> None:
    """Restore an optimizer state written by :func:`optimizer_state_dict` (every rank passes it)."""
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        inner = _inner_optimizer(optimizer)
        set_optimizer_state_dict(wrapped, inner, _keyed_by_name(state, wrapped, inner),
                                 options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def _keyed_by_name(state: dict, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state written without FSDP (``Optimizer.state_dict()``: parameters numbered in the order of
    the param groups) in the parameter-name keys FSDP's ``set_optimizer_state_dict`` reads; other states unchanged."""
    if not all(isinstance(i, int) for g in state.get("param_groups", []) for i in g["params"]):
        return state
    name_of = {id(p): n for n, p in module.named_parameters()}
    order = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]  # number i -> name
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def clip_grad_norm(accelerator, wrapped: nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm (before clipping) as a float32 scalar tensor; clips to ``max_norm`` if > 0.

    Parameters without a gradient are skipped; a module with no gradient at all has norm 0.
    """
    params = [p for p in wrapped.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=device_of(accelerator))
    limit = float(max_norm) if max_norm and max_norm > 0 else float("inf")
    norm = accelerator.clip_grad_norm_(params, limit) if is_fsdp(accelerator) else torch.nn.utils.clip_grad_norm_(params, limit)
    return full_tensor(norm).detach().float()


def all_reduce_sum(accelerator, t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity with one process)."""
    if accelerator.num_processes > 1:
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_max(accelerator, t: torch.Tensor) -> torch.Tensor:
    """Max over processes (identity with one process)."""
    if accelerator.num_processes > 1:
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def barrier(accelerator) -> None:
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def broadcast_object(accelerator, obj):
    """The main process's ``obj`` on every process (identity with one process)."""
    if accelerator.num_processes > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj
