"""Export a trained DiT in the layouts other tools read, with a model card.

``python scripts/export.py RUN_OR_FOLDER --format wan|diffusers|lora --out DIR`` (docs/export.md):

- ``wan``: the official layout, ``config.json`` (WanModel fields) + ``diffusion_pytorch_model.safetensors`` in the
  original names, as in ``Wan-AI/Wan2.1-T2V-1.3B`` (``wan_architecture.md`` §0);
- ``diffusers``: ``transformer/`` for ``diffusers.WanTransformer3DModel.from_pretrained`` (diffusers names,
  sharded with an index past ``max_shard_size``) and, when the run names its VAE, ``vae/`` for
  ``AutoencoderKLWan``;
- ``lora``: the student minus its base (the teacher) by truncated SVD, in the key format of the CausVid LoRA for
  Wan2.1 that ComfyUI and diffusers' ``WanPipeline.load_lora_weights`` read (:mod:`causvid.lora_extract`), with a
  ``lora_report.json`` of the relative reconstruction error per layer; a run trained with LoRA
  (``model.lora.rank``, :mod:`causvid.train.lora`) has its adapters in that format already: they are written as
  trained (exact, against the base they were trained on) unless ``--base`` / ``--rank`` / ``--energy`` ask for an SVD.

Both hold the run's ``config.yaml`` and a ``README.md`` model card. Fields that the official ``config.json`` does not
carry (``text_dim``, ``patch_size``, ... take constructor defaults there) are kept under ``_causvid`` (keys starting
with ``_`` are ignored by diffusers' ``ConfigMixin``), so our loaders read back any size exactly while the official
and diffusers code read the files of a Wan-sized model as their own.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from causvid.models.registry import DiTConfig
from causvid.models.weights import (
    SAFETENSORS_INDEX_SUFFIX,
    WeightsError,
    dit_to_diffusers_key,
    load_dit,
    save_safetensors,
)
from causvid.train.checkpoint import atomic_write_json

FORMATS = ("wan", "diffusers", "lora")
WEIGHTS_STEM = "diffusion_pytorch_model"
DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' save_pretrained default


class ExportError(ValueError):
    """An export that cannot be written as asked (the message says why)."""


@dataclass
class ExportSource:
    """What an export is made from: the trained DiT, its run config (if any) and where they came from."""

    model: torch.nn.Module
    config: Optional[Any]  # the run's DictConfig (config.yaml), None for a bare weights folder
    folder: str
    metrics: Optional[dict] = None  # the run's eval/metrics.json summary, when there is one
    lora: Optional[dict] = None  # filled by a LoRA export: its lora_report.json
    adapter: Optional[str] = None  # the trained peft adapters next to the weights (model.lora.safetensors), if any


def open_source(path: str) -> ExportSource:
    """A run folder (``<run>/final``), an export folder (``model.safetensors`` + ``config.yaml``), or any DiT
    weights our loader reads (an official or diffusers folder, our safetensors)."""
    from causvid.config import load_config

    if not os.path.exists(path):
        raise ExportError(f"nothing to export at {path}: no such file or folder")
    folder = path
    if os.path.isdir(os.path.join(path, "final")) and not os.path.isfile(os.path.join(path, "model.safetensors")):
        folder = os.path.join(path, "final")  # a run folder
    weights = os.path.join(folder, "model.safetensors")
    cfg_path = os.path.join(folder, "config.yaml")
    if os.path.isfile(weights):
        cfg = load_config(cfg_path) if os.path.isfile(cfg_path) else None
        model = load_dit(weights)
    else:
        cfg, model = None, load_dit(folder)
    metrics = None
    for m in (os.path.join(folder, "eval", "metrics.json"), os.path.join(os.path.dirname(folder), "eval", "metrics.json")):
        if os.path.isfile(m):
            with open(m) as f:
                metrics = json.load(f).get("summary")
            break
    from causvid.train.lora import adapter_path

    adapter = adapter_path(weights) if os.path.isfile(adapter_path(weights)) else None
    return ExportSource(model=model, config=cfg, folder=folder, metrics=metrics, adapter=adapter)


def _check_representable(cfg: DiTConfig) -> None:
    """Wan's and diffusers' DiT have a fixed RoPE base: a model with another cannot be written in their layouts."""
    if cfg.rope_theta != 10000.0:
        raise ExportError(f"rope_theta={cfg.rope_theta}: the Wan and diffusers DiTs fix it at 10000, so this model "
                          "cannot be exported in their layouts")


def wan_config(cfg: DiTConfig) -> dict:
    """``config.json`` of the official layout (``wan_architecture.md`` §0), plus ``_causvid`` (every field)."""
    _check_representable(cfg)
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "dim": cfg.dim,
            "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim,
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "eps": cfg.eps, "text_len": cfg.text_len,
            "_causvid": {"dit": cfg.to_dict()}}


def diffusers_config(cfg: DiTConfig) -> dict:
    """``transformer/config.json`` for ``WanTransformer3DModel`` (its constructor's arguments), plus ``_causvid``."""
    _check_representable(cfg)
    return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0",
            "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim, "out_channels": cfg.out_dim,
            "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
            "cross_attn_norm": cfg.cross_attn_norm, "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
            "eps": cfg.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": cfg.rope_max_positions,
            "pos_embed_seq_len": None, "_causvid": {"dit": cfg.to_dict()}}


