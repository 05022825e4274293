"""The Wan2.1 VAE (wan_architecture.md §4, §7.2): names/shapes, streaming == whole clip, frame counts,
weight I/O (official .pth, diffusers, our safetensors) and a train_vae smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from causvid.config import load_config
from causvid.models.vae import (
    VAE_SIZES,
    WAN_LATENT_MEAN,
    WAN_LATENT_STD,
    CausalCache,
    CausalConv3d,
    Resample,
    RMSNorm,
    VAEArch,
    WanVAE,
    from_diffusers_key,
    load_vae,
    save_vae,
    to_diffusers_key,
    vae_from_config,
)
from causvid.models.weights import WeightsError
from causvid.train.vae_trainer import Phase

# A Wan-shaped miniature: 8x space (downsample2d first), 4x time, as the real VAE.
MINI_WAN = VAEArch(base_dim=8, z_dim=4, dim_mult=(1, 1, 2, 2), num_res_blocks=1,
                   temporal_downsample=(False, True, True))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one thread is faster and does not fight other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomized(arch: VAEArch | str, seed: int = 0) -> WanVAE:
    """A VAE with every tensor random (incl. the zero-initialised attention ``proj`` and the gammas)."""
    torch.manual_seed(seed)
    vae = WanVAE(arch)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim > 1:
                p.normal_(0, 1.0 / math.sqrt(p[0].numel()))
            else:
                p.normal_(0, 0.1)
    return vae.eval()


def video(b: int, t: int, s: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, s, s, generator=g) * 2 - 1


# ------------------------------------------------------------------------------ names and shapes


def test_state_dict_equals_official_reference(reference_tsv):
    ref = reference_tsv("wan2.1_vae.tsv")
    with torch.device("meta"):
        vae = WanVAE("wan2.1")
    sd = vae.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == list(ref.items())  # same names, shapes and order
    assert len(sd) == 194 and sum(v.numel() for v in sd.values()) == 126_892_531
    assert "latent_mean" not in sd and "latent_std" not in sd  # statistics are not weights


def test_diffusers_key_map_is_a_bijection_onto_reference(reference_tsv):
    ref, dref = reference_tsv("wan2.1_vae.tsv"), reference_tsv("diffusers_wan2.1_vae.tsv")
    mapped = {to_diffusers_key(k): s for k, s in ref.items()}
    assert mapped == dref
    assert {from_diffusers_key(k): s for k, s in dref.items()} == ref
    assert (to_diffusers_key("decoder.upsamples.7.time_conv.weight")
            == "decoder.up_blocks.1.upsamplers.0.time_conv.weight")
    assert to_diffusers_key("decoder.upsamples.9.residual.6.bias") == "decoder.up_blocks.2.resnets.1.conv2.bias"


@pytest.mark.parametrize("arch", [VAE_SIZES["tiny"], VAE_SIZES["toy"], MINI_WAN])
def test_key_map_round_trips_for_other_block_counts(arch):
    with torch.device("meta"):
        keys = list(WanVAE(arch).state_dict())
    d = [to_diffusers_key(k, arch) for k in keys]
    assert len(set(d)) == len(keys) and [from_diffusers_key(k, arch) for k in d] == keys
    resnet_idx = {int(k.split(".")[4]) for k in d if k.startswith("decoder.up_blocks.") and ".resnets." in k}
    assert resnet_idx == set(range(arch.num_res_blocks + 1))  # num_res_blocks + 1 resnets per up block


def test_sizes_and_latent_statistics():
    tiny, toy = WanVAE("tiny"), WanVAE("toy")
    assert (toy.arch.z_dim, toy.arch.temporal_factor, toy.arch.spatial_factor) == (8, 4, 4)
    assert (tiny.arch.temporal_factor, tiny.arch.spatial_factor) == (4, 4)
    assert torch.equal(toy.latent_mean, torch.zeros(8)) and torch.equal(toy.latent_std, torch.ones(8))
    with torch.device("meta"):
        wan = WanVAE("wan2.1")
    assert wan.latent_mean.device.type == "cpu" and wan.latent_mean.tolist() == pytest.approx(WAN_LATENT_MEAN)
    assert wan.latent_std.tolist() == pytest.approx(WAN_LATENT_STD)
    tiny.set_latent_stats([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 4.0, 4.0])
    mu = torch.ones(1, 1, 4, 1, 1) * 5
    assert tiny.normalize(mu).flatten().tolist() == [2.0, 1.5, 0.5, 0.25]  # (mu - mean) / std
    assert torch.equal(tiny.denormalize(tiny.normalize(mu)), mu)
    assert tiny.to(torch.bfloat16).latent_mean.dtype == torch.float32  # stats stay fp32


# ------------------------------------------------------------------------------ building blocks


def test_rms_norm_and_causal_conv_by_hand():
    n = RMSNorm(2)
    x = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1, 1)
    assert n(x).flatten().tolist() == pytest.approx([3 / 5 * math.sqrt(2), 4 / 5 * math.sqrt(2)])
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 5, 4, 4)
    ref = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), conv.weight, conv.bias)  # 2 zero frames in front only
    assert torch.allclose(conv(x), ref, atol=1e-6)
    cache = CausalCache()
    streamed = torch.cat([conv(x[:, :, :1], cache), conv(x[:, :, 1:3], cache), conv(x[:, :, 3:], cache)], 2)
    assert torch.allclose(streamed, ref, atol=1e-6)


def test_upsample3d_first_frame_bypass_and_interleave_order():
    r = Resample(2, "upsample3d")
    with torch.no_grad():
        r.resample[1].weight.zero_()
        r.resample[1].weight[0, 0, 1, 1] = 1.0  # spatial conv: out channel 0 = in channel 0 (centre tap)
        r.resample[1].bias.zero_()
        r.time_conv.weight.zero_()
        r.time_conv.bias.zero_()
        r.time_conv.weight[0, 0, 2] = 1.0  # channels [0:C] -> current frame (even output frames)
        r.time_conv.weight[2, 0, 1] = 10.0  # channels [C:2C] -> 10 x previous frame (odd output frames)
    x = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1, 1).expand(1, 2, 3, 1, 1).contiguous()
    y = r(x)  # frame 0 passes alone; later frames t -> (x_t, 10 x_{t-1}) with zeros before frame 1
    assert y.shape == (1, 1, 5, 2, 2)
    assert y[0, 0, :, 0, 0].tolist() == [1.0, 2.0, 0.0, 3.0, 20.0]


def test_downsample3d_windows():
    r = Resample(1, "downsample3d")
    with torch.no_grad():
        r.resample[1].weight.zero_()
        r.resample[1].weight[0, 0, 0, 0] = 1.0  # spatial: top-left tap
        r.resample[1].bias.zero_()
        r.time_conv.weight.copy_(torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1, 1))
        r.time_conv.bias.zero_()
    x = torch.arange(1.0, 6.0).view(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2).contiguous()
    y = r(x)[0, 0, :, 0, 0]  # [x0, conv(x0, x1, x2), conv(x2, x3, x4)]
    assert y.tolist() == [1.0, 1 + 20 + 300, 3 + 40 + 500]


# ------------------------------------------------------------------------------ shapes and frame counts


def test_frame_counts_and_errors():
    vae = randomized("tiny")
    with torch.no_grad():
        for t, f in [(1, 1), (5, 2), (9, 3)]:
            z = vae.encode(video(1, t, 8))
            assert z.shape == (1, f, 4, 2, 2)
            assert vae.decode(z).shape == (1, t, 3, 8, 8)
        assert vae.decode(torch.randn(2, 4, 4, 3, 5)).shape == (2, 13, 3, 12, 20)
    with pytest.raises(ValueError, match="T = 4"):
        vae.encode(video(1, 4, 8))
    with pytest.raises(ValueError, match="H = 6"):
        vae.encode(torch.zeros(1, 5, 3, 6, 8))
    with pytest.raises(ValueError, match=r"\[B, F, 4, h, w\]"):
        vae.decode(torch.zeros(1, 2, 3, 2, 2))
    enc = vae.stream_encoder()
    with pytest.raises(ValueError, match="T = 2"):
        enc.push(video(1, 2, 8))
    enc.push(video(1, 5, 8))
    with pytest.raises(ValueError, match="multiple of 4 frames per push, got T = 5"):
        enc.push(video(1, 5, 8))


def test_decode_clamps_and_output_in_range():
    vae = randomized("tiny")
    with torch.no_grad():
        z = torch.randn(1, 3, 4, 2, 2) * 5
        raw, out = vae.decode(z, clamp=False), vae.decode(z)
    assert raw.abs().max() > 1 and torch.equal(out, raw.clamp(-1, 1))


# ------------------------------------------------------------------------------ streaming == whole clip


@pytest.mark.parametrize("arch,size", [(VAE_SIZES["tiny"], 8), (MINI_WAN, 16)])
def test_streaming_decode_equals_full_decode(arch, size):
    vae = randomized(arch)
    z = torch.randn(2, 5, arch.z_dim, size // arch.spatial_factor, size // arch.spatial_factor)
    with torch.no_grad():
        full = vae.decode(z, clamp=False)
        assert full.shape == (2, 17, 3, size, size) and full.std() > 0.05
        for splits in ([1, 1, 1, 1, 1], [2, 3], [1, 4], [3, 1, 1]):
            dec = vae.stream_decoder(clamp=False)
            parts = [dec.push(c) for c in z.split(splits, dim=1)]
            assert [p.shape[1] for p in parts] == [1 + 4 * (splits[0] - 1)] + [4 * s for s in splits[1:]]
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.decode(z, clamp=False, chunk_frames=2), full, rtol=0, atol=1e-5)
        # Negative control: the carried state matters (a stream primed with another first frame differs).
        other = vae.stream_decoder(clamp=False)
        other.push(torch.randn_like(z[:, :1]))
        assert (other.push(z[:, 1:]) - full[:, 1:]).abs().max() > 1e-2


@pytest.mark.parametrize("arch,size", [(VAE_SIZES["tiny"], 8), (MINI_WAN, 16)])
def test_streaming_encode_equals_full_encode(arch, size):
    vae = randomized(arch)
    x = video(2, 17, size)
    with torch.no_grad():
        full = vae.encode(x)
        assert full.shape == (2, 5, arch.z_dim, size // arch.spatial_factor, size // arch.spatial_factor)
        assert full.std() > 0.05
        for splits in ([1, 4, 4, 4, 4], [5, 12], [9, 8], [1, 16]):
            enc = vae.stream_encoder()
            parts = [enc.push(c) for c in x.split(splits, dim=1)]
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.encode(x, chunk_frames=2), full, rtol=0, atol=1e-5)
        other = vae.stream_encoder()  # negative control: another first frame changes what follows
        other.push(-x[:, :1])
        assert (other.push(x[:, 1:]) - full[:, 1:]).abs().max() > 1e-2


def test_streaming_is_exact_in_float64():
    """fp64: streaming and whole-clip agree to rounding (1e-12), i.e. they are the same computation."""
    vae = randomized(MINI_WAN).double()
    x, z = video(1, 13, 16).double(), torch.randn(1, 4, 4, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        enc, dec = vae.stream_encoder(), vae.stream_decoder(clamp=False)
        streamed_z = torch.cat([enc.push(x[:, :1]), enc.push(x[:, 1:9]), enc.push(x[:, 9:])], 1)
        streamed_x = torch.cat([dec.push(z[:, :1]), dec.push(z[:, 1:3]), dec.push(z[:, 3:])], 1)
        torch.testing.assert_close(streamed_z, vae.encode(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(streamed_x, vae.decode(z, clamp=False), rtol=0, atol=1e-12)


def test_outputs_are_causal_in_time():
    vae = randomized(MINI_WAN)
    x, z = video(1, 9, 16), torch.randn(1, 3, 4, 2, 2)
    with torch.no_grad():
        x2 = x.clone()
        x2[:, 5:] = -x2[:, 5:]  # change pixel frames 5..8 -> only latent frame 2 may change
        a, b = vae.encode(x), vae.encode(x2)
        assert torch.equal(a[:, :2], b[:, :2]) and not torch.allclose(a[:, 2], b[:, 2])
        z2 = z.clone()
        z2[:, 2] += 1  # change latent frame 2 -> only pixel frames 5..8 may change
        a, b = vae.decode(z, clamp=False), vae.decode(z2, clamp=False)
        assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


# ------------------------------------------------------------------------------ weights I/O


def test_save_load_round_trip_is_exact(tmp_path):
    vae = randomized("tiny")
    vae.set_latent_stats([0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0])
    path = str(tmp_path / "vae.safetensors")
    save_vae(vae, path)
    back = load_vae(path, size="tiny")
    assert back.arch == vae.arch
    for (k, a), (k2, b) in zip(vae.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = video(1, 5, 8)
    with torch.no_grad():
        assert torch.equal(back.encode(x), vae.encode(x))
    with pytest.raises(WeightsError, match="different architecture than the requested size 'toy'"):
        load_vae(path, size="toy")
    model = vae_from_config(load_config(None, ["vae.size=tiny", f"vae.path={path}"]).vae)
    assert torch.equal(model.decoder.head[2].weight, vae.decoder.head[2].weight)


def test_official_pth_and_diffusers_folder_load(tmp_path):
    vae = randomized(MINI_WAN)
    sd = vae.state_dict()
    pth = str(tmp_path / "Wan2.1_VAE.pth")
    torch.save(dict(sd), pth)  # the official layout: a plain dict of tensors
    with pytest.raises(WeightsError, match="mis-shaped"):
        load_vae(pth)  # default size wan2.1: the strict check names the offending tensors
    from_pth = load_vae(pth, size=MINI_WAN)
    folder = tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "vae"
    folder.mkdir(parents=True)
    save_file({to_diffusers_key(k, MINI_WAN): v.contiguous() for k, v in sd.items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    cfg = {"_class_name": "AutoencoderKLWan", "base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 2, 2],
           "num_res_blocks": 1, "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
           "latents_mean": [0.5] * 4, "latents_std": [2.0] * 4, "is_residual": False}
    (folder / "config.json").write_text(json.dumps(cfg))
    from_diffusers = load_vae(str(folder.parent))  # pipeline root -> vae/ with its config.json
    assert from_diffusers.arch.latent_mean == (0.5,) * 4 and from_diffusers.arch.structure() == MINI_WAN.structure()
    for k, v in sd.items():
        assert torch.equal(from_pth.state_dict()[k], v) and torch.equal(from_diffusers.state_dict()[k], v)
    cfg["is_residual"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="is_residual"):
        load_vae(str(folder))


class _Payload:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickle_with_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload()}, path)
    with pytest.raises(WeightsError, match="evil.pth"):
        load_vae(path)


def test_truncated_and_mismatched_files_are_named(tmp_path):
    vae = randomized("tiny")
    path = str(tmp_path / "vae.safetensors")
    save_vae(vae, path)
    blob = open(path, "rb").read()
    cut = str(tmp_path / "cut.safetensors")
    open(cut, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(WeightsError, match="cut.safetensors"):
        load_vae(cut)
    sd = dict(vae.state_dict())
    del sd["decoder.head.2.bias"]
    sd["encoder.conv1.weight"] = torch.zeros(1, 3, 3, 3, 3)
    sd["encoder.extra"] = torch.zeros(1)
    bad = str(tmp_path / "bad.pth")
    torch.save(sd, bad)
    with pytest.raises(WeightsError) as err:
        load_vae(bad, size="tiny")
    msg = str(err.value)
    assert "decoder.head.2.bias" in msg and "encoder.conv1.weight" in msg and "encoder.extra" in msg
    assert "bad.pth" in msg
    with pytest.raises(WeightsError, match="not found"):
        load_vae(str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------------ training smoke test


def test_train_vae_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("train_vae_script", os.path.join(ROOT, "scripts", "train_vae.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = str(tmp_path / "run")
    rc = script.main(["--output", out, "--steps", "2", "--no-progress", "vae.size=tiny", "data.height=16",
                      "data.width=16", "data.num_frames=9", "train.optim.lr=1e-3", "train.batch_size=1",
                      "vae.train.schedule=0.5:1x8x2,0.5:9x0x1", "vae.train.eval_videos=1",
                      "vae.train.stats_videos=2"])
    assert rc == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["steps"] == 2 and math.isfinite(metrics["psnr_mean"]) and len(metrics["latent_std"]) == 4
    vae = load_vae(os.path.join(out, "vae.safetensors"), size="tiny")
    assert vae.arch.latent_std == tuple(metrics["latent_std"])
    with torch.no_grad():
        assert vae.decode(vae.encode(video(1, 9, 16))).shape == (1, 9, 3, 16, 16)


def test_inflated_init_starts_as_a_per_frame_image_model():
    from causvid.train.vae_trainer import inflated_he_init_

    torch.manual_seed(0)
    vae = inflated_he_init_(WanVAE("tiny")).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():  # give the zero-initialised convs weights (current tap only)
            if name.endswith("residual.6.weight"):
                p[:, :, -1].normal_(0, 0.1)
            elif name.endswith("proj.weight"):
                p.normal_(0, 0.1)
        x = video(1, 9, 8)
        z = vae.encode(x)  # latent j encodes pixel frame 4j alone (temporal taps zero, time_conv keeps x_2j)
        for j in range(3):
            torch.testing.assert_close(z[:, j], vae.encode(x[:, 4 * j:4 * j + 1])[:, 0], rtol=0, atol=1e-5)
        y = vae.decode(z, clamp=False)  # latent j -> frames 4j-3..4j, all the image decoding of latent j
        for j in (1, 2):
            img = vae.decode(z[:, j:j + 1], clamp=False)[:, 0]
            for t in range(4 * j - 3, 4 * j + 1):
                torch.testing.assert_close(y[:, t], img, rtol=0, atol=1e-5)


def test_training_schedule_and_metrics_by_hand():
    from causvid.train.vae_trainer import VAETrainOptions, parse_schedule, psnr

    assert parse_schedule("0.5:1x0x8,0.5:9x32") == [Phase(0.5, 1, 0, 8), Phase(0.5, 9, 32, 0)]
    opt = VAETrainOptions(schedule="0.25:1x0x8,0.75:9x32")
    assert [opt.phase_at(s, 8).frames for s in range(8)] == [1, 1, 9, 9, 9, 9, 9, 9]
    assert parse_schedule("0.5:1x32x16,0.5:33x32x1@0.2")[1] == Phase(0.5, 33, 32, 1, lr_scale=0.2)
    # per-phase warm-up (1 step) + cosine to min_lr_ratio, peak scaled by the phase's lr_scale
    opt = VAETrainOptions(schedule="0.5:1x32,0.5:9x32@0.2", min_lr_ratio=0.1)
    f = [opt.lr_factor(s, 8, 1) for s in range(8)]
    assert f[0] == pytest.approx(1.0) and f[4] == pytest.approx(0.2) and f[3] < f[1] and f[7] < f[5] == pytest.approx(0.2)
    opt = VAETrainOptions(schedule="0.25:1x0x8,0.75:9x32")
    for bad in ("0.5:1x0", "1.0:9", "0.5:1x0,0.6:9x32", "1.0:9x32@0", "1.0:9x32@x"):
        with pytest.raises(ValueError, match="vae.train.schedule"):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="clip frames must be 1 \\+ 4n"):
        VAETrainOptions(schedule="1.0:6x0").validate(33, 64, 64, 4, 4)
    with pytest.raises(ValueError, match="unknown vae.train option"):
        VAETrainOptions.from_mapping({"crop_size": 3})
    assert VAETrainOptions.from_mapping({"sample_posterior": "false", "kl_weight": "0.5"}).kl_weight == 0.5
    x = torch.zeros(2, 1, 3, 4, 4)
    assert psnr(x, x + 0.1).tolist() == pytest.approx([10 * math.log10(4 / 0.01)] * 2)


def test_bf16_model_accepts_fp32_inputs():
    vae = randomized("tiny").to(torch.bfloat16)
    with torch.no_grad():
        z = vae.encode(video(1, 5, 8))
        assert z.dtype == torch.bfloat16 and vae.decode(z.float()).shape == (1, 5, 3, 8, 8)
