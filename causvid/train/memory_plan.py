"""Per-device memory plan of a training run, before anything is built (``--dry-run``; docs/memory_plan.md).

``plan_memory(cfg, launch)`` sums, per device, what the resolved config and the launch setup (world size,
FSDP2 or not, CUDA or CPU) put in memory, from the networks' real shapes:

* **weights** of every network the stage builds (generator / model, critic, frozen teacher, the text
  encoder when kept resident, the VAE when used), counted on the meta device from the real classes;
  trainables are fp32 (the stages load them so), the teacher is in ``model.dtype``; under FSDP2 every
  DiT is sharded (``1 / world`` per device), the text encoder and VAE are replicated;
* **gradients** (fp32, of the network being updated: the trainer frees them after each update) and
  **AdamW moments** (two fp32 tensors per trainable parameter), sharded under FSDP2;
* **activations** saved for the backward pass, per DiT block from the block's shapes (the table of
  :func:`block_activation_bytes`), with and without per-block activation checkpointing;
* **transients**: one block's working set, the parameters FSDP2 gathers around a block, the bf16 weight
  copies autocast keeps (single device / DDP with fp32 weights), DDP's gradient buckets, AdamW's step
  workspace (CUDA's foreach kernels), the KV cache of backward simulation;
* **setup**: without FSDP2 the stages load every network whole on the device, and build the text encoder
  there to encode the negative prompt; under FSDP2 on GPUs they build the networks on the host and the trainer
  shards them, so the device holds the text encoder, then the shards + one unit being sharded (the whole
  networks are a host-memory line, not part of the device peak); that is a second peak;
* **sampling** (the exported student with its KV caches) as its own, informational, section.

On the CPU (``--plan-device cpu``, the rehearsal: the host is the device, its peak is the process's RSS) three
things differ from a GPU, each modelled from what the process really does (docs/memory_plan.md, "CPU launches"):

* **mapped weight files are read lazily**: the loaders map safetensors / ``.pth`` files and ``load_into`` assigns
  the mapped tensors when the file holds the dtype the network is loaded in, so a network costs nothing until it is
  read: one process reads it at its first forward (then it is the "weights" line), an FSDP2 rank reads its
  ``1 / W`` of each tensor while ``fully_shard`` chunks it (:func:`_reads_mapped`). A network whose file holds
  another dtype (or whose file cannot be read) is converted whole at load time;
* **glibc keeps its heap**: with the default, dynamic mmap threshold, the parameters FSDP2 all-gathers for a forward
  (up to 32 MiB each, and larger ones where a free heap block fits them) come from the heap; freed after each unit,
  they stay resident (the heap shrinks only from its top) and the moments allocated at the first optimizer step
  partly fill and partly extend it, so the next all-gather needs new memory: the plan counts the gathered parameters
  once more (not when ``MALLOC_MMAP_THRESHOLD_`` fixes the threshold: freed blocks then go back to the system);
* the reserve is :data:`CPU_RUNTIME` (libraries paged in and their state, measured) instead of the CUDA reserve.

The plan is an estimate (what the caching allocator and CUDA context add is a fixed reserve, not a
measurement); docs/wan2.1.md states how far it is from the measured peak of the CPU rehearsal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from causvid.config import ConfigError
from causvid.models.registry import DiTConfig, dit_config

__all__ = ["LaunchSetup", "MemoryPlan", "PlanLine", "parse_memory_size", "plan_memory", "block_activation_bytes",
           "root_activation_bytes", "dit_param_counts", "add_arguments", "launch_from_args", "dry_run_plan",
           "plan_ode_pairs", "print_plan"]

GiB = 1024 ** 3
_UNITS = {"": None, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2, "mib": 1024 ** 2,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1024 ** 4, "tb": 1024 ** 4, "tib": 1024 ** 4}
# CUDA context, cuBLAS / NCCL workspaces and the caching allocator's slack: a fixed reserve on GPUs (assumption)
CUDA_RESERVE = int(1.5 * GiB)
# What a CPU process holds above its import baseline once it has run training steps, beside its tensors: the
# libraries' code paged in by the first forward / backward / AdamW step (file-backed, ~0.09 GiB) and their lazily
# built state (thread pools, kernel caches, autograd; anonymous, ~0.08 GiB). Measured (scripts/measure_peak_rss.py's
# RSS, 2-core EPYC, torch 2.14.1): 0.165 GiB for a tiny DiT, 0.185 GiB at Wan2.1-1.3B widths (2 layers), whatever the
# allocator settings; tests/test_memory_plan.py re-measures it on a tiny DiT. The CPU plans' reserve.
CPU_RUNTIME = int(0.17 * GiB)
# the glibc variables that fix malloc's mmap threshold (no dynamic threshold: freed blocks above it are unmapped)
_MALLOC_FIXED = ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------------------------ inputs
def parse_memory_size(text: str) -> int:
    """``"80GB"`` / ``"80 GiB"`` / ``"141G"`` / ``"24000MB"`` -> bytes. GB and GiB both mean 2^30 bytes (GPU
    memory is quoted in binary units: an "80GB" H100 has 80 GiB). Raises ValueError with a one-line message."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or _UNITS[unit] is None or float(m.group(1)) <= 0:
        raise ValueError(f"--device-memory {text!r}: expected a positive size with a unit, e.g. 80GB, 141GiB "
                         "or 24000MB")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class LaunchSetup:
    """How a run is launched: processes, FSDP2 or not, and what computes (``cuda`` or ``cpu``)."""

    world_size: int = 1
    fsdp: bool = False
    device: str = "cuda"
    reshard_after_forward: bool = True
    source: str = "default"
    # glibc's mmap threshold fixed by the environment (MALLOC_MMAP_THRESHOLD_ / GLIBC_TUNABLES): freed heap blocks
    # above it go back to the system, so a CPU process does not keep its heap's high-water mark
    malloc_fixed: bool = False

    @property
    def shards(self) -> int:
        """How many ways a DiT's parameters, gradients and moments are split."""
        return self.world_size if self.fsdp and self.world_size > 1 else 1

    @property
    def ddp(self) -> bool:
        return self.world_size > 1 and not self.fsdp

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, device: str = "cuda") -> "LaunchSetup":
        """What ``accelerate launch`` / ``torchrun`` set: ``WORLD_SIZE``, ``ACCELERATE_USE_FSDP`` + ``FSDP_VERSION``."""
        world = int(env.get("WORLD_SIZE", "1"))
        fsdp = env.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if fsdp and env.get("FSDP_VERSION", "2") != "2":
            raise ConfigError("the launch asks for FSDP version 1; the trainer supports FSDP2 only (fsdp_version: 2)")
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
        return cls(world, fsdp, device, reshard, "environment" if "WORLD_SIZE" in env else "default",
                   malloc_fixed(env))

    @classmethod
    def from_accelerate_config(cls, path: str, device: str = "cuda") -> "LaunchSetup":
        """An accelerate YAML (``configs/accelerate/*.yaml``): ``num_processes``, ``distributed_type``, ``fsdp_config``."""
        from omegaconf import OmegaConf

        if not os.path.isfile(path):
            raise ConfigError(f"--launch-config {path!r}: no such file")
        node = OmegaConf.to_container(OmegaConf.load(path))
        fsdp_cfg = node.get("fsdp_config") or {}
        fsdp = str(node.get("distributed_type", "NO")).upper() == "FSDP"
        if fsdp and int(fsdp_cfg.get("fsdp_version", 1)) != 2:
            raise ConfigError(f"--launch-config {path}: fsdp_version must be 2 (the trainer supports FSDP2 only)")
        return cls(int(node.get("num_processes", 1)), fsdp, device,
                   bool(fsdp_cfg.get("fsdp_reshard_after_forward", True)), path)


