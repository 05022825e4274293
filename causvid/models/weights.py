"""Safe weight files: safetensors (single or sharded with an index) and pickle-free ``.pth``.

Nothing here ever unpickles code: ``.pth`` files go through ``torch.load(weights_only=True)``, which
refuses any pickle that references a callable. Every loader is strict: a missing, unexpected or
mis-shaped tensor is an error that names it; a corrupt file is an error that names the file.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"


class WeightsError(RuntimeError):
    """A weight file is missing, corrupt, unsafe, or does not match the model."""


def load_safetensors(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise WeightsError(f"weight file not found: {path}")
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"corrupt or unreadable safetensors file {path}: {err}") from None


def load_pth(path: str) -> dict[str, torch.Tensor]:
    """A ``torch.save``d plain dict of tensors, loaded with ``weights_only=True`` (never runs code)."""
    if not os.path.isfile(path):
        raise WeightsError(f"weight file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle.UnpicklingError for unsafe pickles, RuntimeError for corrupt zips
        kind = "unsafe (it references code) or corrupt" if "weights_only" in str(err) or "Unpickl" in type(err).__name__ \
            else "corrupt or unreadable"
        raise WeightsError(f"refusing {path}: file is {kind}: {str(err).splitlines()[0]}") from None
    if isinstance(obj, Mapping) and len(obj) == 1 and not isinstance(next(iter(obj.values())), torch.Tensor):
        obj = next(iter(obj.values()))  # {"generator": state_dict} style wrappers
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a flat dict of tensors")
    return dict(obj)


def load_sharded_safetensors(index_path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``*.safetensors.index.json`` + the shards it names (``weight_map``: tensor -> shard file)."""
    try:
        with open(index_path) as f:
            index = json.load(f)
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"corrupt safetensors index {index_path}: {err}") from None
    folder = os.path.dirname(index_path)
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = load_safetensors(os.path.join(folder, shard), device)
        wanted = {k for k, v in weight_map.items() if v == shard}
        missing = wanted - tensors.keys()
        if missing:
            raise WeightsError(f"shard {shard} lacks tensors its index names: {sorted(missing)[:5]}")
        out.update({k: tensors[k] for k in wanted})
    return out


