"""The benchmark's ``--vae-path`` / ``--tiny-decoder`` options and its ``decoder`` section (issue 21), on the tiny
VAE and a randomly initialised tiny decoder. Speed is never asserted."""

import json
import math

import pytest
import torch

from causvid.benchmark import BenchOptions, Workload
from causvid.benchmark.cli import main
from causvid.benchmark.decoder import decode_quality, held_out_latents, stream_decode
from causvid.models.tiny_decoder import TinyDecoder, TinyDecoderArch, save_tiny_decoder
from causvid.models.vae import WanVAE, save_vae, vae_arch
from causvid.train.vae_trainer import psnr

# 9 frames of 16x16 -> 3 latent frames of 4x4 (tiny VAE: 4x time, 4x space, z 4), one latent frame per chunk
ARGS = ["--size", "tiny", "--quick", "--height", "16", "--width", "16", "--frames", "9", "--chunk", "1", "--steps", "2",
        "--teacher-steps", "2", "--threads", "1", "--no-text-encoder", "--no-mp4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny VAE and a tiny decoder for its latents, random weights (seed unlike the benchmark's own VAE's)."""
    d = tmp_path_factory.mktemp("decoder_files")
    torch.manual_seed(123)
    save_vae(WanVAE("tiny"), str(d / "vae.safetensors"))
    arch = TinyDecoderArch.for_vae(vae_arch("tiny"), channels=8, min_channels=4, blocks=1)
    save_tiny_decoder(TinyDecoder(arch), str(d / "decoder.safetensors"))
    other = TinyDecoderArch.for_vae(vae_arch("toy"), channels=8, min_channels=4, blocks=0)  # z 8, not 4
    save_tiny_decoder(TinyDecoder(other), str(d / "toy_decoder.safetensors"))
    return {k: str(d / f"{k}.safetensors") for k in ("vae", "decoder", "toy_decoder")}


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the script sets the process-wide thread count


def test_decoder_section_and_student_with_the_tiny_decoder(files, tmp_path, restore_threads):
    out = tmp_path / "out"
    assert main(ARGS + ["--sections", "student,teacher,decoder", "--vae-path", files["vae"], "--tiny-decoder",
                        files["decoder"], "--decoder-videos", "2", "--out-dir", str(out)]) == 0
    r = json.loads((out / "benchmark.json").read_text())
    assert not r.get("errors"), r.get("errors")
    d = r["decoder"]
    assert d["latent_shape"] == [1, 3, 4, 4, 4] and d["pixel_frames"] == 9 and d["chunk"] == 1
    assert d["latents"].startswith("VAE encoding of 2 held-out toy-world videos")
    keys = {"whole_s", "stream_s", "stream_first_chunk_s", "whole_stats", "stream_stats", "fps_stream", "decode_flops",
            "params", "peak_bytes_whole", "peak_bytes_stream", "stream_vs_whole_max_abs_diff"}
    for name in ("vae", "tiny"):
        row = d[name]
        assert set(row) == keys
        assert row["whole_s"] > 0 and row["stream_s"] > 0 and 0 < row["stream_first_chunk_s"] <= row["stream_s"]
        assert row["decode_flops"] > 0 and row["stream_vs_whole_max_abs_diff"] < 1e-5
    v, t = d["vae"], d["tiny"]
    # ratios are VAE / tiny (> 1: the tiny decoder is faster / cheaper)
    assert d["speedup_whole"] == pytest.approx(v["whole_s"] / t["whole_s"], rel=1e-12)
    assert d["speedup_stream"] == pytest.approx(v["stream_s"] / t["stream_s"], rel=1e-12)
    assert d["speedup_first_chunk"] == pytest.approx(v["stream_first_chunk_s"] / t["stream_first_chunk_s"], rel=1e-12)
    assert d["flop_ratio"] == pytest.approx(v["decode_flops"] / t["decode_flops"], rel=1e-12)
    assert v["params"] == sum(p.numel() for p in WanVAE("tiny").parameters())
    q = d["psnr"]
    assert q["videos"] == 2 and all(math.isfinite(q[k]) and 0 < q[k] < 100
                                    for k in ("tiny_vs_vae", "vae_vs_frames", "tiny_vs_frames"))
    assert q["loss_db"] == pytest.approx(q["vae_vs_frames"] - q["tiny_vs_frames"], rel=1e-12)
    # the student pipeline decoded with the tiny decoder (its counted FLOPs are the tiny decoder's streamed decode,
    # same chunks), the teacher with the VAE
    st, te = r["student"], r["teacher"]
    assert st["decoder"] == "tiny" and te["decoder"] == "vae"
    assert st["decode_flops"] == t["decode_flops"] != v["decode_flops"]
    assert st["prompt_to_output_includes"] == ["sampling", "tiny_decode"] and te["decode_s"] is not None
    assert "tiny streaming decoder" in r["meta"]["student_decoder"] and "VAE" in r["meta"]["teacher_decoder"]
    assert r["meta"]["vae"] == f"trained weights {files['vae']}"
    issue21 = {row["target"].split(" >=")[0].split(" <=")[0]: row for row in r["targets"] if row["setting"] == "issue 21"}
    assert len(issue21) == 3 and issue21["tiny decoder speed-up over the VAE decoder (streamed)"]["value"] == \
        d["speedup_stream"]
    md = (out / "benchmark.md").read_text()
    assert "### Tiny decoder vs VAE decoder" in md and "| tiny decoder vs VAE decoder |" in md
    assert "tiny decoder)" in md.split("### Student vs teacher")[1].split("\n")[2]  # the student column's header


def test_workload_loads_the_files_and_decode_quality(files, one_thread):
    o = BenchOptions(size="tiny", height=16, width=16, frames=9, chunk=1, steps=2, text_encoder=False,
                     attention="sdpa", precision="fp32", vae_path=files["vae"], tiny_decoder=files["decoder"],
                     sections=("decoder",)).resolved()
    w = Workload(o, torch.device("cpu"))
    from safetensors.torch import load_file

    sd = load_file(files["vae"])
    assert all(torch.equal(w.vae.state_dict()[k], sd[k]) for k in sd)
    sd = load_file(files["decoder"])
    assert all(torch.equal(w.tiny.state_dict()[k], sd[k]) for k in sd)
    assert w.decoder is w.tiny and w.decoder_name == "tiny"
    latents, frames = held_out_latents(w, 2)
    assert latents.shape == (2, 3, 4, 4, 4) and frames.shape == (2, 9, 3, 16, 16)
    # a decoder against itself: identical frames (PSNR at the 1e-12 MSE floor, 126 dB), no loss
    same = decode_quality(w.vae, w.vae, latents, frames, chunk=1)
    assert same["tiny_vs_vae"] > 120 and same["loss_db"] == 0.0 and same["vae_vs_frames"] == same["tiny_vs_frames"]
    # the tiny decoder against the VAE: the mean of per-clip PSNRs of the (streamed == whole-clip) decodes
    got = decode_quality(w.vae, w.tiny, latents, frames, chunk=1)
    with torch.no_grad():
        want = [float(psnr(w.tiny.decode(latents[i:i + 1]), w.vae.decode(latents[i:i + 1]))[0]) for i in range(2)]
        gt = [float(psnr(w.vae.decode(latents[i:i + 1]), frames[i:i + 1])[0]) for i in range(2)]
    assert got["tiny_vs_vae"] == pytest.approx(sum(want) / 2, abs=1e-3) and got["tiny_vs_vae"] < 100
    assert got["vae_vs_frames"] == pytest.approx(sum(gt) / 2, abs=1e-3)
    assert stream_decode(w.tiny, latents[:1], 2).shape == (1, 9, 3, 16, 16)
    assert decode_quality(w.vae, w.tiny, latents, None, chunk=1)["loss_db"] is None
    # the teacher keeps the VAE: its run never touches the tiny decoder
    from causvid.benchmark import Recorder

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher decoded with the tiny decoder")

    w.tiny.decode = w.tiny.stream_decoder = refuse
    w.teacher_run(Recorder(w.clock), noise=w.noise(1), num_steps=1, decode=True)


@pytest.mark.parametrize("extra, message", [
    (["--tiny-decoder", "/nonexistent/decoder.safetensors"], "--tiny-decoder /nonexistent/decoder.safetensors: no such file"),
    (["--vae-path", "/nonexistent/vae.safetensors"], "--vae-path /nonexistent/vae.safetensors: no such file or folder"),
    (["--sections", "student,decoder"], "--sections decoder needs --tiny-decoder"),
    (["--tiny-decoder", "{vae}"], "holds a 'wan_vae', not a tiny decoder"),
    (["--vae-path", "{decoder}"], "holds a 'tiny_decoder', not a VAE"),
    (["--tiny-decoder", "{toy_decoder}"], "made for latents (z, spatial, temporal) = (8, 4, 4), the 'tiny' VAE's are (4, 4, 4)"),
    (["--tiny-decoder", "{decoder}", "--no-vae"], "need the VAE: drop --no-vae"),
    (["--tiny-decoder", "{decoder}", "--decoder-videos", "0"], "--decoder-videos must be >= 1"),
])
def test_bad_options_fail_in_one_line_before_anything_is_built(files, monkeypatch, capsys, extra, message):
    import causvid.benchmark.cli as cli

    monkeypatch.setattr(cli, "run_benchmark", lambda o: pytest.fail("built the benchmark despite bad options"))
    with pytest.raises(SystemExit) as e:
        main(ARGS + [a.format(**files) for a in extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("usage: ") is False and message in err, err


def test_decoder_section_is_a_default_section_with_tiny_decoder_only(files, monkeypatch):
    import causvid.benchmark.cli as cli

    seen = []

    def stub(o):
        seen.append(o.sections)
        raise KeyboardInterrupt  # stop before anything is built

    monkeypatch.setattr(cli, "run_benchmark", stub)
    for extra in ([], ["--tiny-decoder", files["decoder"]]):
        with pytest.raises(KeyboardInterrupt):
            main(ARGS + extra)
    assert "decoder" not in seen[0] and seen[1][-1] == "decoder" and seen[1][:-1] == seen[0]
