"""The Wan2.1 DiT (``wan_architecture.md`` §2-3), with one forward for three uses.

* bidirectional (teacher, critic): ``model(x, t, ctx)``
* block-causal over a whole clip (training): ``model(x, t, ctx, layout=ChunkLayout(k))``
* one chunk against a KV cache (sampling): ``model(x_chunk, t_chunk, ctx, kv_cache=cache, start_frame=f0)``

Parameter names equal the official checkpoint (``blocks.N.self_attn.q.weight`` ...), so the Wan2.1
files load strictly. Per-frame timesteps ``t [B, F]`` give per-frame modulation (CausVid); ``t [B]``
is broadcast. Numerics follow the official bf16 recipe: the sinusoid in float64, time embedding,
modulation, norms, RoPE and the residual stream in float32; matmuls in the weights' / autocast dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from causvid.models.attention import (
    ChunkLayout,
    CrossAttnCache,
    KVCache,
    flex_chunk_attention,
    prefix_chunk_attention,
    sdpa,
    token_chunk_mask,
)
from causvid.models.registry import DiTConfig


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] timesteps -> [N, dim] float32; float64 math, ``[cos, sin]`` order (§2.2 step 2)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float()


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real channels per axis (t, h, w): ``d - 4 (d // 6), 2 (d // 6), 2 (d // 6)`` -> 44/42/42 at d = 128."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6 for 3-axis RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_cos_sin(head_dim: int, frames: torch.Tensor, height: int, width: int, theta: float = 10000.0):
    """cos, sin of shape [len(frames) * height * width, head_dim / 2] (float32, float64 math).

    Token (f, h, w) gets the concatenated angles of its temporal, height and width positions; any
    frame position works (no 1024-row table limit). cos / sin are taken per axis ([P, n/2] each) and then
    laid out over the tokens: the same float64 angle gives the same value, so this equals taking cos / sin
    of the whole [L, d/2] angle grid bit for bit, at a fraction of the transcendental work.
    """
    dims = rope_axis_dims(head_dim)
    dev = frames.device

    def cos_sin(pos: torch.Tensor, n: int):  # [P] -> 2 x [P, n/2] float32
        inv = 1.0 / theta ** (torch.arange(0, n, 2, dtype=torch.float64, device=dev) / n)
        ang = pos.double()[:, None] * inv[None]
        return torch.cos(ang).float(), torch.sin(ang).float()

    axes = (cos_sin(frames, dims[0]), cos_sin(torch.arange(height, device=dev), dims[1]),
            cos_sin(torch.arange(width, device=dev), dims[2]))
    Fq = frames.shape[0]

    def grid(i: int) -> torch.Tensor:  # (f h w) tokens, frame-major: [Fq * H * W, d/2]
        at, ah, aw = (a[i] for a in axes)
        return torch.cat([
            at[:, None, None, :].expand(Fq, height, width, -1),
            ah[None, :, None, :].expand(Fq, height, width, -1),
            aw[None, None, :, :].expand(Fq, height, width, -1),
        ], dim=-1).reshape(Fq * height * width, head_dim // 2)

    return grid(0), grid(1)


def rope_freqs(head_dim: int, frames: torch.Tensor, height: int, width: int, theta: float = 10000.0) -> torch.Tensor:
    """The RoPE rotations as complex64 ``cos + i sin`` [L, head_dim / 2] (see :func:`rope_cos_sin`)."""
    return torch.complex(*rope_cos_sin(head_dim, frames, height, width, theta))


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2j, 2j+1) of x [B, L, H, d] by ``freqs`` [L, d/2] (complex64).

    One complex multiply: ``(a + ib)(c + is) = (ac - bs) + i(as + bc)``, the same float32 products and sums as
    the pair-wise formula (bit-equal on the CPU), in one pass over x instead of seven.
    """
    xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [B, L, H, d/2]
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(-2).to(x.dtype)  # [B, L, H, d]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2j, 2j+1) of x [B, L, H, d] by the angles of [L, d/2]."""
    return rotate(x, torch.complex(cos.float(), sin.float()))


