"""A LoRA of "student minus base" by truncated SVD, in the key format of the CausVid LoRA for Wan2.1.

The format ComfyUI's Wan LoRA loader and diffusers' ``WanPipeline.load_lora_weights`` read (``ecosystem.md`` §10):
original Wan names under ``diffusion_model.``; per linear layer ``<name>.lora_down.weight`` ``[r, in]``,
``<name>.lora_up.weight`` ``[out, r]`` and, in the blocks, ``<name>.alpha`` (a 0-dim tensor; the applied delta is
``alpha / r * up @ down``, we write ``alpha = r``; without an alpha the scale is 1); bias deltas as
``<name>.diff_b``; other changed tensors (norm scales, modulation tables, the patch embedding) as full deltas
``<name>.diff``, which ComfyUI applies and diffusers skips (:func:`diffusers_skips`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

PREFIX = "diffusion_model."
# linear layers factorised by SVD (original Wan names, without ".weight"); an ``.alpha`` only for block layers:
# diffusers' converter reads alphas there and refuses them on the global layers (their scale is 1)
BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.((self_attn|cross_attn)\.[qkvo]|ffn\.[02])$")
GLOBAL_LINEAR = re.compile(r"^(time_embedding\.[02]|text_embedding\.[02]|time_projection\.1|head\.head)$")


@dataclass
class LoraReport:
    """Relative Frobenius error ``|delta - up @ down| / |delta|`` per factorised layer and over all of them."""

    rank: int
    per_layer: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    full_deltas: list[str] = field(default_factory=list)  # written as .diff / .diff_b


def diffusers_skips(key: str) -> bool:
    """Whether diffusers' Wan LoRA loader ignores this LoRA key (a full ``.diff`` / ``.diff_b`` of a tensor that
    is not a linear layer: norms, modulation tables, the patch embedding)."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if name.endswith(".diff"):
        return True
    base = name[: -len(".diff_b")] if name.endswith(".diff_b") else None
    return base is not None and not (BLOCK_LINEAR.match(base) or GLOBAL_LINEAR.match(base))


def extract_lora(student: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], rank: Optional[int] = None,
                 energy: Optional[float] = None, dtype: torch.dtype = torch.float32
                 ) -> tuple[dict[str, torch.Tensor], LoraReport]:
    """``student - base`` as a LoRA state dict (keys above) and its reconstruction report.

    ``rank``: the rank of every factorised layer (capped at the layer's full rank); or ``energy`` in (0, 1]: per
    layer the smallest rank keeping that fraction of the delta's squared singular values. Unchanged tensors are
    left out. Both state dicts in original Wan names with equal keys and shapes.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank= or energy=")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if set(student) != set(base):
        diff = sorted(set(student) ^ set(base))
        raise ValueError(f"student and base differ in tensor names, e.g. {diff[:4]}")
    out: dict[str, torch.Tensor] = {}
    report = LoraReport(rank=0)  # the largest rank written
    err_sq = total_sq = 0.0
    for key in sorted(student):
        s, b = student[key], base[key]
        if s.shape != b.shape:
            raise ValueError(f"{key}: student {tuple(s.shape)} vs base {tuple(b.shape)}")
        delta = s.double() - b.double()
        if not delta.any():
            continue
        name, _, leaf = key.rpartition(".")
        if leaf == "weight" and (BLOCK_LINEAR.match(name) or GLOBAL_LINEAR.match(name)):
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)  # delta [out, in] = u diag(sv) vh
            r = min(rank, sv.numel()) if rank is not None else _energy_rank(sv, energy)
            up, down = u[:, :r] * sv[:r], vh[:r]  # [out, r], [r, in]
            err = (delta - up @ down).norm().item()
            report.per_layer[name] = err / delta.norm().item()
            err_sq, total_sq = err_sq + err ** 2, total_sq + delta.norm().item() ** 2
            out[f"{PREFIX}{name}.lora_up.weight"] = up.to(dtype).contiguous()
            out[f"{PREFIX}{name}.lora_down.weight"] = down.to(dtype).contiguous()
            if BLOCK_LINEAR.match(name):
                out[f"{PREFIX}{name}.alpha"] = torch.tensor(float(r), dtype=dtype)  # alpha / r = 1
            report.rank = max(report.rank, r)
        else:
            # x.weight -> x.diff, x.bias -> x.diff_b, a bare parameter (blocks.i.modulation) -> its name + .diff
            lora_key = {"weight": f"{name}.diff", "bias": f"{name}.diff_b"}.get(leaf, f"{key}.diff")
            out[PREFIX + lora_key] = delta.to(dtype)
            report.full_deltas.append(key)
    report.total = (err_sq / total_sq) ** 0.5 if total_sq else 0.0
    return out, report


def _energy_rank(sv: torch.Tensor, energy: float) -> int:
    """Smallest r with ``sum(sv[:r]^2) >= energy * sum(sv^2)``."""
    cum = torch.cumsum(sv.double() ** 2, 0)
    return int(torch.searchsorted(cum, energy * cum[-1] * (1 - 1e-12)).item()) + 1


def apply_lora(base: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor], strength: float = 1.0
               ) -> dict[str, torch.Tensor]:
    """``base`` with a LoRA of this format added (``strength * alpha / r * up @ down``, ``.diff``, ``.diff_b``):
    how ComfyUI applies it, as a reference for tests and for merging."""
    out = {k: v.clone() for k, v in base.items()}
    for key, t in lora.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{key}: not a {PREFIX!r} key")
        k = key[len(PREFIX):]
        if k.endswith(".lora_up.weight"):
            name = k[: -len(".lora_up.weight")]
            down = lora[f"{PREFIX}{name}.lora_down.weight"]
            alpha = lora.get(f"{PREFIX}{name}.alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
            w = out[f"{name}.weight"]
            out[f"{name}.weight"] = (w.double() + strength * scale * t.double() @ down.double()).to(w.dtype)
        elif k.endswith(".diff_b"):
            name = k[: -len(".diff_b")] + ".bias"
            out[name] = (out[name].double() + strength * t.double()).to(out[name].dtype)
        elif k.endswith(".diff"):
            name = k[: -len(".diff")]
            name = f"{name}.weight" if f"{name}.weight" in out else name
            out[name] = (out[name].double() + strength * t.double()).to(out[name].dtype)
    return out
