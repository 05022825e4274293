"""Train a :class:`causvid.models.tiny_decoder.TinyDecoder` on a frozen VAE's latents (``scripts/train_decoder.py``).

A pool of training videos is encoded once by the VAE (normalised posterior means, what the DiT learns to produce);
each step decodes random latent crops of clips that start at the clip's first latent frame (so the decoder's
first-frame rule and its causal cache see what they see at sampling time) and regresses the aligned pixel crops:
``L1 + MSE`` against the video frames (``target="frames"``) or against the VAE's own decode (``target="vae"``,
pure distillation). Evaluation decodes whole held-out clips and reports PSNR of the tiny decoder and of the VAE
against the frames, and of the tiny decoder against the VAE.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Sequence

import torch

from causvid.models.tiny_decoder import TinyDecoder, TinyDecoderArch, save_tiny_decoder
from causvid.train.lr import lr_multiplier
from causvid.train.vae_trainer import psnr


@dataclass
class DecoderTrainOptions:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio over the run
    pool_videos: int = 64  # training videos encoded once by the VAE
    latent_frames: int = 3  # latent frames per training clip (from the clip's first), 0 = whole clip
    crop: int = 8  # latent crop size (pixels: crop * spatial factor), 0 = whole frames
    target: str = "frames"  # frames | vae
    eval_videos: int = 8
    seed: int = 0
    channels: int = 64
    blocks: int = 2

    def validate(self) -> None:
        for name in ("steps", "batch_size", "pool_videos"):
            if getattr(self, name) < 1:
                raise ValueError(f"decoder option {name} must be >= 1, got {getattr(self, name)}")
        if self.latent_frames < 0 or self.crop < 0 or self.eval_videos < 0:
            raise ValueError("decoder options latent_frames, crop and eval_videos must be >= 0")
        if self.target not in ("frames", "vae"):
            raise ValueError(f"decoder option target must be 'frames' or 'vae', got {self.target!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError("decoder options: lr must be > 0 and min_lr_ratio in [0, 1]")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "DecoderTrainOptions":
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown decoder option(s) {unknown} (valid: {sorted(known)})")
        out = {}
        for k, v in d.items():
            default = getattr(cls, k)
            try:
                out[k] = type(default)(v)
            except (TypeError, ValueError):
                raise ValueError(f"decoder option {k}={v!r} is not a {type(default).__name__}") from None
        opt = cls(**out)
        opt.validate()
        return opt


@torch.no_grad()
def encode_pool(vae, videos: Sequence[torch.Tensor], target: str, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(latents [F, z, h, w], target pixels [T, 3, H, W])]`` for each ``[T, 3, H, W]`` video."""
    out = []
    for v in videos:
        z = vae.encode(v[None].to(device))  # [1, F, z, h, w] normalised
        y = vae.decode(z)[0] if target == "vae" else v.to(device)
        out.append((z[0], y))
    return out


def _crop(z: torch.Tensor, y: torch.Tensor, opt: DecoderTrainOptions, s: int, t: int, gen: torch.Generator):
    """The first ``latent_frames`` latent frames of ``z`` [F, z, h, w], a random latent crop, and the aligned pixels."""
    f = z.shape[0] if opt.latent_frames == 0 else min(opt.latent_frames, z.shape[0])
    z, y = z[:f], y[:1 + t * (f - 1)]  # latent frames [0, f) decode to pixel frames [0, 1 + t (f - 1))
    h, w = z.shape[-2:]
    c = opt.crop
    if c and (c < h or c < w):
        y0 = int(torch.randint(0, h - min(c, h) + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - min(c, w) + 1, (1,), generator=gen))
        z = z[..., y0:y0 + c, x0:x0 + c]
        y = y[..., y0 * s:(y0 + c) * s, x0 * s:(x0 + c) * s]
    return z, y


@torch.no_grad()
def evaluate(decoder: TinyDecoder, vae, videos: Sequence[torch.Tensor], device) -> dict[str, float]:
    """Whole-clip decodes of held-out videos: PSNR (dB) of tiny and VAE against the frames, tiny against VAE."""
    decoder.eval()
    tiny, full, vs = [], [], []
    for v in videos:
        x = v[None].to(device)
        z = vae.encode(x)
        a, b = decoder.decode(z), vae.decode(z)
        tiny.append(float(psnr(a, x)[0]))
        full.append(float(psnr(b, x)[0]))
        vs.append(float(psnr(a, b)[0]))
    n = max(len(videos), 1)
    return {"psnr_tiny": sum(tiny) / n, "psnr_vae": sum(full) / n, "psnr_tiny_vs_vae": sum(vs) / n,
            "eval_videos": len(videos)}


def train_decoder(vae, train_videos: Sequence[torch.Tensor], held_out: Sequence[torch.Tensor], output_dir: str,
                  opt: Optional[DecoderTrainOptions] = None, device: Any = "cpu", progress: bool = True,
                  provenance: Optional[Mapping[str, Any]] = None) -> dict:
    """Train, evaluate and write ``decoder.safetensors`` + ``metrics.json`` into ``output_dir``; the metrics."""
    from tqdm.auto import tqdm

    opt = opt or DecoderTrainOptions()
    opt.validate()
    vae = vae.to(device).eval().requires_grad_(False)
    torch.manual_seed(opt.seed)
    arch = TinyDecoderArch.for_vae(vae.arch, channels=opt.channels, blocks=opt.blocks)
    decoder = TinyDecoder(arch).to(device).train()
    s, t = arch.spatial_factor, arch.temporal_factor
    t0 = time.time()
    pool = encode_pool(vae, train_videos[:opt.pool_videos], opt.target, device)
    encode_seconds = time.time() - t0
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=opt.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_multiplier(
        k, opt.steps, opt.warmup_steps, decay_steps=opt.steps, min_ratio=opt.min_lr_ratio))
    gen = torch.Generator().manual_seed(opt.seed)
    bar = tqdm(range(opt.steps), desc="tiny decoder", disable=not progress, dynamic_ncols=True)
    t0, losses = time.time(), []
    for step in bar:
        idx = torch.randint(0, len(pool), (opt.batch_size,), generator=gen).tolist()
        pairs = [_crop(*pool[i], opt, s, t, gen) for i in idx]
        z = torch.stack([p[0] for p in pairs])  # [B, f, z, c, c]
        y = torch.stack([p[1] for p in pairs])  # [B, 1 + t (f - 1), 3, c s, c s]
        out = decoder(z)
        loss = (out - y).abs().mean() + (out - y).pow(2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite tiny-decoder loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
    train_seconds = time.time() - t0
    decoder.eval()
    metrics = evaluate(decoder, vae, held_out, device)
    metrics.update(steps=opt.steps, train_seconds=round(train_seconds, 1), encode_seconds=round(encode_seconds, 1),
                   final_loss=sum(losses[-20:]) / max(len(losses[-20:]), 1), options=asdict(opt),
                   arch=arch.to_dict(), parameters=sum(p.numel() for p in decoder.parameters()),
                   torch_threads=torch.get_num_threads(), **dict(provenance or {}))
    os.makedirs(output_dir, exist_ok=True)
    save_tiny_decoder(decoder.cpu(), os.path.join(output_dir, "decoder.safetensors"))
    from causvid.train.checkpoint import atomic_write_json

    atomic_write_json(os.path.join(output_dir, "metrics.json"), metrics)
    return metrics
