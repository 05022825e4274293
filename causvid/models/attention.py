"""Chunk masks, KV caches and attention backends for the block-causal DiT.

Frames are grouped into chunks of ``k`` latent frames (optionally frame 0 alone, for image-to-video).
The chunk mask on frames is ``M[i, j] = 1 iff chunk(j) <= chunk(i)`` (full attention inside a chunk,
causal across chunks), expanded to tokens frame-major (``wan_architecture.md`` §3.3).

Backends: unmasked SDPA per chunk over its key prefix (``sdpa``: CPU; the chunk mask makes every chunk's keys a
prefix), SDPA with an explicit boolean mask (``sdpa_mask``: the reference), FlexAttention with a ``BlockMask``
(CUDA training), and plain unmasked SDPA over the KV cache (sampling: a query chunk sees the whole cache).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ChunkLayout:
    """How latent frames group into causal chunks."""

    chunk_size: int = 3
    independent_first_frame: bool = False

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def chunk_of(self, frame: int) -> int:
        if self.independent_first_frame:
            return 0 if frame == 0 else 1 + (frame - 1) // self.chunk_size
        return frame // self.chunk_size

    def chunk_ids(self, num_frames: int) -> torch.Tensor:
        """[F] long: the chunk index of every frame."""
        return torch.tensor([self.chunk_of(f) for f in range(num_frames)], dtype=torch.long)

    def chunks(self, num_frames: int) -> list[tuple[int, int]]:
        """Frame ranges ``[start, end)`` of the chunks covering ``num_frames`` frames (last may be short)."""
        out, start = [], 0
        while start < num_frames:
            size = 1 if (self.independent_first_frame and start == 0) else self.chunk_size
            out.append((start, min(start + size, num_frames)))
            start += size
        return out

    def check_divides(self, num_frames: int) -> None:
        rest = num_frames - (1 if self.independent_first_frame else 0)
        if rest % self.chunk_size:
            raise ValueError(f"chunk size {self.chunk_size} does not divide the {rest} latent frames"
                             + (" after the independent first frame" if self.independent_first_frame else ""))


def frame_chunk_mask(num_frames: int, layout: ChunkLayout) -> torch.Tensor:
    """[F, F] bool, ``M[i, j] = chunk(j) <= chunk(i)``."""
    c = layout.chunk_ids(num_frames)
    return c[None, :] <= c[:, None]


def token_chunk_mask(num_frames: int, tokens_per_frame: int, layout: ChunkLayout) -> torch.Tensor:
    """[F*S, F*S] bool: the frame mask expanded to frame-major tokens."""
    m = frame_chunk_mask(num_frames, layout)
    return m.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


# ----------------------------------------------------------------------------------------------------------------
# Attention kernels. q, k, v: [B, L, H, d]  ->  out [B, Lq, H, d]
# ----------------------------------------------------------------------------------------------------------------

def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)  # [B, L, H, d]


def prefix_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, tokens_per_frame: int,
                           layout: ChunkLayout) -> torch.Tensor:
    """Block-causal attention as one unmasked SDPA per chunk: the queries of a chunk ending at frame ``f1`` see
    exactly the keys of frames ``[0, f1)``, a prefix, so no mask is built and no masked score is computed
    (7 chunks of 3 frames: 57% of the dense work). q, k, v [B, F*S, H, d] -> [B, F*S, H, d]."""
    S = tokens_per_frame
    outs = [sdpa(q[:, f0 * S:f1 * S], k[:, :f1 * S], v[:, :f1 * S]) for f0, f1 in layout.chunks(num_frames)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@functools.lru_cache(maxsize=16)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def flex_block_mask(num_frames: int, tokens_per_frame: int, layout: ChunkLayout, device: str):
    """FlexAttention ``BlockMask`` for the chunk mask; the sequence is padded to a multiple of 128.

    Padded query rows see only themselves (keeps their softmax finite); real rows never see padding.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    total = num_frames * tokens_per_frame
    padded = -(-total // 128) * 128
    chunk_of_token = torch.full((padded,), -1, dtype=torch.long, device=device)
    chunk_of_token[:total] = layout.chunk_ids(num_frames).to(device).repeat_interleave(tokens_per_frame)

    def mask_mod(b, h, q_idx, kv_idx):
        cq, ck = chunk_of_token[q_idx], chunk_of_token[kv_idx]
        return ((ck <= cq) & (ck >= 0) & (cq >= 0)) | (q_idx == kv_idx)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=padded, KV_LEN=padded, device=device)


def flex_chunk_attention(q, k, v, num_frames: int, tokens_per_frame: int, layout: ChunkLayout) -> torch.Tensor:
    """Block-causal attention with FlexAttention (compiled on CUDA, eager elsewhere)."""
    from torch.nn.attention.flex_attention import flex_attention

    B, L, H, d = q.shape
    bm = flex_block_mask(num_frames, tokens_per_frame, layout, str(q.device))
    pad = bm.shape[-2] - L
    q, k, v = (F.pad(x.transpose(1, 2), (0, 0, 0, pad)) for x in (q, k, v))  # [B, H, Lpad, d]
    fn = _compiled_flex() if q.is_cuda else flex_attention
    out = fn(q, k, v, block_mask=bm)
    return out[:, :, :L].transpose(1, 2)  # [B, L, H, d]