def shard_size_bytes(size: int | str) -> int:
    """``10GB`` / ``500MB`` / ``4096`` -> bytes (decimal units, as diffusers' ``max_shard_size``)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", str(size), flags=re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ExportError(f"max shard size {size!r}: expected a positive size such as 10GB, 500MB or 4096")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[(m.group(2) or "B").upper()]
    return int(float(m.group(1)) * unit)


def diffusers_vae_config(arch) -> dict:
    """``vae/config.json`` for ``AutoencoderKLWan`` (its constructor's arguments) from our :class:`VAEArch`."""
    z = arch.z_dim
    return {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0", "base_dim": arch.base_dim,
            "decoder_base_dim": None, "z_dim": z, "dim_mult": list(arch.dim_mult),
            "num_res_blocks": arch.num_res_blocks, "attn_scales": [],
            "temperal_downsample": list(arch.temporal_downsample), "dropout": arch.dropout,
            "latents_mean": list(arch.latent_mean) if arch.latent_mean is not None else [0.0] * z,
            "latents_std": list(arch.latent_std) if arch.latent_std is not None else [1.0] * z,
            "is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None,
            "scale_factor_temporal": 2 ** sum(arch.temporal_downsample),
            "scale_factor_spatial": 2 ** (len(arch.dim_mult) - 1)}


def _write_vae(vae_path: str, size: Optional[str], folder: str, max_shard_size: int | str,
               dtype: Optional[torch.dtype]) -> None:
    """The run's VAE (any size of the Wan2.1 VAE architecture) as a diffusers ``vae/`` folder."""
    from causvid.models.vae import load_vae, to_diffusers_key

    vae = load_vae(vae_path, size)
    os.makedirs(folder)
    atomic_write_json(os.path.join(folder, "config.json"), diffusers_vae_config(vae.arch))
    write_weights({to_diffusers_key(k, vae.arch): (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                   for k, v in vae.state_dict().items()}, folder, max_shard_size)


def write_weights(sd: Mapping[str, torch.Tensor], folder: str, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
                  ) -> list[str]:
    """``diffusion_pytorch_model.safetensors``, or ``-0000k-of-0000N`` shards and the ``.index.json`` that
    diffusers and our loader read, with ``{"format": "pt"}`` metadata. Returns the files written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(dict(sd), filename_pattern=WEIGHTS_STEM + "{suffix}.safetensors",
                                               max_shard_size=shard_size_bytes(max_shard_size))
    written = []
    for name, keys in split.filename_to_tensors.items():
        path = os.path.join(folder, name)
        save_safetensors({k: sd[k] for k in keys}, path, {"format": "pt"})
        written.append(path)
    if split.is_sharded:
        index = os.path.join(folder, WEIGHTS_STEM + SAFETENSORS_INDEX_SUFFIX)
        atomic_write_json(index, {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename})
        written.append(index)
    return written


@dataclass
class LoraOptions:
    """``--format lora``: the base the delta is taken against and the truncation (one of rank / energy)."""

    base: Optional[str] = None  # DiT weights; default: the run config's train.teacher_path
    rank: Optional[int] = 32
    energy: Optional[float] = None
    trained: bool = True  # a LoRA-trained source: emit its adapters as trained (exact) instead of an SVD


def export(source: ExportSource, out: str, fmt: str, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
           dtype: Optional[torch.dtype] = None, lora: Optional[LoraOptions] = None) -> list[str]:
    """Write ``source`` into the folder ``out`` in ``fmt`` (``wan`` | ``diffusers`` | ``lora``), atomically (a
    temporary folder renamed at the end; an existing ``out`` is refused). Returns the files written, relative to
    ``out``."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {list(FORMATS)}")
    if os.path.exists(out):
        raise ExportError(f"{out} exists: choose a new folder (nothing is overwritten)")
    cfg: DiTConfig = source.model.cfg
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          for k, v in source.model.state_dict().items()}
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    weights_dir = os.path.join(tmp, "transformer") if fmt == "diffusers" else tmp
    os.makedirs(weights_dir)
    try:
        if fmt == "diffusers":
            atomic_write_json(os.path.join(weights_dir, "config.json"), diffusers_config(cfg))
            write_weights({dit_to_diffusers_key(k): v for k, v in sd.items()}, weights_dir, max_shard_size)
            vae_path = source.config.vae.path if source.config is not None else None
            if vae_path:  # the run's VAE, for AutoencoderKLWan
                _write_vae(vae_path, source.config.vae.size, os.path.join(tmp, "vae"), max_shard_size, dtype)
        elif fmt == "wan":
            atomic_write_json(os.path.join(weights_dir, "config.json"), wan_config(cfg))
            write_weights(sd, weights_dir, max_shard_size)
        else:
            source.lora = _write_lora(source, lora or LoraOptions(), tmp, dtype or torch.float32)
        if source.config is not None:
            from causvid.config import save_config

            save_config(source.config, os.path.join(tmp, "config.yaml"))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(source, fmt))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(os.path.relpath(os.path.join(d, n), out) for d, _, ns in os.walk(out) for n in ns)


