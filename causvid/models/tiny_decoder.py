"""A tiny causal streaming decoder for any VAE's latents (the role TAEHV plays for Wan in the fast peers).

The Wan VAE decoder is most of a distilled student's compute (274 TFLOP per 81-frame 480x832 video, 173 GFLOP per
81-frame 64x64 toy video). This decoder maps the same *normalised* latents ``[B, F, z, h, w]`` that the DiT produces
to pixels ``[B, 1 + t(F - 1), 3, H, W]`` with a few causal convolutions at latent resolution and cheap per-frame 2D
upsampling, trained to reproduce the frames from the VAE's latents (``causvid/train/decoder_trainer.py``).

Structure (``TinyDecoderArch``; ``C`` = ``channels``, ``s`` = spatial factor, ``t`` = temporal factor)::

    latents [B, z, F, h, w]
      -> CausalConv3d(z, C, 3)                         causal in time: latent frame f sees frames <= f
      -> ``blocks`` x (CausalConv3d(C, C, 3) -> SiLU -> CausalConv3d(C, C, 3)) + residual
      -> Conv3d(C, t * C, 1x3x3) -> [B, C, F * t, h, w]   (each latent frame expands to t frames; the clip's first
                                                          latent frame keeps only its last one, as Wan's 1 + 4n)
      -> log2(s) x (nearest 2x in space -> Conv2d 3x3 -> SiLU), channels C -> C/2 -> ... (>= ``min_channels``)
      -> Conv2d 3x3 -> 3                                  pixels [B, 3, T, H, W]

Every temporal interaction happens in the causal 3D convolutions, which carry their last frames in a
:class:`causvid.models.vae.CausalCache`; so decoding chunk by chunk (:class:`TinyStreamingDecoder`) equals decoding
the whole clip (tested). The 2D stages are per frame.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from causvid.models.vae import CausalCache, CausalConv3d

KIND = "tiny_decoder"


@dataclass(frozen=True)
class TinyDecoderArch:
    z_dim: int = 16
    spatial_factor: int = 8
    temporal_factor: int = 4
    channels: int = 64
    min_channels: int = 16
    blocks: int = 2

    def __post_init__(self) -> None:
        s = self.spatial_factor
        if s < 1 or s & (s - 1):
            raise ValueError(f"tiny decoder: spatial_factor must be a power of two, got {s}")
        for name in ("z_dim", "temporal_factor", "channels", "min_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"tiny decoder: {name} must be >= 1, got {getattr(self, name)}")
        if self.blocks < 0:
            raise ValueError(f"tiny decoder: blocks must be >= 0, got {self.blocks}")

    @property
    def stage_channels(self) -> list[int]:
        """Channels after each 2x upsampling stage."""
        n = int(math.log2(self.spatial_factor))
        return [max(self.min_channels, self.channels >> (i + 1)) for i in range(n)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TinyDecoderArch":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"tiny decoder config has unknown keys {sorted(unknown)}")
        return cls(**dict(d))

    @classmethod
    def for_vae(cls, vae_arch, **kw) -> "TinyDecoderArch":
        """The decoder shape for a VAE's latents (``causvid.models.vae.VAEArch``)."""
        return cls(z_dim=vae_arch.z_dim, spatial_factor=vae_arch.spatial_factor,
                   temporal_factor=vae_arch.temporal_factor, **kw)


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(c, c, 3, padding=1)
        self.conv2 = CausalConv3d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache]) -> torch.Tensor:  # [B, C, F, h, w]
        return x + self.conv2(F.silu(self.conv1(x, cache)), cache)


