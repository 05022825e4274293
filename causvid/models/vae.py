"""The Wan2.1 3-D causal VAE (``wan_architecture.md`` §4), with streaming encode and decode.

Parameter names and shapes are those of the official ``Wan2.1_VAE.pth`` (§4.6); the diffusers
``AutoencoderKLWan`` names are reached through :func:`to_diffusers_key` / :func:`from_diffusers_key` (§7.2).

**One code path.** Every module runs the *whole-sequence causal formulation* of §4.4: a causal
convolution pads its input in time with the frames carried in from the previous call (zeros at the
start of a clip), a temporal down/up-sample keeps the frames it has not consumed yet. That carried state
lives in a :class:`CausalCache`. A whole clip is one call with a fresh (or no) cache; streaming is the
same call repeated on consecutive chunks with one cache, so streaming == whole clip by construction
(up to float rounding of differently shaped convolutions).

Layouts: the public API takes videos ``[B, T, 3, H, W]`` in [-1, 1] with ``T = 1 + 4n`` and returns
latents ``[B, F, z, h, w]`` (``F = 1 + n``); inside the network tensors are ``[B, C, T, H, W]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from causvid.models.weights import (
    WeightsError,
    find_weight_files,
    load_into,
    load_state_dict_file,
    read_model_header,
    read_safetensors_metadata,
    save_model,
    strip_prefixes,
)

# §4.5: per-channel statistics of the Wan2.1 latents (z = (mu - mean) / std).
WAN_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

VAE_KIND = "wan_vae"  # the ``kind`` written into our safetensors header by :func:`save_vae`


# ----------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEArch:
    """Hyper-parameters of the Wan VAE (§4.1). ``temporal_downsample[i]``: stage i halves time.

    ``latent_mean`` / ``latent_std`` (length ``z_dim``) normalise the latents; ``None`` means 0 / 1.
    They are not weights: they live in the config (embedded in our safetensors), not the state dict.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: Tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latent_mean: Optional[Tuple[float, ...]] = None
    latent_std: Optional[Tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAEArch: temporal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                             f"entries, got {list(self.temporal_downsample)}")
        for name in ("latent_mean", "latent_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.z_dim:
                raise ValueError(f"VAEArch: {name} has {len(v)} values, z_dim is {self.z_dim}")
        if self.latent_std is not None and any(s <= 0 for s in self.latent_std):
            raise ValueError(f"VAEArch: latent_std must be positive, got {self.latent_std}")

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame (after the first): 4 for Wan."""
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W: 8 for Wan."""
        return 2 ** (len(self.dim_mult) - 1)

    def structure(self) -> tuple:
        """The fields that decide tensor names and shapes (not the latent statistics)."""
        return (self.base_dim, self.z_dim, tuple(self.dim_mult), self.num_res_blocks,
                tuple(bool(t) for t in self.temporal_downsample))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("dim_mult", "temporal_downsample", "latent_mean", "latent_std"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEArch":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VAE config fields {sorted(unknown)}; valid: {sorted(known)}")
        d = dict(d)
        for k in ("dim_mult", "temporal_downsample", "latent_mean", "latent_std"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        if "temporal_downsample" in d:
            d["temporal_downsample"] = tuple(bool(t) for t in d["temporal_downsample"])
        return cls(**d)

    def replace(self, **kw: Any) -> "VAEArch":
        return replace(self, **kw)


VAE_SIZES: dict[str, VAEArch] = {
    # Unit tests: 4x time, 4x space, z 4 (matches the tiny DiT's in_dim).
    "tiny": VAEArch(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True)),
    # The embedded default: 64x64x33 toy videos -> [9, 8, 16, 16] latents; trains on a CPU in minutes.
    "toy": VAEArch(base_dim=16, z_dim=8, dim_mult=(1, 2, 4), num_res_blocks=1, temporal_downsample=(True, True)),
    # Wan2.1_VAE.pth (§4.1).
    "wan2.1": VAEArch(latent_mean=WAN_LATENT_MEAN, latent_std=WAN_LATENT_STD),
}


def vae_arch(size: "str | VAEArch") -> VAEArch:
    """A registry name (or an explicit :class:`VAEArch`, returned as is) -> the architecture."""
    if isinstance(size, VAEArch):
        return size
    if size not in VAE_SIZES:
        raise KeyError(f"unknown VAE size {size!r}; valid: {sorted(VAE_SIZES)}")
    return VAE_SIZES[size]


def size_name(arch: VAEArch) -> Optional[str]:
    """The registry name whose structure equals ``arch`` (latent statistics ignored), if any."""
    for name, a in VAE_SIZES.items():
        if a.structure() == arch.structure():
            return name
    return None


# ----------------------------------------------------------------------------------------------------
# Causal state
# ----------------------------------------------------------------------------------------------------


class CausalCache:
    """Frames carried between consecutive calls on one clip (§4.4 "feature cache").

    Maps a module to its state: the last ``2 * p_t`` input frames of a causal convolution, the
    not-yet-consumed frames of a temporal downsample, a "first frame done" flag of a temporal upsample.
    An empty cache means "the clip starts here" (zero padding in time).
    """

    def __init__(self) -> None:
        self._state: dict[int, Any] = {}

    def get(self, module: nn.Module) -> Any:
        return self._state.get(id(module))

    def set(self, module: nn.Module, value: Any) -> None:
        self._state[id(module)] = value

    def clear(self) -> None:
        self._state.clear()

    def __len__(self) -> int:
        return len(self._state)


class CacheAware:
    """Marker: the module's ``forward`` is ``forward(x, cache)``."""


def _call(layer: nn.Module, x: torch.Tensor, cache: Optional[CausalCache]) -> torch.Tensor:
    return layer(x, cache) if isinstance(layer, CacheAware) else layer(x)


# ----------------------------------------------------------------------------------------------------
# Building blocks (§4.2)
# ----------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d, CacheAware):
    """Conv3d with ``2 * p_t`` frames of *front* padding in time (carried frames or zeros), none behind.

    ``padding=(p_t, p_h, p_w)``: H and W are zero-padded symmetrically, time only in front. The
    stored weights are those of a plain ``nn.Conv3d`` (keys ``weight``, ``bias``).
    """

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0)
        self.time_pad = 2 * pad[0]
        self.space_pad = (pad[2], pad[2], pad[1], pad[1])  # F.pad order: W left/right, H top/bottom

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:  # [B, C, T, H, W]
        if self.time_pad:
            prev = cache.get(self) if cache is not None else None
            if prev is None:
                x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))  # [B, C, 2p_t + T, H, W], zeros in front
            else:
                x = torch.cat([prev, x], dim=2)  # [B, C, 2p_t + T, H, W]
            if cache is not None:
                cache.set(self, x[:, :, -self.time_pad:].clone())
        if any(self.space_pad):
            x = F.pad(x, self.space_pad)
        return super().forward(x)


