"""Many-step autoregressive sampling of the causal teacher equals a whole-clip block-causal computation."""

import torch
from test_dit import make_model

from causvid import schedule as S
from causvid.models.attention import ChunkLayout
from causvid.sampler import causal_teacher_sample


def test_causal_teacher_sample_equals_whole_clip_reference():
    m = make_model()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 6, 4, 4, 6, generator=g)
    cond, uncond = torch.randn(2, 8, 24, generator=g), torch.randn(2, 8, 24, generator=g)
    lay, steps, w = ChunkLayout(2), 4, 3.0
    got = causal_teacher_sample(m, noise, cond, uncond, layout=lay, num_steps=steps, shift=5.0, guidance=w)
    # reference: each chunk integrated with the whole clip so far through the block-causal mask,
    # earlier chunks clean at t = 0 (what the KV cache holds after the refresh pass)
    sig = S.sampling_sigmas(steps, 5.0)
    done = []
    with torch.no_grad():
        for f0, f1 in lay.chunks(6):
            x = noise[:, f0:f1]
            for i in range(steps):
                clip = torch.cat(done + [x], 1)
                t = torch.zeros(2, f1)
                t[:, f0:] = float(sig[i]) * 1000
                vc = m(clip, t, cond, layout=lay)[:, f0:]
                vu = m(clip, t, uncond, layout=lay)[:, f0:]
                x = S.euler_step(x, S.cfg_combine(vc, vu, w), float(sig[i]), float(sig[i + 1]))
            done.append(x)
    want = torch.cat(done, 1)
    assert want.abs().mean() > 0.1
    assert (got - want).abs().max() < 1e-4


def test_rolling_window_bounds_the_context():
    m = make_model()
    noise = torch.randn(1, 8, 4, 4, 6, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(1, 8, 24, generator=torch.Generator().manual_seed(2))
    lay = ChunkLayout(2)
    full = causal_teacher_sample(m, noise, cond, None, layout=lay, num_steps=3, guidance=1.0)
    roll = causal_teacher_sample(m, noise, cond, None, layout=lay, num_steps=3, guidance=1.0, sink_chunks=1,
                                 window_chunks=2)
    assert torch.equal(full[:, :6], roll[:, :6])  # the window (sink 1 + 2 chunks) holds everything so far
    assert (full[:, 6:] - roll[:, 6:]).abs().max() > 1e-4  # chunk 3 no longer sees chunk 1