def malloc_fixed(env: Mapping[str, str]) -> bool:
    """Whether the environment fixes glibc malloc's mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536`` or
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``), which turns its dynamic threshold off."""
    return _MALLOC_FIXED[0] in env or _MALLOC_FIXED[1] in env.get("GLIBC_TUNABLES", "")


# ------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class DiTCounts:
    total: int
    block: int  # parameters of one DiTBlock
    root: int  # everything outside the blocks (embeddings, time projection, head)


def dit_param_counts(d: DiTConfig) -> DiTCounts:
    """Parameter counts of the real :class:`WanDiT` built on the meta device (no memory allocated)."""
    import torch

    from causvid.models.dit import WanDiT

    with torch.device("meta"):
        one = WanDiT(d.replace(num_layers=1))
    block = sum(p.numel() for p in one.blocks[0].parameters())
    root = sum(p.numel() for p in one.parameters()) - block
    return DiTCounts(root + d.num_layers * block, block, root)


def _file_tensors(path: str) -> Optional[dict[str, tuple[tuple[int, ...], str]]]:
    """Name -> (shape, dtype) of a weight file, read from its header (safetensors) or lazily (``.pth`` with
    ``mmap=True``: no tensor data is read). None when the path is not a readable file."""
    if not path or not os.path.isfile(path):
        return None
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return {k: (tuple(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype())) for k in f.keys()}
        import torch

        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in sd.items() if hasattr(v, "shape")}
    except Exception:  # an unreadable file is the loader's to report; the plan falls back to the named size
        return None


_FILE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "torch.float32": "float32",
                "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def dit_file_dtypes(path: str) -> Optional[set[str]]:
    """The dtypes a DiT's weight file(s) hold (``float32`` ...), from the headers: our export folder or file, an
    official folder (single or sharded safetensors, also diffusers' ``transformer/``). None when unreadable."""
    from causvid.models.weights import find_weight_files

    try:
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "model.safetensors")) and not os.path.isfile(
                    os.path.join(path, "config.json")):
                path = os.path.join(path, "model.safetensors")  # an export folder (stages.resolve_dit_path)
            else:
                folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "transformer")
                path = find_weight_files(folder)
        files = [path]
        if path.endswith(".json"):
            with open(path) as f:
                files = [os.path.join(os.path.dirname(path), s) for s in sorted(set(json.load(f)["weight_map"].values()))]
        dtypes: set[str] = set()
        for fp in files:
            tensors = _file_tensors(fp)
            if tensors is None:
                return None
            dtypes |= {_FILE_DTYPES.get(dt, dt) for _, dt in tensors.values()}
        return dtypes
    except Exception:  # unreadable: the loader reports it; the plan assumes a conversion (every byte in memory)
        return None


