"""The rehearsal kit (causvid.models.random_weights): official names and shapes, read by the real loaders."""

from __future__ import annotations

import os
import re

import pytest
import torch

from causvid.config import TextConfig
from causvid.models.random_weights import UMT5_FILE, VAE_FILE, write_random_weights
from causvid.models.text import UMT5TextEncoder, text_encoder_from_config
from causvid.models.vae import load_vae
from causvid.models.weights import WeightsError, load_dit, load_pth, load_safetensors


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("wan-1.3b-random"))
    write_random_weights(out, "wan2.1-1.3b", layers=1)
    return out


def _first_blocks(ref: dict, layers: int) -> dict:
    keep = {}
    for k, v in ref.items():
        m = re.match(r"blocks\.(\d+)\.", k)
        if m is None or int(m.group(1)) < layers:
            keep[k] = v
    return keep


def test_files_have_the_official_names_and_shapes(kit, reference_tsv):
    dit = {k: tuple(v.shape) for k, v in load_safetensors(os.path.join(kit, "diffusion_pytorch_model.safetensors")).items()}
    assert dit == _first_blocks(reference_tsv("wan2.1_t2v_1.3b_dit.tsv"), 1)
    vae = {k: tuple(v.shape) for k, v in load_pth(os.path.join(kit, VAE_FILE)).items()}
    assert vae == reference_tsv("wan2.1_vae.tsv")
    text = load_pth(os.path.join(kit, UMT5_FILE))
    ref = _first_blocks(reference_tsv("umt5_xxl_encoder.tsv"), 1)
    assert {k: tuple(v.shape) for k, v in text.items() if k != "token_embedding.weight"} == \
        {k: v for k, v in ref.items() if k != "token_embedding.weight"}
    assert text["token_embedding.weight"].shape[1] == ref["token_embedding.weight"][1]
    assert text["blocks.0.attn.q.weight"].dtype == torch.bfloat16


def test_real_loaders_read_the_kit_and_run(kit):
    dit = load_dit(kit)
    assert (dit.cfg.dim, dit.cfg.num_heads, dit.cfg.ffn_dim, dit.cfg.text_len, dit.cfg.num_layers) == (1536, 12, 8960, 512, 1)
    vae = load_vae(os.path.join(kit, VAE_FILE))
    cfg = TextConfig(kind="umt5", path=os.path.join(kit, UMT5_FILE), tokenizer_path=os.path.join(kit, "google/umt5-xxl"))
    enc = text_encoder_from_config(cfg, dim=4096, text_len=512)
    emb, lens = enc.encode(["a cat walking on the grass"])
    assert emb.shape == (1, 512, 4096) and 1 < int(lens[0]) < 20 and emb[0, : lens[0]].abs().sum() > 0
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 5, 3, 16, 16) * 2 - 1)  # [B, T, 3, H, W] -> [B, 2, 16, 2, 2]
        v = dit(z, torch.tensor([500.0]), emb)
    assert v.shape == z.shape == (1, 2, 16, 2, 2) and torch.isfinite(v).all() and v.abs().sum() > 0


def test_text_dtype_reaches_the_umt5_encoder(kit):
    kw = dict(kind="umt5", path=os.path.join(kit, UMT5_FILE), tokenizer_path=os.path.join(kit, "google/umt5-xxl"))
    assert text_encoder_from_config(TextConfig(**kw)).model.token_embedding.weight.dtype == torch.bfloat16
    enc = text_encoder_from_config(TextConfig(**kw, dtype="float32"))
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32}


def test_umt5_loader_refuses_a_gap_in_the_blocks(kit, tmp_path):
    sd = load_pth(os.path.join(kit, UMT5_FILE))
    sd.update({k.replace("blocks.0.", "blocks.2."): v for k, v in sd.items() if k.startswith("blocks.0.")})
    path = str(tmp_path / "gap.pth")
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"blocks \[1\] are missing"):
        UMT5TextEncoder.from_files(path, os.path.join(kit, "google/umt5-xxl"))


@pytest.mark.slow
def test_diffusers_layout_loads(tmp_path):
    write_random_weights(str(tmp_path), "wan2.1-1.3b", layers=1, layout="diffusers")
    assert load_dit(str(tmp_path)).cfg.num_layers == 1
    assert load_vae(str(tmp_path / "vae")).arch.z_dim == 16


def test_bad_arguments_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown --arch"):
        write_random_weights(str(tmp_path / "x"), "wan2.2-5b")
    with pytest.raises(ValueError, match="layer counts"):
        write_random_weights(str(tmp_path / "x"), layers=0)
    assert not os.path.exists(tmp_path / "x")
