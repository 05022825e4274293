"""The sampler: KV-cached chunk generation == a block-causal whole-clip computation, rolling cache, prompt
switches, I2V / V2V, the overlap mode, UniPC accuracy, streaming == generate, export folders, import hygiene."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from causvid import schedule as S
from causvid.config import load_config, save_config
from causvid.models.attention import ChunkLayout
from causvid.models.dit import WanDiT
from causvid.models.registry import dit_config
from causvid.sampler import CausalSampler, UniPCState, causal_sample, teacher_sample, v2v_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = [1000.0, 757.0, 522.0]
P1, P2 = "a red circle moving left", "a blue square moving up"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is many times faster than two on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model: WanDiT, seed: int = 0) -> WanDiT:
    """The official init zeroes head.head (a fresh model outputs 0): re-randomise so tests are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.head.weight.copy_(torch.randn(model.head.head.weight.shape, generator=g) * 0.2)
        model.head.head.bias.copy_(torch.randn(model.head.head.bias.shape, generator=g) * 0.2)
        for blk in model.blocks:
            for lin in (blk.self_attn.o, blk.cross_attn.o, blk.ffn[2]):
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.05)
    return model.eval()


def tiny_cfg(*extra):
    return load_config(None, ["model.size=tiny", "vae.size=tiny", "data.height=16", "data.width=16",
                              "data.num_frames=33", "sampler.num_frames=33", *extra])


def make_sampler(*extra, **kw) -> CausalSampler:
    torch.manual_seed(0)
    s = CausalSampler.from_config(tiny_cfg(*extra), device="cpu", steps=kw.pop("steps", STEPS), **kw)
    randomize(s.model)
    return s


# ------------------------------------------------------------------------------------------------------------
# The reference: block-causal whole-clip generation (previous chunks clean at t = 0, current chunk at t_j)
# ------------------------------------------------------------------------------------------------------------

def whole_clip_reference(model, layout, num_frames, ctx, chunk_inputs, renoises, steps_per_chunk, *,
                         prefix=None, uncond=None, guidance=1.0):
    """For each chunk in order and each step, run the model on the whole clip so far with the chunk mask and
    take the current chunk's output. ``chunk_inputs[c]`` is the chunk's state at ``steps_per_chunk[c][0]``."""
    done = []
    P = 0 if prefix is None else prefix.shape[1]
    for c, (f0, f1) in enumerate(layout.chunks(num_frames)):
        if f1 <= P:
            done.append(prefix[:, f0:f1])
            continue
        x, steps = chunk_inputs[c], steps_per_chunk[c]
        B, n = x.shape[:2]
        for j, t_j in enumerate(steps):
            full = torch.cat(done + [x], dim=1)  # [B, f1, C, H, W]
            t = torch.cat([torch.zeros(B, f0), torch.full((B, n), t_j)], dim=1)
            v = model(full, t, ctx, layout=layout)[:, f0:f1]
            if guidance != 1.0:
                v = S.cfg_combine(v, model(full, t, uncond, layout=layout)[:, f0:f1], guidance)
            x0 = S.x0_from_flow(x, v, torch.full((B, n), t_j))
            if j + 1 < len(steps):
                x = S.add_noise(x0, renoises[c][j], torch.full((B, n), steps[j + 1]))
        done.append(x0)
    return torch.cat(done, dim=1)


def sampler_noise(s: CausalSampler, seeds, num_frames, steps=STEPS, skip_frames=0):
    """Re-create the sampler's documented draws: per sample generator; per chunk eps0 then one per extra step."""
    gens = [torch.Generator().manual_seed(sd) for sd in seeds]
    h, w = s.latent_hw
    C = s.model.cfg.in_dim
    inputs, renoises = [], []
    for f0, f1 in s.layout.chunks(num_frames):
        if f1 <= skip_frames:
            inputs.append(None)
            renoises.append(None)
            continue
        n = f1 - f0
        draw = lambda n=n: torch.stack([torch.randn((n, C, h, w), generator=g) for g in gens])
        inputs.append(draw())
        renoises.append([draw() for _ in steps[1:]])
    return inputs, renoises