def lora_base_path(source: ExportSource, opts: LoraOptions) -> str:
    """The base the LoRA is taken against: ``opts.base``, else the run's ``train.teacher_path``."""
    base = opts.base or (source.config.train.teacher_path if source.config is not None else None)
    if not base:
        raise ExportError("--format lora needs the base model: pass --base (the teacher / Wan2.1 DiT) or export a "
                          "run whose config names train.teacher_path")
    if not os.path.exists(base):
        raise ExportError(f"LoRA base not found: {base}")
    return base


def _write_lora(source: ExportSource, opts: LoraOptions, folder: str, dtype: torch.dtype) -> dict:
    from causvid.lora_extract import diffusers_skips, extract_lora

    if source.adapter is not None and opts.trained:
        return _write_trained_lora(source, folder, dtype)
    base_path = lora_base_path(source, opts)
    base = load_dit(base_path)
    if base.cfg != source.model.cfg:
        raise ExportError(f"the base {base_path} is not the student's architecture ({base.cfg} vs {source.model.cfg})")
    tensors, report = extract_lora(source.model.state_dict(), base.state_dict(), rank=opts.rank, energy=opts.energy,
                                   dtype=dtype)
    name = f"causvid_lora_rank{report.rank}_{str(dtype).removeprefix('torch.')}.safetensors"
    meta = {"format": "pt", "rank": str(report.rank), "base_model": os.path.abspath(base_path),
            "causvid_dit": json.dumps(source.model.cfg.to_dict())}
    save_safetensors(tensors, os.path.join(folder, name), meta)
    summary = {"file": name, "base": os.path.abspath(base_path), "rank": report.rank, "energy": opts.energy,
               "relative_error_total": report.total, "relative_error_per_layer": report.per_layer,
               "full_deltas": report.full_deltas,
               "ignored_by_diffusers": sorted(k for k in tensors if diffusers_skips(k))}
    atomic_write_json(os.path.join(folder, "lora_report.json"), summary)
    return summary


def _write_trained_lora(source: ExportSource, folder: str, dtype: torch.dtype) -> dict:
    """The adapters a LoRA run trained (``model.lora.rank``), already in the CausVid LoRA key format: written as
    they are (cast to ``dtype``), against the base they were trained on (exact: no SVD)."""
    from causvid.lora_extract import diffusers_skips
    from causvid.train.lora import read_adapter

    tensors, meta = read_adapter(source.adapter)
    rank = int(meta["rank"])
    name = f"causvid_lora_rank{rank}_{str(dtype).removeprefix('torch.')}.safetensors"
    save_safetensors({k: v.to(dtype) for k, v in tensors.items()}, os.path.join(folder, name), meta)
    summary = {"file": name, "base": meta.get("base_model"), "base_sha256": meta.get("base_sha256"), "rank": rank,
               "alpha": float(meta["alpha"]), "energy": None, "trained": True, "relative_error_total": 0.0,
               "relative_error_per_layer": {}, "full_deltas": [],
               "ignored_by_diffusers": sorted(k for k in tensors if diffusers_skips(k))}
    atomic_write_json(os.path.join(folder, "lora_report.json"), summary)
    return summary


