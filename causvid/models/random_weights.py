"""Random weights in the official Wan2.1 file layouts: the "rehearse before you rent" kit.

:func:`write_random_weights` writes a folder that every loader reads exactly as it reads the official
``Wan-AI/Wan2.1-T2V-1.3B`` (or ``-14B``) download (``docs/wan2.1.md``)::

    DIR/
      config.json                              # original WanModel config (num_layers = the chosen count)
      diffusion_pytorch_model.safetensors      # DiT at the real widths, original names, fp32
      Wan2.1_VAE.pth                           # the VAE at its real config (torch.save of a plain dict)
      models_t5_umt5-xxl-enc-bf16.pth          # umT5 encoder at its real widths, fewer layers, bf16
      google/umt5-xxl/tokenizer.json           # a small BPE tokenizer (pad 0, eos 1, unk 2, as umT5)

With ``layout="diffusers"`` the DiT and VAE go to ``transformer/`` and ``vae/`` with diffusers names and
configs instead (the text encoder files stay as above).

What differs from the real files: the DiT's and the encoder's layer counts, and the umT5 vocabulary
(the rows of ``token_embedding``: as many as the small tokenizer has, instead of 256,384; the umT5
loader takes the row and layer counts from the file). Every width and every tensor name is the real one.
The DiT's zero-initialised output head is given small random values so that every parameter of a
rehearsal receives gradients.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from causvid.models.registry import DIT_SIZES, DiTConfig
from causvid.models.weights import dit_to_diffusers_key, save_safetensors

# The folder layout of the official release (docs/wan2.1.md).
DIT_CONFIG = "config.json"
DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"
VAE_FILE = "Wan2.1_VAE.pth"
UMT5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = os.path.join("google", "umt5-xxl")

ARCHS = ("wan2.1-1.3b", "wan2.1-14b")

# Text the rehearsal tokenizer is trained on: enough English for prompts to become a few tokens each.
_CORPUS = (
    "a red circle moving left across a blue background",
    "a cat walking on the grass in the sunlight, slow camera pan",
    "waves crashing on a rocky beach at sunset, aerial view",
    "a person riding a bicycle through a busy city street at night",
    "close-up of a flower blooming in time-lapse, soft light",
    "a dog running in the snow, cinematic, high quality, detailed",
    "the quick brown fox jumps over the lazy dog",
)


def _official(config: dict) -> dict:
    """A config of causvid.export without its ``_causvid`` entry: what the official files hold, so that the
    loaders read the rehearsal folder as they read a download."""
    return {k: v for k, v in config.items() if k != "_causvid"}


def diffusers_vae_config(arch) -> dict:
    """``vae/config.json`` of a diffusers ``AutoencoderKLWan`` (the Wan2.1 VAE)."""
    return {"_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": arch.base_dim,
            "dim_mult": list(arch.dim_mult), "dropout": arch.dropout, "num_res_blocks": arch.num_res_blocks,
            "temperal_downsample": list(arch.temporal_downsample), "z_dim": arch.z_dim,
            "latents_mean": list(arch.latent_mean), "latents_std": list(arch.latent_std)}


def random_dit(cfg: DiTConfig, seed: int = 0):
    """A :class:`WanDiT` with the official initialisation and a small random output head."""
    from causvid.models.dit import WanDiT

    torch.manual_seed(seed)
    model = WanDiT(cfg)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return model


def build_tokenizer(texts: Sequence[str] = _CORPUS, vocab_size: int = 1024):
    """A BPE tokenizer with SentencePiece-style word boundaries and umT5's special ids (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from causvid.config import WAN_NEGATIVE_PROMPT
    from causvid.models.text import EOS_TOKEN, PAD_TOKEN, UNK_TOKEN

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN, UNK_TOKEN],
                                  show_progress=False)
    tok.train_from_iterator(list(texts) * 4 + [WAN_NEGATIVE_PROMPT], trainer)
    return tok


def write_random_weights(out: str, arch: str = "wan2.1-1.3b", *, layers: int = 2, text_layers: int | None = None,
                         layout: str = "original", seed: int = 0) -> dict[str, str]:
    """Write the rehearsal folder (module docstring) and return ``{role: path}`` of what was written.

    ``layers``: DiT blocks; ``text_layers``: umT5 blocks (default: ``layers``); ``layout``: ``original`` or
    ``diffusers`` (DiT and VAE). Checks its arguments before building anything.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; valid: {list(ARCHS)}")
    if layout not in ("original", "diffusers"):
        raise ValueError(f"unknown layout {layout!r}; valid: ['original', 'diffusers']")
    text_layers = layers if text_layers is None else text_layers
    if layers < 1 or text_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got layers={layers}, text_layers={text_layers}")
    from causvid.models.text import UMT5Encoder, umt5_arch
    from causvid.models.vae import WanVAE, to_diffusers_key, vae_arch

    written: dict[str, str] = {}
    os.makedirs(out, exist_ok=True)
    cfg = DIT_SIZES[arch].replace(num_layers=layers)
    dit_sd = random_dit(cfg, seed).state_dict()
    from causvid.export import diffusers_config, wan_config

    if layout == "diffusers":
        folder, dit_cfg = os.path.join(out, "transformer"), _official(diffusers_config(cfg))
        dit_sd = {dit_to_diffusers_key(k): v for k, v in dit_sd.items()}
    else:
        folder, dit_cfg = out, _official(wan_config(cfg))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, DIT_CONFIG), "w") as f:
        json.dump(dit_cfg, f, indent=2)
    written["dit"] = os.path.join(folder, DIT_WEIGHTS)
    save_safetensors(dit_sd, written["dit"])
    del dit_sd

    torch.manual_seed(seed + 1)
    vae_a = vae_arch("wan2.1")
    vae_sd = WanVAE(vae_a).state_dict()
    if layout == "diffusers":
        folder = os.path.join(out, "vae")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(diffusers_vae_config(vae_a), f, indent=2)
        written["vae"] = os.path.join(folder, DIT_WEIGHTS)
        save_safetensors({to_diffusers_key(k, vae_a): v for k, v in vae_sd.items()}, written["vae"])
    else:
        written["vae"] = os.path.join(out, VAE_FILE)
        torch.save(vae_sd, written["vae"])
    del vae_sd

    tok = build_tokenizer()
    tok_dir = os.path.join(out, TOKENIZER_DIR)
    os.makedirs(tok_dir, exist_ok=True)
    written["tokenizer"] = os.path.join(tok_dir, "tokenizer.json")
    tok.save(written["tokenizer"])
    text_a = umt5_arch("umt5-xxl").replace(num_layers=text_layers, vocab_size=tok.get_vocab_size())
    written["text"] = os.path.join(out, UMT5_FILE)
    torch.save(UMT5Encoder(text_a).init_weights(seed + 2).to(torch.bfloat16).state_dict(), written["text"])
    return written
