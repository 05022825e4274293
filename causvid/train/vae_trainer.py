"""Train the toy Wan-architecture VAE on toy-world videos (DESIGN.md §5, first arrow; docs/vae.md).

The VAE is causal and convolutional, so it can train on pieces of videos. Training follows a schedule
of phases (``VAETrainOptions.schedule``), by default: single frames (an image autoencoder: cheap steps,
large batches), then short clips (the temporal layers), then whole 64x64 x 33-frame videos (no crop
borders inside the frame, steady-state causal history). The initialisation (:func:`inflated_he_init_`)
makes the network start as a per-frame image model, so the image phase trains everything spatial and
the later phases only have to add temporal mixing. Loss per step::

    L = l1_weight * |x - x_hat|_1 + mse_weight * |x - x_hat|_2^2 + kl_weight * KL(q(z|x) || N(0, I))

(means over elements; ``x_hat`` decodes a reparameterised sample of the posterior). After training the
per-channel latent mean / std are measured on training videos and stored in the VAE's config, so
``vae.encode`` hands the DiT roughly unit-variance latents (as Wan's constants do, wan_architecture.md §4.5).

Outputs in ``output_dir``: ``vae.safetensors`` (:func:`causvid.models.vae.save_vae`, atomic),
``metrics.json`` (held-out PSNR, timing) and ``config.yaml`` (the resolved run config).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from causvid.config import save_config
from causvid.models.vae import CausalConv3d, WanVAE, save_vae, vae_arch
from causvid.train.lr import lr_multiplier
from causvid.train.precision import warn_if_emulated_bf16


@dataclass(frozen=True)
class Phase:
    """A part of training: ``fraction`` of the steps on clips of ``frames`` x ``crop`` x ``crop``
    (crop 0: whole frames), ``batch`` clips per step (0: ``train.batch_size``), peak learning rate
    ``lr_scale`` x ``train.optim.lr``."""

    fraction: float
    frames: int
    crop: int
    batch: int = 0
    lr_scale: float = 1.0


def parse_schedule(spec: str) -> list[Phase]:
    """``"0.45:1x32x16,0.35:9x32x4,0.2:33x32x1@0.2"`` -> phases (``fraction:FRAMESxCROP[xBATCH][@LR_SCALE]``,
    comma separated)."""
    phases = []
    for part in spec.split(","):
        try:
            frac, dims = part.strip().split(":")
            dims, _, scale = dims.partition("@")
            nums = [int(v) for v in dims.split("x")]
            if len(nums) not in (2, 3):
                raise ValueError
            lr_scale = float(scale) if scale else 1.0
            if not lr_scale > 0:
                raise ValueError
            phases.append(Phase(float(frac), *nums, lr_scale=lr_scale))
        except (ValueError, TypeError):
            raise ValueError(f"vae.train.schedule: cannot parse {part!r} in {spec!r}; expected "
                             "'fraction:FRAMESxCROP[xBATCH][@LR_SCALE]' items separated by commas") from None
    if not phases or abs(sum(p.fraction for p in phases) - 1.0) > 1e-6 or any(p.fraction < 0 for p in phases):
        raise ValueError(f"vae.train.schedule: the fractions of {spec!r} must be >= 0 and sum to 1")
    return phases


@dataclass
class VAETrainOptions:
    """VAE-specific knobs (proposed config section ``vae.train``; set them with ``vae.train.<name>=``)."""

    schedule: str = "0.45:1x32x16,0.35:9x32x4,0.2:33x32x1@0.2"  # see parse_schedule; crop 0 = whole frames
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-4
    sample_posterior: bool = True  # decode mu + sigma * eps (a VAE) rather than mu (an autoencoder)
    init: str = "inflated"  # inflated: see inflated_he_init_ | default: PyTorch's init
    logvar_init: float = -6.0  # inflated init: bias of the log-variance channels (little noise at first)
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio
    restart_lr: bool = True  # each phase: fresh AdamW moments, warm-up + cosine decay (else one decay overall)
    eval_videos: int = 8  # held-out videos (whole clips) for the PSNR
    eval_seed_offset: int = 1  # held-out world seed = training seed + offset
    stats_videos: int = 16  # training videos used to measure the latent mean / std

    @classmethod
    def from_mapping(cls, d: Optional[Mapping[str, Any]]) -> "VAETrainOptions":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown vae.train option(s) {sorted(unknown)}; valid: {sorted(known)}")
        defaults = cls()

        def cast(k: str, v: Any) -> Any:
            t = type(getattr(defaults, k))
            if t is bool and isinstance(v, str):
                if v.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"vae.train.{k} must be true or false, got {v!r}")
                return v.lower() in ("true", "1")
            return t(v)

        return cls(**{k: cast(k, v) for k, v in d.items()})

    def phases(self) -> list[Phase]:
        return parse_schedule(self.schedule)

    def validate(self, num_frames: int, height: int, width: int, spatial: int, temporal: int) -> None:
        if self.init not in ("inflated", "default"):
            raise ValueError(f"vae.train.init must be 'inflated' or 'default', got {self.init!r}")
        for p in self.phases():
            if p.frames < 1 or (p.frames - 1) % temporal or p.frames > num_frames:
                raise ValueError(f"vae.train.schedule: clip frames must be 1 + {temporal}n and <= data.num_frames "
                                 f"({num_frames}), got {p.frames}")
            if p.crop and (p.crop % spatial or p.crop > min(height, width)):
                raise ValueError(f"vae.train.schedule: crop must be a multiple of {spatial} and <= the frame "
                                 f"size ({height}x{width}), got {p.crop}")

    def phase_bounds(self, total: int) -> list[tuple[int, int, Phase]]:
        """``(first step, end step, phase)`` of every phase of a ``total``-step run."""
        out, start, acc = [], 0, 0.0
        for p in self.phases():
            acc += p.fraction * total
            end = round(acc)
            out.append((start, end, p))
            start = end
        return out

    def phase_at(self, step: int, total: int) -> Phase:
        """The phase that ``step`` (0-based) of ``total`` belongs to."""
        return self.position(step, total)[2]

    def position(self, step: int, total: int) -> tuple[int, int, Phase]:
        """``(step within its phase, phase length, phase)``."""
        bounds = self.phase_bounds(total)
        for start, end, p in bounds:
            if step < end:
                return step - start, end - start, p
        start, end, p = bounds[-1]
        return step - start, end - start, p

    def lr_factor(self, step: int, total: int, warmup: int) -> float:
        """Multiplier of the base lr: warm-up + cosine per phase (``restart_lr``) or over the whole run."""
        i, n, phase = self.position(step, total)
        if not self.restart_lr:
            return phase.lr_scale * lr_multiplier(step, total, warmup, total, self.min_lr_ratio)
        return phase.lr_scale * lr_multiplier(i, n, warmup, n, self.min_lr_ratio)


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def inflated_he_init_(vae: WanVAE, logvar_init: float = -6.0) -> WanVAE:
    """Initialise for training from scratch so that the VAE starts as a per-frame *image* autoencoder.

    * every conv: He-normal weights (std ``sqrt(2 / fan_in)``), zero bias; a causal conv with a temporal
      kernel gets them on its last (current-frame) tap only, its earlier taps are zero;
    * ``time_conv`` of a temporal downsample is the identity on the current frame (keeps every second
      frame), of a temporal upsample the identity into both output frames (repeats frames);
    * the last conv of every residual branch and the attention ``proj`` are zero (blocks start as the
      identity), and the log-variance bias starts at ``logvar_init`` (nearly noiseless samples).

    Single-frame training then trains all spatial weights and leaves the temporal taps at zero (they
    only ever see the zero padding), i.e. an image VAE inflated to 3-D, which the video phases refine.
    PyTorch's default conv init shrinks the signal at every non-residual conv and learns several times
    slower on the toy world (docs/vae.md).
    """
    for name, m in vae.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Conv3d)):
            continue
        nn.init.zeros_(m.bias)
        if name.endswith(("residual.6", ".proj")):
            nn.init.zeros_(m.weight)
        elif name.endswith("time_conv"):
            eye = torch.eye(m.in_channels).repeat(m.out_channels // m.in_channels, 1)  # [Cout, Cin]
            m.weight.zero_()
            m.weight[:, :, -1, 0, 0] = eye
        elif isinstance(m, CausalConv3d) and m.kernel_size[0] > 1:
            m.weight.zero_()
            tap = m.weight[:, :, -1]  # [Cout, Cin, kh, kw]
            nn.init.normal_(tap, 0.0, math.sqrt(2.0 / tap[0].numel()))
        else:
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.weight[0].numel()))
    nn.init.constant_(vae.conv1.bias[vae.arch.z_dim:], logvar_init)  # conv1 channels z..2z: log-variances
    return vae


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB of videos in [-1, 1] (``data_range`` 2); one value per leading (batch) item."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-12))


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over elements of KL(N(mu, exp(logvar)) || N(0, 1)) = 0.5 (mu^2 + e^logvar - 1 - logvar)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def vae_loss(video: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             opt: VAETrainOptions) -> tuple[torch.Tensor, dict[str, float]]:
    l1 = (recon - video).abs().mean()
    mse = (recon - video).pow(2).mean()
    kl = kl_to_standard_normal(mu, logvar)
    loss = opt.l1_weight * l1 + opt.mse_weight * mse + opt.kl_weight * kl
    return loss, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def random_subclip(video: torch.Tensor, clip_frames: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``[clip_frames, 3, crop, crop]`` window of a ``[T, 3, H, W]`` video (crop 0: full frames)."""
    t, _, h, w = video.shape
    t0 = int(torch.randint(0, t - clip_frames + 1, (1,), generator=gen))
    video = video[t0:t0 + clip_frames]
    if crop and (crop < h or crop < w):
        y0 = int(torch.randint(0, h - crop + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - crop + 1, (1,), generator=gen))
        video = video[:, :, y0:y0 + crop, x0:x0 + crop]
    return video


