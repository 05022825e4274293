"""Benchmark options: sizes, step lists, sections and :class:`BenchOptions`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------

# Per DiT size: default pixel resolution, VAE size, text encoder kind, (temporal, spatial) VAE factors.
SIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(height=32, width=32, frames=13, vae="tiny", text="toy", factors=(4, 4)),
    "toy": dict(height=64, width=64, frames=81, vae="toy", text="toy", factors=(4, 4)),
    "wan2.1-1.3b": dict(height=480, width=832, frames=81, vae="wan2.1", text="umt5", factors=(4, 8)),
    "wan2.1-14b": dict(height=480, width=832, frames=81, vae="wan2.1", text="umt5", factors=(4, 8)),
}

# Student step lists by step count (``causvid_reference.md`` §3; CausVid-Wan uses 3, Self-Forcing 4).
STEP_LISTS: dict[int, list[float]] = {
    1: [1000.0],
    2: [1000.0, 500.0],
    3: [1000.0, 757.0, 522.0],
    4: [1000.0, 750.0, 500.0, 250.0],
}

SECTIONS = ("flops", "student", "teacher", "kv", "steps", "batch", "dmd", "self_forcing")
# Run only when named in ``--sections``: ``peer`` needs diffusers (the ``interop`` extra); ``decoder`` needs
# ``--tiny-decoder`` (the command line adds it to the default sections when one is given).
OPTIONAL_SECTIONS = ("peer", "decoder")

H100_BF16_DENSE_TFLOPS = 989.0  # datasheet dense bf16 (H100 / H200 SXM), performance.md §1.4


@dataclass
class BenchOptions:
    """Everything a run needs; ``scripts/benchmark.py`` fills it from the command line."""

    size: str = "toy"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    height: Optional[int] = None
    width: Optional[int] = None
    frames: Optional[int] = None  # pixel frames, 1 + 4n
    chunk: int = 3  # latent frames per causal chunk
    steps: int = 3  # student denoising steps per chunk (+ 1 cache-refresh pass)
    teacher_steps: int = 50
    guidance: float = 6.0  # teacher CFG weight (true w; 2 forwards per step when != 1)
    shift: float = 8.0
    batch: int = 4  # N of the batch 1 vs N comparison
    lengths: Sequence[int] = (6, 9, 12, 21, 42)  # latent frames of the KV-vs-recompute sweep
    sweep_steps: Sequence[int] = (1, 2, 3, 4)
    warmup: int = 1
    reps: int = 3
    teacher_reps: int = 2
    batch_reps: int = 2
    dmd_batch: int = 1
    dmd_guidance: float = 4.5  # real-score CFG weight of the DMD generator update
    grad_ckpt: Optional[bool] = None  # None: on for Wan sizes, off otherwise
    optimizer_step: bool = True  # include AdamW + grad clipping in the DMD step
    attention: str = "auto"  # auto | sdpa | flex (block-causal masks: training and recomputation)
    compile: bool = False
    compile_mode: Optional[str] = None
    text_encoder: bool = True
    vae: bool = True
    vae_path: Optional[str] = None  # trained VAE weights (causvid.models.vae.load_vae); None: random weights
    tiny_decoder: Optional[str] = None  # a trained decoder.safetensors: the student decodes with it
    decoder_videos: int = 4  # held-out toy-world videos of the ``decoder`` section's PSNR (with vae_path)
    write_mp4: bool = True
    mp4_preset: str = "medium"
    prompt: str = "a red circle moving left"
    prompt_tokens: int = 512  # umT5 tokens timed when no tokenizer is available (Wan pads to 512)
    peak_tflops: Optional[float] = None
    threads: Optional[int] = None
    sections: Sequence[str] = SECTIONS
    peer_cases: Sequence[str] = ("bench", "wan-mini")  # cases of the ``peer`` section (causvid/benchmark/peer.py)
    seed: int = 0
    quick: bool = False
    command: str = ""

    def resolved(self) -> "BenchOptions":
        """Fill size-dependent defaults; ``quick`` shrinks repetitions and sweeps (CI smoke run)."""
        if self.size not in SIZE_DEFAULTS:
            raise ValueError(f"unknown size {self.size!r}; valid: {sorted(SIZE_DEFAULTS)}")
        d = SIZE_DEFAULTS[self.size]
        o = dataclasses.replace(self, height=self.height or d["height"], width=self.width or d["width"],
                                frames=self.frames or d["frames"])
        if o.grad_ckpt is None:
            o.grad_ckpt = o.size.startswith("wan")
        if o.quick:
            o.warmup, o.reps, o.teacher_reps, o.batch_reps = min(o.warmup, 1), 1, 1, 1
            o.lengths = tuple(o.lengths)[:2]
            o.sweep_steps = tuple(sorted({1, o.steps}))
            o.batch = min(o.batch, 2)
        bad = [s for s in o.sections if s not in SECTIONS + OPTIONAL_SECTIONS]
        if bad:
            raise ValueError(f"unknown sections {bad}; valid: {list(SECTIONS + OPTIONAL_SECTIONS)}")
        bad = [c for c in o.peer_cases if c not in ("bench", "wan-mini")]
        if bad:
            raise ValueError(f"unknown peer cases {bad}; valid: ['bench', 'wan-mini']")
        tf, sf = d["factors"]
        if (o.frames - 1) % tf:
            raise ValueError(f"--frames must be 1 + {tf}n (the VAE compresses time {tf}x), got {o.frames}")
        if o.height % (2 * sf) or o.width % (2 * sf):
            raise ValueError(f"--height/--width must be multiples of {2 * sf} (VAE x{sf}, patch 2), "
                             f"got {o.height}x{o.width}")
        if o.steps < 1 or o.chunk < 1 or o.teacher_steps < 1 or o.batch < 1:
            raise ValueError("--steps, --chunk, --teacher-steps and --batch must be >= 1")
        if o.decoder_videos < 1:
            raise ValueError(f"--decoder-videos must be >= 1, got {o.decoder_videos}")
        check_model_files(o)
        return o


def check_model_files(o: BenchOptions) -> None:
    """``--vae-path`` / ``--tiny-decoder`` exist and fit the size's VAE (headers only: nothing is loaded); the
    ``decoder`` section has what it needs. A ``ValueError`` with one line otherwise."""
    from causvid.models.vae import VAE_KIND, VAEArch, vae_arch
    from causvid.models.weights import WeightsError, read_model_header, read_safetensors_metadata

    arch = vae_arch(SIZE_DEFAULTS[o.size]["vae"])
    if "decoder" in o.sections and not o.tiny_decoder:
        raise ValueError("--sections decoder needs --tiny-decoder PATH (a decoder.safetensors of scripts/train_decoder.py)")
    if (o.tiny_decoder or o.vae_path) and not o.vae:
        raise ValueError("--vae-path and --tiny-decoder need the VAE: drop --no-vae")
    if o.vae_path:
        if not os.path.exists(o.vae_path):
            raise ValueError(f"--vae-path {o.vae_path}: no such file or folder")
        if o.vae_path.endswith(".safetensors"):
            try:
                meta = read_safetensors_metadata(o.vae_path)
                if "kind" in meta and meta["kind"] != VAE_KIND:
                    raise ValueError(f"--vae-path {o.vae_path}: holds a {meta['kind']!r}, not a VAE")
                if meta.get("kind") == VAE_KIND:
                    got = VAEArch.from_dict(read_model_header(o.vae_path)[1]["arch"])
                    if got.structure() != arch.structure():
                        raise ValueError(f"--vae-path {o.vae_path}: a VAE of another architecture than the "
                                         f"{o.size!r} size's ({got.to_dict()} vs {arch.to_dict()})")
            except WeightsError as err:
                raise ValueError(f"--vae-path: {err}") from None
    if o.tiny_decoder:
        if not os.path.isfile(o.tiny_decoder):
            raise ValueError(f"--tiny-decoder {o.tiny_decoder}: no such file")
        from causvid.models.tiny_decoder import KIND, TinyDecoderArch

        try:
            kind, cfg = read_model_header(o.tiny_decoder)
        except WeightsError as err:
            raise ValueError(f"--tiny-decoder: {err}") from None
        if kind != KIND:
            raise ValueError(f"--tiny-decoder {o.tiny_decoder}: holds a {kind!r}, not a tiny decoder")
        td = TinyDecoderArch.from_dict(cfg)
        want = (arch.z_dim, arch.spatial_factor, arch.temporal_factor)
        if (td.z_dim, td.spatial_factor, td.temporal_factor) != want:
            raise ValueError(f"--tiny-decoder {o.tiny_decoder}: made for latents (z, spatial, temporal) = "
                             f"{(td.z_dim, td.spatial_factor, td.temporal_factor)}, the {o.size!r} VAE's are {want}")


def step_list(k: int) -> list[float]:
    """The student's timesteps for ``k`` steps (without the final 0)."""
    if k in STEP_LISTS:
        return list(STEP_LISTS[k])
    return [1000.0 * (1 - i / k) for i in range(k)]
