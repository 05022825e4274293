"""The user-facing :class:`CausalSampler`: export folders, prompts, streaming decode, rolling cache, v2v / i2v."""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from causvid import schedule as S
from causvid.models.attention import ChunkLayout, CrossAttnCache, KVCache
from causvid.sampler.causal import check_prefix, denoise_chunk, student_steps, v2v_steps
from causvid.sampler.live import LivePrompt

# ----------------------------------------------------------------------------------------------------------------
# CausalSampler: what users touch
# ----------------------------------------------------------------------------------------------------------------

PromptSpec = Union[str, Sequence[str], Mapping[int, Union[str, Sequence[str]]], LivePrompt]


class _hybridmethod:
    """A method callable on the class (``CausalSampler.show(video)``) or on an instance (uses its fps)."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, cls):
        return functools.partial(self.fn, obj)


@dataclass
class _Branch:
    """One conditioning branch of the rollout: its prompt context, KV cache and cross-attention cache."""

    context: torch.Tensor  # [B, text_len, text_dim]
    kv: KVCache
    cross: CrossAttnCache


@dataclass
class _Resident:
    """A chunk whose clean K/V sit in the cache: what its refresh pass was run on (kept for re-caching)."""

    start: int  # absolute first frame
    x: torch.Tensor  # [B, n, C, h, w] the refresh input (x0, or x0 lightly noised when context_noise > 0)
    t: float  # the refresh timestep


def _normalize_schedule(prompts: PromptSpec) -> tuple[dict[int, list[str]], bool]:
    """``str | list[str] | {chunk: str | list[str]} | LivePrompt`` -> ({chunk: [prompt per sample]}, batched).

    A :class:`LivePrompt` gives its current prompt at chunk 0 (its later changes are read while streaming)."""
    if isinstance(prompts, LivePrompt):
        return {0: [prompts.prompt]}, False
    if isinstance(prompts, str):
        return {0: [prompts]}, False
    if isinstance(prompts, Mapping):
        if not prompts:
            raise ValueError("the prompt schedule is empty")
        sched: dict[int, list[str]] = {}
        batched = None
        for c, p in sorted(prompts.items(), key=lambda kv: int(kv[0])):
            c = int(c)
            if c < 0:
                raise ValueError(f"prompt schedule: chunk index {c} must be >= 0")
            is_list = not isinstance(p, str)
            p = [p] if isinstance(p, str) else _prompt_list(p)
            if batched is not None and (is_list != batched or len(p) != len(next(iter(sched.values())))):
                raise ValueError(f"prompt schedule: chunk {c} has {len(p)} prompt(s); every entry must be a string, "
                                 "or every entry a list of the same length (one prompt per sample)")
            batched = is_list
            sched[c] = p
        if 0 not in sched:
            raise ValueError(f"prompt schedule must give a prompt for chunk 0, got chunks {sorted(sched)}")
        return sched, bool(batched)
    prompts = _prompt_list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    return {0: prompts}, True


def _prompt_list(prompts: Any) -> list[str]:
    """A list of prompt strings; anything else (None, numbers, a bare non-string) is a ValueError naming it."""
    try:
        items = list(prompts)
    except TypeError:
        raise ValueError(f"invalid prompt {prompts!r}: a prompt must be a string") from None
    for q in items:
        if not isinstance(q, str):
            raise ValueError(f"invalid prompt {q!r}: a prompt must be a string")
    return items


def _as_video_tensor(video: Any) -> torch.Tensor:
    """uint8 [T, H, W, 3] / [B, T, H, W, 3] (numpy or torch) or float [.., T, 3, H, W] in [-1, 1] -> float [B, T, 3, H, W]."""
    x = torch.as_tensor(np.asarray(video)) if not isinstance(video, torch.Tensor) else video
    if x.dim() == 4:
        x = x[None]
    if x.dim() != 5:
        raise ValueError(f"expected a video [T, 3, H, W], [T, H, W, 3] or batched, got shape {tuple(x.shape)}")
    if x.shape[2] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 1, 4, 2, 3)  # [B, T, H, W, 3] -> [B, T, 3, H, W]
    if x.shape[2] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float().clamp(-1.0, 1.0)


def _as_image_tensor(image: Any) -> torch.Tensor:
    """An image uint8 [H, W, 3] / float [3, H, W] in [-1, 1] (or batched [B, ...]) -> float [B, 1, 3, H, W]."""
    x = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"expected an image [3, H, W] or [H, W, 3] (or batched), got shape {tuple(x.shape)}")
    return _as_video_tensor(x[:, None])  # [B, 1, ...] -> [B, 1, 3, H, W]


def _uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """[B, t, 3, H, W] in [-1, 1] -> uint8 [B, t, H, W, 3] (same rounding as ``video_io.to_uint8``)."""
    return _uint8_on_device(frames).cpu().numpy()


def _uint8_on_device(frames: torch.Tensor) -> torch.Tensor:
    """As :func:`_uint8_frames`, left on the frames' device (no host synchronisation)."""
    x = ((frames.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2)


class _FramePump:
    """Pulls pixel frames from a video (tensor/array) or an iterable of frame chunks, ``take(t)`` at a time."""

    def __init__(self, video: Any):
        if isinstance(video, (torch.Tensor, np.ndarray)):
            self._it: Iterator = iter([_as_video_tensor(video)])
        else:
            self._it = (_as_video_tensor(v) for v in video)
        self._buf: list[torch.Tensor] = []
        self._n = 0
        self.done = False

    def take(self, t: int) -> Optional[torch.Tensor]:
        """The next ``t`` frames [B, t, 3, H, W], or None if the source ends first (leftover frames dropped)."""
        while self._n < t and not self.done:
            try:
                v = next(self._it)
            except StopIteration:
                self.done = True
                break
            self._buf.append(v)
            self._n += v.shape[1]
        if self._n < t:
            return None
        allf = torch.cat(self._buf, dim=1)
        out, rest = allf[:, :t], allf[:, t:]
        self._buf, self._n = ([rest] if rest.shape[1] else []), rest.shape[1]
        return out


class CausalSampler:
    """Few-step, KV-cached, block-autoregressive video generation with streaming decode (``docs/sampling.md``).

    Build it with :meth:`from_pretrained` (an export folder: ``model.safetensors`` + ``config.yaml``) or
    :meth:`from_config` (a run config plus official Wan files), then::

        video = sampler.generate("a red circle moving left", num_frames=33, seed=0)    # uint8 [T, H, W, 3]
        for frames in sampler.stream({0: "a red circle", 4: "a blue square"}, num_chunks=12, seed=0):
            ...                                                                     # uint8 [t, H, W, 3]

    Noise is drawn per chunk and per sample from ``torch.Generator(seed_b)`` on the CPU, in this order for
    every generated chunk: the starting noise ``[n, C, h, w]``, then one re-noise tensor per step after the
    first, then (``context_noise > 0``) the refresh noise. Given (prefix) chunks draw nothing. So
    :meth:`stream` and :meth:`generate` agree exactly, and sample b of a batch equals a single run with
    seed ``seed + b`` (or ``seeds[b]``).
    """

    def __init__(self, model, vae, text_encoder, *, layout: ChunkLayout, steps: Sequence[float],
                 context_noise: float = 0.0, sink_chunks: int = 1, window_chunks: int = 0, guidance: float = 1.0,
                 negative_prompt: str = "", height: int = 64, width: int = 64, fps: float = 8.0,
                 num_frames: int = 33, offload_text: bool = True, device: Any = None, cfg: Any = None,
                 decoder: Any = None):
        self.model = model  # used under torch.no_grad(); train/eval mode and requires_grad are left as given
        self.vae = vae
        # pixels come from ``decoder`` (a TinyDecoder, or anything with ``stream_decoder()``) or the VAE's decoder
        self.decoder = decoder if decoder is not None else vae
        self.text_encoder = text_encoder
        self.layout = layout
        self.steps = [float(s) for s in steps]
        if not self.steps or any(b >= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"steps must be a non-empty strictly decreasing list of timesteps, got {self.steps}")
        top = int(getattr(getattr(cfg, "schedule", None), "num_train_timesteps", 1000))
        if not all(0.0 <= s <= top for s in self.steps):
            raise ValueError(f"steps must lie in [0, {top}], got {self.steps}")
        self.context_noise = float(context_noise)
        if sink_chunks < 0 or window_chunks < 0:
            raise ValueError(f"sink_chunks ({sink_chunks}) and window_chunks ({window_chunks}) must be >= 0")
        self.sink_chunks, self.window_chunks = int(sink_chunks), int(window_chunks)
        self.guidance = float(guidance)
        self.negative_prompt = negative_prompt
        self.height, self.width, self.fps, self.num_frames = int(height), int(width), float(fps), int(num_frames)
        self.offload_text = offload_text
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.cfg = cfg
        self._kv_pool: dict[tuple, KVCache] = {}
        self._in_use: set[int] = set()  # ids of caches held by unfinished streams
        self._cross_pool: dict[int, tuple] = {}  # branch -> (context, weights signature, CrossAttnCache)
        self.kv_caches: list[KVCache] = []
        self._check_geometry()

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str, *, device: Any = None, dtype: Any = None,
                        overrides: Optional[list[str]] = None, **kw) -> "CausalSampler":
        """Open an export folder (``model.safetensors`` + ``config.yaml`` with the VAE / text encoder paths).

        ``overrides``: config dotlist (``["sampler.window_chunks=8"]``); ``kw``: :meth:`from_config` options
        (``steps=``, ``window_chunks=``, ``text_encoder=`` ...).
        """
        from causvid.config import load_config, resolve_folder_paths
        from causvid.models.weights import WeightsError

        cfg_path, weights = os.path.join(folder, "config.yaml"), os.path.join(folder, "model.safetensors")
        for p in (cfg_path, weights):
            if not os.path.isfile(p):
                raise WeightsError(f"{folder} is not an export folder: {os.path.basename(p)} is missing ({p})")
        cfg = resolve_folder_paths(load_config(cfg_path, overrides), folder)  # paths may be relative to the folder
        return cls.from_config(cfg, dit_path=weights, device=device, dtype=dtype, **kw)

    @classmethod
    def from_config(cls, cfg: Any = None, dit_path: Optional[str] = None, *, vae_path: Optional[str] = None,
                    text_path: Optional[str] = None, tokenizer_path: Optional[str] = None, model=None, vae=None,
                    text_encoder=None, device: Any = None, dtype: Any = None, steps: Optional[Sequence[float]] = None,
                    **sampler_kw) -> "CausalSampler":
        """A run config (path, DictConfig, or None for defaults) plus weights.

        ``dit_path``: our safetensors or an official Wan DiT folder; without it (and without ``model``) the DiT of
        ``cfg.model.size`` is freshly initialised (tests, demos). ``vae_path`` / ``text_path`` / ``tokenizer_path``
        override ``cfg.vae.path`` / ``cfg.text.path`` / ``cfg.text.tokenizer_path``. ``steps`` overrides the
        step list (timesteps without the final 0). Other keyword arguments override the sampler fields
        (``context_noise``, ``sink_chunks``, ``window_chunks``, ``guidance``, ``height``, ``width``, ``fps``,
        ``num_frames``, ``negative_prompt``).
        """
        from omegaconf import DictConfig, OmegaConf

        from causvid.config import load_config

        if cfg is None or isinstance(cfg, (str, os.PathLike)):
            cfg = load_config(cfg)
        elif not isinstance(cfg, DictConfig):
            cfg = OmegaConf.structured(cfg)
        cfg = copy.deepcopy(cfg)
        if vae_path is not None:
            cfg.vae.path = vae_path
        if text_path is not None:
            cfg.text.path = text_path
        if tokenizer_path is not None:
            cfg.text.tokenizer_path = tokenizer_path
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        dt = _dtype(dtype or cfg.model.dtype)
        if model is None:
            model = _build_dit(cfg, dit_path, device, dt).requires_grad_(False)
        if vae is None:
            from causvid.models.vae import vae_from_config

            vae = vae_from_config(cfg.vae, device=device).eval().requires_grad_(False)
        if text_encoder is None:
            from causvid.models.text import text_encoder_from_config

            text_encoder = text_encoder_from_config(cfg.text, device=device, dim=model.cfg.text_dim,
                                                    text_len=model.cfg.text_len)
        if cfg.sampler.decoder == "tiny" and "decoder" not in sampler_kw:
            from causvid.models.tiny_decoder import load_tiny_decoder

            sampler_kw["decoder"] = load_tiny_decoder(cfg.sampler.tiny_decoder_path, device=device)
        if steps is None:
            sc = cfg.schedule
            steps = student_steps(S.denoising_steps(list(sc.denoising_step_list), sc.warp_denoising_step, sc.shift))
        kw = dict(context_noise=cfg.sampler.context_noise, sink_chunks=cfg.sampler.sink_chunks,
                  window_chunks=cfg.sampler.window_chunks, guidance=cfg.sampler.guidance,
                  negative_prompt=cfg.dmd.negative_prompt, height=cfg.data.height, width=cfg.data.width,
                  fps=cfg.data.fps, num_frames=cfg.sampler.num_frames, offload_text=cfg.text.offload_after_encode)
        unknown = set(sampler_kw) - set(kw) - {"decoder"}
        if unknown:
            raise TypeError(f"unknown CausalSampler option(s) {sorted(unknown)}; valid: {sorted(kw)}")
        kw.update(sampler_kw)
        layout = ChunkLayout(cfg.model.chunk_size, cfg.model.independent_first_frame)
        return cls(model, vae, text_encoder, layout=layout, steps=steps, device=device, cfg=cfg, **kw)

    # -- geometry -----------------------------------------------------------------------------------------------

    def _check_geometry(self) -> None:
        if self.vae is None:
            return
        z, s = self.vae.arch.z_dim, self.vae.arch.spatial_factor
        if z != self.model.cfg.in_dim:
            raise ValueError(f"the VAE has {z} latent channels but the DiT expects in_dim={self.model.cfg.in_dim}")
        if self.height % s or self.width % s:
            raise ValueError(f"height {self.height} / width {self.width} must be multiples of the VAE's {s}x")
        self.model.grid((1, 1, z, self.height // s, self.width // s))  # raises if not divisible by the patch
        d = getattr(self.decoder, "arch", None)
        if self.decoder is not self.vae and d is not None and (d.z_dim, d.spatial_factor) != (z, s):
            raise ValueError(f"the decoder takes {d.z_dim}-channel latents at {d.spatial_factor}x, the VAE makes "
                             f"{z}-channel latents at {s}x")

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.vae.arch.spatial_factor
        return self.height // s, self.width // s

    @property
    def temporal_factor(self) -> int:
        return self.vae.arch.temporal_factor if self.vae is not None else 4

    def latent_frames(self, num_frames: Optional[int] = None, num_chunks: Optional[int] = None) -> int:
        """Latent frames for ``num_frames`` pixel frames (``1 + 4n``) or ``num_chunks`` chunks."""
        if num_chunks is not None:
            if num_chunks < 1:
                raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
            first = 1 if self.layout.independent_first_frame else self.layout.chunk_size
            return first + (num_chunks - 1) * self.layout.chunk_size
        n = self.num_frames if num_frames is None else int(num_frames)
        s = self.temporal_factor
        if n < 1 or (n - 1) % s:
            raise ValueError(f"num_frames must be 1 + {s}n pixel frames, got {n}")
        return 1 + (n - 1) // s

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_factor * (latent_frames - 1)

    # -- prompts -------------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt strings -> context [B, text_len, text_dim] on the sampler's device (encoder cache reused).

        With ``offload_text`` the encoder is moved to the device for the call and released to the CPU after.
        """
        enc = self.text_encoder
        if enc is None:
            raise RuntimeError("this sampler has no text encoder; pass context tensors instead of prompts")
        if self.offload_text and self.device.type != "cpu" and enc.device != self.device:
            enc.to(self.device)
        emb, _ = enc.encode(list(prompts), device=self.device)
        if self.offload_text:
            enc.release()
        return emb

    def _contexts(self, sched: dict[int, list[str]]) -> dict[int, torch.Tensor]:
        """Encode every prompt of the schedule in one call (then the encoder can be offloaded)."""
        flat = [p for ps in sched.values() for p in ps]
        if self.guidance != 1.0:
            flat.append(self.negative_prompt)
        emb = self.encode_prompts(flat)
        out, i = {}, 0
        for c, ps in sched.items():
            out[c] = emb[i:i + len(ps)]
            i += len(ps)
        if self.guidance != 1.0:
            out[-1] = emb[i:i + 1]  # the negative prompt (broadcast over the batch later)
        return out

    # -- caches --------------------------------------------------------------------------------------------------

    def cache_plan(self, total_frames: Optional[int]) -> tuple[int, int]:
        """(capacity_frames, sink_frames) of the KV cache for a rollout of ``total_frames`` latent frames.

        ``window_chunks == 0``: a static cache holding every frame. Otherwise a rolling cache holding the first
        ``sink_chunks`` chunks plus the most recent ``window_chunks`` chunks (the current chunk included).
        """
        k = self.layout.chunk_size
        if self.window_chunks == 0:
            if total_frames is None:
                raise ValueError("an unbounded stream needs a rolling cache: set window_chunks > 0 "
                                 "(config key 'sampler.window_chunks')")
            return total_frames, 0
        sink = 0 if self.sink_chunks == 0 else (
            self.sink_chunks * k - (k - 1 if self.layout.independent_first_frame else 0))
        cap = sink + self.window_chunks * k
        if total_frames is not None and total_frames <= cap:
            return total_frames, 0  # never evicts: a static cache of the whole rollout
        return cap, sink

    def _kv_cache(self, key: int, B: int, capacity: int, sink: int, S_tok: int) -> KVCache:
        """A preallocated cache, reused (reset, not reallocated) by later calls of the same shape.

        A cache still held by an unfinished stream is never shared: a second concurrent stream gets its own.
        """
        p = next(self.model.parameters())
        spec = (key, B, capacity, sink, S_tok, p.dtype, self.device)
        cache = self._kv_pool.get(spec)
        if cache is None or id(cache) in self._in_use:
            cache = self.model.new_kv_cache(B, capacity, S_tok, sink_frames=sink, dtype=p.dtype, device=self.device)
            if spec not in self._kv_pool or id(self._kv_pool[spec]) not in self._in_use:
                self._kv_pool = {s: c for s, c in self._kv_pool.items() if s[0] != key or id(c) in self._in_use}
                self._kv_pool[spec] = cache
        cache.reset()
        self._in_use.add(id(cache))
        return cache

    def _cross_cache(self, key: int, context: torch.Tensor) -> CrossAttnCache:
        """The cross-attention K/V of the previous call when it was made from the same context by the same weights
        (checked once per call, before the chunk loop), else a new, empty cache."""
        sig = self._cross_signature()
        hit = self._cross_pool.get(key)
        if hit is not None and id(hit[2]) not in self._in_use and hit[1] == sig and hit[2].ready:
            ctx = hit[0]
            if ctx is context or (ctx.shape == context.shape and ctx.dtype == context.dtype
                                  and ctx.device == context.device and torch.equal(ctx, context)):
                self._in_use.add(id(hit[2]))
                return hit[2]
        cache = CrossAttnCache()
        self._in_use.add(id(cache))
        return cache

    def _cross_signature(self) -> tuple:
        """The identity and in-place version of every weight: an optimiser step or a load changes it."""
        return tuple((id(p), p._version) for p in self.model.parameters())

    def _keep_cross(self, key: int, branch: "_Branch") -> None:
        self._in_use.discard(id(branch.cross))
        if branch.cross.ready:
            self._cross_pool[key] = (branch.context, self._cross_signature(), branch.cross)

    def free_caches(self) -> None:
        """Drop every cache kept for the next call: the preallocated KV caches, the cross-attention K/V of the
        last prompts and the model's RoPE tables (all are rebuilt on demand)."""
        self._kv_pool.clear()
        self._cross_pool.clear()
        if hasattr(self.model, "free_caches"):
            self.model.free_caches()
        self.kv_caches = []

    def with_options(self, **kw) -> "CausalSampler":
        """A sampler sharing this one's networks, with other sampling options and its own KV caches.

        ``kw``: ``steps``, ``context_noise``, ``sink_chunks``, ``window_chunks``, ``guidance``, ``negative_prompt``,
        ``fps``, ``num_frames`` (validated as in the constructor). Used by servers that run several streams with
        different settings over one loaded model (``causvid.demo``); its caches go when the view goes.
        """
        opts = dict(steps=self.steps, context_noise=self.context_noise, sink_chunks=self.sink_chunks,
                    window_chunks=self.window_chunks, guidance=self.guidance, negative_prompt=self.negative_prompt,
                    fps=self.fps, num_frames=self.num_frames)
        unknown = set(kw) - set(opts)
        if unknown:
            raise TypeError(f"unknown CausalSampler option(s) {sorted(unknown)}; valid: {sorted(opts)}")
        opts.update(kw)
        return CausalSampler(self.model, self.vae, self.text_encoder, layout=self.layout, height=self.height,
                             width=self.width, offload_text=self.offload_text, device=self.device, cfg=self.cfg,
                             decoder=self.decoder, **opts)

    # -- noise ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _generators(seed: Union[int, Sequence[int]], B: int) -> list[torch.Generator]:
        def ok(s):
            return isinstance(s, (int, np.integer)) and not isinstance(s, bool)

        if not ok(seed) and not (isinstance(seed, (list, tuple)) and all(ok(s) for s in seed)):
            raise ValueError(f"invalid seed {seed!r}: an integer, or a list of integers (one per sample)")
        seeds = [int(seed) + b for b in range(B)] if ok(seed) else [int(s) for s in seed]
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {B}")
        return [torch.Generator().manual_seed(s) for s in seeds]

    def _randn(self, gens: list[torch.Generator], shape: tuple) -> torch.Tensor:
        """[B, *shape] float32: sample b drawn from its own CPU generator (device independent); copied to a GPU
        from pinned memory without blocking (a pageable copy would synchronise the chunk loop)."""
        x = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    # -- the rollout engine -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def stream_latents(self, prompts: PromptSpec, num_chunks: Optional[int] = None, num_frames: Optional[int] = None,
                       seed: Union[int, Sequence[int]] = 0, *, image: Any = None, video: Any = None,
                       t_start: Optional[float] = None, recache: bool = False, prefix: Optional[torch.Tensor] = None,
                       start_frame: int = 0, _gens: Optional[list] = None
                       ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(f0, f1, latents [B, n, C, h, w])`` chunk by chunk (absolute frame positions).

        * ``prompts``: a prompt, a list (batch) or a schedule ``{chunk index: prompt(s)}`` (chunk 0 required).
          A switch replaces the cross-attention cache; ``recache=True`` also re-runs the refresh pass of every
          chunk resident in the KV cache under the new prompt (clean K/V recomputed with the new text). A
          :class:`~causvid.sampler.live.LivePrompt` (one sample) is read before every chunk: a change set since the
          previous chunk is applied like a scheduled switch, with its own ``recache`` choice.
        * length: ``num_chunks`` or ``num_frames`` (pixel frames ``1 + 4n``); with neither, ``video``'s length, else
          ``num_frames`` of the config; with a rolling cache (``window_chunks > 0``) and ``num_chunks=-1`` the
          stream never ends.
        * ``image``: image-to-video; the first frame is VAE-encoded as latent frame 0 (the layout needs
          ``independent_first_frame``) and written to the cache at t = 0.
        * ``video``: video-to-video; frames (tensor / array, or an iterable of frame chunks) are encoded chunk by
          chunk (streaming VAE encoder), noised to ``t_start`` and denoised with the steps below ``t_start``.
        * ``prefix`` [B, P, C, h, w]: given clean latents (video extension), written to the cache at t = 0.
        * ``start_frame``: absolute position of the first frame (RoPE), e.g. to continue past 1024 frames.
        """
        live = prompts if isinstance(prompts, LivePrompt) else None
        if live is not None:
            sched = {0: [live.take(0).prompt]}  # later changes are taken chunk by chunk below
        else:
            sched, _ = _normalize_schedule(prompts)
        B = len(sched[0])
        gens = _gens if _gens is not None else self._generators(seed, B)
        contexts = self._contexts(sched)
        h, w = self.latent_hw
        C = self.model.cfg.in_dim
        S_tok = self.model.tokens_per_frame(h, w)

        # given latents: image (I2V) and/or prefix (extension)
        given = []
        if image is not None:
            if not self.layout.independent_first_frame:
                raise ValueError("image-to-video needs a layout with an independent first frame "
                                 "(config key 'model.independent_first_frame: true')")
            img = _as_image_tensor(image).to(self.device)
            given.append(self.vae.encode(img.expand(B, -1, -1, -1, -1) if img.shape[0] == 1 else img))
        if prefix is not None:
            given.append(prefix.to(self.device, torch.float32))
        given_lat = torch.cat(given, dim=1) if given else None
        P = 0 if given_lat is None else given_lat.shape[1]
        if given_lat is not None and given_lat.shape[0] != B:
            raise ValueError(f"given latents have batch {given_lat.shape[0]}, the prompts {B}")

        pump = encoder = None
        if video is not None:
            if t_start is None:
                raise ValueError("video-to-video needs t_start (the noise level the input is brought to)")
            if P:
                raise ValueError("video-to-video cannot be combined with image= or prefix=")
            pump, encoder = _FramePump(video), self.vae.stream_encoder()
            steps_v = v2v_steps(self.steps, t_start)
            if num_chunks is None and num_frames is None and isinstance(video, (torch.Tensor, np.ndarray)):
                num_frames = _as_video_tensor(video).shape[1]

        if num_chunks == -1:
            total = None  # endless (needs a rolling cache)
        elif num_chunks is not None or num_frames is not None or video is None:
            total = self.latent_frames(num_frames, num_chunks)
        else:
            total = None  # until the input video ends (needs a rolling cache)
        if total is not None and P:
            check_prefix(self.layout, total, P)
        if total is not None and max(sched) >= len(self.layout.chunks(total)):
            raise ValueError(f"prompt schedule: chunk {max(sched)} lies past the stream's end "
                             f"({len(self.layout.chunks(total))} chunks)")
        capacity, sink = self.cache_plan(total)

        caches = [self._kv_cache(i, B, capacity, sink, S_tok) for i in range(2 if self.guidance != 1.0 else 1)]
        self.kv_caches = caches  # the caches of the latest rollout (inspect memory / resident frames)
        branches = [_Branch(contexts[0], caches[0], self._cross_cache(0, contexts[0]))]
        if self.guidance != 1.0:
            neg = contexts[-1].expand(B, -1, -1)
            branches.append(_Branch(neg, caches[1], self._cross_cache(1, neg)))
        keep_resident = (recache and any(c > 0 for c in sched)) or live is not None
        resident: list[_Resident] = []

        def flow(x, t, a):
            v = [self.model(x, t, br.context, kv_cache=br.kv, start_frame=a, cross_cache=br.cross)
                 for br in branches]
            return v[0] if len(v) == 1 else S.cfg_combine(v[0], v[1], self.guidance)

        def refresh(x, t_ref, a, only: Optional[list] = None):
            tt = torch.full(x.shape[:2], float(t_ref), device=self.device)
            for br in (only or branches):
                self.model(x, tt, br.context, kv_cache=br.kv, start_frame=a, cross_cache=br.cross)

        try:
            for c, (f0, f1) in enumerate(self._chunk_ranges(total)):
                n, a = f1 - f0, start_frame + f0
                switch = None  # None, or (the new context, whether this switch re-caches)
                if c > 0 and live is not None:
                    change = live.take(c)
                    if change is not None:
                        switch = self.encode_prompts([change.prompt]), change.recache
                elif c > 0 and c in sched:
                    switch = contexts[c], recache
                if switch is not None:  # prompt switch: new cross-attention K/V (and optionally re-cached context)
                    br = branches[0]
                    br.context, switch_recache = switch
                    br.cross.clear()
                    if switch_recache and resident:
                        br.kv.reset()  # replay the refresh passes of the resident chunks, in order, with the new text
                        for r in resident:
                            refresh(r.x, r.t, r.start, only=[br])
                if f1 <= P:  # given clean latents (image / prefix): cached at t = 0, no noise drawn
                    x0 = given_lat[:, f0:f1]
                    xc, t_ref = x0, 0.0
                else:
                    if pump is not None:
                        frames = pump.take(self.pixel_frames(n) if f0 == 0 else self.temporal_factor * n)
                        if frames is None:
                            return
                        lat = encoder.push(frames.to(self.device))  # [B, n, C, h, w]
                        eps = self._randn(gens, (n, C, h, w))
                        x = S.add_noise(lat, eps, torch.full((B, n), float(t_start), device=self.device))
                        steps = steps_v
                    else:
                        x = self._randn(gens, (n, C, h, w))
                        steps = self.steps
                    x0 = denoise_chunk(flow, x, steps, a, lambda j, n=n: self._randn(gens, (n, C, h, w)))
                    xc, t_ref = x0, self.context_noise
                    if self.context_noise > 0:
                        xc = S.add_noise(x0, self._randn(gens, (n, C, h, w)),
                                         torch.full((B, n), self.context_noise, device=self.device))
                yield a, start_frame + f1, x0  # before the refresh pass: lower first-frame latency
                refresh(xc, t_ref, a)
                if keep_resident:
                    resident.append(_Resident(a, xc, t_ref))
                    slots = branches[0].kv.slot_of
                    resident = [r for r in resident if all(f in slots for f in range(r.start, r.start + r.x.shape[1]))]
        finally:
            for cache in caches:
                self._in_use.discard(id(cache))
            for i, br in enumerate(branches):  # kept for the next call with the same prompts
                self._keep_cross(i, br)

    def _chunk_ranges(self, total: Optional[int]) -> Iterator[tuple[int, int]]:
        if total is not None:
            yield from self.layout.chunks(total)
            return
        f0 = 0
        while True:
            n = 1 if (self.layout.independent_first_frame and f0 == 0) else self.layout.chunk_size
            yield f0, f0 + n
            f0 += n

    # -- decoding -------------------------------------------------------------------------------------------------

    @torch.no_grad()  # on a generator: no-grad only while it runs, never leaked to the caller between chunks
    def stream(self, prompts: PromptSpec, num_chunks: Optional[int] = None, num_frames: Optional[int] = None,
               seed: Union[int, Sequence[int]] = 0, **kw) -> Iterator[np.ndarray]:
        """Decoded frames as each chunk finishes: uint8 [t, H, W, 3] (``[B, t, H, W, 3]`` for a list / batched
        schedule). Same arguments as :meth:`stream_latents`. The VAE decodes chunk by chunk with its causal cache
        (the first chunk gives ``1 + 4(n - 1)`` frames, later ones ``4 n``)."""
        _, batched = _normalize_schedule(prompts)
        dec = self.decoder.stream_decoder()
        for _, _, lat in self.stream_latents(prompts, num_chunks, num_frames, seed, **kw):
            frames = _uint8_frames(dec.push(lat))
            yield frames if batched else frames[0]

    def generate(self, prompts: PromptSpec, num_frames: Optional[int] = None, seed: Union[int, Sequence[int]] = 0, *,
                 num_chunks: Optional[int] = None, return_latents: bool = False, **kw):
        """The whole video: uint8 [T, H, W, 3] (``[B, T, H, W, 3]`` for a list of prompts).

        Runs exactly the chunks of :meth:`stream` (so both agree for the same seed). ``return_latents=True``
        returns ``(video, latents [B, F, C, h, w])``. Keyword arguments as in :meth:`stream_latents`.
        """
        _, batched = _normalize_schedule(prompts)
        dec = self.decoder.stream_decoder()
        frames, lats = [], []
        with torch.no_grad():
            for _, _, lat in self.stream_latents(prompts, num_chunks, num_frames, seed, **kw):
                lats.append(lat)
                frames.append(_uint8_on_device(dec.push(lat)))  # copied to the host once, after the loop
        video = torch.cat(frames, dim=1).cpu().numpy()
        video = video if batched else video[0]
        return (video, torch.cat(lats, dim=1)) if return_latents else video

    # -- long video: the official overlap-restart mode (causvid_reference.md §2.2) --------------------------------

    @torch.no_grad()
    def stream_overlap(self, prompts: Union[str, Sequence[str]], num_rollouts: int = 3,
                       seed: Union[int, Sequence[int]] = 0, *, rollout_frames: Optional[int] = None,
                       overlap_frames: Optional[int] = None) -> Iterator[np.ndarray]:
        """CausVid's long-video mode: fresh rollouts of ``rollout_frames`` latent frames whose positions restart
        at 0; each rollout after the first starts from ``overlap_frames`` given latents = the pixel frame
        ``-(4 (n - 1) + 1)`` of the previous rollout re-encoded as an image latent + its last ``n - 1`` latents.

        Frames are yielded as decoded, except each rollout's last ``4 (n - 1) + 1`` frames, which are replaced by
        the next rollout's decode of its prefix (the official stitching). Unlike the official script the last
        rollout's tail is kept. ``rollout_frames`` defaults to the config's ``sampler.num_frames``.
        """
        _, batched = _normalize_schedule(prompts)
        if isinstance(prompts, Mapping):
            raise ValueError("the overlap mode takes a prompt or a list of prompts, not a schedule")
        F_roll = self.latent_frames(None) if rollout_frames is None else int(rollout_frames)
        n = self.layout.chunk_size if overlap_frames is None else int(overlap_frames)
        if n < 1 or n >= F_roll:
            raise ValueError(f"overlap_frames must be in [1, {F_roll}), got {n}")
        check_prefix(self.layout, F_roll, n)
        tail = self.pixel_frames(n)  # pixel frames covered by the n overlap latents
        B = 1 if isinstance(prompts, str) else len(prompts)
        gens = self._generators(seed, B)
        prefix = None
        for r in range(num_rollouts):
            dec, buf, lats = self.decoder.stream_decoder(), [], []
            for _, _, lat in self.stream_latents(prompts, None, self.pixel_frames(F_roll), prefix=prefix,
                                                 _gens=gens):
                lats.append(lat)
                buf.append(dec.push(lat))
                allf = torch.cat(buf, dim=1)
                emit, buf = allf[:, :-tail], [allf[:, -tail:]]
                if emit.shape[1]:
                    out = _uint8_frames(emit)
                    yield out if batched else out[0]
            last = torch.cat(buf, dim=1)  # [B, tail, 3, H, W]
            if r == num_rollouts - 1:
                out = _uint8_frames(last)
                yield out if batched else out[0]
                break
            lat_all = torch.cat(lats, dim=1)
            image_latent = self.vae.encode(last[:, :1])  # pixel frame -(4 (n - 1) + 1) as an image
            prefix = torch.cat([image_latent, lat_all[:, F_roll - (n - 1):]], dim=1)

    def generate_overlap(self, prompts: Union[str, Sequence[str]], num_rollouts: int = 3,
                         seed: Union[int, Sequence[int]] = 0, **kw) -> np.ndarray:
        """The whole overlap-restart video (see :meth:`stream_overlap`): uint8 [T, H, W, 3] or [B, T, H, W, 3]."""
        parts = list(self.stream_overlap(prompts, num_rollouts, seed, **kw))
        return np.concatenate(parts, axis=0 if parts[0].ndim == 4 else 1)

    # -- output ---------------------------------------------------------------------------------------------------

    @_hybridmethod
    def show(self, video: Any, fps: Optional[float] = None, format: str = "mp4", width: Optional[int] = None):
        """Display a video inline in a notebook (``CausalSampler.show(v)`` or ``sampler.show(v)``).

        A batch [B, T, H, W, 3] is shown side by side."""
        from causvid.video_io import show

        v = np.asarray(video)
        if v.ndim == 5:
            v = np.concatenate(list(v), axis=2)  # [B, T, H, W, 3] -> [T, H, B*W, 3]
        return show(v, fps=fps or (self.fps if self is not None else 8.0), format=format, width=width)

    def save(self, video: Any, path: str, fps: Optional[float] = None) -> str:
        """Write ``video`` (uint8 [T, H, W, 3]) as ``.mp4`` (PyAV) or ``.gif`` by the path's suffix."""
        from causvid.video_io import write_gif, write_mp4

        fps = fps or self.fps
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".gif":
            return write_gif(path, video, fps)
        if suffix == ".mp4":
            return write_mp4(path, video, fps)
        raise ValueError(f"unknown video format {suffix!r} for {path}; use .mp4 or .gif")


def _dtype(name: Any) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(table)}")
    return table[name]


def _build_dit(cfg, dit_path: Optional[str], device, dtype):
    """Load the DiT named by ``dit_path`` (our safetensors or an official folder), or build ``cfg.model.size``."""
    from causvid.models.dit import WanDiT
    from causvid.models.registry import dit_config
    from causvid.models.weights import load_dit

    if dit_path is not None:
        return load_dit(dit_path, device=str(device), dtype=dtype).eval()  # the file's own config wins
    return WanDiT(dit_config(cfg.model.size, cfg.model.num_layers)).to(device=device, dtype=dtype).eval()
