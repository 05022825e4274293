"""Generate and score toy-world videos for every model of the pipeline (used by the quickstart and the ablation).

Models are opened from the export folders the trainer writes (``final/model.safetensors`` + ``config.yaml``):
* a *teacher* (bidirectional, or the causal teacher with its chunk mask) samples with the many-step ODE solver and CFG;
* a *student* samples with the KV-cached few-step sampler (:class:`causvid.sampler.CausalSampler`).
Scores are :mod:`causvid.eval.toyworld_metrics` against the prompt (a toy-world caption).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from causvid import schedule as S
from causvid.config import load_config, resolve_folder_paths
from causvid.data.toyworld import ToyWorld
from causvid.eval import toyworld_metrics as M
from causvid.losses import diffusion_loss
from causvid.models.attention import ChunkLayout
from causvid.models.text import text_encoder_from_config
from causvid.models.vae import vae_from_config
from causvid.models.weights import load_dit
from causvid.sampler import CausalSampler, teacher_sample
from causvid.video_io import to_uint8

EVAL_SEED = 777  # toy-world seed of the held-out evaluation set (training uses data.toyworld.seed = 0)


def heldout_set(n: int, cfg) -> tuple[list[str], list[np.ndarray]]:
    """``n`` held-out ground-truth videos (uint8 [T, H, W, 3]) and their captions."""
    d = cfg.data
    world = ToyWorld(height=d.height, width=d.width, num_frames=d.num_frames, fps=d.fps, seed=EVAL_SEED,
                     num_videos=n, max_objects=d.toyworld.max_objects,
                     textured_background_prob=d.toyworld.textured_background_prob)
    items = [world[i] for i in range(n)]
    return [it["caption"] for it in items], [to_uint8(it["video"]) for it in items]


@torch.no_grad()
def vae_roundtrip(vae, videos: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
    """Encode -> decode ground-truth uint8 videos ``[T, H, W, 3]``: the ceiling of anything generated in latent space."""
    dev = next(vae.parameters()).device
    out = []
    for i in range(0, len(videos), batch_size):
        x = _uint8_to_model(videos[i:i + batch_size], dev)  # [B, T, 3, H, W] in [-1, 1]
        out += [to_uint8(r) for r in vae.decode(vae.encode(x)).cpu()]
    return out


@dataclass
class Timing:
    seconds: float
    first_chunk_s: Optional[float] = None


class TeacherRunner:
    """Many-step ODE sampling of an exported teacher, decoded with the pipeline's VAE."""

    def __init__(self, folder: str, device: str = "cpu"):
        self.cfg = resolve_folder_paths(load_config(os.path.join(folder, "config.yaml")), folder)
        self.model = load_dit(os.path.join(folder, "model.safetensors"), device=device).eval()
        self.text = text_encoder_from_config(self.cfg.text, device=device, dim=self.model.cfg.text_dim,
                                             text_len=self.model.cfg.text_len)
        self.vae = vae_from_config(self.cfg.vae, device=device).eval()
        self.device = device
        causal = self.cfg.train.stage == "causal_teacher"
        self.layout = ChunkLayout(self.cfg.model.chunk_size, self.cfg.model.independent_first_frame) if causal else None

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, num_steps: int = 50, guidance: float = 6.0,
                 shift: Optional[float] = None, batch_size: int = 8) -> tuple[list[np.ndarray], Timing]:
        d = self.cfg.data
        F = (d.num_frames - 1) // 4 + 1
        z = self.model.cfg.in_dim
        sf = self.vae.arch.spatial_factor
        h, w = d.height // sf, d.width // sf
        out, t0 = [], time.perf_counter()
        neg, _ = self.text.encode([self.cfg.dmd.negative_prompt])
        for i in range(0, len(prompts), batch_size):
            ps, ss = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
            cond, _ = self.text.encode(ps)
            noise = torch.stack([torch.randn(F, z, h, w, generator=torch.Generator().manual_seed(int(s))) for s in ss])
            res = teacher_sample(self.model, noise.to(self.device), cond.to(self.device),
                                 neg.expand(len(ps), -1, -1).to(self.device), num_steps=num_steps,
                                 shift=shift if shift is not None else self.cfg.ode_pairs.shift, guidance=guidance,
                                 layout=self.layout)
            video = self.vae.decode(res.x0)
            out += [to_uint8(v) for v in video.cpu()]
        return out, Timing(time.perf_counter() - t0)

    @torch.no_grad()
    def generate_autoregressive(self, prompts: Sequence[str], seeds: Sequence[int], *, num_steps: int = 50,
                                guidance: float = 6.0, shift: Optional[float] = None, num_frames: Optional[int] = None,
                                window_chunks: int = 0, batch_size: int = 8) -> list[np.ndarray]:
        """Chunk-by-chunk many-step sampling (the causal teacher; KV cache, optional rolling window)."""
        from causvid.sampler import causal_teacher_sample

        d = self.cfg.data
        F = ((num_frames or d.num_frames) - 1) // 4 + 1
        sf = self.vae.arch.spatial_factor
        layout = self.layout or ChunkLayout(self.cfg.model.chunk_size, self.cfg.model.independent_first_frame)
        neg, _ = self.text.encode([self.cfg.dmd.negative_prompt])
        out = []
        for i in range(0, len(prompts), batch_size):
            ps, ss = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
            cond, _ = self.text.encode(ps)
            noise = torch.stack([torch.randn(F, self.model.cfg.in_dim, d.height // sf, d.width // sf,
                                             generator=torch.Generator().manual_seed(int(s))) for s in ss])
            x0 = causal_teacher_sample(self.model, noise.to(self.device), cond.to(self.device),
                                       neg.expand(len(ps), -1, -1).to(self.device), layout=layout,
                                       num_steps=num_steps, shift=shift if shift is not None else self.cfg.ode_pairs.shift,
                                       guidance=guidance, sink_chunks=1 if window_chunks else 0,
                                       window_chunks=window_chunks)
            out += [to_uint8(v) for v in self.vae.decode(x0).cpu()]
        return out


    @torch.no_grad()
    def fit_check(self, latents_path: str, n: int = 64, timesteps: Sequence[float] = (100, 300, 500, 700, 900)) -> dict:
        """Flow-matching loss on ``n`` of the teacher's training latents (``latents_path``, shards with stored text
        embeddings) and on ``n`` held-out toy videos encoded with the teacher's VAE, at the same timesteps and noise.
        About equal: the teacher is not over-fitting its training set (it is under-fitting if the loss is still
        falling with training). Returns ``{"train": {t: loss}, "heldout": {t: loss}}``."""
        from causvid.data.shards import LatentShardDataset

        ds = LatentShardDataset(latents_path)
        if len(ds) < n:
            raise ValueError(f"{latents_path} holds {len(ds)} items, fewer than n={n}")
        items = [ds[i] for i in range(n)]
        x_tr = torch.stack([it["latents"] for it in items])  # [n, F, C, h, w]
        c_tr = torch.stack([it["context"] for it in items])  # [n, L, D]
        prompts, gt = heldout_set(n, self.cfg)
        c_ho, _ = self.text.encode(prompts)
        vae_dtype = next(self.vae.parameters()).dtype
        x_ho = torch.cat([self.vae.encode(_uint8_to_model(gt[i:i + 8], self.device).to(vae_dtype)).float().cpu()
                          for i in range(0, n, 8)])  # [n, F, C, h, w]
        return {"train": flow_matching_loss(self.model, x_tr, c_tr, timesteps),
                "heldout": flow_matching_loss(self.model, x_ho, c_ho.float().cpu(), timesteps)}