@pytest.mark.parametrize("independent_first_frame", [False, True])
def test_causal_sample_equals_whole_clip(independent_first_frame):
    torch.manual_seed(0)
    model = randomize(WanDiT(dit_config("tiny")))
    layout = ChunkLayout(3, independent_first_frame)
    B, F = 2, 7 if independent_first_frame else 8  # the last chunk is short in the second case
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(B, F, 4, 4, 6, generator=g)
    renoise = torch.randn(B, F, len(STEPS) - 1, 4, 4, 6, generator=g)
    ctx = torch.randn(B, 5, 24, generator=g)
    with torch.no_grad():
        got = causal_sample(model, noise, ctx, layout=layout, steps=STEPS, renoise=renoise)
        chunks = layout.chunks(F)
        ref = whole_clip_reference(model, layout, F, ctx, [noise[:, a:b] for a, b in chunks],
                                   [[renoise[:, a:b, j] for j in range(len(STEPS) - 1)] for a, b in chunks],
                                   [STEPS] * len(chunks))
    assert got.shape == noise.shape
    assert (got - ref).abs().max().item() <= 1e-5
    assert ref.abs().mean() > 0.1  # not vacuous


def test_sampler_generate_equals_whole_clip_and_batches_agree():
    s = make_sampler()
    with torch.no_grad():
        video, lat = s.generate(P1, num_frames=33, seed=3, return_latents=True)
        assert video.shape == (33, 16, 16, 3) and video.dtype == np.uint8 and lat.shape == (1, 9, 4, 4, 4)
        ctx = s.encode_prompts([P1])
        inputs, renoises = sampler_noise(s, [3], 9)
        ref = whole_clip_reference(s.model, s.layout, 9, ctx, inputs, renoises, [STEPS] * 3)
        assert (lat - ref).abs().max().item() <= 1e-5
        # a batch of prompts with per-sample seeds == single runs (seed list, or seed + b)
        vb, lb = s.generate([P1, P2], num_frames=33, seed=[3, 8], return_latents=True)
        _, l2 = s.generate(P2, num_frames=33, seed=8, return_latents=True)
        _, lc = s.generate([P2, P1], num_frames=33, seed=7, return_latents=True)  # seeds 7, 8
    assert vb.shape == (2, 33, 16, 16, 3)
    assert (lb[0] - lat[0]).abs().max() <= 1e-5 and (lb[1] - l2[0]).abs().max() <= 1e-5
    assert (lc[1] - lb[0]).abs().max() > 1e-3  # seed 8 with P1 differs from seed 3 with P1


def test_stream_equals_generate_and_cache_is_reused():
    s = make_sampler()
    video = s.generate(P1, num_frames=25, seed=5)
    cache = s.kv_caches[0]
    parts = list(s.stream(P1, num_frames=25, seed=5))
    assert [p.shape[0] for p in parts] == [9, 12, 4]  # 1 + 4 (3 - 1), 4 * 3, then the short last chunk
    assert np.array_equal(np.concatenate(parts), video)
    assert s.kv_caches[0] is cache  # preallocated once, reset between calls
    # two interleaved streams do not share a cache
    a, b = s.stream(P1, num_frames=25, seed=5), s.stream(P2, num_frames=25, seed=6)
    pa, pb = zip(*[(next(a), next(b)) for _ in range(2)])
    assert np.array_equal(np.concatenate(pa), video[:21])
    assert np.array_equal(np.concatenate(pb), s.generate(P2, num_frames=25, seed=6)[:21])


def test_classifier_free_guidance_equals_whole_clip():
    s = make_sampler(guidance=3.0, negative_prompt="static")
    with torch.no_grad():
        _, lat = s.generate(P1, num_chunks=2, seed=1, return_latents=True)
        ctx, unc = s.encode_prompts([P1]), s.encode_prompts(["static"])
        inputs, renoises = sampler_noise(s, [1], 6)
        ref = whole_clip_reference(s.model, s.layout, 6, ctx, inputs, renoises, [STEPS] * 2, uncond=unc, guidance=3.0)
    assert (lat - ref).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------------------
# Long video
# ------------------------------------------------------------------------------------------------------------

