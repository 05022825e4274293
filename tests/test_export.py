"""scripts/export.py: the official Wan and diffusers layouts, read back by our loaders and by diffusers itself."""

import json
import logging
import os
import warnings

import pytest
import torch

from causvid.config import load_config, save_config
from causvid.export import ExportError, LoraOptions, export, main, open_source, shard_size_bytes
from causvid.models.dit import WanDiT
from causvid.models.registry import dit_config
from causvid.models.weights import load_dit, save_dit

diffusers = pytest.importorskip("diffusers")  # the `interop` extra, installed by .ci/run

TIMESTEPS = (999.0, 500.0, 10.0)


def random_dit(seed=0) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(dit_config("tiny"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # the official init zeroes the head: outputs would be 0
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, cfg.in_dim, 4, 6, generator=g)  # [B, F, C, H, W]
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)  # padded to text_len, as Wan's pipelines do
    return x, ctx


def ours(model, x, ctx, t):
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), t), ctx)  # [B, F, C, H, W]


def theirs(model, x, ctx, t):
    with torch.no_grad():
        out = model(hidden_states=x.transpose(1, 2), timestep=torch.full((x.shape[0],), t),
                    encoder_hidden_states=ctx, return_dict=False)[0]  # [B, C, F, H, W]
    return out.transpose(1, 2)