def _uint8_to_model(videos: Sequence[np.ndarray], device) -> torch.Tensor:
    """uint8 videos ``[T, H, W, 3]`` -> ``[B, T, 3, H, W]`` float in [-1, 1] on ``device``."""
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2) for v in videos])
    return x.to(device).float() / 127.5 - 1.0


@torch.no_grad()
def flow_matching_loss(model, x0: torch.Tensor, context: torch.Tensor, timesteps: Sequence[float], *, seed: int = 0,
                       batch_size: int = 16) -> dict[float, float]:
    """The teacher's loss (eq. 1, :func:`causvid.losses.diffusion_loss`) on clean latents ``x0 [N, F, C, h, w]`` with
    text embeddings ``context [N, L, D]``, at each fixed timestep with fixed noise (one draw of ``[N, ...]`` per
    timestep, seeded by ``seed + t``), averaged over the N items: comparable across models and data sets."""
    dev = next(model.parameters()).device
    N = x0.shape[0]
    out = {}
    for tv in timesteps:
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + int(tv)))  # [N, F, C, h, w]
        total = 0.0
        for i in range(0, N, batch_size):
            xb, eb = x0[i:i + batch_size].to(dev).float(), eps[i:i + batch_size].to(dev)
            t = torch.full((xb.shape[0],), float(tv), device=dev)
            v = model(S.add_noise(xb, eb, t), t, context[i:i + batch_size].to(dev))
            total += float(diffusion_loss(v, xb, eb)) * xb.shape[0]
        out[float(tv)] = total / N
    return out


class StudentRunner:
    """Few-step KV-cached sampling of an exported causal student."""

    def __init__(self, folder: str, device: str = "cpu", **kw):
        self.sampler = CausalSampler.from_pretrained(folder, device=device, **kw)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, num_frames: Optional[int] = None,
                 batch_size: int = 8) -> tuple[list[np.ndarray], Timing]:
        out, t0 = [], time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            ps, ss = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
            v = self.sampler.generate(ps, num_frames=num_frames, seed=ss)
            out += [np.asarray(x) for x in v]
        return out, Timing(time.perf_counter() - t0)


def score(videos: Sequence[np.ndarray], prompts: Sequence[str], fps: float) -> dict:
    """Mean / std of every toy metric over a set of videos."""
    return M.aggregate([M.score_video(v, p, fps=fps) for v, p in zip(videos, prompts)])


def score_windows(videos: Sequence[np.ndarray], prompts: Sequence[str], window: int, fps: float) -> list[dict]:
    """Per-window aggregate: list over windows of {start, end, mean, std}."""
    per = [M.score_windows(v, p, window, window, fps=fps) for v, p in zip(videos, prompts)]
    n = min(len(x) for x in per)
    out = []
    for k in range(n):
        agg = M.aggregate([x[k] for x in per])
        out.append({"start": per[0][k]["start"], "end": per[0][k]["end"], **agg})
    return out


GROUP_KEYS = ("temporal_quality", "frame_quality", "text_alignment", "total")


def table_row(name: str, agg: dict, extra: str = "") -> str:
    cells = [f"{agg['mean'].get(k, float('nan')):.3f} ± {agg['std'].get(k, float('nan')):.3f}" for k in GROUP_KEYS]
    return f"| {name} | " + " | ".join(cells) + (f" | {extra}" if extra else "") + " |"


def table_header(extra: str = "") -> str:
    cols = ["model", "temporal quality", "frame quality", "text alignment", "total"] + ([extra] if extra else [])
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