def test_rolling_cache_is_flat_and_keeps_sink_plus_window():
    s = make_sampler(sink_chunks=1, window_chunks=2)
    static = make_sampler()
    _, ref = static.generate(P1, num_chunks=7, seed=2, return_latents=True)
    sizes, outs = [], []
    for c, (_f0, f1, lat) in enumerate(s.stream_latents(P1, num_chunks=7, seed=2)):
        kv = s.kv_caches[0]
        sizes.append((kv.num_bytes, kv.k.data_ptr()))
        resident = kv.resident_frames()
        expect = list(range(f1)) if c < 3 else [0, 1, 2] + list(range(f1 - 6, f1))
        assert resident == expect, (c, resident)
        outs.append(lat)
    assert len(set(sizes)) == 1  # one allocation, constant bytes
    assert sizes[0][0] == 2 * 2 * 1 * 9 * 4 * 2 * 16 * 4  # k+v, layers, B, 9 frames x 4 tokens, heads, d, fp32
    got = torch.cat(outs, dim=1)
    assert torch.equal(got[:, :9], ref[:, :9])  # nothing evicted yet: identical to the static cache
    assert (got[:, 9:12] - ref[:, 9:12]).abs().max() > 1e-4  # chunk 3 no longer sees chunk 1


def test_positions_past_1024_frames():
    # 33 chunks of 32 latent frames = 1056 frames, rolling cache of 1 sink + 2 window chunks
    s = make_sampler("model.chunk_size=32", "data.num_frames=125", "sampler.num_frames=125",
                     sink_chunks=1, window_chunks=2, steps=[1000.0])
    last = None
    for f0, f1, lat in s.stream_latents(P1, num_chunks=33, seed=0):
        last = (f0, f1, lat)
    assert last[:2] == (1024, 1056) and torch.isfinite(last[2]).all()
    assert s.kv_caches[0].resident_frames() == list(range(32)) + list(range(992, 1056))
    # RoPE is relative: shifting every position (to 2000+) leaves a short video unchanged up to rounding
    a = torch.cat([x for *_, x in s.stream_latents(P1, num_chunks=2, seed=4)], dim=1)
    b = torch.cat([x for *_, x in s.stream_latents(P1, num_chunks=2, seed=4, start_frame=2000)], dim=1)
    assert (a - b).abs().max() <= 1e-4 and a.abs().mean() > 0.1


def test_overlap_mode_restarts_with_reencoded_overlap():
    s = make_sampler()
    F_pix, tail = 25, 9  # rollouts of 7 latent frames (25 pixel frames); 3 overlap latents cover 9 pixel frames
    out = s.generate_overlap(P1, num_rollouts=3, seed=0, rollout_frames=7)
    assert out.shape == (3 * (F_pix - tail) + tail, 16, 16, 3)
    first = s.generate(P1, num_frames=F_pix, seed=0)
    assert np.array_equal(out[:F_pix - tail], first[:F_pix - tail])  # rollout 1 == a plain generation
    assert not np.array_equal(out[F_pix - tail:F_pix], first[F_pix - tail:])  # replaced by rollout 2's re-decode


# ------------------------------------------------------------------------------------------------------------
# Prompt switching
# ------------------------------------------------------------------------------------------------------------

def test_prompt_switch_changes_only_what_follows():
    s = make_sampler()
    with torch.no_grad():
        _, base = s.generate(P1, num_chunks=4, seed=1, return_latents=True)
        _, sw = s.generate({0: P1, 2: P2}, num_chunks=4, seed=1, return_latents=True)
        _, rc = s.generate({0: P1, 2: P2}, num_chunks=4, seed=1, return_latents=True, recache=True)
        _, same = s.generate({0: P1, 2: P1}, num_chunks=4, seed=1, return_latents=True, recache=True)
        assert torch.equal(sw[:, :6], base[:, :6]) and torch.equal(rc[:, :6], base[:, :6])
        assert (sw[:, 6:] - base[:, 6:]).abs().max() > 1e-3
        assert (rc[:, 6:] - sw[:, 6:]).abs().max() > 1e-4  # re-caching changes the context the new chunks see
        assert torch.equal(same, base)  # re-caching under the same prompt reproduces the cache exactly
        # with recache, chunks after the switch == the whole clip computed under the new prompt
        ctx2 = s.encode_prompts([P2])
        inputs, renoises = sampler_noise(s, [1], 12)
        ref = whole_clip_reference(s.model, s.layout, 12, ctx2, inputs, renoises, [STEPS] * 4, prefix=rc[:, :6])
    assert (rc - ref).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------------------
