"""The four training stages of CausVid (``docs/method.md``; ``causvid_reference.md`` §4-§5).

* ``teacher``        bidirectional DiT trained by flow matching (one t per video, condition dropout to the
                     negative prompt so the teacher supports CFG).
* ``causal_teacher`` the same network fine-tuned with the chunk mask and one t per chunk (diffusion forcing);
                     the causal teacher of the paper's ablation.
* ``ode``            ODE-regression initialisation of the causal student on teacher trajectories (§4.3).
* ``dmd``            asymmetric DMD (§5): causal generator, frozen real score (teacher, CFG), online fake
                     score (critic) trained with the flow loss, 1 generator update per ``update_ratio`` critic
                     updates. ``dmd.teacher = none`` is the no-DMD ablation (pure ODE regression).

Stages build networks, data sets and losses only; the generic trainer (:mod:`causvid.train.trainer`) owns
optimisers, clipping, EMA, checkpoints, data order and RNG (the contract is :class:`causvid.train.stage.Stage`).
Every random number of a loss call is drawn from the trainer's ``rng`` so a resumed run draws the same ones.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from causvid import schedule as S
from causvid.config import ConfigError
from causvid.losses import (
    critic_flow_loss,
    diffusion_loss,
    dmd_generator_loss,
    ode_regression_loss,
)
from causvid.models.attention import ChunkLayout
from causvid.models.registry import dit_config
from causvid.sampler import causal_sample, guided_flow, student_steps, teacher_sample
from causvid.train import lora
from causvid.train.rollout import draw_exit_steps, exit_interval, self_forcing_rollout
from causvid.train.stage import Stage, build_stage, register_stage

__all__ = ["TeacherStage", "CausalTeacherStage", "ODEStage", "DMDStage", "build_stage", "load_network",
           "resolve_dit_path"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CRITIC_FILE = "critic.safetensors"


# ----------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------


def resolve_dit_path(path: str) -> str:
    """An export folder (``<run>/final/`` with ``model.safetensors``) -> its weight file; anything else as is."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, MODEL_FILE)) \
            and not os.path.isfile(os.path.join(path, "config.json")):
        return os.path.join(path, MODEL_FILE)
    return path


def _dtype(cfg) -> torch.dtype:
    return torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32


def load_network(cfg, key: str, *, device="cpu", dtype: torch.dtype = torch.float32, trainable: bool = True):
    """The DiT whose weights the config key ``key`` (``train.init_from`` / ``train.teacher_path``) names.

    Accepts our export folders / safetensors and the official Wan folders. The architecture must equal
    ``cfg.model.size`` (ConfigError naming both otherwise). Frozen networks are put in eval mode without grads.
    """
    from causvid.models.weights import load_dit

    path = OmegaConf.select(cfg, key)
    if not path:
        raise ConfigError(f"config key '{key}' is required for train.stage={cfg.train.stage!r}")
    if not os.path.exists(path):
        raise ConfigError(f"config key '{key}' = {path!r}: no such file or folder")
    model = load_dit(resolve_dit_path(path), device=device, dtype=dtype, attention=cfg.model.attention,
                     gradient_checkpointing=cfg.model.gradient_checkpointing and trainable)
    want = dit_config(cfg.model.size, cfg.model.num_layers)
    if model.cfg != want:
        diff = {k: (v, getattr(want, k)) for k, v in model.cfg.to_dict().items()
                if v != want.to_dict()[k]}
        raise ConfigError(f"config key '{key}' = {path!r} holds a DiT that differs from model.size="
                          f"{cfg.model.size!r} in (file, config): {diff}")
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def new_network(cfg, device="cpu"):
    """A freshly initialised DiT of ``cfg.model.size`` (the toy teacher trained from scratch)."""
    from causvid.models.dit import WanDiT

    return WanDiT(dit_config(cfg.model.size, cfg.model.num_layers), attention=cfg.model.attention,
                  gradient_checkpointing=cfg.model.gradient_checkpointing).to(device)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a DDP wrapper (used only for no-grad rollouts that need model methods)."""
    return getattr(model, "module", model)


def layout_of(cfg) -> ChunkLayout:
    return ChunkLayout(int(cfg.model.chunk_size), bool(cfg.model.independent_first_frame))


# ----------------------------------------------------------------------------------------------------
# Random draws (everything from the trainer's generator)
# ----------------------------------------------------------------------------------------------------


def cpu_generator(rng: torch.Generator) -> torch.Generator:
    """A CPU generator for small draws (indices, timesteps): ``rng`` itself, or one seeded from it."""
    if rng.device.type == "cpu":
        return rng
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng, device=rng.device))
    return torch.Generator().manual_seed(seed)


def randn_like(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Gaussian noise shaped like ``x`` (float32 on x's device) drawn from ``rng`` on rng's device."""
    return torch.randn(x.shape, generator=rng, device=rng.device, dtype=torch.float32).to(x.device)


