"""Exponential moving average of a trained network, kept in fp32 (DESIGN.md section 6).

``shadow <- decay * shadow + (1 - decay) * param`` after every successful optimizer step of the EMA
target from ``start_step`` on; before ``start_step`` the shadow is a plain copy of the parameters
(so the EMA starts from the weights at ``start_step``). The shadow lives on the parameters' device
and works on whatever tensors the module holds (full tensors, or local shards under FSDP).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """fp32 shadow of the floating-point parameters of ``module`` (names as in ``module.named_parameters()``)."""

    def __init__(self, module: nn.Module, decay: float, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay} (config key 'train.ema_decay')")
        self.decay, self.start_step = float(decay), int(start_step)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone().float() for name, p in module.named_parameters() if p.is_floating_point()
        }

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Fold the current parameters of ``module`` into the shadow (after its optimizer step at ``step``)."""
        params = dict(module.named_parameters())
        copy_only = step < self.start_step
        for name, s in self.shadow.items():
            p = params[name].detach().float()
            if copy_only:
                s.copy_(p)
            else:
                s.lerp_(p, 1.0 - self.decay)  # s + (1 - decay) (p - s) = decay s + (1 - decay) p

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        if missing or extra:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, s in self.shadow.items():
            if tuple(state[name].shape) != tuple(s.shape):
                raise ValueError(f"EMA tensor '{name}': shape {tuple(state[name].shape)} != model {tuple(s.shape)}")
            src = state[name].to(device=s.device, dtype=torch.float32)
            if hasattr(s, "device_mesh"):  # an FSDP2 shard: scatter the full tensor like the parameter
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src, s.device_mesh, s.placements)
            s.copy_(src)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the shadow into ``module``'s parameters (cast to their dtype)."""
        params = dict(module.named_parameters())
        for name, s in self.shadow.items():
            params[name].copy_(s.to(params[name].dtype))
