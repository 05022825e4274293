"""The tiny streaming decoder: streamed == whole clip, FLOPs against the VAE decoder, training on a VAE's latents,
file round trip, and the sampler's ``sampler.decoder=tiny``."""

import json

import numpy as np
import pytest
import torch
from test_sampler import make_sampler

from causvid.benchmark.flops import count_flops
from causvid.config import ConfigError, load_config
from causvid.models.tiny_decoder import TinyDecoder, TinyDecoderArch, load_tiny_decoder, save_tiny_decoder
from causvid.models.vae import WanVAE, save_vae, vae_arch
from causvid.models.weights import WeightsError
from causvid.train.decoder_cli import main as train_decoder_main
from causvid.train.decoder_trainer import DecoderTrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomized(arch: TinyDecoderArch, seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    return TinyDecoder(arch).eval()


@pytest.mark.parametrize("size,splits", [("toy", [1, 2, 3, 3]), ("toy", [1, 8]), ("wan2.1", [3, 1, 2])])
def test_streamed_equals_whole_clip(size, splits):
    dec = _randomized(TinyDecoderArch.for_vae(vae_arch(size), channels=16, blocks=2))
    a = dec.arch
    z = torch.randn(2, sum(splits), a.z_dim, 4, 6)
    with torch.no_grad():
        whole = dec.decode(z, clamp=False)
        s = dec.stream_decoder(clamp=False)
        parts = [s.push(c) for c in z.split(splits, dim=1)]
    assert whole.shape == (2, 1 + a.temporal_factor * (sum(splits) - 1), 3, 4 * a.spatial_factor, 6 * a.spatial_factor)
    assert [p.shape[1] for p in parts] == [1 + a.temporal_factor * (splits[0] - 1)] + [a.temporal_factor * n
                                                                                      for n in splits[1:]]
    assert torch.equal(torch.cat(parts, dim=1), whole)  # same kernels on the same frames: bit-exact
    # causal: later latents do not change earlier frames
    z2 = z.clone()
    z2[:, -1] += 1.0
    with torch.no_grad():
        other = dec.decode(z2, clamp=False)
    n_before = 1 + a.temporal_factor * (sum(splits) - 2)
    assert torch.equal(other[:, :n_before], whole[:, :n_before]) and not torch.equal(other, whole)


def test_flops_hand_computed_and_against_the_vae():
    a = TinyDecoderArch(z_dim=4, spatial_factor=4, temporal_factor=4, channels=8, min_channels=2, blocks=1)
    assert a.stage_channels == [4, 2]
    dec = _randomized(a)
    F_, h, w = 3, 5, 6
    T = 1 + 4 * (F_ - 1)
    lat = F_ * h * w  # latent voxels
    hand = 2 * (27 * 4 * 8 * lat  # conv_in
                + 2 * 27 * 8 * 8 * lat  # one residual block
                + 9 * 8 * 32 * lat  # expand, over every latent frame before the first frame's trim
                + 9 * 8 * 4 * T * (2 * h) * (2 * w)  # stage 1
                + 9 * 4 * 2 * T * (4 * h) * (4 * w)  # stage 2
                + 9 * 2 * 3 * T * (4 * h) * (4 * w))  # conv_out
    with torch.no_grad():
        flops, _ = count_flops(lambda: dec.decode(torch.randn(1, F_, 4, h, w)))
    assert flops == hand
    # the shipped Wan2.1 shape: <= 5 % of the Wan VAE decoder (measured at a small size: both are convolutions,
    # linear in pixels; the VAE's middle attention only grows faster with size)
    torch.manual_seed(0)
    vae = WanVAE(vae_arch("wan2.1")).eval()
    tiny = _randomized(TinyDecoderArch.for_vae(vae.arch))
    z = torch.randn(1, 3, 16, 4, 4)
    with torch.no_grad():
        f_tiny, _ = count_flops(lambda: tiny.decode(z))
        f_vae, _ = count_flops(lambda: vae.decode(z))
    assert f_tiny <= 0.05 * f_vae, (f_tiny, f_vae)


def test_file_round_trip_and_clear_errors(tmp_path):
    dec = _randomized(TinyDecoderArch.for_vae(vae_arch("toy"), channels=8))
    path = str(tmp_path / "decoder.safetensors")
    save_tiny_decoder(dec, path)
    back = load_tiny_decoder(path)
    assert back.arch == dec.arch
    z = torch.randn(1, 2, 8, 3, 3)
    with torch.no_grad():
        assert torch.equal(back.decode(z), dec.decode(z))
    save_vae(WanVAE(vae_arch("tiny")), str(tmp_path / "vae.safetensors"))
    with pytest.raises(WeightsError, match="not a tiny decoder"):
        load_tiny_decoder(str(tmp_path / "vae.safetensors"))
    with pytest.raises(WeightsError, match="not found"):
        load_tiny_decoder(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="spatial_factor"):
        TinyDecoderArch(spatial_factor=6)
    with pytest.raises(ValueError, match="unknown decoder option"):
        DecoderTrainOptions.from_mapping({"stepz": 3})
    with pytest.raises(ValueError, match="target"):
        DecoderTrainOptions.from_mapping({"target": "pixels"})


def test_trains_on_a_vae_latents_and_improves(tmp_path, capsys):
    """The command line end to end on a random 'tiny' VAE and 16x16 toy-world videos: loss falls, metrics written."""
    torch.manual_seed(0)
    save_vae(WanVAE(vae_arch("tiny")), str(tmp_path / "vae.safetensors"))
    common = ["--vae", str(tmp_path / "vae.safetensors"), "--no-progress", "vae.size=tiny", "data.height=16",
              "data.width=16", "data.num_frames=9", "pool_videos=4", "eval_videos=2", "batch_size=4", "crop=0",
              "channels=16", "target=vae", "lr=3e-3"]
    assert train_decoder_main(["--out", str(tmp_path / "d0"), *common, "steps=1"]) == 0
    assert train_decoder_main(["--out", str(tmp_path / "d1"), *common, "steps=60"]) == 0
    m0 = json.loads((tmp_path / "d0" / "metrics.json").read_text())
    m1 = json.loads((tmp_path / "d1" / "metrics.json").read_text())
    assert m1["psnr_tiny_vs_vae"] > m0["psnr_tiny_vs_vae"] + 3.0, (m0["psnr_tiny_vs_vae"], m1["psnr_tiny_vs_vae"])
    assert load_tiny_decoder(str(tmp_path / "d1" / "decoder.safetensors")).arch.z_dim == 4
    assert train_decoder_main(["--out", str(tmp_path / "d2"), *common, "steps=0"]) == 2
    assert train_decoder_main(["--out", str(tmp_path / "d2"), "--vae", str(tmp_path / "nope.pth")]) == 2
    assert "error:" in capsys.readouterr().err


def test_sampler_decodes_with_the_tiny_decoder(tmp_path):
    dec = _randomized(TinyDecoderArch.for_vae(vae_arch("tiny"), channels=8))
    path = str(tmp_path / "decoder.safetensors")
    save_tiny_decoder(dec, path)
    s = make_sampler("sampler.decoder=tiny", f"sampler.tiny_decoder_path={path}")
    video, lat = s.generate("a red circle", return_latents=True)
    with torch.no_grad():
        want = ((dec.decode(lat) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[0].permute(0, 2, 3, 1).numpy()
    assert video.shape == want.shape
    assert np.abs(video.astype(int) - want.astype(int)).max() <= 1
    vae_video = make_sampler().generate("a red circle")
    assert not np.array_equal(vae_video, video)
    with pytest.raises(ConfigError, match="tiny_decoder_path"):
        load_config(None, ["sampler.decoder=tiny"])
    with pytest.raises(ValueError, match="decoder takes"):
        make_sampler(decoder=_randomized(TinyDecoderArch.for_vae(vae_arch("toy"), channels=8)))