def load_diffusers(folder, caplog, **kw):
    """``WanTransformer3DModel.from_pretrained`` with every log record and warning captured."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        model = diffusers.WanTransformer3DModel.from_pretrained(folder, **kw)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("diffusers")] + [str(w.message) for w in caught]
    assert not [m for m in said if any(s in m.lower() for s in ("missing", "unexpected", "not used", "ignored",
                                                                     "newly initialized"))], said
    return model.eval()


def run_folder(tmp_path, model):
    """A run folder as the trainer leaves it: final/model.safetensors + final/config.yaml."""
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    save_dit(model, str(final / "model.safetensors"))
    cfg = load_config(None, ["model.size=tiny", "train.stage=dmd", "train.max_steps=7", "schedule.shift=3.0"])
    save_config(cfg, str(final / "config.yaml"))
    return tmp_path / "run"


def test_diffusers_export_loads_in_diffusers_and_matches_our_model(tmp_path, caplog):
    model = random_dit()
    out = tmp_path / "exp"
    files = export(open_source(str(run_folder(tmp_path, model))), str(out), "diffusers")
    assert files == ["README.md", "config.yaml", "transformer/config.json",
                     "transformer/diffusion_pytorch_model.safetensors"]
    theirs_model = load_diffusers(str(out), caplog, subfolder="transformer")
    x, ctx = inputs(model.cfg)
    for t in TIMESTEPS:
        a, b = ours(model, x, ctx, t), theirs(theirs_model, x, ctx, t)
        assert a.abs().mean() > 0.1  # a real output, not the zero head
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # our loader reads the folder back exactly
    back = load_dit(str(out / "transformer"))
    assert back.cfg == model.cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_wan_export_round_trips_and_has_the_official_config(tmp_path):
    model = random_dit(3)
    out = tmp_path / "wan"
    export(open_source(str(run_folder(tmp_path, model) / "final")), str(out), "wan")
    cfg = json.loads((out / "config.json").read_text())
    official = {"_class_name", "_diffusers_version", "model_type", "dim", "ffn_dim", "freq_dim", "in_dim", "out_dim",
                "num_heads", "num_layers", "eps", "text_len"}  # wan_architecture.md §0
    assert set(cfg) == official | {"_causvid"} and cfg["_class_name"] == "WanModel" and cfg["dim"] == 32
    from safetensors import safe_open

    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict()) and f.metadata()["format"] == "pt"
        assert "blocks.0.self_attn.q.weight" in f.keys()  # original Wan names
    back = load_dit(str(out))
    assert back.cfg == model.cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_sharded_diffusers_export(tmp_path, caplog):
    model = random_dit(4)
    out = tmp_path / "sharded"
    files = export(open_source(str(run_folder(tmp_path, model))), str(out), "diffusers", max_shard_size="20KB")
    shards = [f for f in files if f.startswith("transformer/diffusion_pytorch_model-")]
    assert len(shards) > 2 and "transformer/diffusion_pytorch_model.safetensors.index.json" in files
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in model.state_dict().values())
    theirs_model = load_diffusers(str(out), caplog, subfolder="transformer")
    x, ctx = inputs(model.cfg)
    torch.testing.assert_close(theirs(theirs_model, x, ctx, 500.0), ours(model, x, ctx, 500.0), rtol=0, atol=1e-5)
    back = load_dit(str(out / "transformer"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_our_loader_reads_a_diffusers_save_pretrained_transformer(tmp_path):
    torch.manual_seed(5)
    cfg = dit_config("tiny")
    theirs_model = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps).eval()
    with torch.no_grad():
        for p in theirs_model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    theirs_model.save_pretrained(str(tmp_path / "d"))
    model = load_dit(str(tmp_path / "d"), cfg=None).eval()
    # diffusers' config has no text_len: ours defaults to 512, so feed 512 context rows to both
    x, _ = inputs(cfg)
    ctx = torch.randn(2, model.cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(2))
    for t in TIMESTEPS:
        a, b = ours(model, x, ctx, t), theirs(theirs_model, x, ctx, t)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()  # outputs of size ~10 here: relative


def test_model_card_front_matter_and_training_table(tmp_path):
    out = tmp_path / "exp"
    export(open_source(str(run_folder(tmp_path, random_dit()))), str(out), "diffusers")
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    fields = dict(line.split(": ", 1) for line in front.splitlines() if ": " in line)
    assert fields["license"] == "apache-2.0" and fields["library_name"] == "diffusers"
    assert fields["pipeline_tag"] == "text-to-video" and "  - causvid" in front
    assert "base_model" not in fields  # a tiny random model is not a Wan fine-tune
    assert "| recipe | asymmetric DMD (`train.stage=dmd`) |" in card and "| steps | 7 |" in card
    assert "| timestep shift | 3.0 |" in card and "guidance 1.0" in card


def test_cli_errors_before_loading_and_never_overwrites(tmp_path, capsys):
    run = run_folder(tmp_path, random_dit())
    assert main([str(tmp_path / "missing"), "--format", "wan", "--out", str(tmp_path / "o")]) == 2
    assert "nothing to export" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main([str(run), "--format", "wan", "--out", str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main([str(run), "--format", "wan", "--out", str(tmp_path / "o"), "--max-shard-size", "ten"]) == 2
    assert "max shard size 'ten'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    assert main([str(run), "--format", "wan", "--out", str(tmp_path / "o"), "--dtype", "bfloat16"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "o" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("blocks.0.self_attn.q.weight").dtype == torch.bfloat16
    with pytest.raises(ExportError, match="unknown export format"):
        export(open_source(str(run)), str(tmp_path / "p"), "onnx")


def test_shard_size_units():
    assert shard_size_bytes("10GB") == 10**10 and shard_size_bytes("500mb") == 5 * 10**8
    assert shard_size_bytes(4096) == 4096 and shard_size_bytes("1.5KB") == 1500
    for bad in ("0", "-1GB", "10 GiB", ""):
        with pytest.raises(ExportError):
            shard_size_bytes(bad)


# --- --format lora ----------------------------------------------------------------------------------------------

# The key format of the CausVid LoRA for Wan2.1 as ComfyUI's Wan loader and diffusers' Wan LoRA converter read it
# (ecosystem.md §10): original Wan names under diffusion_model.; a rename breaks this list.
LORA_RULES = [
    r"^diffusion_model\.blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.(lora_down\.weight|lora_up\.weight|alpha|diff_b)$",
    r"^diffusion_model\.blocks\.\d+\.ffn\.[02]\.(lora_down\.weight|lora_up\.weight|alpha|diff_b)$",
    # global linear layers: no .alpha (diffusers refuses one there; the scale is 1)
    r"^diffusion_model\.(time_embedding\.[02]|text_embedding\.[02]|time_projection\.1|head\.head)\."
    r"(lora_down\.weight|lora_up\.weight|diff_b)$",
    # full deltas: norms, modulation tables, patch embedding
    r"^diffusion_model\.blocks\.\d+\.((self_attn|cross_attn)\.norm_[qk]|norm3)\.(diff|diff_b)$",
    r"^diffusion_model\.(blocks\.\d+\.modulation|head\.modulation|patch_embedding)\.(diff|diff_b)$",
]


def check_lora_format(lora, base_sd):
    import re

    for key, t in lora.items():
        assert any(re.match(rule, key) for rule in LORA_RULES), key
        name = key[len("diffusion_model."):].rsplit(".", 2 if key.endswith(".weight") else 1)[0]
        if key.endswith(".lora_down.weight"):
            up = lora[f"diffusion_model.{name}.lora_up.weight"]
            w = base_sd[f"{name}.weight"]
            assert t.shape == (up.shape[1], w.shape[1]) and up.shape[0] == w.shape[0]  # down [r, in], up [out, r]
            alpha = lora.get(f"diffusion_model.{name}.alpha")
            assert (alpha is None) == (not name.startswith("blocks."))
            assert alpha is None or (alpha.dim() == 0 and float(alpha) == t.shape[0])  # alpha = r: scale 1


def linear_key(k):
    from causvid.lora_extract import BLOCK_LINEAR, GLOBAL_LINEAR

    name, _, _ = k.rpartition(".")
    return bool(BLOCK_LINEAR.match(name) or GLOBAL_LINEAR.match(name))


def student_of(base: WanDiT, only_linear: bool, seed=7) -> WanDiT:
    g = torch.Generator().manual_seed(seed)
    student = WanDiT(base.cfg).eval()
    student.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) if linear_key(k) or not only_linear
                             else v.clone() for k, v in base.state_dict().items()})
    return student


def lora_run(tmp_path, student, base):
    save_dit(base, str(tmp_path / "base.safetensors"))
    run = run_folder(tmp_path, student)
    cfg = load_config(str(run / "final" / "config.yaml"), [f"train.teacher_path={tmp_path / 'base.safetensors'}"])
    save_config(cfg, str(run / "final" / "config.yaml"))
    return run


def diffusers_with_lora(tmp_path, base, lora_file, caplog):
    export(open_source(str(tmp_path / "base.safetensors")), str(tmp_path / "base_d"), "diffusers")
    model = load_diffusers(str(tmp_path / "base_d"), caplog, subfolder="transformer")
    converted = diffusers.WanPipeline.lora_state_dict(str(lora_file))  # ComfyUI/Wan names -> diffusers/peft
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="causvid")
    return model


def test_lora_full_rank_in_diffusers_equals_the_student(tmp_path, caplog):
    pytest.importorskip("peft")
    base = random_dit(8)
    student = student_of(base, only_linear=True)
    out = tmp_path / "lora"
    files = export(open_source(str(lora_run(tmp_path, student, base))), str(out), "lora",
                   lora=LoraOptions(rank=64))
    assert "causvid_lora_rank32_float32.safetensors" in files  # 64 capped at the full rank of the tiny layers
    from safetensors.torch import load_file

    lora = load_file(str(out / "causvid_lora_rank32_float32.safetensors"))
    check_lora_format(lora, base.state_dict())
    report = json.loads((out / "lora_report.json").read_text())
    assert report["relative_error_total"] < 1e-12 and report["ignored_by_diffusers"] == []
    model = diffusers_with_lora(tmp_path, base, out / "causvid_lora_rank32_float32.safetensors", caplog)
    x, ctx = inputs(base.cfg)
    for t in TIMESTEPS:
        torch.testing.assert_close(theirs(model, x, ctx, t), ours(student, x, ctx, t), rtol=0, atol=1e-4)


def test_lora_truncated_rank_error_is_what_diffusers_applies(tmp_path, caplog):
    pytest.importorskip("peft")
    from causvid.export import LoraOptions
    from causvid.lora_extract import apply_lora

    base = random_dit(9)
    student = student_of(base, only_linear=True)
    out = tmp_path / "lora4"
    export(open_source(str(lora_run(tmp_path, student, base))), str(out), "lora", lora=LoraOptions(rank=4))
    report = json.loads((out / "lora_report.json").read_text())
    # per layer: |delta - rank-4 truncation| / |delta| = sqrt(sum_{i>=4} s_i^2 / sum s_i^2) (Eckart-Young)
    name = "blocks.1.ffn.0"
    delta = (student.state_dict()[f"{name}.weight"] - base.state_dict()[f"{name}.weight"]).double()
    sv = torch.linalg.svdvals(delta)
    assert report["relative_error_per_layer"][name] == pytest.approx(float((sv[4:] ** 2).sum() / (sv ** 2).sum()) ** 0.5,
                                                                      rel=1e-9)
    assert report["relative_error_total"] == pytest.approx(0.816, abs=1e-3)  # random deltas: not low-rank (docs)
    from safetensors.torch import load_file

    lora = load_file(str(out / "causvid_lora_rank4_float32.safetensors"))
    check_lora_format(lora, base.state_dict())
    merged = WanDiT(base.cfg).eval()
    merged.load_state_dict(apply_lora(base.state_dict(), lora))
    model = diffusers_with_lora(tmp_path, base, out / "causvid_lora_rank4_float32.safetensors", caplog)
    x, ctx = inputs(base.cfg)
    torch.testing.assert_close(theirs(model, x, ctx, 500.0), ours(merged, x, ctx, 500.0), rtol=0, atol=1e-4)
    assert (ours(merged, x, ctx, 500.0) - ours(student, x, ctx, 500.0)).abs().max() > 1e-3  # rank 4 is lossy


def test_lora_full_deltas_applied_as_comfyui_does_and_listed_as_ignored_by_diffusers(tmp_path):
    from causvid.lora_extract import apply_lora, extract_lora

    base = random_dit(10)
    student = student_of(base, only_linear=False)  # norms, modulation, patch embedding changed too
    lora, report = extract_lora(student.state_dict(), base.state_dict(), rank=64)
    check_lora_format(lora, base.state_dict())
    merged = apply_lora(base.state_dict(), lora)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    assert "blocks.0.modulation" in report.full_deltas and "patch_embedding.weight" in report.full_deltas
    from causvid.lora_extract import diffusers_skips

    assert diffusers_skips("diffusion_model.blocks.0.modulation.diff")
    assert diffusers_skips("diffusion_model.blocks.0.norm3.diff_b")
    assert not diffusers_skips("diffusion_model.blocks.0.ffn.0.diff_b")
    # energy: 1.0 keeps every singular value, a small fraction keeps rank 1
    full, _ = extract_lora(student.state_dict(), base.state_dict(), energy=1.0)
    assert full["diffusion_model.blocks.0.ffn.0.lora_down.weight"].shape[0] == 32
    one, _ = extract_lora(student.state_dict(), base.state_dict(), energy=1e-9)
    assert one["diffusion_model.blocks.0.ffn.0.lora_down.weight"].shape[0] == 1


def test_lora_cli_errors(tmp_path, capsys):
    base = random_dit(11)
    run = run_folder(tmp_path, student_of(base, only_linear=True))  # its config has no teacher_path
    assert main([str(run), "--format", "lora", "--out", str(tmp_path / "o")]) == 2
    assert "needs the base model" in capsys.readouterr().err
    assert main([str(run), "--format", "lora", "--out", str(tmp_path / "o"), "--base", str(tmp_path / "nope")]) == 2
    assert "LoRA base not found" in capsys.readouterr().err
    assert main([str(run), "--format", "lora", "--out", str(tmp_path / "o"), "--rank", "0"]) == 2
    assert main([str(run), "--format", "wan", "--out", str(tmp_path / "o"), "--rank", "4"]) == 2
    assert "apply to --format lora only" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