@torch.no_grad()
def evaluate_psnr(vae: WanVAE, videos: Sequence[torch.Tensor], device: torch.device) -> dict[str, float]:
    """Whole-clip encode -> decode (clamped) of each ``[T, 3, H, W]`` video: mean and min PSNR (dB)."""
    vae.eval()
    values, sq = [], 0.0
    for v in videos:
        x = v.unsqueeze(0).to(device)
        y = vae.decode(vae.encode(x))
        values.append(float(psnr(x, y)[0]))
        sq += float((x - y).pow(2).mean())
    return {"psnr_mean": sum(values) / len(values), "psnr_min": min(values), "num_videos": len(videos),
            "psnr_of_mean_mse": 10 * math.log10(4.0 / max(sq / len(videos), 1e-12))}


@torch.no_grad()
def measure_latent_stats(vae: WanVAE, videos: Sequence[torch.Tensor], device: torch.device) -> tuple[list, list]:
    """Per-channel mean and std of the posterior means ``mu`` over ``videos`` (all frames and pixels)."""
    vae.eval()
    mus = [vae.encode_dist(v.unsqueeze(0).to(device))[0] for v in videos]  # each [1, F, z, h, w]
    mu = torch.cat([m.transpose(1, 2).flatten(2) for m in mus], dim=2)[0].double()  # [z, N]
    return mu.mean(dim=1).tolist(), mu.std(dim=1).clamp_min(1e-6).tolist()


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def default_datasets(cfg: Any, opt: VAETrainOptions):
    """Training and held-out toy worlds (held-out: another seed, so other scenes)."""
    from causvid.data.toyworld import ToyWorld, toyworld_from_config

    d, t = cfg.data, cfg.data.toyworld
    held_out = ToyWorld(height=d.height, width=d.width, num_frames=d.num_frames, fps=d.fps,
                        seed=t.seed + opt.eval_seed_offset, num_videos=max(opt.eval_videos, 1),
                        max_objects=t.max_objects, textured_background_prob=t.textured_background_prob)
    return toyworld_from_config(d), held_out


