"""Named model sizes. ``tiny`` is for tests, ``toy`` is the embedded default, the rest are Wan2.1.

Only plain dataclasses here (no torch import), so configs can be validated before anything is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Tuple


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the Wan2.1 DiT (``wan_architecture.md`` §1)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024  # rows of the RoPE table per axis (positions beyond are computed)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DiT config fields {sorted(unknown)}; valid: {sorted(known)}")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)

    def replace(self, **kw) -> "DiTConfig":
        return replace(self, **kw)


DIT_SIZES: dict[str, DiTConfig] = {
    # 2 layers, head_dim 16 (RoPE t/h/w = 8/4/4): unit tests.
    "tiny": DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=24, text_len=8, in_dim=4, out_dim=4),
    # The embedded default: small enough to train on a 2-core CPU in minutes.
    "toy": DiTConfig(dim=128, ffn_dim=384, num_heads=4, num_layers=4, freq_dim=64, text_dim=64, text_len=16, in_dim=8, out_dim=8),
    "wan2.1-1.3b": DiTConfig(),
    "wan2.1-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def dit_config(size: str, num_layers: int | None = None) -> DiTConfig:
    """The named size; ``num_layers`` (``model.num_layers``) keeps its widths with that many blocks."""
    if size not in DIT_SIZES:
        raise KeyError(f"unknown DiT size {size!r}; valid: {sorted(DIT_SIZES)}")
    cfg = DIT_SIZES[size]
    return cfg if num_layers is None else cfg.replace(num_layers=int(num_layers))
