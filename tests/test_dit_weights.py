"""Loading the official DiT layouts (original and diffusers names, single and sharded) strictly and safely."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from test_dit import inputs, make_model

from causvid.models.weights import WeightsError, dit_to_diffusers_key, load_dit, load_pth, save_dit


def _write_official(folder, model, diffusers=False, shards=1):
    os.makedirs(folder, exist_ok=True)
    c = model.cfg
    if diffusers:
        cfg = {"_class_name": "WanTransformer3DModel", "num_attention_heads": c.num_heads, "attention_head_dim": c.head_dim,
               "in_channels": c.in_dim, "out_channels": c.out_dim, "text_dim": c.text_dim, "freq_dim": c.freq_dim,
               "ffn_dim": c.ffn_dim, "num_layers": c.num_layers, "patch_size": list(c.patch_size), "eps": c.eps}
    else:  # the official config.json omits patch_size, text_dim, qk_norm, cross_attn_norm
        cfg = {"_class_name": "WanModel", "model_type": "t2v", "dim": c.dim, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim,
               "in_dim": c.in_dim, "out_dim": c.out_dim, "num_heads": c.num_heads, "num_layers": c.num_layers,
               "eps": c.eps, "text_len": c.text_len}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = {(dit_to_diffusers_key(k) if diffusers else k): v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        save_file(sd, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        return
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _same_output(a, b):
    x, t, ctx = inputs()
    with torch.no_grad():
        return torch.equal(a(x, t, ctx), b(x, t, ctx))


def _tiny_wan_cfg():
    # official config.json cannot express text_dim/text_len, so the test model uses the Wan defaults for those
    from causvid.models.registry import dit_config
    return dit_config("tiny").replace(text_dim=4096, text_len=512)


@pytest.mark.parametrize("diffusers,shards", [(False, 1), (False, 3), (True, 1), (True, 2)])
def test_official_layouts_load(tmp_path, diffusers, shards):
    torch.manual_seed(0)
    from causvid.models.dit import WanDiT
    m = WanDiT(_tiny_wan_cfg()).eval()
    torch.nn.init.normal_(m.head.head.weight)
    _write_official(tmp_path / "w", m, diffusers, shards)
    loaded = load_dit(str(tmp_path / "w")).eval()
    assert loaded.cfg == m.cfg
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x, t, _ = inputs()
    ctx = torch.randn(2, 7, 4096)
    with torch.no_grad():
        assert torch.equal(m(x, t, ctx), loaded(x, t, ctx))


def test_our_export_round_trip_with_embedded_config(tmp_path):
    m = make_model()
    save_dit(m, str(tmp_path / "dit.safetensors"))
    loaded = load_dit(str(tmp_path / "dit.safetensors")).eval()
    assert loaded.cfg == m.cfg and _same_output(m, loaded)


def test_missing_unexpected_misshaped_tensors_are_named(tmp_path):
    m = make_model()
    sd = dict(m.state_dict())
    sd.pop("blocks.1.ffn.0.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    sd["head.head.weight"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_dit(str(tmp_path / "bad.safetensors"), cfg=m.cfg)
    msg = str(e.value)
    assert "blocks.1.ffn.0.bias" in msg and "blocks.0.extra.weight" in msg and "head.head.weight" in msg


def test_truncated_and_missing_files_name_the_file(tmp_path):
    m = make_model()
    p = tmp_path / "dit.safetensors"
    save_dit(m, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="dit.safetensors"):
        load_dit(str(p), cfg=m.cfg)
    with pytest.raises(WeightsError, match="nope"):
        load_dit(str(tmp_path / "nope"))
    # a sharded checkpoint whose shard is missing
    _write_official(tmp_path / "sh", m, shards=2)
    os.remove(tmp_path / "sh" / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(WeightsError, match="00002-of-00002"):
        load_dit(str(tmp_path / "sh"), cfg=m.cfg)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/causvid_pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(WeightsError, match="evil.pth"):
        load_pth(str(p))
    assert not os.path.exists("/tmp/causvid_pwned")
    # a plain tensor dict in .pth loads
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(load_pth(str(tmp_path / "ok.pth"))["a"], torch.ones(2))