class RMSNorm(nn.Module):
    """``F.normalize`` over channels (L2, eps 1e-12) times ``sqrt(C) * gamma`` (§4.2 RMS_norm, no bias).

    ``images=False``: gamma ``[C, 1, 1, 1]`` for ``[B, C, T, H, W]``; ``images=True``: ``[C, 1, 1]``.
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module, CacheAware):
    """``residual`` = [RMSNorm, SiLU, CausalConv3d 3, RMSNorm, SiLU, Dropout, CausalConv3d 3] + shortcut."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(cout, cout, 3, padding=1),
        )
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        h = x
        for layer in self.residual:
            h = _call(layer, h, cache)
        return h + _call(self.shortcut, x, cache)


class AttentionBlock(nn.Module, CacheAware):
    """Single-head self-attention over the H*W positions of each frame (§4.2); no state in time."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # official init: the block starts as the identity

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))
        q, k, v = rearrange(self.to_qkv(y), "n (three c) h w -> three n 1 (h w) c", three=3)  # [N, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        y = self.proj(rearrange(y, "n 1 (h w) c -> n c h w", h=h))
        return x + rearrange(y, "(b t) c h w -> b c t h w", b=b)


class Upsample2x(nn.Module):
    """Nearest 2x along H and W, computed in fp32 as the official code does; no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module, CacheAware):
    """Spatial 2x down/up-sampling, optionally with 2x in time (§4.2, §4.4 whole-sequence form).

    The first frame of a clip never goes through the temporal part:
    * ``downsample3d``: out = [x_0, Conv_t(x_0, x_1, x_2), Conv_t(x_2, x_3, x_4), ...] (kernel 3, stride 2);
      T = 1 + 2m frames -> 1 + m. The cache keeps the frame that starts the next window.
    * ``upsample3d``: out = [x_0, interleave(causal Conv_t(x_1, x_2, ...))], each later frame -> 2 frames
      (output channels [0:C] -> even, [C:2C] -> odd frames). The cache keeps "frame 0 done".
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r}; valid: {self.MODES}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        y = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)

    def _time_up(self, x: torch.Tensor, cache: Optional[CausalCache]) -> torch.Tensor:
        started = cache is not None and cache.get(self) is not None
        if cache is not None:
            cache.set(self, True)
        head, rest = (x[:, :, :0], x) if started else (x[:, :, :1], x[:, :, 1:])
        if rest.shape[2] == 0:
            return head
        y = self.time_conv(rest, cache)  # [B, 2C, T', H, W]
        y = rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2)  # [B, C, 2T', H, W]
        return torch.cat([head, y], dim=2)

    def _time_down(self, x: torch.Tensor, cache: Optional[CausalCache]) -> torch.Tensor:
        prev = cache.get(self) if cache is not None else None
        head = x[:, :, :1] if prev is None else x[:, :, :0]
        buf = x if prev is None else torch.cat([prev, x], dim=2)  # [B, C, L, H, W]
        n = (buf.shape[2] - 1) // 2  # complete windows (kernel 3, stride 2) starting at 0, 2, 4, ...
        if cache is not None:
            cache.set(self, buf[:, :, 2 * n:].clone())  # frames of the first incomplete window
        if n == 0:
            return head
        return torch.cat([head, self.time_conv(buf[:, :, : 2 * n + 1])], dim=2)  # [B, C, h + n, H, W]

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        x = self._spatial(x)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x


# ----------------------------------------------------------------------------------------------------
# Encoder / decoder (§4.3)
# ----------------------------------------------------------------------------------------------------


class Encoder3d(nn.Module, CacheAware):
    """``conv1`` -> ``downsamples`` -> ``middle`` [RB, Attn, RB] -> ``head`` [RMSNorm, SiLU, conv]."""

    def __init__(self, arch: VAEArch) -> None:
        super().__init__()
        dims = [arch.base_dim * m for m in (1, *arch.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(arch.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, arch.dropout))
                cin = cout
            if i < len(arch.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if arch.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c, arch.dropout), AttentionBlock(c),
                                    ResidualBlock(c, c, arch.dropout))
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, arch.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle, *self.head):
            x = _call(layer, x, cache)
        return x  # [B, 2z, F, h, w]


class Decoder3d(nn.Module, CacheAware):
    """``conv1`` -> ``middle`` -> ``upsamples`` -> ``head``; each stage after the first takes half the
    channels because the preceding upsample conv halves them (§4.3)."""

    def __init__(self, arch: VAEArch) -> None:
        super().__init__()
        mult = arch.dim_mult
        dims = [arch.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = tuple(arch.temporal_downsample)[::-1]
        self.conv1 = CausalConv3d(arch.z_dim, dims[0], 3, padding=1)
        c = dims[0]
        self.middle = nn.Sequential(ResidualBlock(c, c, arch.dropout), AttentionBlock(c),
                                    ResidualBlock(c, c, arch.dropout))
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin = cin // 2
            for _ in range(arch.num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout, arch.dropout))
                cin = cout
            if i < len(mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples, *self.head):
            x = _call(layer, x, cache)
        return x  # [B, 3, T, H, W]


# ----------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1 VAE: ``encoder``, ``conv1`` (2z -> 2z, k 1), ``conv2`` (z -> z, k 1), ``decoder`` (§4).

    ``encode``/``decode`` speak normalised latents ``z = (mu - mean) / std`` in ``[B, F, z, h, w]``.
    ``latent_mean``/``latent_std`` are non-persistent fp32 buffers (not in the state dict).
    """

    def __init__(self, arch: VAEArch | str = "toy") -> None:
        super().__init__()
        self.arch = vae_arch(arch) if isinstance(arch, str) else arch
        self.encoder = Encoder3d(self.arch)
        self.conv1 = CausalConv3d(self.arch.z_dim * 2, self.arch.z_dim * 2, 1)
        self.conv2 = CausalConv3d(self.arch.z_dim, self.arch.z_dim, 1)
        self.decoder = Decoder3d(self.arch)
        self.register_buffer("latent_mean", torch.zeros(self.arch.z_dim), persistent=False)
        self.register_buffer("latent_std", torch.ones(self.arch.z_dim), persistent=False)
        self.reset_latent_buffers()

    # -- latent statistics -----------------------------------------------------------------------

    def reset_latent_buffers(self) -> None:
        """(Re)create the statistics buffers from ``self.arch`` (also materialises them after meta init)."""
        a, dev = self.arch, self.latent_mean.device
        if dev.type == "meta":
            dev = next((p.device for p in self.parameters() if not p.is_meta), torch.device("cpu"))
        mean = a.latent_mean if a.latent_mean is not None else (0.0,) * a.z_dim
        std = a.latent_std if a.latent_std is not None else (1.0,) * a.z_dim
        self.latent_mean = torch.tensor(mean, dtype=torch.float32, device=dev)
        self.latent_std = torch.tensor(std, dtype=torch.float32, device=dev)

    def set_latent_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.arch = self.arch.replace(latent_mean=tuple(float(m) for m in mean), latent_std=tuple(float(s) for s in std))
        self.reset_latent_buffers()

    def _apply(self, fn, recurse=True):  # keep the statistics in fp32 through .to(bfloat16) / .half()
        super()._apply(fn, recurse)
        self.latent_mean, self.latent_std = self.latent_mean.float(), self.latent_std.float()
        return self

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """``[B, F, z, h, w]`` raw posterior mean -> DiT latents ``(mu - mean) / std`` (in fp32, cast back)."""
        shape = (-1, 1, 1)
        return ((mu.float() - self.latent_mean.view(shape)) / self.latent_std.view(shape)).to(mu.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1)
        return (z.float() * self.latent_std.view(shape) + self.latent_mean.view(shape)).to(z.dtype)

    # -- shapes ------------------------------------------------------------------------------------

    def latent_frames(self, num_frames: int) -> int:
        """Pixel frames ``1 + s n`` -> latent frames ``1 + n`` (ValueError otherwise)."""
        s = self.arch.temporal_factor
        if num_frames < 1 or (num_frames - 1) % s:
            raise ValueError(f"the VAE needs T = 1 + {s}n video frames, got T = {num_frames}")
        return 1 + (num_frames - 1) // s

    def pixel_frames(self, num_latent_frames: int) -> int:
        return 1 + self.arch.temporal_factor * (num_latent_frames - 1)

    def _check_video(self, video: torch.Tensor, first: bool = True) -> None:
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"expected a video [B, T, 3, H, W], got shape {tuple(video.shape)}")
        t, (h, w), s = video.shape[1], video.shape[3:], self.arch.spatial_factor
        if first:
            self.latent_frames(t)
        elif t < 1 or t % self.arch.temporal_factor:
            raise ValueError(f"after the first chunk, streaming encode needs a multiple of "
                             f"{self.arch.temporal_factor} frames per push, got T = {t}")
        if h % s or w % s:
            raise ValueError(f"video height and width must be multiples of {s}, got H = {h}, W = {w}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[2] != self.arch.z_dim or latents.shape[1] < 1:
            raise ValueError(f"expected latents [B, F, {self.arch.z_dim}, h, w] with F >= 1, "
                             f"got shape {tuple(latents.shape)}")

    # -- one code path: raw encode / decode on [B, C, T, H, W] with an optional cache ------------------

    def encode_raw(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, T, H, W]`` -> (mu, logvar), each ``[B, z, F, h, w]``, unnormalised."""
        x = x.to(self.conv1.weight.dtype)  # inputs follow the model's dtype (fp32 or bf16)
        h = self.conv1(self.encoder(x, cache), cache)  # [B, 2z, F, h, w]
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def decode_raw(self, z: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        """Unnormalised ``[B, z, F, h, w]`` -> pixels ``[B, 3, T, H, W]`` (not clamped)."""
        return self.decoder(self.conv2(z.to(self.conv2.weight.dtype), cache), cache)

    # -- public API ([B, T, C, H, W]) ------------------------------------------------------------------

    def encode_dist(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Video ``[B, T, 3, H, W]`` -> unnormalised posterior (mu, logvar), each ``[B, F, z, h, w]``."""
        self._check_video(video)
        mu, logvar = self.encode_raw(rearrange(video, "b t c h w -> b c t h w"))
        return rearrange(mu, "b c f h w -> b f c h w"), rearrange(logvar, "b c f h w -> b f c h w")

    def encode(self, video: torch.Tensor, chunk_frames: Optional[int] = None) -> torch.Tensor:
        """Video ``[B, T, 3, H, W]`` in [-1, 1], ``T = 1 + 4n`` -> normalised latents ``[B, 1 + n, z, h, w]``.

        ``chunk_frames`` (latent frames per step) bounds memory by streaming; the result is the same.
        """
        self._check_video(video)
        if chunk_frames is not None:
            return self._encode_chunked(video, chunk_frames)
        mu, _ = self.encode_raw(rearrange(video, "b t c h w -> b c t h w"))
        return self.normalize(rearrange(mu, "b c f h w -> b f c h w"))

    def decode(self, latents: torch.Tensor, clamp: bool = True, chunk_frames: Optional[int] = None) -> torch.Tensor:
        """Normalised latents ``[B, F, z, h, w]`` -> video ``[B, 1 + 4(F - 1), 3, H, W]`` clamped to [-1, 1]."""
        self._check_latents(latents)
        if chunk_frames is not None:
            dec = self.stream_decoder(clamp=clamp)
            return torch.cat([dec.push(c) for c in latents.split(chunk_frames, dim=1)], dim=1)
        z = rearrange(self.denormalize(latents), "b f c h w -> b c f h w")
        video = rearrange(self.decode_raw(z), "b c t h w -> b t c h w")
        return video.clamp(-1.0, 1.0) if clamp else video

    def _encode_chunked(self, video: torch.Tensor, chunk_frames: int) -> torch.Tensor:
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        s, enc = self.arch.temporal_factor, self.stream_encoder()
        first = 1 + s * (chunk_frames - 1)
        pieces = [video[:, :first]] + list(video[:, first:].split(s * chunk_frames, dim=1))
        return torch.cat([enc.push(p) for p in pieces if p.shape[1]], dim=1)

    def forward(self, video: torch.Tensor, sample: bool = True,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: video ``[B, T, 3, H, W]`` -> (reconstruction [B, T, 3, H, W] unclamped, mu, logvar).

        ``sample``: decode ``mu + exp(logvar / 2) * eps`` (reparameterised) instead of ``mu``.
        """
        self._check_video(video)
        mu, logvar = self.encode_raw(rearrange(video, "b t c h w -> b c t h w"))  # [B, z, F, h, w]
        logvar = logvar.clamp(-30.0, 20.0)
        z = mu
        if sample:
            dev = generator.device if generator is not None else mu.device
            eps = torch.randn(mu.shape, generator=generator, device=dev, dtype=mu.dtype).to(mu.device)
            z = mu + torch.exp(0.5 * logvar) * eps
        recon = rearrange(self.decode_raw(z), "b c t h w -> b t c h w")
        return recon, rearrange(mu, "b c f h w -> b f c h w"), rearrange(logvar, "b c f h w -> b f c h w")

    # -- streaming -------------------------------------------------------------------------------------

    def stream_decoder(self, clamp: bool = True) -> "StreamingDecoder":
        return StreamingDecoder(self, clamp=clamp)

    def stream_encoder(self) -> "StreamingEncoder":
        return StreamingEncoder(self)


class StreamingDecoder:
    """Decode latents chunk by chunk with the causal cache; concatenated output == ``vae.decode(all)``.

    ``push([B, f, z, h, w])`` -> frames: ``1 + 4(f - 1)`` for the first chunk, ``4 f`` afterwards.
    Run it under ``torch.no_grad()`` (the cache keeps whatever graph its tensors carry).
    """

    def __init__(self, vae: WanVAE, clamp: bool = True) -> None:
        self.vae, self.clamp = vae, clamp
        self.cache = CausalCache()
        self.latent_frames = 0  # latent frames pushed so far
        self.frames = 0  # pixel frames returned so far

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        self.vae._check_latents(latents)
        z = rearrange(self.vae.denormalize(latents), "b f c h w -> b c f h w")
        video = rearrange(self.vae.decode_raw(z, self.cache), "b c t h w -> b t c h w")
        self.latent_frames += latents.shape[1]
        self.frames += video.shape[1]
        return video.clamp(-1.0, 1.0) if self.clamp else video

    def reset(self) -> None:
        self.cache.clear()
        self.latent_frames = self.frames = 0


class StreamingEncoder:
    """Encode a video chunk by chunk: first push ``1 + 4m`` frames, later pushes multiples of 4.

    ``push([B, t, 3, H, W])`` -> normalised latents ``[B, f, z, h, w]`` (``1 + m`` first, then ``t / 4``);
    the concatenation equals ``vae.encode(whole video)``.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.cache = CausalCache()
        self.frames = 0
        self.latent_frames = 0

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        self.vae._check_video(frames, first=self.frames == 0)
        mu, _ = self.vae.encode_raw(rearrange(frames, "b t c h w -> b c t h w"), self.cache)
        latents = self.vae.normalize(rearrange(mu, "b c f h w -> b f c h w"))
        self.frames += frames.shape[1]
        self.latent_frames += latents.shape[1]
        return latents

    def reset(self) -> None:
        self.cache.clear()
        self.frames = self.latent_frames = 0


def iter_stream_decode(vae: WanVAE, chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Convenience generator: decoded frames for each latent chunk of ``chunks``."""
    dec = vae.stream_decoder()
    for c in chunks:
        yield dec.push(c)


# ----------------------------------------------------------------------------------------------------
# Wan <-> diffusers key names (§7.2)
# ----------------------------------------------------------------------------------------------------

_RES_TO_DIFFUSERS = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
                     ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))
_TOP_TO_DIFFUSERS = (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."))
_PART_TO_DIFFUSERS = (("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out."),
                      ("middle.0.", "mid_block.resnets.0."), ("middle.1.", "mid_block.attentions.0."),
                      ("middle.2.", "mid_block.resnets.1."))


def _swap_prefix(key: str, pairs: Sequence[tuple[str, str]], reverse: bool = False) -> Optional[str]:
    for a, b in pairs:
        src, dst = (b, a) if reverse else (a, b)
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def to_diffusers_key(key: str, arch: Optional[VAEArch] = None) -> str:
    """Original Wan VAE name -> diffusers ``AutoencoderKLWan`` name (§7.2). Unknown names pass unchanged.

    ``decoder.upsamples.i`` becomes ``up_blocks.b.resnets.r`` / ``up_blocks.b.upsamplers.0`` with
    ``b, r = divmod(i, num_res_blocks + 2)`` (3 resnets + 1 upsampler per stage for Wan).
    """
    per_stage = (arch or VAE_SIZES["wan2.1"]).num_res_blocks + 2
    top = _swap_prefix(key, _TOP_TO_DIFFUSERS)
    if top is not None:
        return top
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key
    new = _swap_prefix(rest, _PART_TO_DIFFUSERS)
    if new is not None:
        rest = new
        if rest.startswith("mid_block.resnets."):
            i, _, tail = rest[len("mid_block.resnets."):].partition(".")
            rest = f"mid_block.resnets.{i}." + (_swap_prefix(tail, _RES_TO_DIFFUSERS) or tail)
        return f"{part}.{rest}"
    head, idx, tail = (rest.split(".", 2) + ["", ""])[:3]
    if head == "downsamples" and part == "encoder" and idx.isdigit():
        return f"encoder.down_blocks.{idx}." + (_swap_prefix(tail, _RES_TO_DIFFUSERS) or tail)
    if head == "upsamples" and part == "decoder" and idx.isdigit():
        b, r = divmod(int(idx), per_stage)
        if r == per_stage - 1:
            return f"decoder.up_blocks.{b}.upsamplers.0.{tail}"
        return f"decoder.up_blocks.{b}.resnets.{r}." + (_swap_prefix(tail, _RES_TO_DIFFUSERS) or tail)
    return key


def from_diffusers_key(key: str, arch: Optional[VAEArch] = None) -> str:
    """Inverse of :func:`to_diffusers_key`. Unknown names pass unchanged."""
    per_stage = (arch or VAE_SIZES["wan2.1"]).num_res_blocks + 2
    top = _swap_prefix(key, _TOP_TO_DIFFUSERS, reverse=True)
    if top is not None:
        return top
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key
    if rest.startswith("mid_block.resnets."):
        i, _, tail = rest[len("mid_block.resnets."):].partition(".")
        rest = f"mid_block.resnets.{i}." + (_swap_prefix(tail, _RES_TO_DIFFUSERS, reverse=True) or tail)
    new = _swap_prefix(rest, _PART_TO_DIFFUSERS, reverse=True)
    if new is not None:
        return f"{part}.{new}"
    fields = rest.split(".")
    if part == "encoder" and fields[0] == "down_blocks" and len(fields) > 2:
        tail = ".".join(fields[2:])
        return f"encoder.downsamples.{fields[1]}." + (_swap_prefix(tail, _RES_TO_DIFFUSERS, reverse=True) or tail)
    if part == "decoder" and fields[0] == "up_blocks" and len(fields) > 4 and fields[1].isdigit() and fields[3].isdigit():
        b, kind, r, tail = int(fields[1]), fields[2], int(fields[3]), ".".join(fields[4:])
        if kind == "upsamplers":
            return f"decoder.upsamples.{b * per_stage + per_stage - 1}.{tail}"
        if kind == "resnets":
            return f"decoder.upsamples.{b * per_stage + r}." + (_swap_prefix(tail, _RES_TO_DIFFUSERS, reverse=True) or tail)
    return key


def is_diffusers_state_dict(keys: Sequence[str] | Mapping[str, Any]) -> bool:
    return any(k.startswith(("quant_conv.", "post_quant_conv.", "encoder.conv_in.", "decoder.conv_in.")) for k in keys)


# ----------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------


def save_vae(vae: WanVAE, path: str) -> None:
    """Our safetensors: official tensor names, with ``{"size", "arch"}`` (incl. latent stats) embedded."""
    save_model(vae, path, VAE_KIND, {"size": size_name(vae.arch), "arch": vae.arch.to_dict()})


def arch_from_diffusers_config(cfg: Mapping[str, Any], where: str) -> VAEArch:
    """``AutoencoderKLWan`` ``config.json`` -> :class:`VAEArch`; refuses Wan2.2 features we do not build."""
    unsupported = {"is_residual": False, "patch_size": None, "decoder_base_dim": None, "attn_scales": [],
                   "in_channels": 3, "out_channels": 3}
    for k, ok in unsupported.items():
        if k in cfg and cfg[k] != ok and not (k == "decoder_base_dim" and cfg[k] == cfg.get("base_dim")):
            raise WeightsError(f"{where}: unsupported AutoencoderKLWan setting {k}={cfg[k]!r} (only the Wan2.1 VAE "
                               f"is implemented; expected {ok!r})")
    try:
        return VAEArch(base_dim=int(cfg.get("base_dim", 96)), z_dim=int(cfg.get("z_dim", 16)),
                       dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
                       num_res_blocks=int(cfg.get("num_res_blocks", 2)),
                       temporal_downsample=tuple(bool(t) for t in cfg.get("temperal_downsample", (False, True, True))),
                       latent_mean=tuple(cfg["latents_mean"]) if cfg.get("latents_mean") else None,
                       latent_std=tuple(cfg["latents_std"]) if cfg.get("latents_std") else None)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{where}: invalid AutoencoderKLWan config: {err}") from None


def _diffusers_config_near(path: str) -> Optional[tuple[str, dict]]:
    """The ``config.json`` of an AutoencoderKLWan next to ``path`` (a file or folder), if there is one."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as err:
        raise WeightsError(f"unreadable {cfg_path}: {err}") from None
    return (cfg_path, cfg) if cfg.get("_class_name") == "AutoencoderKLWan" else None


def _resolve_folder(path: str) -> str:
    """A diffusers pipeline root -> its ``vae/`` folder; a VAE folder stays."""
    sub = os.path.join(path, "vae")
    if os.path.isdir(sub) and not any(f.endswith(".safetensors") for f in os.listdir(path)):
        return sub
    return path


def _check_size(arch: VAEArch, size: "str | VAEArch | None", path: str) -> None:
    if size is not None and vae_arch(size).structure() != arch.structure():
        raise WeightsError(f"{path} holds a VAE of a different architecture than the requested size {size!r}: "
                           f"file {arch.to_dict()} vs requested {vae_arch(size).to_dict()}")


def read_vae_file(path: str, size: "str | VAEArch | None" = None) -> tuple[VAEArch, dict[str, torch.Tensor]]:
    """Architecture and state dict (official names) of any supported VAE file or folder."""
    if not os.path.exists(path):
        raise WeightsError(f"VAE weights not found: {path}")
    if os.path.isdir(path):
        path = _resolve_folder(path)
        path = find_weight_files(path)
    arch: Optional[VAEArch] = None
    if path.endswith(".safetensors"):
        meta = read_safetensors_metadata(path)
        if meta.get("kind") == VAE_KIND:
            _, cfg = read_model_header(path)
            arch = VAEArch.from_dict(cfg["arch"])
            _check_size(arch, size, path)
        elif "kind" in meta:
            raise WeightsError(f"{path} holds a {meta['kind']!r} model, not a VAE ({VAE_KIND!r})")
    if arch is None:
        found = _diffusers_config_near(path)
        if found is not None:
            arch = arch_from_diffusers_config(found[1], found[0])
            _check_size(arch, size, path)
        else:
            arch = vae_arch(size or "wan2.1")
    sd = strip_prefixes(load_state_dict_file(path), ("vae.", "model."))
    if is_diffusers_state_dict(sd):
        sd = {from_diffusers_key(k, arch): v for k, v in sd.items()}
    return arch, sd


def load_vae(path: str, size: "str | VAEArch | None" = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> WanVAE:
    """Build a :class:`WanVAE` from ``Wan2.1_VAE.pth``, a diffusers ``AutoencoderKLWan`` folder or
    safetensors (with its ``config.json`` when present), or our own safetensors (:func:`save_vae`).

    ``size`` (a registry name or a :class:`VAEArch`) picks the architecture when the file does not say
    (default ``"wan2.1"``) and is checked against it when it does. Strict: a missing, unexpected or mis-shaped tensor is an error naming it.
    """
    arch, sd = read_vae_file(path, size)
    with torch.device("meta"):
        vae = WanVAE(arch)
    try:
        load_into(vae, sd, f"VAE weights {path}")
    except WeightsError as err:
        hint = f" (built the {size_name(arch) or 'custom'!r} VAE architecture; does vae.size match the file?)"
        raise WeightsError(str(err) + hint) from None
    vae.reset_latent_buffers()
    return vae.to(device=device, dtype=dtype).eval()


def vae_from_config(cfg: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    """From ``causvid.config.VAEConfig`` (``size``, optional ``path``): loaded, or randomly initialised."""
    if getattr(cfg, "path", None):
        return load_vae(cfg.path, size=cfg.size, device=device, dtype=dtype)
    return WanVAE(vae_arch(cfg.size)).to(device=device, dtype=dtype)