def text_encoder_params(cfg, d: DiTConfig) -> tuple[int, str]:
    """(parameters, where the count comes from) of the text encoder ``cfg.text`` names."""
    tensors = _file_tensors(cfg.text.path) if cfg.text.path else None
    if tensors is not None:
        return sum(math.prod(s) for s, _ in tensors.values()), f"counted from {os.path.basename(cfg.text.path)}"
    import torch

    if cfg.text.kind == "toy":
        from causvid.models.text import ToyTextEncoder

        enc = ToyTextEncoder(dim=d.text_dim, text_len=d.text_len)  # tiny; built for real
        return sum(p.numel() for p in enc.parameters()), "toy encoder"
    from causvid.models.text import UMT5Encoder, umt5_arch

    arch = umt5_arch("umt5-xxl" if cfg.text.kind == "umt5" else "tiny")
    with torch.device("meta"):
        enc = UMT5Encoder(arch)
    return sum(p.numel() for p in enc.parameters()), f"named size ({arch.num_layers} layers, {arch.vocab_size} rows)"


def vae_params(cfg) -> int:
    import torch

    from causvid.models.vae import WanVAE, vae_arch

    with torch.device("meta"):
        vae = WanVAE(vae_arch(cfg.vae.size))
    return sum(p.numel() for p in vae.parameters())


# ------------------------------------------------------------------------------------ activations
def _attention_kind(cfg, launch: LaunchSetup, causal: bool) -> str:
    """How a block attends: ``full`` (SDPA, no mask), ``prefix`` (one unmasked SDPA per chunk over its key prefix:
    ``sdpa``), ``mask`` (SDPA with the chunk mask: ``sdpa_mask``), ``flex`` (FlexAttention)."""
    if not causal:
        return "full"
    backend = str(cfg.model.attention)
    if backend == "auto":
        backend = "flex" if launch.device == "cuda" else "sdpa"
    return {"flex": "flex", "sdpa_mask": "mask"}.get(backend, "prefix")


