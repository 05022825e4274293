"""Text encoders: the umT5-XXL encoder of Wan2.1 and the toy world's small frozen encoder.

Both sit behind one interface, :class:`TextEncoder`::

    emb, lens = encoder.encode(["a red circle moving left", ...])
    # emb  [B, text_len, dim] float32, rows >= lens[b] exactly zero (wan_architecture.md §5.4)
    # lens [B] long, real tokens per prompt including the end-of-sequence token

* :class:`UMT5Encoder` is the umT5 encoder with Wan's parameter names (``wan_architecture.md`` §5.1,
  §5.3); :func:`umt5_key_to_hf` / :func:`umt5_key_from_hf` map them to and from HF
  ``UMT5EncoderModel`` names (§7.3). :class:`UMT5TextEncoder` adds the tokenizer (a local
  ``tokenizer.json`` read with the ``tokenizers`` package, §5.4) and loads the official
  ``models_t5_umt5-xxl-enc-bf16.pth`` safely.
* :class:`ToyTextEncoder` is a frozen, seeded two-layer transformer over a word-level vocabulary
  (the toy world's words). See ``docs/text.md`` for why it is frozen.

Tensor layouts: token ids and masks ``[B, L]`` (mask 1 = real token); hidden states ``[B, L, D]``;
attention logits ``[B, H, Lq, Lk]``.
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from causvid.models.weights import (
    WeightsError,
    load_into,
    load_safetensors,
    load_state_dict_file,
    read_model_header,
    save_model,
    strip_prefixes,
)

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"


# ------------------------------------------------------------------------------------------------
# umT5 architecture (wan_architecture.md §5.1)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UMT5Arch:
    """Sizes of a umT5 encoder (§5.1). ``text_len`` is the padded prompt length (512 for Wan)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads != 0:
            raise ValueError(f"UMT5Arch: dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def replace(self, **kw: Any) -> "UMT5Arch":
        return replace(self, **kw)


UMT5_ARCHS: dict[str, UMT5Arch] = {
    "umt5-xxl": UMT5Arch(),
    # Unit tests and the ``tiny`` DiT (text_dim 24, text_len 8).
    "tiny": UMT5Arch(vocab_size=512, dim=24, dim_attn=24, dim_ffn=48, num_heads=2, num_layers=2, text_len=8),
}


def umt5_arch(arch: str | UMT5Arch) -> UMT5Arch:
    if isinstance(arch, UMT5Arch):
        return arch
    if arch not in UMT5_ARCHS:
        raise KeyError(f"unknown umT5 size {arch!r}; valid: {sorted(UMT5_ARCHS)}")
    return UMT5_ARCHS[arch]


def relative_position_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of ``rel = key_pos - query_pos`` (§5.1).

    Half the buckets per direction (positive offsets use the upper half); within a half, offsets
    below ``half // 2`` get their own bucket, larger ones a logarithmic bucket up to ``max_distance``.
    The log is taken in float32 and truncated, as in the reference implementations.
    """
    half = num_buckets // 2
    max_exact = half // 2
    a = rel.abs()
    log_ratio = torch.log(a.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(a < max_exact, a, large)


def relative_buckets(lq: int, lk: int, arch: UMT5Arch, device: torch.device | None = None) -> torch.Tensor:
    """Bucket index of every (query, key) pair: ``[Lq, Lk]`` long."""
    q = torch.arange(lq, device=device)
    k = torch.arange(lk, device=device)
    return relative_position_bucket(k[None, :] - q[:, None], arch.num_buckets, arch.max_distance)


class T5RMSNorm(nn.Module):
    """T5 layer norm (§5.1): ``weight * x * rsqrt(mean(x^2) + eps)``; no mean subtraction, no bias.

    The variance is computed in float32 (or wider); with a half-precision weight the normalised x is
    cast to the weight's dtype before the multiply.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        x = x * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class RelativePositionBias(nn.Module):
    """Per-layer relative position bias (§5.1, umT5: ``shared_pos=False``); table ``[buckets, heads]``."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """``buckets [Lq, Lk]`` -> bias ``[1, H, Lq, Lk]``."""
        return rearrange(self.embedding(buckets), "q k h -> 1 h q k")


class UMT5Attention(nn.Module):
    """T5 self-attention (§5.1): bias-free q/k/v/o, **no** 1/sqrt(d) scaling, relative bias, key mask
    filled with ``finfo.min``, softmax in float32 (or wider)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``x [B, L, D]``, ``bias [1, H, L, L]``, ``key_mask [B, L]`` bool (True = real) -> ``[B, L, D]``."""
        q, k, v = (rearrange(p(x), "b l (h d) -> b h l d", h=self.num_heads) for p in (self.q, self.k, self.v))
        logits = torch.einsum("bhid,bhjd->bhij", q, k) + bias  # [B, H, Lq, Lk], unscaled (T5)
        logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(logits.dtype).min)
        attn = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).to(v.dtype)
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        return self.o(rearrange(out, "b h l d -> b l (h d)"))


class UMT5FeedForward(nn.Module):
    """Gated tanh-GELU FFN (§5.1): ``fc2(fc1(x) * gelu_tanh(gate.0(x)))``."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """fp16 only: clamp to +-(max - 1000) when an inf appeared (§5.1); a no-op otherwise."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class UMT5Block(nn.Module):
    """``x += Attn(norm1(x)); x += FFN(norm2(x))`` with this layer's own relative bias (§5.1)."""

    def __init__(self, arch: UMT5Arch):
        super().__init__()
        # Definition order = the order of the official state dict (§5.3).
        self.norm1 = T5RMSNorm(arch.dim, arch.eps)
        self.attn = UMT5Attention(arch.dim, arch.dim_attn, arch.num_heads)
        self.norm2 = T5RMSNorm(arch.dim, arch.eps)
        self.ffn = UMT5FeedForward(arch.dim, arch.dim_ffn)
        self.pos_embedding = RelativePositionBias(arch.num_buckets, arch.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = _fp16_clamp(x + self.attn(self.norm1(x), self.pos_embedding(buckets), key_mask))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The umT5 encoder with Wan's parameter names (§5.1, §5.3). Build on ``torch.device("meta")``
    to inspect the XXL layout without memory."""

    def __init__(self, arch: str | UMT5Arch = "umt5-xxl"):
        super().__init__()
        self.arch = umt5_arch(arch)
        self.token_embedding = nn.Embedding(self.arch.vocab_size, self.arch.dim)
        self.blocks = nn.ModuleList(UMT5Block(self.arch) for _ in range(self.arch.num_layers))
        self.norm = T5RMSNorm(self.arch.dim, self.arch.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``ids [B, L]`` long, ``mask [B, L]`` (1 = real token) -> hidden states ``[B, L, dim]``.

        Rows at padded positions are computed but meaningless; callers zero them (§5.4).
        """
        key_mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        buckets = relative_buckets(ids.shape[1], ids.shape[1], self.arch, ids.device)  # [L, L]
        x = self.token_embedding(ids)  # [B, L, D]
        for block in self.blocks:
            x = block(x, buckets, key_mask)
        return self.norm(x)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "UMT5Encoder":
        """Deterministic random init (T5-style scales) for tests and the ``tiny-umt5`` kind: norms 1,
        embeddings and relative-bias tables N(0, 1), each Linear N(0, s^2) with s from the table below."""
        g = torch.Generator().manual_seed(seed)
        a = self.arch
        linear_std = {"attn.q": (a.dim * a.head_dim) ** -0.5, "attn.k": a.dim ** -0.5, "attn.v": a.dim ** -0.5,
                      "attn.o": a.dim_attn ** -0.5, "ffn.gate.0": a.dim ** -0.5, "ffn.fc1": a.dim ** -0.5,
                      "ffn.fc2": a.dim_ffn ** -0.5}
        for name, p in self.named_parameters():
            module = name.rsplit(".", 1)[0].split(".", 2)[-1]  # "blocks.3.attn.q.weight" -> "attn.q"
            if module in ("norm", "norm1", "norm2"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * linear_std.get(module, 1.0))
        return self


# ------------------------------------------------------------------------------------------------
# HF UMT5EncoderModel naming (wan_architecture.md §7.3)
# ------------------------------------------------------------------------------------------------

_HF_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_HF_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_WAN_BLOCK = {v: k for k, v in _HF_BLOCK.items()}
_WAN_TOP = {v: k for k, v in _HF_TOP.items()}
_HF_TIED_EMBEDDING = "encoder.embed_tokens.weight"  # tied to shared.weight in HF


def umt5_key_to_hf(key: str) -> str:
    """Wan umT5 name -> HF ``UMT5EncoderModel`` name (§7.3)."""
    if key in _HF_TOP:
        return _HF_TOP[key]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and m.group(2) in _HF_BLOCK:
        return f"encoder.block.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"
    raise WeightsError(f"not a Wan umT5 tensor name: {key!r}")


def umt5_key_from_hf(key: str) -> str:
    """HF ``UMT5EncoderModel`` name -> Wan umT5 name (§7.3); the tied embed_tokens maps to the embedding."""
    if key == _HF_TIED_EMBEDDING:
        return "token_embedding.weight"
    if key in _WAN_TOP:
        return _WAN_TOP[key]
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    if m and m.group(2) in _WAN_BLOCK:
        return f"blocks.{m.group(1)}.{_WAN_BLOCK[m.group(2)]}"
    raise WeightsError(f"not an HF UMT5EncoderModel tensor name: {key!r}")


def is_hf_umt5(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k == "shared.weight" or k.startswith("encoder.") for k in sd)


def umt5_state_dict_from_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF state dict to Wan names. ``shared.weight`` wins over its tied copy ``embed_tokens``."""
    sd = dict(sd)
    if "shared.weight" in sd:
        sd.pop(_HF_TIED_EMBEDDING, None)
    return {umt5_key_from_hf(k): v for k, v in sd.items()}


def umt5_state_dict_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {umt5_key_to_hf(k): v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------
# Prompt cleaning and tokenization (wan_architecture.md §5.4)
# ------------------------------------------------------------------------------------------------


def _ftfy_fix_text() -> Callable[[str], str] | None:
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy.fix_text


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'`` (§5.4): ftfy (when installed), ``html.unescape`` twice, then every
    whitespace run collapsed to one space, stripped."""
    fix = _ftfy_fix_text()
    if fix is not None:
        text = fix(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` + Wan's prompt pipeline (§5.4): clean, tokenize without special
    tokens, truncate to ``text_len - 1``, append EOS, pad with PAD to ``text_len``."""

    def __init__(self, tokenizer: Any, text_len: int, *, source: str = "<in memory>",
                 pad_token: str = PAD_TOKEN, eos_token: str = EOS_TOKEN):
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.source = source
        self.pad_id = self._token_id(pad_token)
        self.eos_id = self._token_id(eos_token)
        tokenizer.no_padding()
        tokenizer.no_truncation()

    def _token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer {self.source} has no {token!r} token")
        return i

    @classmethod
    def from_path(cls, path: str, text_len: int) -> "TextTokenizer":
        """``path``: a folder holding ``tokenizer.json`` (e.g. ``google/umt5-xxl``) or the file itself."""
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            what = "tokenizer folder" if not os.path.exists(path) else "tokenizer file"
            raise FileNotFoundError(f"{what} not found: {file} (expected the google/umt5-xxl folder with tokenizer.json)")
        try:
            tok = Tokenizer.from_file(file)
        except Exception as err:  # the Rust side raises plain Exceptions
            raise ValueError(f"cannot read tokenizer file {file}: {err}") from None
        return cls(tok, text_len, source=file)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> ``ids [B, text_len]`` long, ``mask [B, text_len]`` long (1 = real token incl. EOS)."""
        ids = torch.full((len(prompts), self.text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.text_len), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            # encode() one by one: encode_batch would start a thread pool (unsafe before forking workers).
            toks = self.tokenizer.encode(clean_prompt(prompt), add_special_tokens=False).ids
            if len(toks) > self.text_len - 1:
                logger.warning("prompt truncated to %d tokens: %.80r", self.text_len, prompt)
                toks = toks[: self.text_len - 1]
            toks = toks + [self.eos_id]
            ids[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[b, : len(toks)] = 1
        return ids, mask


# ------------------------------------------------------------------------------------------------
# The common interface
# ------------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """A frozen prompt encoder: ``encode(prompts) -> (emb [B, text_len, dim] float32, lens [B])``.

    * Rows ``>= lens[b]`` are exactly zero (the official pipeline keeps only the real rows, the DiT
      zero-pads them back; §5.4). Positions past a prompt's own length are never computed: padded
      keys are masked, so the real rows are those of a full-length run.
    * Each prompt is encoded on its own, so its embedding is a pure function of the prompt (bit for
      bit): it never depends on which other prompts were encoded with it or before it, and a resumed
      training run encodes exactly what the uninterrupted run did (docs/reliability.md).
    * Embeddings are cached by prompt string (only the real rows are kept, least recently used ones
      are evicted past ``max_cache_entries``); ``clear_cache()`` empties it.
    * ``release()`` moves the weights to the CPU to give accelerator memory back; the cache stays.

    Subclasses pass their :class:`TextTokenizer` and output width to ``__init__`` and implement
    :meth:`forward`.
    """

    max_cache_entries: int = 256  # umT5-XXL: ~1.6 MB per 100-token prompt

    def __init__(self, tokenizer: TextTokenizer, dim: int):
        super().__init__()
        self.tokenizer = tokenizer
        self._dim = dim
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # prompt -> [len, dim] float32
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def text_len(self) -> int:
        return self.tokenizer.text_len

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids, mask [B, L]`` -> ``[B, L, dim]`` (rows at pad positions unspecified)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> ``emb [B, text_len, dim]`` float32 (zero past each prompt), ``lens [B]`` long.

        Runs on the encoder's device; the result is put on ``device`` (default: the encoder's).
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode() takes a list of prompt strings")
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        self.cache_misses += len(todo)
        self.cache_hits += len(prompts) - len(todo)
        for p in todo:
            self._encode_uncached([p])  # one at a time: the result must not depend on the batch
        device = torch.device(device) if device is not None else self.device
        emb = torch.zeros(len(prompts), self.text_len, self.dim, dtype=torch.float32, device=device)
        lens = torch.zeros(len(prompts), dtype=torch.long)
        for b, p in enumerate(prompts):
            rows = self._cache[p]
            self._cache.move_to_end(p)
            emb[b, : rows.shape[0]] = rows.to(device)
            lens[b] = rows.shape[0]
        self._evict()
        return emb, lens.to(device)

    def _encode_uncached(self, prompts: list[str]) -> None:
        ids, mask = self.tokenizer(prompts)  # [B, text_len]
        lens = mask.sum(dim=1)
        n = int(lens.max())  # positions past the longest prompt are masked keys: skip them
        # through __call__, not .forward: FSDP2 (a sharded frozen toy encoder) gathers its weights in forward hooks
        out = self(ids[:, :n].to(self.device), mask[:, :n].to(self.device)).float()  # [B, n, dim]
        for b, p in enumerate(prompts):
            self._cache[p] = out[b, : int(lens[b])].clone()

    def _evict(self) -> None:
        while len(self._cache) > self.max_cache_entries:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def release(self) -> "TextEncoder":
        """Move the weights to the CPU and hand the freed accelerator memory back."""
        on_cuda = self.device.type == "cuda"
        self.to("cpu")
        if on_cuda:
            torch.cuda.empty_cache()
        return self

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()


# ------------------------------------------------------------------------------------------------
# umT5 text encoder (Wan2.1)
# ------------------------------------------------------------------------------------------------


def arch_of_state_dict(arch: UMT5Arch, sd: Mapping[str, torch.Tensor], where: str) -> UMT5Arch:
    """``arch`` with the layer count and vocabulary rows a (Wan-named) state dict holds.

    The official file has 24 layers and 256,384 rows; a rehearsal file (``causvid.models.random_weights``)
    has fewer of both. Widths are not read from the file: the strict load that follows checks them.
    """
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n = max(layers) + 1 if layers else 0
    if layers != set(range(n)):
        raise WeightsError(f"umT5 weights {where}: blocks {sorted(set(range(n)) - layers)} are missing")
    emb = sd.get("token_embedding.weight")
    rows = int(emb.shape[0]) if emb is not None and emb.dim() == 2 else arch.vocab_size
    if (n, rows) != (arch.num_layers, arch.vocab_size):
        logger.warning("umT5 weights %s: %d layers and %d vocabulary rows (the named size has %d and %d)",
                       where, n, rows, arch.num_layers, arch.vocab_size)
        arch = arch.replace(num_layers=n or arch.num_layers, vocab_size=rows)
    return arch


class UMT5TextEncoder(TextEncoder):
    """umT5 encoder + tokenizer behind :class:`TextEncoder` (§5). Frozen; computes in its weights' dtype
    (bf16 for the official file, as Wan does) and returns float32."""

    def __init__(self, model: UMT5Encoder, tokenizer: TextTokenizer):
        super().__init__(tokenizer, model.arch.dim)
        self.model = model
        self._freeze()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        top = int(ids.max())
        if top >= self.model.arch.vocab_size:
            raise ValueError(f"tokenizer {self.tokenizer.source} produced token id {top}, outside the umT5 "
                             f"vocabulary of {self.model.arch.vocab_size}: tokenizer and weights do not match")
        return self.model(ids, mask)

    @classmethod
    def random(cls, tokenizer_path: str, arch: str | UMT5Arch = "tiny", *, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               text_len: int | None = None) -> "UMT5TextEncoder":
        """A randomly initialised (seeded) encoder: tests and the ``tiny-umt5`` kind without weights."""
        a = umt5_arch(arch)
        tokenizer = TextTokenizer.from_path(tokenizer_path, text_len or a.text_len)
        model = UMT5Encoder(a).init_weights(seed).to(device=device, dtype=dtype)
        return cls(model, tokenizer)

    @classmethod
    def from_files(cls, weights_path: str, tokenizer_path: str, arch: str | UMT5Arch = "umt5-xxl", *,
                   dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                   text_len: int | None = None) -> "UMT5TextEncoder":
        """Load ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan names) or an HF ``UMT5EncoderModel`` file/folder
        (HF names, §7.3), strictly, plus the tokenizer folder.

        Weights are read with ``torch.load(weights_only=True)`` / safetensors (never unpickling code),
        assigned into a module built on the meta device (no second copy), then moved to ``device``.
        """
        a = umt5_arch(arch)
        tokenizer = TextTokenizer.from_path(tokenizer_path, text_len or a.text_len)  # fail fast
        sd = strip_prefixes(load_state_dict_file(weights_path), ("module.", "model."))
        if is_hf_umt5(sd):
            sd = umt5_state_dict_from_hf(sd)
        a = arch_of_state_dict(a, sd, weights_path)
        with torch.device("meta"):
            model = UMT5Encoder(a).to(dtype)
        load_into(model, sd, what=f"umT5 weights {weights_path}")
        return cls(model.to(device), tokenizer)


# ------------------------------------------------------------------------------------------------
# The toy world's text encoder
# ------------------------------------------------------------------------------------------------

TOY_TEXT_KIND = "toy_text_encoder"
_RESERVED = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, as umT5 has pad 0 and eos 1


def default_toy_vocabulary() -> list[str]:
    """The toy world's caption words (``causvid.data.toyworld.VOCABULARY``), imported lazily."""
    try:
        from causvid.data.toyworld import VOCABULARY
    except ImportError as err:
        raise ImportError(f"the default toy vocabulary comes from causvid.data.toyworld.VOCABULARY: {err}; "
                          "pass vocabulary=[...] explicitly") from None
    return list(VOCABULARY)


def _word_normalizer() -> Any:
    """NFKC, lowercase, punctuation other than hyphens replaced by spaces ("Up-left." -> "up-left ")."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                 normalizers.Replace(Regex(r"[^\w\s-]"), " ")])


def build_word_tokenizer(words: Sequence[str]) -> Any:
    """A ``tokenizers`` word-level tokenizer over ``words`` (already normalised, see
    :func:`normalize_vocabulary`): normaliser :func:`_word_normalizer`, whitespace split, ids
    ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``words`` in order. Unknown words map to ``<unk>``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(_RESERVED)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.normalizer = _word_normalizer()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def normalize_vocabulary(entries: Sequence[str]) -> list[str]:
    """Vocabulary entries -> the distinct words the tokenizer will see, in order: normalised like
    captions and split on whitespace ("Moving Left" -> moving, left; "up-left" stays one word)."""
    norm = _word_normalizer()
    out: dict[str, None] = {}
    for entry in entries:
        for piece in norm.normalize_str(str(entry)).split():
            if piece not in _RESERVED:
                out.setdefault(piece, None)
    if not out:
        raise ValueError("the toy text encoder needs a non-empty vocabulary")
    return list(out)


@dataclass(frozen=True)
class ToyTextArch:
    dim: int = 64
    text_len: int = 16
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 256
    seed: int = 0


class ToyBlock(nn.Module):
    """Pre-norm transformer block: ``x += attn(LN(x))``, ``x += mlp(LN(x))`` (keys masked)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``x [B, L, D]``, ``key_mask [B, L]`` bool -> ``[B, L, D]``."""
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])  # [B, H, L, d]
        x = x + self.proj(rearrange(a, "b h l d -> b l (h d)"))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ToyTextEncoder(TextEncoder):
    """The toy world's frozen text encoder: word embeddings + learned positions + a small transformer.

    Weights come from ``seed`` alone (same seed and vocabulary -> identical weights); it is never
    trained (see ``docs/text.md``). ``save(path)`` writes a safetensors file with the config
    (vocabulary included) embedded; :meth:`load` reads it back.
    """

    def __init__(self, vocabulary: Sequence[str] | None = None, *, dim: int = 64, text_len: int = 16,
                 num_layers: int = 2, num_heads: int = 4, ffn_dim: int = 256, seed: int = 0):
        words = normalize_vocabulary(default_toy_vocabulary() if vocabulary is None else vocabulary)
        if dim % num_heads != 0:
            raise ValueError(f"ToyTextEncoder: dim {dim} is not divisible by num_heads {num_heads}")
        tokenizer = TextTokenizer(build_word_tokenizer(words), text_len, source="toy word-level vocabulary")
        super().__init__(tokenizer, dim)
        self.vocabulary = words
        self.arch = ToyTextArch(dim, text_len, num_layers, num_heads, ffn_dim, seed)
        self.token_embedding = nn.Embedding(len(_RESERVED) + len(words), dim)
        self.pos_embedding = nn.Parameter(torch.zeros(text_len, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters(seed)
        self._freeze()

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Seeded init in parameter order: embeddings N(0, 1), positions N(0, 0.5^2), linear weights
        N(0, 1/fan_in), biases 0, LayerNorms identity."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name in ("token_embedding.weight", "pos_embedding"):
                std = 1.0 if name == "token_embedding.weight" else 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids, mask [B, L]`` (L <= text_len) -> ``[B, L, dim]`` (LayerNorm-ed rows)."""
        x = self.token_embedding(ids) + self.pos_embedding[: ids.shape[1]]  # [B, L, D]
        key_mask = mask.bool()
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)

    def config(self) -> dict:
        return {"vocabulary": list(self.vocabulary), **asdict(self.arch)}

    def save(self, path: str) -> None:
        save_model(self, path, TOY_TEXT_KIND, self.config())

    @classmethod
    def load(cls, path: str) -> "ToyTextEncoder":
        kind, config = read_model_header(path)
        if kind != TOY_TEXT_KIND:
            raise WeightsError(f"{path} holds a {kind!r}, not a {TOY_TEXT_KIND!r}")
        enc = cls(**config)
        load_into(enc, load_safetensors(path), what=f"toy text encoder {path}")
        return enc


# ------------------------------------------------------------------------------------------------
# From the run config
# ------------------------------------------------------------------------------------------------


def text_encoder_from_config(cfg: Any, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                             dim: int | None = None, text_len: int | None = None) -> TextEncoder:
    """Build the encoder named by ``cfg`` (a :class:`causvid.config.TextConfig`).

    * ``toy``: ``cfg.path`` (a file written by :meth:`ToyTextEncoder.save`) or, without one, the seeded
      encoder over the toy world's vocabulary (``dim`` / ``text_len`` default to 64 / 16).
    * ``umt5``: the official weights ``cfg.path`` + tokenizer folder ``cfg.tokenizer_path``; computes in
      ``dtype``, else ``cfg.dtype`` (``text.dtype``), else bf16 (the official file's dtype).
    * ``tiny-umt5``: the ``tiny`` umT5 size; weights from ``cfg.path`` or seeded random; float32 default.

    ``dim`` / ``text_len``, when given, must match what the DiT expects (checked, or used to size the
    seeded toy encoder). ``cfg.offload_after_encode`` is for the caller: call ``release()`` after encoding.
    """
    kind = cfg.kind
    if kind == "toy":
        if cfg.path:
            enc: TextEncoder = ToyTextEncoder.load(cfg.path)
        else:
            enc = ToyTextEncoder(dim=dim or 64, text_len=text_len or 16)
        enc = enc.to(device)
    elif kind in ("umt5", "tiny-umt5"):
        arch = "umt5-xxl" if kind == "umt5" else "tiny"
        if not cfg.tokenizer_path:
            raise ValueError(f"config key 'text.tokenizer_path' is required for text.kind={kind!r} "
                             "(a folder with tokenizer.json, e.g. google/umt5-xxl)")
        if kind == "umt5" and not cfg.path:
            raise ValueError("config key 'text.path' is required for text.kind='umt5' "
                             "(models_t5_umt5-xxl-enc-bf16.pth)")
        dt = dtype or (getattr(torch, cfg.dtype) if cfg.dtype else torch.bfloat16 if kind == "umt5" else torch.float32)
        if cfg.path:
            enc = UMT5TextEncoder.from_files(cfg.path, cfg.tokenizer_path, arch, dtype=dt, device=device,
                                             text_len=text_len)
        else:
            enc = UMT5TextEncoder.random(cfg.tokenizer_path, arch, dtype=dt, device=device, text_len=text_len)
    else:
        raise ValueError(f"invalid value for config key 'text.kind': {kind!r}; valid: ['toy', 'umt5', 'tiny-umt5']")
    if dim is not None and enc.dim != dim:
        raise ValueError(f"text encoder {kind!r} outputs dim {enc.dim} but the model expects text_dim {dim}")
    if text_len is not None and enc.text_len != text_len:
        raise ValueError(f"text encoder {kind!r} pads to {enc.text_len} tokens but the model expects text_len {text_len}")
    return enc