def _yaml_list(items) -> str:
    return "".join(f"\n  - {i}" for i in items)


def model_card(source: ExportSource, fmt: str) -> str:
    """``README.md`` with YAML front matter (license, base model, library, tags) and how the model was trained
    and is sampled, from the run config."""
    cfg = source.config
    dit: DiTConfig = source.model.cfg
    wan_sized = dit.dim in (1536, 5120) and dit.text_dim == 4096
    base = ("Wan-AI/Wan2.1-T2V-1.3B" if dit.dim == 1536 else "Wan-AI/Wan2.1-T2V-14B") if wan_sized else None
    library = {"diffusers": "diffusers", "lora": "diffusion-single-file"}.get(fmt, "causvid")
    front = ["---", "license: apache-2.0", f"library_name: {library}", "pipeline_tag: text-to-video"]
    if base:
        front += [f"base_model: {base + ('-Diffusers' if fmt == 'diffusers' else '')}",
                  f"base_model_relation: {'adapter' if fmt == 'lora' else 'finetune'}"]
    tags = ["causvid", "autoregressive-video", "distillation", "wan2.1", "text-to-video"]
    tags += ["lora", "comfyui"] if fmt == "lora" else []
    front += ["tags:" + _yaml_list(tags), "---", ""]
    lines = front + ["# CausVid student" + (f" ({dit.num_layers} layers, dim {dit.dim})" if not wan_sized else ""), "",
                     "A block-causal Wan2.1 DiT trained with [causvid](https://arxiv.org/abs/2412.07772) "
                     "(From Slow Bidirectional to Fast Autoregressive Video Diffusion Models, CVPR 2025).", ""]
    if cfg is not None:
        steps = [float(s) for s in cfg.schedule.denoising_step_list]
        recipe = {"teacher": "flow-matching teacher", "causal_teacher": "causal teacher fine-tune",
                  "ode": "ODE-regression initialisation", "dmd": "asymmetric DMD"}.get(cfg.train.stage, cfg.train.stage)
        lines += ["## Training", "", "| | |", "|---|---|", f"| recipe | {recipe} (`train.stage={cfg.train.stage}`) |",
                  f"| steps | {cfg.train.max_steps} |", f"| timestep shift | {cfg.schedule.shift} |",
                  f"| chunk size | {cfg.model.chunk_size} latent frames |",
                  f"| denoising steps | {steps} |"]
        if cfg.train.stage == "dmd":
            lines += [f"| real-score guidance | {cfg.dmd.real_guidance} |",
                      f"| generator input | {cfg.dmd.generator_input} |"]
        lines += [f"| resolution | {cfg.data.num_frames} frames x {cfg.data.height}x{cfg.data.width} at "
                  f"{cfg.data.fps} fps |", ""]
    if source.metrics:
        lines += ["## Measured", "", "| metric | mean |", "|---|---|"]
        lines += [f"| {k} | {v['mean']:.4f} |" for k, v in sorted(source.metrics.items()) if isinstance(v, Mapping)]
        lines += [""]
    if source.lora is not None:
        rep = source.lora
        how = (f"the adapters trained with peft (rank {rep['rank']}, alpha {rep['alpha']}) on the base "
               f"`{rep['base']}` (sha256 of its weights `{rep['base_sha256'][:16]}...`), exact" if rep.get("trained")
               else f"the student minus its base (`{rep['base']}`) by truncated SVD, rank {rep['rank']}"
               + (f" (energy {rep['energy']})" if rep["energy"] else "") + ", relative reconstruction error "
               f"{rep['relative_error_total']:.3g} over the factorised layers (per layer: `lora_report.json`)")
        lines += ["## LoRA", "", f"`{rep['file']}`: {how}. Keys in the original Wan names under `diffusion_model.` (`.lora_down` / "
                  "`.lora_up` / `.alpha`, `.diff_b`, `.diff`); diffusers ignores the full deltas of norms, "
                  f"modulation tables and the patch embedding ({len(rep['ignored_by_diffusers'])} tensors here), "
                  "ComfyUI applies them.", "",
                  "ComfyUI: the Wan2.1 base model, then `LoraLoaderModelOnly` with this file at strength 1.0, "
                  "CFG 1.0. diffusers:", "", "```python",
                  f'pipe.load_lora_weights("THIS_FOLDER", weight_name="{rep["file"]}")  # pipe: WanPipeline of the base',
                  "```", ""]
    sample_steps = [float(s) for s in cfg.schedule.denoising_step_list][:-1] if cfg is not None else None
    weights = "transformer" if fmt == "diffusers" else "."
    if fmt == "lora":
        lines += [f"Recommended: guidance 1.0, the training step list {sample_steps} (shift "
                  f"{cfg.schedule.shift})." if sample_steps else "", ""]
        return "\n".join(lines)
    lines += ["## Sampling", "", "Chunk by chunk with a KV cache, no CFG (causvid):", "", "```python",
              "from causvid.sampler import CausalSampler", "",
              f's = CausalSampler.from_config("config.yaml", dit_path="{weights}")  # in this folder',
              'video = s.generate("a red circle moving left", num_frames=33, seed=0)', "```", ""]
    if fmt == "diffusers":
        lines += ["With diffusers, as a few-step model without CFG (bidirectional pipelines do not stream):", "",
                  "```python", "from diffusers import WanTransformer3DModel", "",
                  'transformer = WanTransformer3DModel.from_pretrained("THIS_FOLDER", subfolder="transformer")',
                  "# WanPipeline.from_pretrained(BASE, transformer=transformer)(prompt, guidance_scale=1.0, ...)",
                  "```", ""]
    else:
        lines += ["The folder is the official Wan2.1 DiT layout: the Wan code, ComfyUI's Wan loaders and "
                  "`causvid.models.weights.load_dit` read it.", ""]
    if sample_steps:
        lines += [f"Recommended: guidance 1.0, the training step list {sample_steps} "
                  f"(shift {cfg.schedule.shift}).", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``scripts/export.py``: checks its arguments before loading anything; one-line errors, exit 2."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Export a trained DiT (a run folder, its final/ folder or any DiT "
                                            "weights) in the official Wan or the diffusers layout, with a model card.")
    p.add_argument("source", help="run folder (its final/), an export folder, or DiT weights")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 10GB, 500MB (diffusers' rule)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast floating weights (default: as trained; LoRA: float32)")
    p.add_argument("--base", help="lora: the base DiT (default: the run config's train.teacher_path); a LoRA-trained "
                                  "run emits its trained adapters unless --base, --rank or --energy is given")
    p.add_argument("--rank", type=int, default=None, help="lora: rank of every layer (default 32)")
    p.add_argument("--energy", type=float, default=None,
                   help="lora: per layer the smallest rank keeping this fraction of the squared singular values")
    args = p.parse_args(argv)
    try:
        if not os.path.exists(args.source):
            raise ExportError(f"nothing to export at {args.source}: no such file or folder")
        if os.path.exists(args.out):
            raise ExportError(f"{args.out} exists: choose a new folder (nothing is overwritten)")
        shard = shard_size_bytes(args.max_shard_size)
        if args.format != "lora" and (args.base or args.rank is not None or args.energy is not None):
            raise ExportError("--base, --rank and --energy apply to --format lora only")
        if args.rank is not None and args.energy is not None:
            raise ExportError("give --rank or --energy, not both")
        if args.rank is not None and args.rank < 1:
            raise ExportError(f"--rank must be >= 1, got {args.rank}")
        if args.energy is not None and not 0.0 < args.energy <= 1.0:
            raise ExportError(f"--energy must be in (0, 1], got {args.energy}")
        if args.base and not os.path.exists(args.base):
            raise ExportError(f"LoRA base not found: {args.base}")
        opts = LoraOptions(base=args.base, rank=None if args.energy is not None else (args.rank or 32),
                           energy=args.energy, trained=not (args.base or args.rank or args.energy))
        source = open_source(args.source)
        files = export(source, args.out, args.format, max_shard_size=shard,
                       dtype=getattr(torch, args.dtype) if args.dtype else None, lora=opts)
    except (ExportError, WeightsError) as err:
        print(f"export.py: error: {err}", file=sys.stderr)
        return 2
    for f in files:
        print(os.path.join(args.out, f))
    return 0
