"""Models built directly on the target device and dtype (random weights, or trained VAE / tiny decoder weights
by path), and the timed workload."""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from causvid import schedule as S
from causvid.benchmark.flops import count_flops
from causvid.benchmark.measure import Clock, MemoryMeter, Recorder, raise_recompile_limits
from causvid.benchmark.options import SIZE_DEFAULTS, BenchOptions
from causvid.models.attention import ChunkLayout, CrossAttnCache
from causvid.models.dit import WanDiT
from causvid.models.registry import DiTConfig, dit_config
from causvid.sampler import causal_sample_chunks, teacher_sample

# ------------------------------------------------------------------------------------------------
# Building models (random weights, directly on the target device and dtype)
# ------------------------------------------------------------------------------------------------


def build_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, *, attention: str = "auto",
              seed: int = 0) -> WanDiT:
    """A randomly initialised DiT allocated on ``device``. The official init zeroes the head (the output
    would be exactly 0); we give it small random weights so outputs and gradients are non-trivial."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanDiT(cfg, attention=attention)
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return model.to(dtype).eval().requires_grad_(False)


class _AttentionDispatch:
    """One stable callable handed to compiled blocks; the real attention function changes per forward.

    ``torch.compiler.disable`` makes it a graph break, so KV-cache bookkeeping (host-side integers)
    stays in Python and the compiled graphs do not specialise on the cache state.
    """

    def __init__(self):
        self.fn: Optional[Callable] = None

    @torch.compiler.disable
    def __call__(self, layer, q, k, v):
        return self.fn(layer, q, k, v)


def compile_dit_blocks(model: WanDiT, mode: Optional[str] = None) -> WanDiT:
    """``torch.compile`` every DiT block (fusing norms, modulation, RoPE, gating) around an uncompiled
    attention call; the module is changed in place and returned."""
    raise_recompile_limits()
    dispatch = _AttentionDispatch()
    select = model._attention_fn

    def attention_fn(*args, **kwargs):
        dispatch.fn = select(*args, **kwargs)
        return dispatch

    model._attention_fn = attention_fn  # instance attribute: only this model object is affected
    for blk in model.blocks:
        blk.compile(mode=mode)
    return model


def build_vae(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0, path: Optional[str] = None):
    """``(WanVAE, note)``: trained weights from ``path`` (:func:`causvid.models.vae.load_vae`) or random ones;
    ``(None, reason)`` when ``causvid.models.vae`` is not importable."""
    try:
        from causvid.models.vae import WanVAE, load_vae
    except Exception as err:  # noqa: BLE001 - report any import problem as n/a
        return None, f"causvid.models.vae not importable: {err}"
    if path:
        return load_vae(path, size=size, device=device, dtype=dtype).requires_grad_(False), f"trained weights {path}"
    torch.manual_seed(seed)
    with torch.device(device):
        vae = WanVAE(size)
    return vae.to(dtype).eval().requires_grad_(False), "random weights"


def build_tiny_decoder(path: str, device: torch.device, dtype: torch.dtype):
    """A trained :class:`causvid.models.tiny_decoder.TinyDecoder` on ``device`` in ``dtype``."""
    from causvid.models.tiny_decoder import load_tiny_decoder

    return load_tiny_decoder(path, device).to(dtype)


class TextBench:
    """Text encoding for the benchmark: the toy encoder through its public ``encode`` (cache cleared before
    each timed call), or the umT5 encoder network on random token ids when no tokenizer is at hand."""

    def __init__(self, kind: str, cfg: DiTConfig, device: torch.device, dtype: torch.dtype, prompt_tokens: int):
        self.kind, self.cfg, self.device = kind, cfg, device
        self.prompt_tokens = min(prompt_tokens, cfg.text_len)
        if kind == "toy":
            from causvid.models.text import ToyTextEncoder

            heads = 4 if cfg.text_dim % 4 == 0 else 1
            self.encoder = ToyTextEncoder(dim=cfg.text_dim, text_len=cfg.text_len, num_heads=heads).to(device)
            self.note = "ToyTextEncoder.encode (cache cleared per call)"
        else:
            from causvid.models.text import UMT5Encoder

            if cfg.text_dim != 4096:
                raise ValueError(f"umT5-XXL outputs 4096 channels, the DiT expects text_dim {cfg.text_dim}")
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # allocate the 5.7B parameters in their final dtype
            try:
                with torch.device(device):
                    self.encoder = UMT5Encoder("umt5-xxl").eval().requires_grad_(False)
            finally:
                torch.set_default_dtype(default)
            self.note = f"UMT5Encoder (umT5-XXL, random weights) forward on {self.prompt_tokens} random token ids"

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """-> context ``[1, Lc, text_dim]`` float32 on the device."""
        if self.kind == "toy":
            self.encoder.clear_cache()
            emb, _ = self.encoder.encode([prompt], device=self.device)
            return emb
        g = torch.Generator().manual_seed(len(prompt))
        ids = torch.randint(3, self.encoder.arch.vocab_size, (1, self.prompt_tokens), generator=g).to(self.device)
        return self.encoder(ids, torch.ones_like(ids)).float()

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.encoder.parameters())

    def release(self) -> None:
        del self.encoder
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# The workload: geometry + the runs that get timed
# ------------------------------------------------------------------------------------------------


@dataclass
class Geometry:
    """Pixel and latent shapes of one benchmark video."""

    frames: int  # pixel frames
    height: int
    width: int
    latent_frames: int
    latent_h: int
    latent_w: int
    channels: int
    tokens_per_frame: int
    temporal_factor: int

    @classmethod
    def of(cls, o: BenchOptions, cfg: DiTConfig) -> "Geometry":
        tf, sf = SIZE_DEFAULTS[o.size]["factors"]
        lh, lw = o.height // sf, o.width // sf
        tpf = (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
        return cls(o.frames, o.height, o.width, 1 + (o.frames - 1) // tf, lh, lw, cfg.in_dim, tpf, tf)

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_factor * (latent_frames - 1)


class Workload:
    """Models and inputs shared by the sections; each ``*_run`` method is one timed unit of work."""

    def __init__(self, o: BenchOptions, device: torch.device):
        self.o, self.device = o, device
        self.dtype = torch.bfloat16 if o.precision == "bf16" else torch.float32
        self.cfg = dit_config(o.size)
        self.geo = Geometry.of(o, self.cfg)
        self.layout = ChunkLayout(o.chunk)
        self.clock = Clock(device)
        self.meter = MemoryMeter(device)
        self.model = build_dit(self.cfg, device, self.dtype, attention=o.attention, seed=o.seed)
        self.vae, self.vae_note = (None, "disabled (--no-vae)")
        if o.vae:
            self.vae, self.vae_note = build_vae(SIZE_DEFAULTS[o.size]["vae"], device, self.dtype, o.seed, o.vae_path)
        # The student's decoder: the tiny streaming decoder with --tiny-decoder, else the VAE; the teacher always
        # decodes with the VAE (the comparison of issue 21: distilled student + tiny decoder vs teacher + VAE).
        self.tiny = build_tiny_decoder(o.tiny_decoder, device, self.dtype) if o.tiny_decoder else None
        self.decoder = self.tiny if self.tiny is not None else self.vae
        self.decoder_name = "tiny" if self.tiny is not None else ("vae" if self.vae is not None else None)
        self.mp4_note = "written with causvid.video_io.write_mp4 (PyAV, libx264)"
        if not o.write_mp4:
            self.mp4_note = "disabled (--no-mp4)"
        elif importlib.util.find_spec("av") is None:
            self.mp4_note = "n/a (PyAV not installed)"
        self.text: Optional[TextBench] = None
        self.text_note = "disabled (--no-text-encoder)"
        g = torch.Generator().manual_seed(o.seed + 1)
        self.cond = torch.randn(1, self.cfg.text_len, self.cfg.text_dim, generator=g).to(device)
        self.uncond = torch.randn(1, self.cfg.text_len, self.cfg.text_dim, generator=g).to(device)

    # -- inputs --------------------------------------------------------------------------------------

    def noise(self, batch: int, latent_frames: Optional[int] = None, seed: int = 0) -> torch.Tensor:
        g = self.geo
        f = latent_frames or g.latent_frames
        gen = torch.Generator(device=self.device).manual_seed(self.o.seed + seed)
        return torch.randn(batch, f, g.channels, g.latent_h, g.latent_w, generator=gen, device=self.device)

    def renoise(self, noise: torch.Tensor, steps: int, seed: int = 1) -> torch.Tensor:
        """On-device re-noising draws ``[B, F, steps - 1, C, H, W]`` (no host copies inside the loop)."""
        B, F, C, H, W = noise.shape
        gen = torch.Generator(device=self.device).manual_seed(self.o.seed + seed)
        return torch.randn(B, F, max(steps - 1, 0), C, H, W, generator=gen, device=self.device)

    def context(self, batch: int) -> torch.Tensor:
        return self.cond.expand(batch, -1, -1)

    # -- student ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def student_run(self, rec: Recorder, *, noise: torch.Tensor, renoise: torch.Tensor, steps: Sequence[float],
                    cond: Optional[torch.Tensor] = None, decode: bool = False,
                    count: Optional[dict[str, float]] = None) -> list[torch.Tensor]:
        """KV-cached chunk-wise sampling (``causal_sample_chunks``), each chunk decoded as it arrives by the
        student's decoder (``self.decoder``: tiny or VAE) when ``decode``; marks ``first_chunk`` (first latent
        chunk ready / first frames decoded)."""
        B, F = noise.shape[:2]
        cache = self.model.new_kv_cache(B, F, self.geo.tokens_per_frame, dtype=self.dtype, device=self.device)
        cond = self.context(B) if cond is None else cond
        decoder = self.decoder.stream_decoder() if decode else None
        out = []
        chunks = causal_sample_chunks(self.model, noise, cond, layout=self.layout, steps=steps, kv_cache=cache,
                                      cross_cache=CrossAttnCache(), renoise=renoise)
        for i, (_, _, x0) in enumerate(chunks):
            if decoder is not None:
                z = x0.to(self.dtype)
                if count is not None:
                    flops, frames = count_flops(functools.partial(decoder.push, z))
                    count["decode"] = count.get("decode", 0.0) + flops
                else:
                    frames = decoder.push(z)
                out.append(frames)
            else:
                out.append(x0)
            if i == 0:
                rec.mark("first_chunk")
        return out

    def pipeline_run(self, rec: Recorder, *, noise: torch.Tensor, renoise: torch.Tensor, steps: Sequence[float],
                     mp4_dir: Optional[str], count: Optional[dict[str, float]] = None) -> None:
        """Prompt -> mp4: text encoding, streamed sampling + decode, frames to uint8, mp4 written.

        Marks: ``text`` (context ready), ``first_chunk`` (first frames decoded), ``decoded``, ``written``.
        """
        cond = None
        if self.text is not None:
            if count is not None:
                flops, cond = count_flops(lambda: self.text.encode(self.o.prompt))
                count["text_encode"] = flops
            else:
                cond = self.text.encode(self.o.prompt)
            cond = cond.expand(noise.shape[0], -1, -1)
        rec.mark("text")
        frames = self.student_run(rec, noise=noise, renoise=renoise, steps=steps, cond=cond,
                                  decode=self.decoder is not None, count=count)
        rec.mark("decoded")
        if mp4_dir is not None and self.decoder is not None:
            from causvid.video_io import write_mp4

            video = torch.cat(frames, dim=1)[0].float().cpu()  # [T, 3, H, W] in [-1, 1]
            write_mp4(os.path.join(mp4_dir, "benchmark.mp4"), video, fps=16.0, preset=self.o.mp4_preset)
        rec.mark("written")

    # -- teacher ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_run(self, rec: Recorder, *, noise: torch.Tensor, num_steps: int, decode: bool) -> None:
        """Bidirectional many-step CFG sampling (``teacher_sample``), then the VAE decode of the clip, streamed
        ``chunk`` latent frames at a time (the official Wan decode loops over latent frames; same result)."""
        B = noise.shape[0]
        x0 = teacher_sample(self.model, noise, self.context(B), self.uncond.expand(B, -1, -1), num_steps=num_steps,
                            shift=self.o.shift, guidance=self.o.guidance).x0
        rec.mark("sampled")
        if decode:
            self.vae.decode(x0.to(self.dtype), chunk_frames=self.o.chunk)

    # -- recomputation baseline ----------------------------------------------------------------------------

    @torch.no_grad()
    def recompute_run(self, rec: Recorder, *, noise: torch.Tensor, renoise: torch.Tensor,
                      steps: Sequence[float]) -> torch.Tensor:
        """No KV cache: every step of chunk i runs the whole clean prefix (t = 0) plus the noisy chunk
        with the block-causal mask and keeps the chunk's output (same maths as the cached sampler)."""
        B = noise.shape[0]
        cond, cross = self.context(B), CrossAttnCache()
        done: list[torch.Tensor] = []
        for f0, f1 in self.layout.chunks(noise.shape[1]):
            n, x = f1 - f0, noise[:, f0:f1]
            for j, t_j in enumerate(steps):
                t = torch.full((B, n), float(t_j), device=self.device)
                inp = torch.cat(done + [x], dim=1)  # [B, f1, C, H, W]
                t_all = torch.cat([torch.zeros(B, f0, device=self.device), t], dim=1)  # [B, f1]
                v = self.model(inp, t_all, cond, layout=self.layout, cross_cache=cross)[:, f0:f1]
                x0 = S.x0_from_flow(x, v, t)
                if j + 1 < len(steps):
                    x = S.add_noise(x0, renoise[:, f0:f1, j], torch.full((B, n), float(steps[j + 1]), device=self.device))
            done.append(x0)
        return torch.cat(done, dim=1)