def block_activation_bytes(d: DiTConfig, batch: int, frames: int, tokens_per_frame: int, *, bf16: bool,
                           attention: str = "full") -> int:
    """Bytes one :class:`DiTBlock` saves for backward (grad mode), from its shapes.

    With ``N = B L`` tokens (``L = F' S`` per sample), width ``D``, FFN width ``Fd``, ``H`` heads, text rows
    ``Lc`` (= ``text_len``), ``F'`` latent frames; fp32 (``bf16=False``) or bf16 autocast over fp32
    weights (``bf16=True``; FSDP2's bf16 parameters give the same set)::

        tensor class                                  fp32                bf16 autocast
        [N, D] (norm inputs and outputs, q/k/v        22 x 4 B            10 x 4 B + 14 x 2 B
          before and after RMSNorm / RoPE, attention
          outputs, modulated and gated branches)
        [N, Fd] (GELU input and output)               2 x 4 B             2 x 2 B
        [B, Lc, D] (cross-attention K/V side)         4 x 4 B             1 x 4 B + 3 x 2 B
        [N] norm statistics, [B, H, L] log-sum-exp    (9 + 2 H) x 4 B     (9 + 2 H) x 4 B
        [B, Lc] RMSNorm statistic                     4 B                 4 B
        [B, F', D] per-frame modulation               8 x 4 B             8 x 4 B
        [L, L] chunk mask (``attention="mask"``)      4 B                 2 B
        [N, D] concatenated chunk outputs             4 B                 2 B
          (``attention="prefix"``, > 1 chunk: the
          per-chunk outputs and their concatenation,
          the output projection's input, are both kept)

    FlexAttention (``attention="flex"``, CUDA) saves its own padded copies of q, k, v and the output
    (``Lp`` = L rounded up to 128) and its log-sum-exp instead of the four unpadded ones, plus the output
    projection's input copy. The table was read off ``torch.autograd.graph.saved_tensors_hooks`` on the real
    block (tests/test_memory_plan.py checks it exactly for fp32 and bf16, with and without the mask).
    """
    B, D, Fd, H, Lc = batch, d.dim, d.ffn_dim, d.num_heads, d.text_len
    L = frames * tokens_per_frame
    N = B * L
    if bf16:
        tokens, ffn, ctx, e = N * D * (10 * 4 + 14 * 2), N * Fd * 2 * 2, B * Lc * D * (4 + 3 * 2), 2
    else:
        tokens, ffn, ctx, e = N * D * 22 * 4, N * Fd * 2 * 4, B * Lc * D * 4 * 4, 4
    small = 4 * N * (9 + 2 * H) + 4 * B * Lc + 4 * B * frames * 8 * D
    total = tokens + ffn + ctx + small
    if attention == "mask":
        total += L * L * e
    elif attention == "prefix":
        total += N * D * e
    elif attention == "flex":
        Lp = -(-L // 128) * 128
        total += -4 * N * D * e - 4 * B * H * L + 4 * B * Lp * D * e + 4 * B * H * Lp + N * D * e
    return total


def root_activation_bytes(d: DiTConfig, batch: int, frames: int, tokens_per_frame: int, height: int, width: int,
                          *, bf16: bool) -> int:
    """Bytes saved for backward outside the blocks: the latent input (``height x width`` latent pixels), time and
    text embeddings, the head, and the tensors every block shares (embedded context, RoPE angles)."""
    B, D, Lc = batch, d.dim, d.text_len
    L = frames * tokens_per_frame
    N = B * L
    e = 2 if bf16 else 4
    latent = B * frames * d.patch_size[0] * d.in_dim * height * width * e  # [B, F, C, h, w]
    time = B * frames * (d.freq_dim + 4 * D) * 4 + B * frames * D * 4
    text = B * Lc * (d.text_dim + 2 * D) * e + B * Lc * D * e  # + the embedded context the blocks share
    head = N * D * (4 + 4 + e) + N * 8
    rope = L * d.head_dim * 4
    return latent + time + text + head + rope


@dataclass(frozen=True)
class Activations:
    """Saved-for-backward bytes of one grad-mode forward of a DiT, and one block's working set."""

    full: int  # no checkpointing: root + every block
    checkpointed: int  # root + each block's input (fp32) + one block recomputed during backward
    block: int  # one block's saved set (also used as its transient working set)


def dit_activations(d: DiTConfig, batch: int, latent: tuple[int, int, int, int], *, bf16: bool,
                    attention: str) -> Activations:
    F, _, h, w = latent
    Fp, S = F // d.patch_size[0], (h // d.patch_size[1]) * (w // d.patch_size[2])
    blk = block_activation_bytes(d, batch, Fp, S, bf16=bf16, attention=attention)
    root = root_activation_bytes(d, batch, Fp, S, h, w, bf16=bf16)
    inputs = d.num_layers * batch * Fp * S * d.dim * 4  # the fp32 residual stream entering each block
    return Activations(root + d.num_layers * blk, root + inputs + blk, blk)


# ------------------------------------------------------------------------------------------- plan
@dataclass
class PlanLine:
    section: str  # "resident" | "update" | "setup" | "save" | "host" | "sampling"
    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    launch: LaunchSetup
    stage: str
    lines: list[PlanLine] = field(default_factory=list)
    peaks: dict[str, int] = field(default_factory=dict)  # "train (checkpointing on / off)", "setup", "save / export (rank 0)"
    checkpointing: bool = False
    reserve: int = 0
    device_memory: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    def add(self, section: str, name: str, nbytes: int, note: str = "") -> int:
        self.lines.append(PlanLine(section, name, int(nbytes), note))
        return int(nbytes)

    @property
    def counted(self) -> list[str]:
        """The peaks the run reaches: setup and the training step at the config's checkpointing."""
        if "teacher sampling" in self.peaks:
            return ["teacher sampling"]
        return ["setup", "train (checkpointing on)" if self.checkpointing else "train (checkpointing off)",
                *(["save / export (rank 0)"] if "save / export (rank 0)" in self.peaks else [])]

    @property
    def peak(self) -> int:
        """The run's per-device peak: the largest counted peak + the reserve."""
        return max(self.peaks[k] for k in self.counted) + self.reserve

    @property
    def fits(self) -> Optional[bool]:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def to_json(self) -> dict[str, Any]:
        return {
            "memory_plan": {
                "stage": self.stage, "world_size": self.launch.world_size, "fsdp": self.launch.fsdp,
                "device": self.launch.device, "checkpointing": self.checkpointing,
                "lines": [{"section": x.section, "name": x.name, "bytes": x.bytes} for x in self.lines],
                "peaks": dict(self.peaks), "reserve": self.reserve, "peak": self.peak,
                "device_memory": self.device_memory, "fits": self.fits,
            }
        }

    def table(self) -> str:
        la = self.launch
        dist = f"FSDP2 x{la.world_size}" if la.shards > 1 else f"DDP x{la.world_size}" if la.ddp else "1 process"
        if self.stage == "ode_pairs":
            dist = f"{la.world_size} process(es), each with the whole teacher"
        out = [f"memory plan per device: stage {self.stage}, {dist}, {la.device} (launch from {la.source})",
               f"{'':2}{'item':<64}{'GiB':>9}  note"]
        titles = {"resident": "resident for the whole run",
                  "update": "transient in the largest update",
                  "setup": "setup: networks built and sharded, text encoder encoding the negative prompt",
                  "save": "checkpoint save / export (rank 0; the host is the device)",
                  "host": "host memory (informational; not part of the device peak)",
                  "sampling": "sampling with the exported student (not part of training)"}
        for sec in ("resident", "update", "setup", "save", "host", "sampling"):
            rows = [x for x in self.lines if x.section == sec]
            if rows:
                out.append(f"{titles[sec]}:")
                out += [f"  {x.name:<64}{x.bytes / GiB:>9.2f}  {x.note}" for x in rows]
        out.append("peaks:")
        for k, v in self.peaks.items():
            mark = " <- this config" if k in self.counted and k.startswith("train") else ""
            out.append(f"  {k:<64}{v / GiB:>9.2f}{mark}")
        if self.reserve:
            what = ("+ CUDA context / allocator reserve" if la.device == "cuda"
                    else "+ CPU runtime (libraries paged in, their state; measured)")
            out.append(f"  {what:<64}{self.reserve / GiB:>9.2f}")
        out.append(f"  {'per-device peak':<64}{self.peak / GiB:>9.2f}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"{verdict} in {_human(self.device_memory)} ({_human(self.device_memory - self.peak)} to spare)")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def _human(n: int) -> str:
    """Bytes as GiB (or MiB below 1 GiB), signed when negative."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 1024 ** 2:.2f} MiB"


@dataclass(frozen=True)
class _Net:
    name: str
    params: int
    dtype: str
    trainable: bool
    dit: Optional[DiTConfig] = None  # DiTs are sharded under FSDP2; other networks are replicated
    path: str = ""  # the weight file / folder it is loaded from ("" when built from scratch)


def _reads_mapped(net: _Net) -> bool:
    """Whether loading ``net`` leaves its weights as mapped file pages (read when touched): its file holds exactly
    the dtype it is loaded in (``load_into`` then assigns the mapped tensors; another dtype is converted, into new
    memory, at load time). False for a network built from scratch or a file the plan cannot read."""
    return bool(net.path) and dit_file_dtypes(net.path) == {net.dtype}


def _nbytes(params: int, dtype: str) -> int:
    return params * _DTYPE_BYTES[dtype]


def _stage_roles(cfg) -> dict[str, Any]:
    """What the stage of ``cfg`` builds (mirrors causvid/train/stages.py; tests/test_memory_plan.py checks the
    two agree): trainables, frozen teacher, text encoder (resident / only at setup / none), VAE, grad forwards."""
    stage, src = str(cfg.train.stage), str(cfg.data.source)
    previews = int(cfg.train.sample_every) > 0 and bool(cfg.vae.path) and os.path.exists(str(cfg.vae.path))
    dmd = stage == "dmd" and cfg.dmd.teacher != "none"
    if stage in ("teacher", "causal_teacher"):
        on_the_fly = src in ("toyworld", "videos")
        text_built = float(cfg.train.cond_dropout) > 0 or on_the_fly or previews
        return dict(trainables=["model"], teacher=False, text_built=text_built, text_resident=on_the_fly,
                    vae=on_the_fly or previews, causal=stage == "causal_teacher", backward_sim=False)
    if not dmd:  # ODE regression (also dmd.teacher = none)
        return dict(trainables=["generator"], teacher=False, text_built=previews, text_resident=False,
                    vae=previews, causal=True, backward_sim=False)
    on_the_fly = src in ("toyworld", "videos", "prompts")
    gi = str(cfg.dmd.generator_input)
    return dict(trainables=["generator", "critic"], teacher=True, text_built=True, text_resident=on_the_fly,
                vae=(on_the_fly and gi == "data") or previews, causal=True, score_causal=cfg.dmd.teacher == "causal",
                backward_sim=gi == "backward_simulation")


def plan_memory(cfg, launch: LaunchSetup = LaunchSetup(), *, device_memory: Optional[int] = None) -> MemoryPlan:
    """The per-device memory plan of ``cfg`` (a resolved, validated config) under ``launch`` (module docstring)."""
    from causvid.ode_pairs import latent_shape_from_config

    d = dit_config(cfg.model.size, cfg.model.num_layers)
    counts = dit_param_counts(d)
    roles = _stage_roles(cfg)
    W = launch.shards
    bf16 = str(cfg.train.mixed_precision) == "bf16"
    plan = MemoryPlan(launch, str(cfg.train.stage), checkpointing=bool(cfg.model.gradient_checkpointing),
                      reserve=CUDA_RESERVE if launch.device == "cuda" else CPU_RUNTIME, device_memory=device_memory)
    B = int(cfg.train.batch_size)
    latent = latent_shape_from_config(cfg)  # [F, C, h, w]

    init_from, teacher_path = str(cfg.train.init_from or ""), str(cfg.train.teacher_path or "")
    lora_on = int(cfg.model.lora.rank) > 0  # adapters on shared bases (causvid/train/lora.py): not modelled as mapped
    nets = [_Net(n, counts.total, "float32", True, d,
                 "" if lora_on else (teacher_path if n == "critic" else init_from)) for n in roles["trainables"]]
    if roles["teacher"]:
        nets.append(_Net("teacher", counts.total, str(cfg.model.dtype), False, d, "" if lora_on else teacher_path))
    text_params, text_src = text_encoder_params(cfg, d) if roles["text_built"] else (0, "")
    text_dtype = str(cfg.text.dtype or ("bfloat16" if cfg.text.kind == "umt5" else "float32"))
    text = _Net("text encoder", text_params, text_dtype, False)
    vae = _Net("VAE", vae_params(cfg), "float32", False) if roles["vae"] else None

    # -- resident for the whole run
    shard_note = f"1/{W} (FSDP2)" if W > 1 else "whole"
    resident = 0
    for n in nets:
        what = "trainable fp32" if n.trainable else f"frozen {n.dtype}"
        resident += plan.add("resident", f"weights: {n.name}", _nbytes(n.params, n.dtype) // W,
                             f"{n.params / 1e9:.3f}B params, {what}, {shard_note}")
    trainable = [n for n in nets if n.trainable]
    resident += plan.add("resident", "AdamW moments (exp_avg, exp_avg_sq)",
                         sum(2 * _nbytes(n.params, "float32") for n in trainable) // W,
                         f"2 x fp32 x {'+'.join(n.name for n in trainable)}, {shard_note}")
    if roles["text_resident"]:
        resident += plan.add("resident", "weights: text encoder (encodes prompts in the loop)",
                             _nbytes(text.params, text.dtype), f"{text.params / 1e9:.3f}B params, {text.dtype}, {text_src}")
    if vae is not None:
        resident += plan.add("resident", "weights: VAE", _nbytes(vae.params, "float32"),
                             f"{vae.params / 1e6:.0f}M params fp32; its encode/decode workspace is not modelled")

    # -- the largest update: gradients + activations + transients
    grads = max(_nbytes(n.params, "float32") for n in trainable) // W
    act_kind = _attention_kind(cfg, launch, roles["causal"])
    score_kind = _attention_kind(cfg, launch, roles.get("score_causal", False))
    # the network trained with the larger saved set: generator/model (causal) or critic (score layout)
    acts = dit_activations(d, B, latent, bf16=bf16, attention=act_kind)
    if "critic" in roles["trainables"]:
        crit = dit_activations(d, B, latent, bf16=bf16, attention=score_kind)
        acts = max(acts, crit, key=lambda a: a.full)
    plan.add("update", "gradients (the network being updated)", grads, f"fp32, {shard_note}")
    plan.add("update", "activations, checkpointing off", acts.full,
             f"{d.num_layers} blocks x {acts.block / GiB:.3f} GiB + root; batch {B}, latent {list(latent)}, "
             f"{'bf16 autocast' if bf16 else 'fp32'}, attention {act_kind}")
    plan.add("update", "activations, checkpointing on", acts.checkpointed,
             f"{d.num_layers} fp32 block inputs + 1 block recomputed + root")
    work = plan.add("update", "one block's working set (forward / backward)", acts.block, "a block's saved set again")
    extra = 0
    if W > 1:
        unsharded = (counts.root + 2 * counts.block) * (2 if bf16 else 4) + counts.block * 4
        extra += plan.add("update", "FSDP2: gathered root + 2 blocks, 1 block's grads", unsharded,
                          f"{'bf16' if bf16 else 'fp32'} parameters, fp32 gradients before reduce-scatter")
    elif bf16:
        extra += plan.add("update", "autocast bf16 copies of fp32 trainable weights",
                          sum(_nbytes(n.params, "bfloat16") for n in trainable),
                          "cached for the whole loss (weights of every trainable used in it)")
    if launch.ddp:
        extra += plan.add("update", "DDP gradient buckets", grads, "a second copy of the gradients")
    if roles["backward_sim"]:
        F, _, h, w = latent
        S = (h // d.patch_size[1]) * (w // d.patch_size[2])
        kv = 2 * d.num_layers * B * F * S * d.dim * 4 + 2 * d.num_layers * B * d.text_len * d.dim * 4
        extra += plan.add("update", "KV + cross-attention caches (backward simulation)", kv,
                          "fp32 (the generator's parameter dtype), every latent frame")
    if launch.device == "cpu" and W > 1 and not launch.malloc_fixed:
        retained = plan.add("update", "glibc heap kept after FSDP2's gathered parameters are freed",
                            (counts.root + 2 * counts.block) * (2 if bf16 else 4),
                            "root + 2 blocks again: freed heap blocks stay resident (glibc default; not with "
                            "MALLOC_MMAP_THRESHOLD_)")
    else:
        retained = 0
    step_ws = (max(_nbytes(n.params, "float32") for n in trainable) // W if launch.device == "cuda"
               else 2 * d.ffn_dim * d.dim * 4)
    opt_moment = resident + retained + grads + step_ws
    plan.add("update", "AdamW step workspace", step_ws,
             "foreach sqrt(exp_avg_sq) of one network (CUDA)" if launch.device == "cuda"
             else "per-tensor temporaries of the largest tensor (CPU for-loop AdamW)")
    accum = int(cfg.train.grad_accum) > 1

    def backward_peak(saved: int) -> int:
        # the backward frees block activations as it writes block gradients: max(saved, grads) + one block's
        # working set (both together with gradient accumulation, whose earlier micro-batches left gradients)
        return resident + retained + extra + work + (saved + grads if accum else max(saved, grads))

    plan.peaks["train (checkpointing off)"] = max(backward_peak(acts.full), opt_moment)
    plan.peaks["train (checkpointing on)"] = max(backward_peak(acts.checkpointed), opt_moment)

    # -- checkpoint save / export under FSDP2: rank 0 gathers full state dicts on the host. A checkpoint gathers them one
    #    at a time (causvid/train/checkpoint.py save_checkpoint releases each once written), the largest being one
    #    network's AdamW moments (2 x fp32 whole); the export (trainer._export_modules) holds every trainable's full
    #    weights (fp32) at once. On a CPU launch the host is the device: a peak of rank 0 over its resident memory; on
    #    GPUs a host line.
    if W > 1:
        full_state = max(max(2 * _nbytes(n.params, "float32") for n in trainable),
                         sum(_nbytes(n.params, "float32") for n in trainable))
        if launch.device == "cpu":
            plan.add("save", "full state on rank 0 (one AdamW state / every trainable's weights)", full_state,
                     "the larger of a checkpoint's 2 x fp32 whole of one network and the export's fp32 trainables")
            plan.peaks["save / export (rank 0)"] = resident + retained + full_state
        else:
            plan.add("host", "save / export: full state on rank 0's host", full_state,
                     "one network's AdamW state (checkpoint) or every trainable's weights (export), fp32")

    # -- setup. Text encoder (and VAE) are built on the device by stage.setup, the encoder encodes the negative prompt
    #    and is released unless it encodes prompts in the loop.
    text_setup = 0
    if roles["text_built"]:
        text_setup = plan.add("setup", "text encoder" + ("" if roles["text_resident"] else " (released after encoding)"),
                              _nbytes(text.params, text.dtype),
                              f"{text.params / 1e9:.3f}B params, {text.dtype}, {text_src}")
    vae_setup = plan.add("setup", "VAE", _nbytes(vae.params, "float32")) if vae is not None else 0
    resident_text = text_setup if roles["text_resident"] else 0
    whole_host = sum(_nbytes(n.params, n.dtype) for n in nets)
    if W > 1 and launch.device == "cuda":
        # FSDP2 on GPUs: the stages build every DiT on the host (parallel.weights_device); the trainer shards one network
        # after the other, fully_shard moving one unit (a block, then the root's own parameters) to the device, chunking
        # it and dropping the whole unit. The device holds the shards made so far + one unit whole.
        shards = 0
        for n in nets:
            shards += plan.add("setup", f"{n.name} (shard)", _nbytes(n.params, n.dtype) // W, f"1/{W}, made on the device")
        unit = plan.add("setup", "one unit whole while fully_shard moves and chunks it",
                        max(counts.block, counts.root) * max(_DTYPE_BYTES[n.dtype] for n in nets),
                        "the largest of a block and the root's own parameters")
        plan.peaks["setup"] = vae_setup + max(text_setup, shards + unit + resident_text)
        plan.add("host", "every network whole on the host before sharding (per process)", whole_host,
                 "CPU RAM of each process while the trainer shards; a node holds it once per process "
                 "(less where the files' pages are shared: networks stored in the dtype they are loaded in)")
    elif launch.device == "cpu" and not launch.ddp:
        # the CPU rehearsal (the host is the device): networks whose file holds their dtype stay mapped file pages until
        # read (_reads_mapped); the others are converted whole at load. The text encoder encodes the negative prompt
        # before anything is sharded or run, so its phase holds only the converted networks. One process reads a
        # mapped network at its first forward (the training step's "weights"); under FSDP2 the trainer shards one
        # network after the other (trainables, then the teacher), each rank reading its 1/W of every tensor of a
        # mapped network, whose pages are released once its shards are made (the trainer keeps no reference).
        mapped = {n.name: _reads_mapped(n) for n in nets}
        converted = 0
        for n in nets:
            if mapped[n.name]:
                plan.add("setup", f"{n.name} (mapped file, read {'while sharded' if W > 1 else 'at the first forward'})",
                         0, f"{os.path.basename(os.path.normpath(n.path))} holds {n.dtype}: nothing read at load")
            else:
                converted += plan.add("setup", f"{n.name} (whole)", _nbytes(n.params, n.dtype),
                                      "built or converted at load" if n.path else "built from scratch")
        phases = [converted + text_setup]
        if W > 1:
            made, whole_left = 0, converted
            for n in nets:
                shard = plan.add("setup", f"{n.name} (shard)", _nbytes(n.params, n.dtype) // W, f"1/{W}")
                if mapped[n.name]:
                    held = plan.add("setup", f"{n.name}: its 1/{W} of the mapped file, read while sharding",
                                    _nbytes(n.params, n.dtype) // W)
                else:
                    held = 0  # its whole converted weights are in whole_left until its shards are made
                phases.append(made + shard + held + whole_left + resident_text)
                made += shard
                whole_left -= 0 if mapped[n.name] else _nbytes(n.params, n.dtype)
        plan.peaks["setup"] = vae_setup + max(phases)
    else:
        # one device (or DDP, whose broadcast from rank 0 writes every parameter): every network whole on the device,
        # then the text encoder built there.
        whole = 0
        for n in nets:
            whole += plan.add("setup", f"{n.name} (whole)", _nbytes(n.params, n.dtype))
        plan.peaks["setup"] = whole + vae_setup + text_setup
    if W > 1 and plan.peaks["setup"] > plan.peaks["train (checkpointing on)"]:
        plan.notes.append("the setup peak dominates: the text encoder is built whole on every device to encode the "
                          "negative prompt (causvid/train/stages.py _setup_conditioning)")

    # -- sampling with the exported student (informational)
    _sampling_lines(plan, cfg, d, counts)
    return plan


def plan_ode_pairs(cfg, launch: LaunchSetup = LaunchSetup(), *, batch_size: Optional[int] = None,
                   device_memory: Optional[int] = None) -> MemoryPlan:
    """``scripts/build_ode_pairs.py``: every process holds the whole frozen teacher (``model.dtype``) and the text
    encoder, and runs no-grad forwards (CFG branches one after the other) on ``batch_size`` videos; one block's
    saved-set size bounds a no-grad block's working set. Trajectory states go to the CPU as they are produced."""
    from causvid.ode_pairs import latent_shape_from_config

    d = dit_config(cfg.model.size, cfg.model.num_layers)
    counts = dit_param_counts(d)
    plan = MemoryPlan(launch, "ode_pairs", reserve=CUDA_RESERVE if launch.device == "cuda" else 0,
                      device_memory=device_memory)
    B = int(batch_size or cfg.train.batch_size)
    text_params, text_src = text_encoder_params(cfg, d)
    text_dtype = str(cfg.text.dtype or ("bfloat16" if cfg.text.kind == "umt5" else "float32"))
    total = plan.add("resident", "weights: teacher", _nbytes(counts.total, str(cfg.model.dtype)),
                     f"{counts.total / 1e9:.3f}B params, frozen {cfg.model.dtype}, whole on every process")
    total += plan.add("resident", "weights: text encoder", _nbytes(text_params, text_dtype),
                      f"{text_params / 1e9:.3f}B params, {text_dtype}, {text_src}")
    acts = dit_activations(d, B, latent_shape_from_config(cfg), bf16=str(cfg.model.dtype) == "bfloat16",
                           attention="full")
    total += plan.add("update", "one block's working set (no-grad forward)", acts.block, f"batch {B}")
    plan.peaks = {"teacher sampling": total}
    return plan


def _sampling_lines(plan: MemoryPlan, cfg, d: DiTConfig, counts: DiTCounts) -> None:
    """CausalSampler at ``sampler.num_frames``: student weights (``model.dtype``), KV caches, cross caches."""
    from causvid.models.vae import vae_arch

    a = vae_arch(cfg.vae.size)
    n = int(cfg.sampler.num_frames)
    F = 1 + (n - 1) // a.temporal_factor
    S = (cfg.data.height // a.spatial_factor // d.patch_size[1]) * (cfg.data.width // a.spatial_factor // d.patch_size[2])
    k = int(cfg.model.chunk_size)
    win = int(cfg.sampler.window_chunks)
    cap = F if win == 0 else min(F, (int(cfg.sampler.sink_chunks) + win) * k)
    branches = 2 if float(cfg.sampler.guidance) != 1.0 else 1
    e = _DTYPE_BYTES[str(cfg.model.dtype)]
    plan.add("sampling", "student weights", _nbytes(counts.total, str(cfg.model.dtype)), f"{cfg.model.dtype}, whole")
    plan.add("sampling", "KV cache", branches * 2 * d.num_layers * cap * S * d.dim * e,
             f"{branches} branch(es) x K,V x {d.num_layers} layers x {cap} frames x {S} tokens")
    plan.add("sampling", "cross-attention cache", branches * 2 * d.num_layers * d.text_len * d.dim * e)


# -------------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    """The ``--dry-run`` plan's options on a trainer's argument parser."""
    g = p.add_argument_group("memory plan (with --dry-run)")
    g.add_argument("--device-memory", help="device size to check the plan against, e.g. 80GB (GB = GiB)")
    g.add_argument("--num-processes", type=int, help="processes of the launch (default: WORLD_SIZE or 1)")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="FSDP2 (--fsdp) or DDP (--no-fsdp) when --num-processes > 1 (default: the launch's)")
    g.add_argument("--launch-config", help="an accelerate config YAML to read the launch from (configs/accelerate/)")
    g.add_argument("--plan-device", choices=("cuda", "cpu"), default="cuda",
                   help="what the run computes on (cpu: the rehearsal; default cuda)")


def launch_from_args(args, env: Mapping[str, str] = os.environ) -> LaunchSetup:
    """The launch: ``--launch-config`` file, else the launcher's environment, then ``--num-processes`` / ``--fsdp``."""
    device = getattr(args, "plan_device", "cuda") or "cuda"
    base = (LaunchSetup.from_accelerate_config(args.launch_config, device) if getattr(args, "launch_config", None)
            else LaunchSetup.from_env(env, device))
    world = base.world_size if getattr(args, "num_processes", None) is None else int(args.num_processes)
    if world < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {world}")
    fsdp = base.fsdp if getattr(args, "fsdp", None) is None else bool(args.fsdp)
    changed = world != base.world_size or fsdp != base.fsdp
    return LaunchSetup(world, fsdp, device, base.reshard_after_forward,
                       "command line" if changed else base.source, malloc_fixed(env))


def dry_run_plan_size(args) -> Optional[int]:
    """``--device-memory`` in bytes (None when absent); ConfigError with one line on bad input."""
    try:
        return parse_memory_size(args.device_memory) if getattr(args, "device_memory", None) is not None else None
    except ValueError as err:
        raise ConfigError(str(err)) from None


def dry_run_plan(cfg, args, env: Mapping[str, str] = os.environ) -> MemoryPlan:
    """Parse the plan's options (ConfigError with one line on bad input) and compute the plan."""
    return plan_memory(cfg, launch_from_args(args, env), device_memory=dry_run_plan_size(args))


def print_plan(plan: MemoryPlan) -> None:
    print(plan.table())
    print(json.dumps(plan.to_json(), sort_keys=True))


def main(argv=None) -> int:
    """``scripts/memory_plan.py``: the plan of a config without its files (weights need not be downloaded yet).

    The trainers' ``--dry-run`` prints the same plan after the full pre-flight pass (which needs the files).
    """
    import sys

    from causvid.config import load_config

    p = argparse.ArgumentParser(description="Per-device memory plan of a training config (docs/memory_plan.md)")
    p.add_argument("--config", help="run config YAML (deltas from causvid/config.py defaults)")
    add_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model.gradient_checkpointing=false")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, list(args.overrides))
        plan = dry_run_plan(cfg, args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_plan(plan)
    return 0