def find_weight_files(folder: str, stem: str = "diffusion_pytorch_model") -> str:
    """The file to load from a model folder: an index (sharded) or a single safetensors file."""
    for name in (f"{stem}{SAFETENSORS_INDEX_SUFFIX}", f"{stem}.safetensors", "model.safetensors.index.json",
                 "model.safetensors"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    cands = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") or f.endswith(SAFETENSORS_INDEX_SUFFIX))
    if len(cands) == 1:
        return os.path.join(folder, cands[0])
    raise WeightsError(f"no weights found in {folder} (looked for {stem}.safetensors or {stem}{SAFETENSORS_INDEX_SUFFIX})")


def load_state_dict_file(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Any supported weight file or folder -> flat state dict."""
    if os.path.isdir(path):
        path = find_weight_files(path)
    if path.endswith(".json"):
        return load_sharded_safetensors(path, device)
    if path.endswith(".safetensors"):
        return load_safetensors(path, device)
    if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
        return load_pth(path)
    if not os.path.exists(path):
        raise WeightsError(f"weight file not found: {path}")
    raise WeightsError(f"unsupported weight file type: {path} (use .safetensors, an index .json, or .pth)")


def strip_prefixes(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove a known wrapper prefix (``model.``, ``model.diffusion_model.``...) when every key has it."""
    sd = dict(sd)
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def check_state_dict(expected: Mapping[str, torch.Size | tuple], got: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict comparison of names and shapes; the error names every offending tensor (first few)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(got))
        if tuple(got[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {missing[:8]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {unexpected[:8]}")
    if mismatched:
        problems.append(f"{len(mismatched)} mis-shaped tensor(s): {mismatched[:8]}")
    if problems:
        raise WeightsError(f"{what} does not match the model: " + "; ".join(problems))


def load_into(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str,
              key_map: Callable[[str], str] | None = None) -> None:
    """Strictly load ``sd`` (optionally renamed by ``key_map``) into ``module``, casting to its dtypes.

    Works for modules on the meta device too (tensors are assigned).
    """
    if key_map is not None:
        sd = {key_map(k): v for k, v in sd.items()}
    own = module.state_dict()
    check_state_dict({k: v.shape for k, v in own.items()}, sd, what)
    on_meta = any(p.is_meta for p in module.parameters())
    sd = {k: v.to(own[k].dtype) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=on_meta)


def save_safetensors(sd: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Atomic write: a temporary file in the same folder, fsync, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, tmp, metadata=dict(metadata or {}))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_safetensors_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise WeightsError(f"weight file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"corrupt or unreadable safetensors file {path}: {err}") from None


def save_model(module: torch.nn.Module, path: str, kind: str, config: Mapping) -> None:
    """Our own export: one safetensors file with ``{"kind": ..., "config": json}`` embedded."""
    save_safetensors(module.state_dict(), path, {"kind": kind, "config": json.dumps(dict(config))})


def read_model_header(path: str) -> tuple[str, dict]:
    meta = read_safetensors_metadata(path)
    if "config" not in meta or "kind" not in meta:
        raise WeightsError(f"{path} has no embedded causvid config (not written by causvid.models.weights.save_model)")
    return meta["kind"], json.loads(meta["config"])


# ----------------------------------------------------------------------------------------------------------------
# Wan DiT <-> diffusers ``WanTransformer3DModel`` names (``wan_architecture.md`` §7.1)
# ----------------------------------------------------------------------------------------------------------------

_DIT_TO_DIFFUSERS = [  # (original regex, diffusers replacement), applied to whole names
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
    (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
    (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
    (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (r"^blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
]
_DIT_FROM_DIFFUSERS = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
]


def _rename(name: str, rules) -> str:
    import re

    for pat, rep in rules:
        new, n = re.subn(pat, rep, name)
        if n:
            return new
    return name


def dit_to_diffusers_key(name: str) -> str:
    return _rename(name, _DIT_TO_DIFFUSERS)


def dit_from_diffusers_key(name: str) -> str:
    return _rename(name, _DIT_FROM_DIFFUSERS)


DIT_PREFIXES = ("model.diffusion_model.", "model.", "module.", "_orig_mod.", "generator.")


def is_diffusers_dit(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd)


def dit_config_from_folder(folder: str):
    """Read ``config.json`` of an official (original or diffusers) DiT folder into a :class:`DiTConfig`."""
    from causvid.models.registry import DiTConfig

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise WeightsError(f"no config.json in {folder}")
    try:
        with open(path) as f:
            c = json.load(f)
    except ValueError as err:
        raise WeightsError(f"corrupt config.json in {folder}: {err}") from None
    if isinstance(c.get("_causvid"), dict) and "dit" in c["_causvid"]:  # written by causvid.export: every field
        try:
            return DiTConfig.from_dict(c["_causvid"]["dit"])
        except (TypeError, ValueError) as err:
            raise WeightsError(f"bad _causvid.dit in {path}: {err}") from None
    if "num_attention_heads" in c:  # diffusers WanTransformer3DModel
        heads, hd = c["num_attention_heads"], c["attention_head_dim"]
        return DiTConfig(dim=heads * hd, ffn_dim=c["ffn_dim"], num_heads=heads, num_layers=c["num_layers"],
                         freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096),
                         in_dim=c.get("in_channels", 16), out_dim=c.get("out_channels", 16),
                         patch_size=tuple(c.get("patch_size", (1, 2, 2))), eps=c.get("eps", 1e-6))
    # original WanModel config: patch_size, text_dim, qk_norm, cross_attn_norm are not written (constructor defaults)
    return DiTConfig(dim=c["dim"], ffn_dim=c["ffn_dim"], num_heads=c["num_heads"], num_layers=c["num_layers"],
                     freq_dim=c.get("freq_dim", 256), text_len=c.get("text_len", 512), in_dim=c.get("in_dim", 16),
                     out_dim=c.get("out_dim", 16), eps=c.get("eps", 1e-6))


def load_dit_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Any DiT weight file/folder (ours, original Wan, diffusers, sharded) -> state dict in original Wan names."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) \
            and os.path.isdir(os.path.join(path, "transformer")):
        path = os.path.join(path, "transformer")  # a diffusers pipeline folder
    sd = strip_prefixes(load_state_dict_file(path), DIT_PREFIXES)
    if is_diffusers_dit(sd):
        sd = {dit_from_diffusers_key(k): v for k, v in sd.items()}
    return sd


def load_dit(path: str, cfg=None, *, device: str = "cpu", dtype: torch.dtype | None = None, **model_kw):
    """Build a :class:`WanDiT` and load weights strictly.

    ``path``: our safetensors (config embedded), an official folder with ``config.json`` (single or sharded
    safetensors, original or diffusers names), or a bare weight file together with ``cfg``.
    """
    from causvid.models.dit import WanDiT
    from causvid.models.registry import DiTConfig

    if not os.path.exists(path):
        raise WeightsError(f"DiT weights not found: {path}")
    if cfg is None:
        if os.path.isdir(path):
            folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "transformer")
            cfg = dit_config_from_folder(folder)
        elif path.endswith(".safetensors"):
            kind, c = read_model_header(path)
            if kind != "dit":
                raise WeightsError(f"{path} holds a {kind!r}, not a DiT")
            cfg = DiTConfig.from_dict(c)
        else:
            raise WeightsError(f"cannot tell the DiT configuration of {path}: pass cfg= or a folder with config.json")
    sd = load_dit_state_dict(path)
    with torch.device("meta"):
        model = WanDiT(cfg, **model_kw)
    load_into(model, sd, f"DiT weights {path}")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model


def save_dit(model: torch.nn.Module, path: str) -> None:
    save_model(model, path, "dit", model.cfg.to_dict())