def build_vae(cfg: Any, opt: VAETrainOptions) -> WanVAE:
    """``cfg.vae.path`` (fine-tune) or a fresh ``cfg.vae.size`` VAE with the ``opt.init`` initialisation."""
    from causvid.models.vae import load_vae

    if cfg.vae.path:
        return load_vae(cfg.vae.path, size=cfg.vae.size)
    vae = WanVAE(vae_arch(cfg.vae.size))
    return inflated_he_init_(vae, opt.logvar_init) if opt.init == "inflated" else vae


def train_vae(cfg: Any, output_dir: str, steps: Optional[int] = None, options: Optional[VAETrainOptions] = None,
              datasets: Optional[Callable[[Any, VAETrainOptions], tuple]] = None, progress: bool = True) -> dict:
    """Train the VAE of ``cfg.vae`` and write ``vae.safetensors``, ``metrics.json``, ``config.yaml``.

    Uses ``cfg.train.{max_steps, batch_size, seed, optim.*, mixed_precision, log_every,
    max_consecutive_nonfinite}`` and ``cfg.data`` (frame size, frames, toy world). ``datasets`` may
    replace the toy world: ``(cfg, options) -> (train, held_out)``, items ``{"video": [T, 3, H, W]}``.
    Returns the metrics written to ``metrics.json`` (empty on processes other than the main one).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    opt = options or VAETrainOptions()
    total = int(cfg.train.max_steps if steps is None else steps)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    warn_if_emulated_bf16(cfg.train.mixed_precision, acc.device.type)
    torch.manual_seed(cfg.train.seed)
    vae = build_vae(cfg, opt).train()
    a = vae.arch
    opt.validate(cfg.data.num_frames, cfg.data.height, cfg.data.width, a.spatial_factor, a.temporal_factor)
    train_set, held_out = (datasets or default_datasets)(cfg, opt)
    o = cfg.train.optim
    optimizer = torch.optim.AdamW(vae.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: opt.lr_factor(s, total, o.warmup_steps))
    model, optimizer, scheduler = acc.prepare(vae, optimizer, scheduler)

    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + acc.process_index)
    bar = tqdm(range(total), desc="vae", disable=not (progress and acc.is_main_process), dynamic_ncols=True)
    t_start, logs, nonfinite, skipped, window = time.time(), {}, 0, 0, []
    for step in bar:
        within, _, ph = opt.position(step, total)
        if within == 0 and step > 0 and opt.restart_lr:
            # A new phase starts like a fresh run: Adam moments from single frames would give the temporal
            # taps (zero gradient until now, bias correction long done) steps many times the learning rate.
            getattr(optimizer, "optimizer", optimizer).state.clear()
        n = ph.batch or cfg.train.batch_size
        idx = torch.randint(0, len(train_set), (n,), generator=gen).tolist()
        batch = torch.stack([random_subclip(train_set[i]["video"], ph.frames, ph.crop, gen) for i in idx])
        batch = batch.to(acc.device)  # [n, frames, 3, crop, crop]
        with acc.autocast():
            recon, mu, logvar = model(batch, sample=opt.sample_posterior, generator=gen)
        loss, logs = vae_loss(batch, recon.float(), mu.float(), logvar.float(), opt)
        if not torch.isfinite(loss):
            nonfinite, skipped = nonfinite + 1, skipped + 1
            optimizer.zero_grad(set_to_none=True)
            if nonfinite >= cfg.train.max_consecutive_nonfinite:
                raise FloatingPointError(f"{nonfinite} consecutive non-finite VAE losses at step {step}")
            continue
        nonfinite = 0
        acc.backward(loss)
        if o.grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(logs["mse"])
        if (step + 1) % max(1, cfg.train.log_every) == 0 or step == total - 1:
            train_psnr = 10 * math.log10(4.0 / max(sum(window) / len(window), 1e-12))  # over the log interval
            bar.set_postfix(psnr=f"{train_psnr:.2f}", clip=f"{n}x{ph.frames}x{ph.crop or 'full'}",
                            lr=f"{scheduler.get_last_lr()[0]:.1e}")
            window = []
    train_seconds = time.time() - t_start

    metrics: dict[str, Any] = {}
    acc.wait_for_everyone()
    if acc.is_main_process:
        vae = acc.unwrap_model(model).float()
        n_stats = min(opt.stats_videos, len(train_set))
        mean, std = measure_latent_stats(vae, [train_set[i]["video"] for i in range(n_stats)], acc.device)
        vae.set_latent_stats(mean, std)
        t_eval = time.time()
        videos = [held_out[i]["video"] for i in range(min(opt.eval_videos, len(held_out)))]
        metrics = evaluate_psnr(vae, videos, acc.device) if videos else {}
        metrics.update(
            steps=total, skipped_steps=skipped, train_seconds=round(train_seconds, 1),
            eval_seconds=round(time.time() - t_eval, 1), last_train_losses=logs, vae_size=cfg.vae.size,
            parameters=sum(p.numel() for p in vae.parameters()), latent_mean=mean, latent_std=std,
            held_out=f"{type(held_out).__name__} seed {getattr(held_out, 'seed', None)}, first {len(videos)} items",
            video_shape=list(videos[0].shape) if videos else None, options=asdict(opt),
            batch_size=cfg.train.batch_size, lr=cfg.train.optim.lr, mixed_precision=cfg.train.mixed_precision,
            processes=acc.num_processes, device=str(acc.device), torch_threads=torch.get_num_threads(),
        )
        os.makedirs(output_dir, exist_ok=True)
        save_vae(vae.cpu(), os.path.join(output_dir, "vae.safetensors"))
        save_config(cfg, os.path.join(output_dir, "config.yaml"))
        _write_json(os.path.join(output_dir, "metrics.json"), metrics)
    acc.wait_for_everyone()
    return metrics


def split_vae_train_overrides(overrides: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Separate ``vae.train.<name>=value`` items (VAETrainOptions) from run-config dotlist items."""
    rest, opts = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.startswith("vae.train.") and sep:
            opts[key[len("vae.train."):]] = value
        else:
            rest.append(item)
    return rest, opts


def options_from(cfg: Any, cli: Mapping[str, str]) -> VAETrainOptions:
    """``cfg.vae.train`` (when the config schema has it) updated by command-line ``vae.train.*`` items."""
    base: dict[str, Any] = {}
    section = getattr(cfg.vae, "train", None)
    if section is not None:
        base.update(dict(section))
    base.update(cli)
    return VAETrainOptions.from_mapping(base)