# ----------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------

class KVCache:
    """Preallocated self-attention cache for all layers, keys stored after RoPE at absolute frame positions.

    Memory is allocated once: ``[num_layers, B, capacity_frames * S, H, d]`` for keys and values.
    ``sink_frames`` first frames are kept forever; the rest of the capacity is a ring over the most
    recent frames (a rolling window), so generation length is unbounded at constant memory. With
    ``capacity_frames`` >= the whole video the cache never evicts (the official static cache).

    Bookkeeping is host-side integers only (no device synchronisation in the chunk loop). Attention
    is permutation-invariant over keys, so the ring needs no reordering: a query chunk attends to all
    resident frames (which are all at earlier or equal positions).
    """

    def __init__(self, num_layers: int, batch_size: int, capacity_frames: int, tokens_per_frame: int,
                 num_heads: int, head_dim: int, *, sink_frames: int = 0, dtype=torch.float32, device="cpu"):
        if sink_frames >= capacity_frames:
            raise ValueError(f"sink_frames ({sink_frames}) must be < capacity_frames ({capacity_frames})")
        self.S = tokens_per_frame
        self.capacity = capacity_frames
        self.sink = sink_frames
        shape = (num_layers, batch_size, capacity_frames * tokens_per_frame, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.reset()

    def reset(self) -> None:
        """Forget all frames (the buffers are kept: no reallocation)."""
        self.slot_of: dict[int, int] = {}  # absolute frame -> slot
        self.frame_in: list[Optional[int]] = [None] * self.capacity  # slot -> absolute frame
        self.filled = 0  # slots [0, filled) hold frames
        self._next_ring = self.sink  # next ring slot to overwrite once full
        self._pending: Optional[list[tuple[int, int]]] = None

    @property
    def num_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def resident_frames(self) -> list[int]:
        return sorted(f for f in self.frame_in if f is not None)

    def plan(self, start_frame: int, num_frames: int) -> list[tuple[int, int]]:
        """Assign slots to frames ``[start_frame, start_frame + num_frames)``; returns (slot, frame) pairs.

        Frames already resident (re-denoising the same chunk) keep their slots. New frames take free
        slots, then evict the oldest non-sink frames. Called once per forward, before layer 0.
        """
        if num_frames > self.capacity - self.sink:
            raise ValueError(f"a chunk of {num_frames} frames does not fit a cache of {self.capacity} frames "
                             f"with {self.sink} sink frames")
        pairs = []
        for f in range(start_frame, start_frame + num_frames):
            if f in self.slot_of:
                pairs.append((self.slot_of[f], f))
                continue
            if self.filled < self.capacity:
                slot = self.filled
                self.filled += 1
            else:
                slot = self._next_ring
                self._next_ring = self.sink + (self._next_ring + 1 - self.sink) % (self.capacity - self.sink)
                old = self.frame_in[slot]
                if old is not None:
                    del self.slot_of[old]
            self.slot_of[f] = slot
            self.frame_in[slot] = f
            pairs.append((slot, f))
        newest = max(f for f in self.frame_in if f is not None)
        if newest != start_frame + num_frames - 1:
            raise ValueError(f"KV cache holds frame {newest}, later than the chunk ending at frame "
                             f"{start_frame + num_frames - 1}: chunks must be generated in order (reset() to restart)")
        self._pending = pairs
        return pairs

    def _runs(self) -> list[tuple[int, int, int]]:
        """Contiguous runs (slot_start, chunk_frame_offset, n_frames) of the planned chunk."""
        assert self._pending is not None, "plan() must be called before attend()"
        runs: list[tuple[int, int, int]] = []
        for i, (slot, _) in enumerate(self._pending):
            if runs and runs[-1][0] + runs[-1][2] == slot and runs[-1][1] + runs[-1][2] == i:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((slot, i, 1))
        return runs

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this chunk's roped k/v ([B, n*S, H, d]) to its slots, attend q over all resident frames."""
        S = self.S
        kc, vc = self.k[layer], self.v[layer]  # [B, cap*S, H, d]
        runs = self._runs()
        for slot, off, n in runs:
            kc[:, slot * S:(slot + n) * S] = k[:, off * S:(off + n) * S].detach()
            vc[:, slot * S:(slot + n) * S] = v[:, off * S:(off + n) * S].detach()
        keys, values = kc[:, :self.filled * S], vc[:, :self.filled * S]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Keep the graph through the current chunk's k/v (the cached context carries no gradient).
            keys, values = keys.clone(), values.clone()
            for slot, off, n in runs:
                keys[:, slot * S:(slot + n) * S] = k[:, off * S:(off + n) * S]
                values[:, slot * S:(slot + n) * S] = v[:, off * S:(off + n) * S]
        return sdpa(q, keys.to(q.dtype), values.to(q.dtype))


class CrossAttnCache:
    """Per-layer cross-attention K/V of one prompt batch (after ``k`` RMSNorm). Replace on prompt change."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def ready(self) -> bool:
        return bool(self.kv)

    def clear(self) -> None:
        self.kv.clear()