class RMSNorm(nn.Module):
    """``x rsqrt(mean(x^2) + eps) * weight`` over the last dim, normalised in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the parameter dtype (official ``x.float()`` islands)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def _linear_in(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """Cast an fp32 activation to the layer's weight dtype (autocast, if active, casts further)."""
    return x.to(layer.weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x


class _Projections(nn.Module):
    """q, k, v, o (all biased) and q/k RMSNorm over the whole hidden dim: the parameters of both attentions."""

    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class SelfAttention(_Projections):
    def forward(self, x, rope, attn, layer: int):
        h = _linear_in(x, self.q)
        # RMSNorm over the whole D (across heads), then split: [B, L, D] -> [B, L, H, d]
        q = self.norm_q(self.q(h)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(h)).unflatten(-1, (self.num_heads, -1))
        v = self.v(h).unflatten(-1, (self.num_heads, -1))
        q, k = rotate(q, rope), rotate(k, rope)  # rope: complex64 [L, d/2]
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = attn(layer, q, k, v)  # [B, L, H, d]
        return self.o(out.flatten(2))  # [B, L, D]


class CrossAttention(_Projections):
    def context_kv(self, c: torch.Tensor):
        c = _linear_in(c, self.k)
        k = self.norm_k(self.k(c)).unflatten(-1, (self.num_heads, -1))  # [B, Lc, H, d]
        v = self.v(c).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(self, x, kv):
        q = self.norm_q(self.q(_linear_in(x, self.q))).unflatten(-1, (self.num_heads, -1))
        k, v = kv
        return self.o(sdpa(q, k.to(q.dtype), v.to(q.dtype)).flatten(2))  # no mask: padded rows are attended


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.norm1 = FP32LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(D, cfg.num_heads, cfg.eps, cfg.qk_norm)
        self.norm3 = FP32LayerNorm(D, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(D, cfg.num_heads, cfg.eps, cfg.qk_norm)
        self.norm2 = FP32LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(D, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, D))
        self.modulation = nn.Parameter(torch.randn(1, 6, D) / D ** 0.5)

    def forward(self, x, e0, ctx, rope, attn, layer: int, num_frames: int, kv_sink: Optional[dict] = None):
        """x [B, L, D] fp32 residual stream; e0 [B, F, 6, D] fp32 per-frame modulation; ctx: this layer's cached
        cross-attention (k, v), or the embedded context [B, text_len, D] projected here, inside the block's own
        forward (under FSDP2 a block's weights are gathered only there); ``kv_sink[layer]`` receives that (k, v)."""
        ctx_kv = ctx if isinstance(ctx, tuple) else self.cross_attn.context_kv(ctx)
        if kv_sink is not None:
            kv_sink[layer] = (ctx_kv[0].detach(), ctx_kv[1].detach())
        m = (self.modulation.float()[:, None] + e0).unbind(2)  # 6 x [B, F, D]
        sh_msa, sc_msa, g_msa, sh_ffn, sc_ffn, g_ffn = (t[:, :, None] for t in m)  # [B, F, 1, D]

        def modulate(h, shift, scale):  # per-frame AdaLN on tokens viewed as [B, F, S, D]
            h = h.float().unflatten(1, (num_frames, -1))
            return (h * (1 + scale) + shift).flatten(1, 2)

        def gated(y, gate):
            return (y.float().unflatten(1, (num_frames, -1)) * gate).flatten(1, 2)

        y = self.self_attn(modulate(self.norm1(x), sh_msa, sc_msa), rope, attn, layer)
        x = x + gated(y, g_msa)
        x = x + self.cross_attn(self.norm3(x.float()), ctx_kv).float()
        y = self.ffn(_linear_in(modulate(self.norm2(x), sh_ffn, sc_ffn), self.ffn[0]))
        return x + gated(y, g_ffn)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e, num_frames: int):
        """x [B, L, D]; e [B, F, D] (the time_embedding output, not e0)."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)  # [B, F, D] each
        h = self.norm(x.float()).unflatten(1, (num_frames, -1))  # [B, F, S, D]
        h = (h * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)
        return self.head(_linear_in(h, self.head))


class WanDiT(nn.Module):
    """Wan2.1 DiT. ``forward`` returns the flow ``v = eps - x0`` as [B, F, C, H, W] float32."""

    ROPE_CACHE_SIZE = 8  # RoPE tables kept (one per chunk position / clip shape)

    def __init__(self, cfg: DiTConfig, *, attention: str = "auto", gradient_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self._rope_tables: dict[tuple, torch.Tensor] = {}  # (start, F', H', W', device) -> complex64 [L, d/2]
        self.attention = attention
        self.gradient_checkpointing = gradient_checkpointing
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # -- initialisation (official ``init_weights``, §2.5): note the zero head, so a fresh model outputs 0 --
    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # -- shapes --
    def grid(self, x_shape) -> tuple[int, int, int]:
        """Patch grid (F', H', W') of latents [B, F, C, H, W]."""
        pt, ph, pw = self.cfg.patch_size
        _, Fr, C, H, W = x_shape
        if C != self.cfg.in_dim:
            raise ValueError(f"latents have {C} channels, the model expects in_dim={self.cfg.in_dim}")
        if Fr % pt or H % ph or W % pw:
            raise ValueError(f"latent shape F={Fr}, H={H}, W={W} not divisible by the patch size {self.cfg.patch_size}")
        return Fr // pt, H // ph, W // pw

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """[B, Lc <= text_len, text_dim] -> zero-pad to text_len -> text_embedding -> [B, text_len, D]."""
        B, Lc, Dt = context.shape
        if Dt != self.cfg.text_dim or Lc > self.cfg.text_len:
            raise ValueError(f"context of shape {tuple(context.shape)} does not fit text_dim={self.cfg.text_dim}, "
                             f"text_len={self.cfg.text_len}")
        if Lc < self.cfg.text_len:
            context = F.pad(context, (0, 0, 0, self.cfg.text_len - Lc))
        return self.text_embedding(_linear_in(context, self.text_embedding[0]))

    def cross_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.embed_context(context)
        return [blk.cross_attn.context_kv(c) for blk in self.blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor], *,
                layout: Optional[ChunkLayout] = None, kv_cache: Optional[KVCache] = None, start_frame: int = 0,
                cross_cache: Optional[CrossAttnCache] = None) -> torch.Tensor:
        """
        x: latents [B, F, C, H, W]; t: [B] or [B, F] in [0, 1000]; context: [B, Lc, text_dim] (zero rows past
        the prompt) or None when ``cross_cache`` is ready. ``layout`` selects block-causal attention over the
        clip; ``kv_cache`` selects chunk mode (x is one chunk at absolute frame ``start_frame``).
        """
        B, Fr = x.shape[:2]
        Fp, Hp, Wp = self.grid(x.shape)
        S = Hp * Wp
        if t.dim() == 1:
            t = t[:, None].expand(B, Fr)
        if t.shape != (B, Fr):
            raise ValueError(f"timesteps of shape {tuple(t.shape)} do not match latents [B={B}, F={Fr}]")
        pt = self.cfg.patch_size[0]
        t_grid = t[:, ::pt]  # [B, F'] one value per patch-grid frame

        # patchify: [B, F, C, H, W] -> conv3d on [B, C, F, H, W] -> tokens [B, F'*H'*W', D] (f, h, w) row-major
        h = self.patch_embedding(_linear_in(rearrange(x, "b f c h w -> b c f h w"), self.patch_embedding))
        # [B, D, F', H', W'] -> [B, L, D]; contiguous: the channel-major view made every residual add and norm of
        # the blocks ~10x slower (issue 24's profile)
        h = rearrange(h, "b d f h w -> b (f h w) d").float().contiguous()

        # time: [B, F'] -> e [B, F', D], e0 [B, F', 6, D] (float32)
        with torch.autocast(x.device.type, enabled=False):
            e = self.time_embedding(sinusoidal_embedding(t_grid.flatten(), self.cfg.freq_dim).to(
                self.time_embedding[0].weight.dtype)).float()
            e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
        e = e.unflatten(0, (B, Fp))
        e0 = e0.unflatten(0, (B, Fp)).unflatten(-1, (6, -1))

        # text: cached per-layer K/V, or the embedded context [B, text_len, D] that each block projects itself
        sink = None
        if cross_cache is not None and cross_cache.ready:
            ctx = [cross_cache.kv[i] for i in range(len(self.blocks))]
        else:
            if context is None:
                raise ValueError("context is required unless a ready cross-attention cache is given")
            ctx = [self.embed_context(context)] * len(self.blocks)
            if cross_cache is not None:
                cross_cache.kv, sink = {}, {}

        rope = self.rope(start_frame, Fp, Hp, Wp, x.device)
        attn = self._attention_fn(Fp, S, layout, kv_cache, start_frame, x.device)

        for i, blk in enumerate(self.blocks):
            # a KV cache written in place cannot be recomputed; one that builds its inputs out of place can
            if self.gradient_checkpointing and torch.is_grad_enabled() and (
                    kv_cache is None or getattr(kv_cache, "supports_checkpointing", False)):
                h = checkpoint(blk, h, e0, ctx[i], rope, attn, i, Fp, sink, use_reentrant=False)
            else:
                h = blk(h, e0, ctx[i], rope, attn, i, Fp, sink)
        if sink is not None:
            cross_cache.kv = sink  # complete only now: ``ready`` stays False if a block raised

        out = self.head(h, e, Fp).float()  # [B, L, pt*ph*pw*C]
        # unpatchify: channel fastest within a patch, (pt, ph, pw, c) order
        out = rearrange(out, "b (f h w) (pt ph pw c) -> b (f pt) c (h ph) (w pw)", f=Fp, h=Hp, w=Wp,
                        pt=pt, ph=self.cfg.patch_size[1], pw=self.cfg.patch_size[2])
        return out

    def rope(self, start_frame: int, Fp: int, Hp: int, Wp: int, device) -> torch.Tensor:
        """The RoPE rotations of frames ``[start_frame, start_frame + Fp)`` (complex64 [Fp*Hp*Wp, d/2]), kept in a
        small table cache: the sampler runs every chunk position ``steps + 1`` times and a teacher every step at
        the same positions. :meth:`free_caches` empties it."""
        key = (start_frame, Fp, Hp, Wp, str(device))
        table = self._rope_tables.pop(key, None)
        if table is None:
            frames = torch.arange(start_frame, start_frame + Fp, device=device)
            table = rope_freqs(self.cfg.head_dim, frames, Hp, Wp, self.cfg.rope_theta)
        self._rope_tables[key] = table  # most recently used last
        while len(self._rope_tables) > self.ROPE_CACHE_SIZE:
            self._rope_tables.pop(next(iter(self._rope_tables)))
        return table

    def free_caches(self) -> None:
        """Drop the cached RoPE tables (rebuilt on demand)."""
        self._rope_tables.clear()

    def _attention_fn(self, Fp: int, S: int, layout, kv_cache, start_frame: int, device):
        """Returns ``attn(layer, q, k, v) -> out`` for the selected use."""
        if kv_cache is not None:
            kv_cache.plan(start_frame, Fp)
            return kv_cache.attend
        if layout is None:
            return lambda layer, q, k, v: sdpa(q, k, v)
        backend = self.attention
        if backend == "auto":
            backend = "flex" if device.type == "cuda" else "sdpa"
        if backend == "flex":
            return lambda layer, q, k, v: flex_chunk_attention(q, k, v, Fp, S, layout)
        if backend == "sdpa":
            return lambda layer, q, k, v: prefix_chunk_attention(q, k, v, Fp, S, layout)
        if backend != "sdpa_mask":
            raise ValueError(f"unknown attention backend {backend!r}; valid: auto, sdpa, sdpa_mask, flex")
        mask = token_chunk_mask(Fp, S, layout).to(device)
        return lambda layer, q, k, v: sdpa(q, k, v, mask)

    def new_kv_cache(self, batch_size: int, capacity_frames: int, tokens_per_frame: int, *, sink_frames: int = 0,
                     dtype=None, device=None) -> KVCache:
        p = next(self.parameters())
        return KVCache(len(self.blocks), batch_size, capacity_frames, tokens_per_frame, self.cfg.num_heads,
                       self.cfg.head_dim, sink_frames=sink_frames, dtype=dtype or p.dtype, device=device or p.device)

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        return (latent_h // self.cfg.patch_size[1]) * (latent_w // self.cfg.patch_size[2])