def chunk_to_frames(values: torch.Tensor, layout: ChunkLayout, num_frames: int) -> torch.Tensor:
    """Per-chunk values [B, n_chunks] -> per-frame values [B, F] (each frame takes its chunk's value)."""
    ids = layout.chunk_ids(num_frames).to(values.device)  # [F]
    return values[:, ids]


def num_chunks(layout: ChunkLayout, num_frames: int) -> int:
    return len(layout.chunks(num_frames))


def draw_chunk_levels(g: torch.Generator, batch: int, layout: ChunkLayout, num_frames: int,
                      num_levels: int) -> torch.Tensor:
    """One level index in [0, num_levels) per chunk, broadcast to frames: [B, F] long (``causal_video``, §4.3)."""
    idx = torch.randint(0, num_levels, (batch, num_chunks(layout, num_frames)), generator=g)
    return chunk_to_frames(idx, layout, num_frames)


def gather_levels(states: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """states [B, K, F, C, H, W], idx [B, F] -> x [B, F, C, H, W] with x[b, f] = states[b, idx[b, f], f]."""
    B, K, F = states.shape[:3]
    b = torch.arange(B, device=states.device)[:, None]  # [B, 1]
    f = torch.arange(F, device=states.device)[None, :]  # [1, F]
    return states[b, idx.to(states.device), f]


# ----------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------


class VideoCaptionDataset(torch.utils.data.Dataset):
    """``{"video", "caption"}`` items of a ToyWorld / VideoDataset (drops fields default collate cannot batch)."""

    def __init__(self, videos):
        self.videos = videos

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        item = self.videos[i]
        return {"video": item["video"], "caption": item["caption"]}


class CaptionDataset(torch.utils.data.Dataset):
    """``{"caption"}`` items from a list of prompts or from a ToyWorld (captions only, nothing rendered)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        s = self.source
        return {"caption": s.caption(i) if hasattr(s, "caption") else str(s[i])}


def _video_source(cfg):
    if cfg.data.source == "toyworld":
        from causvid.data.toyworld import toyworld_from_config

        return toyworld_from_config(cfg.data)
    from causvid.data import video as V  # written by the data helper

    if hasattr(V, "video_dataset_from_config"):
        return V.video_dataset_from_config(cfg.data)
    return V.VideoDataset(cfg.data.path, height=cfg.data.height, width=cfg.data.width,
                          num_frames=cfg.data.num_frames, fps=cfg.data.fps)


def build_dataset(cfg, want: str) -> torch.utils.data.Dataset:
    """The data set of ``cfg.data.source`` for what a stage needs: ``clean`` (x0 + text), ``ode`` (trajectory
    states + text) or ``text`` (conditioning only)."""
    from causvid.data.shards import LatentShardDataset, ODEPairDataset

    src = cfg.data.source
    if src == "latents":
        return LatentShardDataset(cfg.data.path)
    if src == "ode_pairs":
        return ODEPairDataset(cfg.data.path)
    if want == "text":
        if src == "prompts":
            if cfg.data.path:
                from causvid.data.prompts import read_prompts

                return CaptionDataset(list(read_prompts(cfg.data.path)))
            from causvid.data.toyworld import toyworld_from_config

            return CaptionDataset(toyworld_from_config(cfg.data))
        if src == "toyworld":
            return CaptionDataset(_video_source(cfg))
    if src in ("toyworld", "videos") and want == "clean":
        return VideoCaptionDataset(_video_source(cfg))
    raise ConfigError(f"config key 'data.source' = {src!r} cannot provide {want} data for train.stage="
                      f"{cfg.train.stage!r}")


def _require(cfg, key: str, why: str) -> None:
    if not OmegaConf.select(cfg, key):
        raise ConfigError(f"config key '{key}' is required {why}")


def _check_self_forcing(cfg) -> None:
    """Combinations ``dmd.generator_input: self_forcing`` cannot train (before anything is built)."""
    sf, why = cfg.dmd.self_forcing, "with dmd.generator_input='self_forcing'"
    if cfg.train.stage != "dmd":
        raise ConfigError(f"invalid value for config key 'train.stage': {cfg.train.stage!r}; self-forcing is a DMD "
                          "input (train.stage=dmd)")
    if cfg.dmd.teacher == "none":
        raise ConfigError(f"config key 'dmd.teacher' = 'none' (ODE regression, no DMD) cannot be used {why}; "
                          "use bidirectional or causal")
    layout = layout_of(cfg)
    F = (int(cfg.data.num_frames) - 1) // 4 + 1
    if len(layout.chunks(F)) < 2:
        raise ConfigError(f"config key 'model.chunk_size' = {cfg.model.chunk_size} makes one chunk of the {F} latent "
                          f"frames: a bidirectional generator has no autoregressive rollout to train {why}; use a "
                          f"chunk size below {F}")
    R = int(sf.rollout_frames)
    if R:
        if R < F:
            raise ConfigError(f"config key 'dmd.self_forcing.rollout_frames' = {R} is shorter than the {F} latent "
                              "frames of the training clip (0 = the clip's length)")
        if R != F and cfg.model.independent_first_frame:
            raise ConfigError("config key 'dmd.self_forcing.rollout_frames' must be 0 (the clip's length) with "
                              "model.independent_first_frame=true (the last clip would not start with its own frame)")
        if (R - F) % int(cfg.model.chunk_size):
            raise ConfigError(f"config key 'dmd.self_forcing.rollout_frames' = {R}: the {R - F} frames before the "
                              f"last clip must be whole chunks of model.chunk_size={cfg.model.chunk_size}")
    if (sf.ts_schedule or sf.ts_schedule_max) and not (sf.same_step_across_blocks or sf.last_step_only):
        raise ConfigError("config keys 'dmd.self_forcing.ts_schedule' / 'ts_schedule_max' need one exit step for all "
                          "chunks (dmd.self_forcing.same_step_across_blocks=true)")


def _check_source(cfg, allowed: tuple[str, ...], why: str) -> None:
    src = cfg.data.source
    if src not in allowed:
        raise ConfigError(f"config key 'data.source' = {src!r} is not usable {why}; valid: {list(allowed)}")
    if src in ("latents", "ode_pairs", "videos"):
        _require(cfg, "data.path", f"with data.source={src!r}")


# ----------------------------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------------------------


class _DiTStage(Stage):
    """Text conditioning (negative prompt, on-the-fly encoding), batch unpacking, previews and export."""

    trained: str = "generator"  # the trainable exported as model.safetensors
    causal: bool = True  # the trained network is block-causal
    needs_negative: bool = False

    # -- conditioning ----------------------------------------------------------------------------------
    def _setup_conditioning(self, cfg, device, *, encode_on_the_fly: bool, encode_videos: bool) -> None:
        """Build the text encoder (and VAE) if needed; encode the negative prompt and preview prompts once."""
        from causvid.models.text import text_encoder_from_config

        self.device = torch.device(device)
        self._frozen_extra: dict[str, nn.Module] = {}
        self.negative: Optional[torch.Tensor] = None
        self.preview_ctx: Optional[torch.Tensor] = None
        self.preview_prompts: list[str] = []
        previews = int(cfg.train.sample_every) > 0
        if previews and not (cfg.vae.path and os.path.exists(cfg.vae.path)):
            log.warning("train.sample_every=%s but vae.path=%r is not a file: no preview videos",
                        cfg.train.sample_every, cfg.vae.path)
            previews = False
        if not (self.needs_negative or encode_on_the_fly or previews):
            return
        d = dit_config(cfg.model.size, cfg.model.num_layers)
        enc = text_encoder_from_config(cfg.text, device=device, dim=d.text_dim, text_len=d.text_len)
        if self.needs_negative:
            self.negative = enc.encode([str(cfg.dmd.negative_prompt)])[0].float().cpu()  # [1, L, D]
        if previews:
            self.preview_prompts = self._preview_prompts(cfg)
            self.preview_ctx = enc.encode(self.preview_prompts)[0].float().cpu()  # [P, L, D]
        if encode_on_the_fly:
            self._frozen_extra["text_encoder"] = enc
        elif cfg.text.offload_after_encode:
            enc.release()
            del enc
        if encode_videos or previews:
            from causvid.models.vae import vae_from_config

            self._frozen_extra["vae"] = vae_from_config(cfg.vae, device=device).eval().requires_grad_(False)

    @staticmethod
    def _preview_prompts(cfg) -> list[str]:
        if cfg.text.kind == "toy":
            from causvid.data.toyworld import toyworld_prompts

            return toyworld_prompts(2, seed=int(cfg.data.toyworld.seed) + 1)
        return ["A red sports car drives along a coastal road at sunset, cinematic.",
                "A cat walks through a sunny garden, realistic style."]

    def frozen(self) -> dict[str, nn.Module]:
        return dict(getattr(self, "_frozen_extra", {}))

    def _uncond(self, batch_size: int, device) -> torch.Tensor:
        """The negative-prompt embedding (CFG's unconditional branch) for a batch: [B, L, D]."""
        return self.negative.to(device).expand(batch_size, -1, -1)

    def context_of(self, batch: dict, models: dict) -> torch.Tensor:
        """Text embeddings [B, L, D]: stored in the batch, or encoded from its captions."""
        if "context" in batch:
            return batch["context"].float()
        enc = models.get("text_encoder")
        if enc is None:
            raise RuntimeError("this batch has captions but no stored context and the stage has no text encoder")
        return enc.encode([str(c) for c in batch["caption"]], device=self.device_of(batch))[0]

    def device_of(self, batch: dict) -> torch.device:
        """The device of the batch's tensors; the stage's device for a batch of strings only."""
        for v in batch.values():
            if torch.is_tensor(v):
                return v.device
        return getattr(self, "device", torch.device("cpu"))

    @torch.no_grad()
    def clean_of(self, batch: dict, models: dict) -> torch.Tensor:
        """Clean latents x0 [B, F, C, h, w]: stored, the last ODE state, or the VAE encoding of the video."""
        if "latents" in batch:
            return batch["latents"].float()
        if "states" in batch:
            return batch["states"][:, -1].float()
        if "video" in batch:
            vae = models["vae"]
            video = batch["video"]
            return vae.encode(video.to(next(vae.parameters()).dtype)).float()
        raise KeyError(f"the batch holds no clean latents, ODE states or videos (keys: {sorted(batch)})")

    # -- export / previews -----------------------------------------------------------------------------
    def ema_target(self) -> Optional[str]:
        return self.trained

    def export(self, models: dict[str, nn.Module], folder: str) -> None:
        """``model.safetensors`` = the trained network (its EMA if the trainer enabled one), config embedded."""
        os.makedirs(folder, exist_ok=True)
        lora.save_network(unwrap(models[self.trained]), os.path.join(folder, MODEL_FILE))  # merged + adapters if LoRA

    @torch.no_grad()
    def sample(self, models: dict[str, nn.Module], step: int) -> Optional[dict[str, torch.Tensor]]:
        """Preview videos of the fixed preview prompts (fixed noise, so steps compare)."""
        if self.preview_ctx is None or "vae" not in models:
            return None
        model = unwrap(models[self.trained])
        dev = next(model.parameters()).device
        lat_shape = self._latent_shape()
        g = torch.Generator().manual_seed(int(self.cfg.train.seed))
        noise = torch.randn((len(self.preview_prompts), *lat_shape), generator=g).to(dev)
        ctx = self.preview_ctx.to(dev)
        latents = self._preview_latents(model, noise, ctx, g)
        vae = models["vae"]
        video = vae.decode(latents.to(next(vae.parameters()).dtype)).float().cpu()  # [P, T, 3, H, W]
        return {f"{i}: {p[:60]}": video[i] for i, p in enumerate(self.preview_prompts)}

    def _latent_shape(self):
        from causvid.ode_pairs import latent_shape_from_config

        return latent_shape_from_config(self.cfg)

    def _preview_latents(self, model, noise, ctx, g):
        steps = S.denoising_steps(list(self.cfg.schedule.denoising_step_list), self.cfg.schedule.warp_denoising_step,
                                  self.cfg.schedule.shift)
        return causal_sample(model, noise, ctx, layout=layout_of(self.cfg), steps=student_steps(steps),
                             context_noise=float(self.cfg.sampler.context_noise), generator=g)


# ----------------------------------------------------------------------------------------------------
# Teacher (bidirectional) and causal teacher: flow matching
# ----------------------------------------------------------------------------------------------------


@register_stage("teacher")
class TeacherStage(_DiTStage):
    """Flow matching ``E ||v(x_t, t, c) - (eps - x0)||^2`` (eq. 1), one t per video from the shifted
    uniform distribution ``t = 1000 shift_s(u)``, u ~ U(0, 1), s = ``schedule.shift``; with probability
    ``train.cond_dropout`` the context is replaced by the negative-prompt embedding (CFG's unconditional
    branch). Data: latent shards, or toy-world / mp4 videos encoded on the fly with the VAE."""

    trained = "model"
    causal = False
    needs_negative = True

    @classmethod
    def check_config(cls, cfg) -> None:
        _check_source(cfg, ("latents", "toyworld", "videos"), "to train a teacher (clean videos / latents)")
        if not 0.0 <= cfg.train.cond_dropout <= 1.0:
            raise ConfigError("config key 'train.cond_dropout' must lie in [0, 1]")

    def setup(self, cfg, device) -> None:
        self.cfg = cfg
        self.layout = layout_of(cfg) if self.causal else None
        if cfg.train.init_from:
            self.model = load_network(cfg, "train.init_from", device=self.network_device(device))
        else:
            self.model = new_network(cfg, self.network_device(device))
        on_the_fly = cfg.data.source in ("toyworld", "videos")
        self.needs_negative = float(cfg.train.cond_dropout) > 0
        self._setup_conditioning(cfg, device, encode_on_the_fly=on_the_fly, encode_videos=on_the_fly)

    def trainable(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def dataset(self):
        return build_dataset(self.cfg, "clean")

    def drop_condition(self, ctx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Replace each sample's context by the negative-prompt embedding with probability cond_dropout."""
        p = float(self.cfg.train.cond_dropout)
        if p <= 0:
            return ctx
        drop = (torch.rand(ctx.shape[0], generator=g) < p).to(ctx.device)  # [B]
        return torch.where(drop[:, None, None], self._uncond(ctx.shape[0], ctx.device), ctx)

    def timesteps(self, g: torch.Generator, batch: int, num_frames: int, device) -> torch.Tensor:
        """[B] one t per video (bidirectional) or [B, F] one t per chunk (causal)."""
        sc = self.cfg.schedule
        if self.layout is None:
            return S.sample_uniform_timesteps((batch,), sc.shift, sc.num_train_timesteps, generator=g, device=device)
        t = S.sample_uniform_timesteps((batch, num_chunks(self.layout, num_frames)), sc.shift,
                                       sc.num_train_timesteps, generator=g, device=device)
        return chunk_to_frames(t, self.layout, num_frames)

    def loss(self, name, batch, models, step, rng):
        g = cpu_generator(rng)
        x0 = self.clean_of(batch, models)  # [B, F, C, h, w]
        ctx = self.drop_condition(self.context_of(batch, models), g)
        B, F = x0.shape[:2]
        t = self.timesteps(g, B, F, x0.device)
        eps = randn_like(x0, rng)
        x_t = S.add_noise(x0, eps, t)
        v = models[name](x_t, t, ctx, layout=self.layout)
        loss = diffusion_loss(v, x0, eps)
        return loss, {"loss/diffusion": float(loss.detach()), "t_mean": float(t.float().mean())}

    def _preview_latents(self, model, noise, ctx, g):
        op = self.cfg.ode_pairs
        uncond = self._uncond(noise.shape[0], noise.device) if self.negative is not None else None
        return teacher_sample(model, noise, ctx, uncond, num_steps=int(op.num_steps), shift=float(op.shift),
                              guidance=float(op.guidance) if uncond is not None else 1.0, solver=str(op.solver),
                              layout=self.layout).x0


@register_stage("causal_teacher")
class CausalTeacherStage(TeacherStage):
    """The teacher fine-tuned (from ``train.init_from``) with the chunk mask and an independent t per chunk
    (diffusion forcing): the causal teacher of the paper's ablation (CausVid Table 4)."""

    causal = True

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        _require(cfg, "train.init_from", "for train.stage='causal_teacher' (the bidirectional teacher to fine-tune)")


# ----------------------------------------------------------------------------------------------------
# ODE regression
# ----------------------------------------------------------------------------------------------------


@register_stage("ode")
class ODEStage(_DiTStage):
    """ODE regression (CausVid §4.3, eq. 3): per chunk an independent level k of the step list; input = the
    teacher's ODE state at level k, t = the level's value; one block-causal forward; MSE between the predicted
    x0 and the trajectory's clean end over chunks with t != 0 (t = 0 chunks are clean context)."""

    trained = "generator"

    @classmethod
    def check_config(cls, cfg) -> None:
        _check_source(cfg, ("ode_pairs",), "for ODE regression (it needs teacher ODE pairs)")
        _require(cfg, "train.init_from", "for ODE regression (the student starts from the teacher's weights)")

    def setup(self, cfg, device) -> None:
        self.cfg = cfg
        self.layout = layout_of(cfg)
        sc = cfg.schedule
        self.steps = S.denoising_steps(list(sc.denoising_step_list), sc.warp_denoising_step, sc.shift,
                                       sc.num_train_timesteps)
        self.generator = lora.adapt(cfg, load_network(cfg, "train.init_from", device=self.network_device(device)),
                                    "generator", str(cfg.train.init_from))  # itself unless model.lora.rank > 0
        self._setup_conditioning(cfg, device, encode_on_the_fly=False, encode_videos=False)

    def trainable(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def dataset(self):
        ds = build_dataset(self.cfg, "ode")
        self._check_levels(ds)
        return ds

    def _check_levels(self, ds) -> None:
        have = [float(x) for x in ds.step_list]
        if len(have) != len(self.steps) or any(abs(a - b) > 1e-3 for a, b in zip(have, self.steps)):
            raise ConfigError(f"the ODE pairs in {self.cfg.data.path} store the levels {have}, but the student's "
                              f"step list (schedule.denoising_step_list, warp={self.cfg.schedule.warp_denoising_step})"
                              f" is {self.steps}; regenerate the pairs or fix the config")

    def level_inputs(self, states: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B, K, F, C, h, w] -> (x_in [B, F, C, h, w], t [B, F]): one random stored level per chunk."""
        B, K, F = states.shape[:3]
        if K != len(self.steps):
            raise ValueError(f"ODE states hold {K} levels, the step list has {len(self.steps)}: {self.steps}")
        idx = draw_chunk_levels(g, B, self.layout, F, K)  # [B, F]
        t = torch.tensor(self.steps, dtype=torch.float32)[idx].to(states.device)  # [B, F]
        return gather_levels(states, idx), t

    def loss(self, name, batch, models, step, rng):
        if name != "generator":
            raise KeyError(f"ODE regression trains only 'generator', not {name!r}")
        g = cpu_generator(rng)
        states = batch["states"].float()  # [B, K, F, C, h, w]
        x_in, t = self.level_inputs(states, g)
        v = models["generator"](x_in, t, self.context_of(batch, models), layout=self.layout)
        x0 = S.x0_from_flow(x_in, v, t)
        loss = ode_regression_loss(x0, states[:, -1], t)
        logs = {"loss/ode": float(loss.detach())}
        with torch.no_grad():  # per-level MSE (the official log buckets by noise level)
            for lv in self.steps[:-1]:
                m = t == lv
                if bool(m.any()):
                    logs[f"ode_mse/t{lv:g}"] = float((x0[m] - states[:, -1][m]).pow(2).mean())
        return loss, logs


# ----------------------------------------------------------------------------------------------------
# DMD
# ----------------------------------------------------------------------------------------------------


@register_stage("dmd")
class DMDStage(ODEStage):
    """Asymmetric distribution matching distillation (CausVid §4.2; reference §5).

    generator: the causal student (``train.init_from``, the ODE initialisation), one block-causal forward
    on inputs chosen by ``dmd.generator_input``, or (``self_forcing``) its own KV-cached rollout with gradient
    through each chunk's exit-step forward (:mod:`causvid.train.rollout`); real score: the frozen teacher (``train.teacher_path``)
    with CFG ``uncond + w (cond - uncond)``, w = ``dmd.real_guidance``, uncond = the negative prompt;
    fake score (critic): a trainable copy of the teacher trained online with the flow loss on generator
    samples. The critic runs in the same mode as the real score (bidirectional, or block-causal with one t
    per chunk when ``dmd.teacher = causal``) so the two scores are comparable. ``dmd.teacher = none`` is the
    ablation without DMD: the stage is then exactly :class:`ODEStage`.
    """

    needs_negative = True

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.ode_only = cfg is not None and cfg.dmd.teacher == "none"

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.dmd.generator_input == "self_forcing":
            _check_self_forcing(cfg)
        if cfg.dmd.teacher == "none":
            ODEStage.check_config(cfg)
            return
        _require(cfg, "train.init_from", "for DMD (the generator's initialisation, normally the ODE stage's output)")
        _require(cfg, "train.teacher_path", f"for DMD with dmd.teacher={cfg.dmd.teacher!r} (the real score)")
        gi = cfg.dmd.generator_input
        if gi == "data":
            _check_source(cfg, ("latents", "ode_pairs", "toyworld", "videos"), "with dmd.generator_input='data'")
        elif gi == "ode":
            _check_source(cfg, ("ode_pairs",), "with dmd.generator_input='ode'")
        else:
            _check_source(cfg, ("latents", "ode_pairs", "toyworld", "prompts"),
                          f"with dmd.generator_input={gi!r} (only text is used)")

    def setup(self, cfg, device) -> None:
        if self.ode_only:
            self.needs_negative = False
            return super().setup(cfg, device)
        self.cfg = cfg
        self.layout = layout_of(cfg)
        sc = cfg.schedule
        self.steps = S.denoising_steps(list(sc.denoising_step_list), sc.warp_denoising_step, sc.shift,
                                       sc.num_train_timesteps)
        self.score_layout = self.layout if cfg.dmd.teacher == "causal" else None
        dev = self.network_device(device)  # the CPU under FSDP2: the trainer shards each network onto the device
        if lora.enabled(cfg):  # adapters on frozen bases shared with the teacher (causvid/train/lora.py)
            self.generator, self.critic, self.teacher = lora.dmd_networks(cfg, dev, _dtype(cfg))
        else:
            self.generator = load_network(cfg, "train.init_from", device=dev)
            self.teacher = load_network(cfg, "train.teacher_path", device=dev, dtype=_dtype(cfg), trainable=False)
            self.critic = load_network(cfg, "train.teacher_path", device=dev)
        gi, src = cfg.dmd.generator_input, cfg.data.source
        on_the_fly = src in ("toyworld", "videos", "prompts")
        self._setup_conditioning(cfg, device, encode_on_the_fly=on_the_fly,
                                 encode_videos=on_the_fly and gi == "data")

    def trainable(self) -> dict[str, nn.Module]:
        if self.ode_only:
            return super().trainable()
        return {"generator": self.generator, "critic": self.critic}

    def frozen(self) -> dict[str, nn.Module]:
        out = super().frozen()
        if not self.ode_only:
            out["teacher"] = self.teacher
        return out

    def optim_config(self, name: str):
        return self.cfg.dmd.critic_optim if name == "critic" else self.cfg.train.optim

    def updates(self, step: int) -> list[str]:
        if self.ode_only:
            return ["generator"]
        return ["generator", "critic"] if step % int(self.cfg.dmd.update_ratio) == 0 else ["critic"]

    def dataset(self):
        if self.ode_only:
            return super().dataset()
        want = {"data": "clean", "ode": "ode", "backward_simulation": "text",
                "self_forcing": "text"}[self.cfg.dmd.generator_input]
        ds = build_dataset(self.cfg, want)
        if want == "ode":
            self._check_levels(ds)
        return ds

    # -- the generator's sample ------------------------------------------------------------------------
    def generator_inputs(self, batch: dict, models: dict, ctx: torch.Tensor, rng: torch.Generator,
                         g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_in [B, F, C, h, w], t [B, F]) for the generator's one forward, per ``dmd.generator_input``."""
        gi = self.cfg.dmd.generator_input
        if gi == "ode":
            return self.level_inputs(batch["states"].float(), g)
        if gi == "data":
            # clean data noised per chunk to a random level of the step list (t = 0 chunks stay clean), §5.2
            x0 = self.clean_of(batch, models)
            B, F = x0.shape[:2]
            idx = draw_chunk_levels(g, B, self.layout, F, len(self.steps))  # [B, F]
            t = torch.tensor(self.steps, dtype=torch.float32)[idx].to(x0.device)
            return S.add_noise(x0, randn_like(x0, rng), t), t
        return self.backward_simulation(models, ctx, rng, g)

    @torch.no_grad()
    def backward_simulation(self, models, ctx, rng, g) -> tuple[torch.Tensor, torch.Tensor]:
        """From pure noise: run the few-step causal sampler (KV cache) for a random number j of steps, re-noise
        its output to level j; j = 0 is pure noise. Needs no video data (DMD2-style backward simulation)."""
        steps = student_steps(self.steps)  # without the final 0
        shape = (ctx.shape[0], *self._latent_shape())
        noise = torch.randn(shape, generator=rng, device=rng.device).to(ctx.device)
        j = int(torch.randint(0, len(steps), (1,), generator=g))
        t = torch.full(shape[:2], steps[j], device=ctx.device)
        if j == 0:
            return noise, t
        x0 = causal_sample(unwrap(models["generator"]), noise, ctx, layout=self.layout, steps=steps[:j],
                           context_noise=float(self.cfg.sampler.context_noise), generator=g)
        return S.add_noise(x0, randn_like(x0, rng), t), t

    # -- Self-Forcing ----------------------------------------------------------------------------------
    def rollout_frames(self) -> tuple[int, int]:
        """(R, F): latent frames rolled out and of the training clip (the last F of the R get gradient)."""
        F = self._latent_shape()[0]
        return int(self.cfg.dmd.self_forcing.rollout_frames) or F, F

    def exit_steps(self, step: int, name: str) -> list[int]:
        """Per-chunk exit steps of the rollout for (step, update): equal on all ranks, reproduced on resume."""
        sf = self.cfg.dmd.self_forcing
        R, _ = self.rollout_frames()
        return draw_exit_steps(int(self.cfg.train.seed), step, name, num_chunks(self.layout, R),
                               len(student_steps(self.steps)), same_step_across_blocks=bool(sf.same_step_across_blocks),
                               last_step_only=bool(sf.last_step_only))

    def self_forcing_sample(self, models, ctx, rng, step: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's own KV-cached rollout (rollout.self_forcing_rollout): x0 of the last clip
        [B, F, C, h, w] (grad through the exit-step forwards when grad mode is on) and its exit levels t [B, F]."""
        sf, sp = self.cfg.dmd.self_forcing, self.cfg.sampler
        steps = student_steps(self.steps)
        R, F = self.rollout_frames()
        exits = self.exit_steps(step, name)
        shape = (ctx.shape[0], R, *self._latent_shape()[1:])
        noise = torch.randn(shape, generator=rng, device=rng.device).to(ctx.device)
        x = self_forcing_rollout(models["generator"], noise, ctx, layout=self.layout, steps=steps, exit_steps=exits,
                                 context_noise=float(sp.context_noise), cache_grad=str(sf.cache_grad), grad_frames=F,
                                 generator=rng, sink_chunks=int(sp.sink_chunks) if sp.window_chunks else 0,
                                 window_chunks=int(sp.window_chunks))
        levels = torch.tensor([[steps[k] for k in exits]], dtype=torch.float32)  # [1, n_chunks]
        t = chunk_to_frames(levels, self.layout, R)[:, R - F:].expand(shape[0], F).to(ctx.device)
        return x[:, R - F:], t

    def score_range(self, step: int, name: str) -> Optional[tuple[int, int]]:
        """The uniform-timestep range [lo, hi) of the DMD / critic t (``ts_schedule`` / ``ts_schedule_max``:
        the exit step's interval), or None for the full range."""
        sf = self.cfg.dmd.self_forcing
        if self.cfg.dmd.generator_input != "self_forcing" or not (sf.ts_schedule or sf.ts_schedule_max):
            return None
        sc = self.cfg.schedule
        lo, hi = exit_interval(student_steps(self.steps), self.exit_steps(step, name)[0], float(sc.shift),
                               int(sc.num_train_timesteps))
        return (lo if sf.ts_schedule else 0, hi if sf.ts_schedule_max else int(sc.num_train_timesteps))

    def generate(self, batch, models, ctx, rng, g, step: int = 0,
                 name: str = "generator") -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's x0 [B, F, C, h, w] (grad as the caller's mode allows) and its input levels t [B, F]."""
        if self.cfg.dmd.generator_input == "self_forcing":
            return self.self_forcing_sample(models, ctx, rng, step, name)
        x_in, t = self.generator_inputs(batch, models, ctx, rng, g)
        v = models["generator"](x_in, t, ctx, layout=self.layout)
        return S.x0_from_flow(x_in, v, t), t

    # -- scores ----------------------------------------------------------------------------------------
    def score_timesteps(self, g: torch.Generator, batch: int, num_frames: int, device,
                        u_range: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """DMD / critic t (§3.5): randint -> shift -> clamp; [B] per video, or [B, F] per chunk (causal scores).
        ``u_range``: draw the uniform integer in [lo, hi) instead of [0, T) (Self-Forcing's ts_schedule)."""
        sc = self.cfg.schedule
        kw = dict(shift=float(sc.shift), min_ratio=float(sc.min_timestep_ratio), max_ratio=float(sc.max_timestep_ratio),
                  num_train_timesteps=int(sc.num_train_timesteps), generator=g, device=device, u_range=u_range)
        if self.score_layout is None:
            return S.sample_training_timesteps((batch,), **kw)
        t = S.sample_training_timesteps((batch, num_chunks(self.score_layout, num_frames)), **kw)
        return chunk_to_frames(t, self.score_layout, num_frames)

    def _score_x0(self, model, x_t, t, ctx, guidance: float) -> torch.Tensor:
        uncond = self._uncond(ctx.shape[0], ctx.device) if guidance != 1.0 else None
        v = guided_flow(model, x_t, t, ctx, uncond, guidance, layout=self.score_layout)
        return S.x0_from_flow(x_t, v, t)

    # -- losses ----------------------------------------------------------------------------------------
    def loss(self, name, batch, models, step, rng):
        if self.ode_only:
            return super().loss(name, batch, models, step, rng)
        g = cpu_generator(rng)
        ctx = self.context_of(batch, models)
        if name == "generator":
            return self.generator_loss(batch, models, ctx, rng, g, step)
        if name == "critic":
            return self.critic_loss(batch, models, ctx, rng, g, step)
        raise KeyError(f"DMD trains 'generator' and 'critic', not {name!r}")

    def generator_loss(self, batch, models, ctx, rng, g, step: int = 0):
        """Eq. (5)-(6): DMD gradient ``(fake - real) / mean|x - real|`` through the 0.5 MSE surrogate."""
        x, t_in = self.generate(batch, models, ctx, rng, g, step, "generator")  # with grad
        B, F = x.shape[:2]
        t = self.score_timesteps(g, B, F, x.device, self.score_range(step, "generator"))
        eps = randn_like(x, rng)
        with torch.no_grad():
            x_t = S.add_noise(x.detach(), eps, t)
            real = self._score_x0(models["teacher"], x_t, t, ctx, float(self.cfg.dmd.real_guidance))
            fake = self._score_x0(models["critic"], x_t, t, ctx, float(self.cfg.dmd.fake_guidance))
        loss, grad = dmd_generator_loss(x, real, fake)
        return loss, {"loss/dmd": float(loss.detach()), "dmd_grad_norm": float(grad.abs().mean()),
                      "t_dmd_mean": float(t.float().mean()), "t_gen_mean": float(t_in.float().mean())}

    def critic_loss(self, batch, models, ctx, rng, g, step: int = 0):
        """Eq. (7): the critic's flow-matching loss on a fresh generator sample (generator under no_grad)."""
        with torch.no_grad():
            x, _ = self.generate(batch, models, ctx, rng, g, step, "critic")
        B, F = x.shape[:2]
        t = self.score_timesteps(g, B, F, x.device, self.score_range(step, "critic"))
        eps = randn_like(x, rng)
        x_t = S.add_noise(x, eps, t)
        v = models["critic"](x_t, t, ctx, layout=self.score_layout)
        loss = critic_flow_loss(v, x, eps)
        return loss, {"loss/critic": float(loss.detach()), "t_critic_mean": float(t.float().mean())}

    def export(self, models, folder) -> None:
        """``model.safetensors`` (generator, EMA if enabled) and ``critic.safetensors`` (to continue training)."""
        super().export(models, folder)
        if not self.ode_only and "critic" in models:
            lora.save_network(unwrap(models["critic"]), os.path.join(folder, CRITIC_FILE))