# Image-to-video and video-to-video
# ------------------------------------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def test_image_to_video_keeps_the_first_frame():
    s = make_sampler("model.independent_first_frame=true", "data.num_frames=25", "sampler.num_frames=25")
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        video, lat = s.generate(P1, seed=2, image=img, return_latents=True)
        x = torch.from_numpy(img).permute(2, 0, 1)[None, None].float() / 127.5 - 1  # [1, 1, 3, H, W]
        z = s.vae.encode(x)
        recon = ((s.vae.decode(z)[0, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        assert video.shape == (25, 16, 16, 3)
        assert torch.equal(lat[:, :1], z)  # the first latent is the encoded image, exactly
        assert psnr(video[0], recon) == float("inf")  # first frame == the VAE's reconstruction of the image
        # the rest == the whole clip with the image latent clean at t = 0 (chunks [0,1), [1,4), [4,7)
        ctx = s.encode_prompts([P1])
        inputs, renoises = sampler_noise(s, [2], 7, skip_frames=1)
        ref = whole_clip_reference(s.model, s.layout, 7, ctx, inputs, renoises, [None, STEPS, STEPS], prefix=z)
    assert (lat - ref).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="independent_first_frame"):
        make_sampler().generate(P1, seed=0, image=img)


def test_video_to_video():
    s = make_sampler()
    src = np.random.default_rng(1).integers(0, 256, (25, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(src).permute(0, 3, 1, 2)[None].float() / 127.5 - 1  # [1, 25, 3, H, W]
    with torch.no_grad():
        enc = s.vae.encode(x)  # [1, 7, 4, 4, 4]
        # t_start = 0: nothing is noised, the model's x0 at sigma 0 is its input -> the encoded video, exactly
        v0, l0 = s.generate(P1, seed=0, video=src, t_start=0, return_latents=True)
        assert torch.equal(l0, enc)
        assert np.array_equal(v0, ((s.vae.decode(enc)[0] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        # streamed input (chunks of 5 frames) == whole input; output == the whole-clip reference
        v1, l1 = s.generate(P1, seed=4, video=src, t_start=600, return_latents=True)
        v2 = s.generate(P1, seed=4, video=(src[i:i + 5] for i in range(0, 25, 5)), t_start=600,
                        num_frames=25)
        assert np.array_equal(v1, v2)
        steps = v2v_steps(STEPS, 600)
        assert steps == [600.0, 522.0]
        eps, renoises = sampler_noise(s, [4], 7, steps=steps)
        chunks = s.layout.chunks(7)
        inputs = [S.add_noise(enc[:, a:b], e, 600.0) for (a, b), e in zip(chunks, eps)]
        ref = whole_clip_reference(s.model, s.layout, 7, s.encode_prompts([P1]), inputs, renoises, [steps] * 3)
        assert (l1 - ref).abs().max().item() <= 1e-5
        # less noise keeps more of the input
        err = [(s.generate(P1, seed=4, video=src, t_start=t, return_latents=True)[1] - enc).abs().mean()
               for t in (100, 900)]
    assert err[0] < err[1]


# ------------------------------------------------------------------------------------------------------------
# UniPC on a Gaussian toy problem with a closed-form flow
# ------------------------------------------------------------------------------------------------------------

class GaussianFlow(torch.nn.Module):
    """Exact flow of x_sigma = (1 - sigma) x0 + sigma eps with x0 ~ N(mu, s^2): v = (x - E[x0 | x]) / sigma.

    The ODE solution from x(1) = z is x(sigma) = (1 - sigma) mu + sqrt((1 - sigma)^2 s^2 + sigma^2) z, so
    x(0) = mu + s z. With s = 0 the paths are straight lines (v = z - mu is constant along each path).
    """

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, t, context, layout=None, cross_cache=None):
        sig = S._bcast(t.double() / 1000.0, x)
        var = (1 - sig) ** 2 * self.s ** 2 + sig ** 2
        x0_mean = self.mu + (1 - sig) * self.s ** 2 / var * (x.double() - (1 - sig) * self.mu)
        return ((x.double() - x0_mean) / sig).float()


def _ode_error(model, z, exact, steps, solver, shift=1.0):
    r = teacher_sample(model, z, None, num_steps=steps, shift=shift, guidance=1.0, solver=solver)
    return (r.x0.double() - exact.double()).abs().max().item()


def test_unipc_beats_euler_and_converges():
    # Both solvers end with sigma_{N-1} -> 0 by returning the x0 prediction (posterior mean), whose gap to the
    # ODE end point is ~ sigma_{N-1}^2 / (2 s^2): a wide data distribution (s = 2) keeps that gap small.
    z = torch.randn(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model = GaussianFlow(mu=0.5, s=2.0)
    exact = 0.5 + 2.0 * z
    e_euler = _ode_error(model, z, exact, 10, "euler")
    e_unipc = _ode_error(model, z, exact, 10, "unipc")
    assert e_unipc < e_euler / 10, (e_unipc, e_euler)  # measured: 0.036 vs 0.94
    errs = [_ode_error(model, z, exact, n, "unipc") for n in (10, 20, 40, 80)]
    assert errs[3] < errs[2] < errs[1] < errs[0] and errs[3] < 1e-3  # converges to the exact solution
    assert errs[1] / errs[3] > 8  # second order: 4x the steps, > 8x smaller error (measured ~19x)
    e_euler_80 = _ode_error(model, z, exact, 80, "euler")
    assert 6 < e_euler / e_euler_80 < 10  # Euler: first order (8x the steps, ~8x smaller error)
    # straight paths (s = 0): Euler is exact for any number of steps
    straight = GaussianFlow(mu=0.5, s=0.0)
    assert _ode_error(straight, z, torch.full_like(z, 0.5), 3, "euler", shift=3.0) < 1e-5


def test_unipc_first_step_is_euler():
    sig = S.sampling_sigmas(5, 3.0)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    out = UniPCState().step(x, v, sig, 0)
    assert torch.allclose(out, S.euler_step(x, v, float(sig[0]), float(sig[1])), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Export folders, output files, import hygiene
# ------------------------------------------------------------------------------------------------------------

def test_from_pretrained_round_trip(tmp_path):
    from causvid.models.text import ToyTextEncoder
    from causvid.models.vae import save_vae
    from causvid.models.weights import WeightsError, save_dit

    s = make_sampler()
    folder = tmp_path / "final"
    folder.mkdir()
    save_dit(s.model, str(folder / "model.safetensors"))
    save_vae(s.vae, str(tmp_path / "vae.safetensors"))
    assert isinstance(s.text_encoder, ToyTextEncoder)
    s.text_encoder.save(str(tmp_path / "text.safetensors"))
    cfg = tiny_cfg(f"vae.path={tmp_path / 'vae.safetensors'}", f"text.path={tmp_path / 'text.safetensors'}",
                   "schedule.denoising_step_list=[1000,757,522,0]")
    save_config(cfg, str(folder / "config.yaml"))
    t = CausalSampler.from_pretrained(str(folder), device="cpu")
    assert t.steps == STEPS and t.height == 16
    assert np.array_equal(t.generate(P1, num_frames=13, seed=0), s.generate(P1, num_frames=13, seed=0))
    with pytest.raises(WeightsError, match="config.yaml"):
        CausalSampler.from_pretrained(str(tmp_path))
    # the CLI over the same folder: a switch schedule, mp4 + gif
    from causvid.sampler import cli

    script = open(os.path.join(ROOT, "scripts", "sample.py")).read()
    assert "from causvid.sampler.cli import main" in script and len(script.splitlines()) < 30  # thin
    out = str(tmp_path / "cli.mp4")
    written = cli.main(["--model", str(folder), "--prompt", P1, "--switch", f"2:{P2}", "--num-chunks", "3",
                        "--seed", "1", "--out", out, "--gif", "--no-progress", "--device", "cpu"])
    assert written == [out, str(tmp_path / "cli.gif")]
    from PIL import Image

    assert Image.open(written[1]).n_frames == 33
    import av

    with av.open(out) as c:
        assert sum(1 for _ in c.decode(video=0)) == 33


def test_warped_steps_from_config():
    s = CausalSampler.from_config(tiny_cfg("schedule.denoising_step_list=[1000,750,500,250,0]",
                                           "schedule.warp_denoising_step=true", "schedule.shift=5.0"), device="cpu")
    assert s.steps == pytest.approx([1000.0, 937.5, 833.333333, 625.0])


def test_writers_and_show(tmp_path):
    pytest.importorskip("av")
    s = make_sampler()
    video = s.generate(P1, num_frames=9, seed=0)
    mp4, gif = s.save(video, str(tmp_path / "v.mp4")), s.save(video, str(tmp_path / "v.gif"))
    assert os.path.getsize(mp4) > 0
    from PIL import Image

    assert Image.open(gif).n_frames == 9
    html = CausalSampler.show(video, format="gif")  # class-level call
    assert "data:image/gif;base64," in html.data


def test_import_does_not_pull_training_stack():
    code = ("import sys, causvid.sampler; bad = [m for m in ('accelerate', 'wandb', 'causvid.train') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