class TinyDecoder(nn.Module):
    """Normalised latents -> pixels in [-1, 1]; the decode half of the VAE interface (``decode``, ``stream_decoder``)."""

    def __init__(self, arch: TinyDecoderArch) -> None:
        super().__init__()
        self.arch = arch
        c, t = arch.channels, arch.temporal_factor
        self.conv_in = CausalConv3d(arch.z_dim, c, 3, padding=1)
        self.blocks = nn.ModuleList(_ResBlock(c) for _ in range(arch.blocks))
        self.expand = nn.Conv3d(c, t * c, (1, 3, 3), padding=(0, 1, 1))
        ups, cin = [], c
        for cout in arch.stage_channels:
            ups.append(nn.Conv2d(cin, cout, 3, padding=1))
            cin = cout
        self.ups = nn.ModuleList(ups)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def pixel_frames(self, num_latent_frames: int) -> int:
        return 1 + self.arch.temporal_factor * (num_latent_frames - 1)

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 5 or latents.shape[2] != self.arch.z_dim:
            raise ValueError(f"tiny decoder expects latents [B, F, {self.arch.z_dim}, h, w], got {tuple(latents.shape)}")

    def decode_raw(self, z: torch.Tensor, cache: Optional[CausalCache] = None, first: bool = True) -> torch.Tensor:
        """``[B, z, F, h, w]`` -> ``[B, 3, T, H, W]`` unclamped; ``first``: the chunk starts the clip."""
        t = self.arch.temporal_factor
        x = self.conv_in(z.to(self.conv_in.weight.dtype), cache)  # [B, C, F, h, w]
        for blk in self.blocks:
            x = blk(x, cache)
        x = F.silu(self.expand(x))  # [B, t*C, F, h, w]
        x = rearrange(x, "b (t c) f h w -> b c (f t) h w", t=t)  # [B, C, F*t, h, w], frame-major
        if first:
            x = x[:, :, t - 1:]  # the clip's first latent frame is one pixel frame: [B, C, 1 + t(F-1), h, w]
        B, T = x.shape[0], x.shape[2]
        x = rearrange(x, "b c t h w -> (b t) c h w")  # per-frame 2D stages
        for conv in self.ups:
            x = F.silu(conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
        x = self.conv_out(x)  # [(B T), 3, H, W]
        return rearrange(x, "(b t) c h w -> b c t h w", b=B, t=T)

    def decode(self, latents: torch.Tensor, clamp: bool = True, chunk_frames: Optional[int] = None) -> torch.Tensor:
        """Normalised latents ``[B, F, z, h, w]`` -> video ``[B, 1 + t(F - 1), 3, H, W]``."""
        self._check_latents(latents)
        if chunk_frames is not None:
            dec = self.stream_decoder(clamp=clamp)
            return torch.cat([dec.push(c) for c in latents.split(chunk_frames, dim=1)], dim=1)
        video = rearrange(self.decode_raw(rearrange(latents, "b f c h w -> b c f h w")), "b c t h w -> b t c h w")
        return video.clamp(-1.0, 1.0) if clamp else video

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Training pass: ``[B, F, z, h, w]`` -> unclamped ``[B, T, 3, H, W]``."""
        return self.decode(latents, clamp=False)

    def stream_decoder(self, clamp: bool = True) -> "TinyStreamingDecoder":
        return TinyStreamingDecoder(self, clamp=clamp)


class TinyStreamingDecoder:
    """``push([B, f, z, h, w])`` -> frames (``1 + t(f - 1)`` first, ``t f`` later); concatenation == ``decode``."""

    def __init__(self, decoder: TinyDecoder, clamp: bool = True) -> None:
        self.decoder, self.clamp = decoder, clamp
        self.cache = CausalCache()
        self.latent_frames = self.frames = 0

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        self.decoder._check_latents(latents)
        z = rearrange(latents, "b f c h w -> b c f h w")
        video = rearrange(self.decoder.decode_raw(z, self.cache, first=self.latent_frames == 0),
                          "b c t h w -> b t c h w")
        self.latent_frames += latents.shape[1]
        self.frames += video.shape[1]
        return video.clamp(-1.0, 1.0) if self.clamp else video

    def reset(self) -> None:
        self.cache.clear()
        self.latent_frames = self.frames = 0


def save_tiny_decoder(decoder: TinyDecoder, path: str) -> None:
    """Atomic safetensors file with the arch in its header (``causvid.models.weights.save_model``)."""
    from causvid.models.weights import save_model

    save_model(decoder, path, KIND, decoder.arch.to_dict())


def load_tiny_decoder(path: str, device: Any = "cpu") -> TinyDecoder:
    """A decoder written by :func:`save_tiny_decoder`; a clear error for any other file."""
    from causvid.models.weights import WeightsError, load_into, load_safetensors, read_model_header

    kind, config = read_model_header(path)
    if kind != KIND:
        raise WeightsError(f"{path}: not a tiny decoder file (it holds a {kind!r})")
    dec = TinyDecoder(TinyDecoderArch.from_dict(config))
    load_into(dec, load_safetensors(path), f"tiny decoder {path}")
    return dec.to(device).eval().requires_grad_(False)
