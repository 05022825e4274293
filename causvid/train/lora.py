"""LoRA training with peft (``model.lora.rank / alpha / targets``): adapters on frozen, shared base networks.

The model code knows nothing of LoRA: peft's ``inject_adapter_in_model`` replaces the targeted ``nn.Linear``
layers of a loaded :class:`~causvid.models.dit.WanDiT` in place by peft LoRA layers (``y = W x + b + alpha / r *
B A x``; A Kaiming-initialised, B zero, so training starts at the base), and this module hands the stages
one small module per role:

* :class:`SharedBase` holds one frozen DiT with the peft adapters of several roles (peft adapter names
  ``generator`` / ``critic``) and runs it as one role at a time (peft's ``set_adapter``; no adapter for the
  frozen teacher).
* :class:`LoRANetwork` is a role: ``forward`` (and every DiT method, e.g. the KV-cache API the samplers use)
  runs the shared DiT with this role's adapter. Its parameters and state dict are only its adapter tensors
  (plus ``lora_base_sha256``, the sha256 of the base weights), so the trainer's optimizers, EMA, clipping and
  checkpoints hold adapters only, and a resume onto another base fails with a clear error.

What is shared (DMD, :func:`dmd_networks`): the teacher, the critic (which the full recipe starts from the
teacher's weights) and, when ``train.init_from`` is the teacher itself or a LoRA run on the teacher (the
ODE stage trained with LoRA), the generator all use one copy of the teacher's weights; otherwise the
generator gets its own frozen copy of ``train.init_from``. The shared base is held in ``model.dtype``
(as the teacher); adapters are fp32. Not supported: FSDP, and ``model.gradient_checkpointing`` together with
a base shared by several roles (a block recomputed in the backward pass would run with the role active at
that moment); both are refused with a one-line error.

The final folder (``Stage.export``, :func:`save_network`) holds the merged network (``model.safetensors``,
``W + alpha / r * B A`` from peft's ``get_delta_weight``) so every loader, sampler and exporter reads it as
any DiT, and the adapters as they were trained in the key format of the CausVid LoRA for Wan2.1
(``model.lora.safetensors``: ``diffusion_model.<layer>.lora_down.weight`` = A ``[r, in]``, ``lora_up.weight`` =
B ``[out, r]``, ``.alpha``; :mod:`causvid.lora_extract`), with the base's path and sha256 in its metadata.
``scripts/export.py --format lora`` emits that file as is (exact, no SVD).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import warnings
from typing import Mapping, Optional

import torch
from torch import nn

from causvid.config import LORA_TARGETS, ConfigError

__all__ = ["enabled", "peft_config", "weights_sha256", "SharedBase", "LoRANetwork", "adapt", "dmd_networks",
           "save_network", "adapter_path", "read_adapter", "ADAPTER_SUFFIX"]

ADAPTER_SUFFIX = ".lora.safetensors"  # model.safetensors -> model.lora.safetensors
PREFIX = "diffusion_model."  # the CausVid LoRA key prefix (causvid.lora_extract.PREFIX)


def enabled(cfg) -> bool:
    """Whether the run trains LoRA adapters (``model.lora.rank > 0``)."""
    return int(cfg.model.lora.rank) > 0


def target_regex(targets) -> str:
    """peft ``target_modules`` (a regex matched against full module names) for ``model.lora.targets``."""
    names = sorted({n for t in targets for n in LORA_TARGETS[str(t)]})
    return r"blocks\.\d+\.(" + "|".join(re.escape(n) for n in names) + ")"


def peft_config(cfg):
    """The ``peft.LoraConfig`` of ``cfg.model.lora`` (no dropout, no bias training, B = 0 at the start)."""
    from peft import LoraConfig

    lo = cfg.model.lora
    r = int(lo.rank)
    return LoraConfig(r=r, lora_alpha=float(lo.alpha) if lo.alpha is not None else float(r),
                      target_modules=target_regex(lo.targets), lora_dropout=0.0, bias="none",
                      init_lora_weights=True)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over every tensor of ``model.state_dict()`` (sorted names, dtype, shape and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def _check_supported() -> None:
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError("config key 'model.lora.rank' > 0 is not supported under FSDP (the adapters live in a "
                          "frozen base outside the sharded module): use DDP or one process")


class SharedBase:
    """One frozen DiT carrying the peft adapters of several roles; :meth:`activate` selects the role."""

    def __init__(self, net: nn.Module, source: str):
        _check_supported()
        self.sha256 = weights_sha256(net)  # before peft renames the layers (.base_layer)
        self.net = net.requires_grad_(False)
        self.source = os.path.abspath(source)
        self.adapters: dict[str, dict[str, tuple[nn.Parameter, nn.Parameter]]] = {}  # role -> layer -> (A, B)
        self.configs: dict[str, object] = {}
        self._layers: list = []
        self._active: object = ()

    def add(self, role: str, config, init: Optional[Mapping[str, torch.Tensor]] = None) -> "LoRANetwork":
        """Inject the adapter ``role`` (peft) and return its :class:`LoRANetwork`; ``init``: starting A / B tensors
        in the CausVid LoRA key format (a LoRA run this one continues)."""
        from peft import inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        if role in self.adapters:
            raise ValueError(f"adapter {role!r} already exists on this base")
        with warnings.catch_warnings():  # "Already found a `peft_config` attribute": several adapters, as intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, self.net, adapter_name=role)
        self._layers = [m for m in self.net.modules() if isinstance(m, LoraLayer)]
        pairs = {}
        for path, m in self.net.named_modules():
            if isinstance(m, LoraLayer) and role in m.lora_A:
                a, b = m.lora_A[role], m.lora_B[role]
                a.float(), b.float()  # fp32 adapters on a base in any dtype (peft casts the input)
                pairs[path] = (a.weight, b.weight)
        if not pairs:
            raise ConfigError(f"config key 'model.lora.targets': no layer of the DiT matches {config.target_modules}")
        if init is not None:
            _load_pairs(pairs, init, config, role)
        self.adapters[role], self.configs[role] = pairs, config
        self._active = ()  # re-apply at the next activate
        self._set_requires_grad()
        return LoRANetwork(self, role)

    def view(self, role: Optional[str]) -> "LoRANetwork":
        """The network of an existing adapter, or (``None``) the frozen base without adapters."""
        return LoRANetwork(self, role)

    def _set_requires_grad(self) -> None:
        for pairs in self.adapters.values():
            for a, b in pairs.values():
                a.requires_grad_(True)
                b.requires_grad_(True)

    def activate(self, role: Optional[str]) -> None:
        """Run the base with adapter ``role`` from now on (``None``: no adapter). peft's switches also set
        ``requires_grad`` of the adapters; every adapter stays trainable here (the trainer's optimizers own them)."""
        if role == self._active:
            return
        for layer in self._layers:
            if role is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(role)
        self._set_requires_grad()
        self._active = role

    @torch.no_grad()
    def merged_state_dict(self, role: Optional[str]) -> dict[str, torch.Tensor]:
        """The plain DiT state dict (original names) of the base with adapter ``role`` merged (fp32 delta)."""
        from peft.tuners.lora import LoraLayer

        out = {}
        for name, t in self.net.state_dict().items():
            if ".lora_" in name:
                continue
            out[name.replace(".base_layer.", ".")] = t.detach().clone()
        if role is not None:
            for path, m in self.net.named_modules():
                if isinstance(m, LoraLayer) and role in m.lora_A:
                    w = out[f"{path}.weight"]
                    out[f"{path}.weight"] = (w.float() + m.get_delta_weight(role).float()).to(w.dtype)
        return out


def _load_pairs(pairs, tensors: Mapping[str, torch.Tensor], config, role: str) -> None:
    want = {f"{PREFIX}{p}.lora_down.weight" for p in pairs} | {f"{PREFIX}{p}.lora_up.weight" for p in pairs}
    have = {k for k in tensors if k.endswith((".lora_down.weight", ".lora_up.weight"))}
    if want != have:
        raise ConfigError(f"config key 'train.init_from': its LoRA adapters adapt other layers than model.lora.targets "
                          f"(missing {sorted(want - have)[:3]}, extra {sorted(have - want)[:3]})")
    scale = float(config.lora_alpha) / int(config.r)
    with torch.no_grad():
        for p, (a, b) in pairs.items():
            down, up = tensors[f"{PREFIX}{p}.lora_down.weight"], tensors[f"{PREFIX}{p}.lora_up.weight"]
            alpha = tensors.get(f"{PREFIX}{p}.alpha")
            if down.shape != a.shape or up.shape != b.shape or \
                    (alpha is not None and float(alpha) / down.shape[0] != scale):
                raise ConfigError(f"config key 'train.init_from': its LoRA layer {p} has rank {down.shape[0]}, alpha "
                                  f"{None if alpha is None else float(alpha)}; model.lora has rank {config.r}, alpha "
                                  f"{config.lora_alpha} (role {role!r})")
            a.copy_(down)
            b.copy_(up)


class LoRANetwork(nn.Module):
    """One role of a :class:`SharedBase`: the DiT with this role's adapter (``role=None``: the frozen base).

    Parameters / state dict: this role's adapter tensors only (``lora.<layer path with />/A|B``) and the
    buffer ``lora_base_sha256``; the base is not a submodule. Attribute reads fall through to the DiT (``cfg``,
    ``new_kv_cache`` ...); its methods run with this role's adapter active.
    """

    def __init__(self, shared: SharedBase, role: Optional[str]):
        super().__init__()
        object.__setattr__(self, "_shared", shared)  # not registered: parameters() are the adapter only
        self.role = role
        if role is not None:
            self.lora = nn.ParameterDict({f"{p.replace('.', '/')}/{ab}": t for p, pair in shared.adapters[role].items()
                                          for ab, t in zip("AB", pair)})
            digest = torch.tensor(list(bytes.fromhex(shared.sha256)), dtype=torch.uint8)  # [32]
            self.register_buffer("lora_base_sha256", digest)

    @property
    def shared(self) -> SharedBase:
        return self.__dict__["_shared"]

    def forward(self, *args, **kwargs):
        self.shared.activate(self.role)
        return self.shared.net(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            shared = self.__dict__.get("_shared")
            if shared is None or name.startswith("__"):
                raise
        attr = getattr(shared.net, name)
        if inspect.ismethod(attr):
            role = self.__dict__.get("role")

            def call(*args, **kwargs):
                shared.activate(role)
                return attr(*args, **kwargs)
            return call
        return attr

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        got = state_dict.get("lora_base_sha256")
        if self.role is not None and got is not None and bytes(got.to(torch.uint8).cpu().tolist()).hex() != self.shared.sha256:
            raise ValueError(f"the LoRA adapters of '{self.role}' were trained on a base with sha256 "
                             f"{bytes(got.to(torch.uint8).cpu().tolist()).hex()[:16]}..., but this run's base "
                             f"({self.shared.source}) has {self.shared.sha256[:16]}...: resume with the same base")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- export ------------------------------------------------------------------------------------------------
    def merged(self) -> nn.Module:
        """A plain :class:`WanDiT` (CPU) with this role's adapter merged into the base weights."""
        from causvid.models.dit import WanDiT

        with torch.device("meta"):  # no random init, no second copy: the merged tensors are assigned
            model = WanDiT(self.shared.net.cfg)
        model.load_state_dict({k: v.cpu() for k, v in self.shared.merged_state_dict(self.role).items()}, assign=True)
        return model.eval()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter in the CausVid LoRA key format: ``lora_down`` = A [r, in], ``lora_up`` = B [out, r], ``alpha``."""
        config = self.shared.configs[self.role]
        out = {}
        for p, (a, b) in self.shared.adapters[self.role].items():
            out[f"{PREFIX}{p}.lora_down.weight"] = a.detach().float().cpu().clone()
            out[f"{PREFIX}{p}.lora_up.weight"] = b.detach().float().cpu().clone()
            out[f"{PREFIX}{p}.alpha"] = torch.tensor(float(config.lora_alpha))
        return out

    def adapter_metadata(self) -> dict[str, str]:
        config = self.shared.configs[self.role]
        return {"format": "pt", "rank": str(config.r), "alpha": str(float(config.lora_alpha)),
                "target_modules": str(config.target_modules), "base_model": self.shared.source,
                "base_sha256": self.shared.sha256, "causvid_dit": json.dumps(self.shared.net.cfg.to_dict()),
                "role": str(self.role)}


# ----------------------------------------------------------------------------------------------------------------
# Building the networks of a stage
# ----------------------------------------------------------------------------------------------------------------


def adapt(cfg, net: nn.Module, role: str, source: str) -> nn.Module:
    """``net`` itself without LoRA; else its :class:`LoRANetwork` with a fresh adapter ``role`` (``net``, loaded
    from ``source``, becomes the frozen base)."""
    if not enabled(cfg):
        return net
    return SharedBase(net, source).add(role, peft_config(cfg))


def dmd_networks(cfg, device, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(generator, critic, teacher) of a LoRA DMD run, sharing the teacher's weights as far as the recipe allows
    (module docstring)."""
    from causvid.train.stages import load_network, resolve_dit_path

    teacher_path, init_path = str(cfg.train.teacher_path), resolve_dit_path(str(cfg.train.init_from))
    net = load_network(cfg, "train.teacher_path", device=device, dtype=dtype, trainable=False)
    shared = SharedBase(net, teacher_path)
    config = peft_config(cfg)
    adapters = adapter_path(init_path)
    same = os.path.realpath(init_path) == os.path.realpath(resolve_dit_path(teacher_path))
    init = None
    if os.path.isfile(adapters):
        tensors, meta = read_adapter(adapters)
        if meta.get("base_sha256") == shared.sha256:
            same, init = True, tensors  # the generator continues a LoRA run on the teacher (e.g. the ODE stage)
    if bool(cfg.model.gradient_checkpointing):  # refused by causvid.config.validate already
        raise ConfigError("config key 'model.gradient_checkpointing' cannot be combined with LoRA DMD")
    if same:
        generator = shared.add("generator", config, init=init)
    else:
        generator = SharedBase(load_network(cfg, "train.init_from", device=device), init_path).add("generator", config)
    critic = shared.add("critic", config)
    return generator, critic, shared.view(None)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def adapter_path(weights_path: str) -> str:
    """``.../model.safetensors`` -> ``.../model.lora.safetensors`` (the adapters written next to merged weights)."""
    stem = weights_path[: -len(".safetensors")] if weights_path.endswith(".safetensors") else weights_path
    return stem + ADAPTER_SUFFIX


def read_adapter(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an adapter file written by :func:`save_network`."""
    from safetensors import safe_open

    from causvid.models.weights import load_safetensors

    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_safetensors(path), meta


def save_network(model: nn.Module, path: str) -> None:
    """Write a trained network to ``path``: a plain DiT as is; a :class:`LoRANetwork` merged, plus its adapters
    (CausVid LoRA format) at :func:`adapter_path`."""
    from causvid.models.weights import save_dit, save_safetensors

    if not isinstance(model, LoRANetwork):
        save_dit(model, path)
        return
    save_dit(model.merged(), path)
    save_safetensors(model.adapter_state_dict(), adapter_path(path), model.adapter_metadata())
