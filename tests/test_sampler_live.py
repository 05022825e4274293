"""Live prompt switching (causvid.sampler.live): a prompt changed while the stream runs == the same switch written
in a schedule, with and without LongLive-style KV re-caching; sampler views share the networks, not the caches."""

import threading

import numpy as np
import pytest
import torch
from test_sampler import P1, P2, make_sampler

from causvid.sampler import LivePrompt

pytestmark = pytest.mark.usefixtures("one_thread")

P3 = "a green triangle moving right"


def live_run(s, changes: dict, num_chunks: int, seed: int, **kw):
    """Stream with a LivePrompt; ``changes[c] = (prompt, recache)`` is set after chunk c - 1 was yielded (so it
    takes effect at chunk c). Returns (latents [1, F, C, h, w], the LivePrompt)."""
    live = LivePrompt(P1)
    out = []
    for c, (_f0, _f1, lat) in enumerate(s.stream_latents(live, num_chunks=num_chunks, seed=seed, **kw)):
        out.append(lat)
        if c + 1 in changes:
            live.set(*changes[c + 1])
    return torch.cat(out, dim=1), live


@pytest.mark.parametrize("recache", [False, True])
def test_live_switch_equals_scheduled_switch(recache):
    s = make_sampler(sink_chunks=1, window_chunks=2)  # rolling cache: re-cache replays sink + window only
    got, live = live_run(s, {2: (P2, recache), 4: (P3, recache)}, num_chunks=6, seed=3)
    _, ref = s.generate({0: P1, 2: P2, 4: P3}, num_chunks=6, seed=3, return_latents=True, recache=recache)
    _, other = s.generate({0: P1, 2: P2, 4: P3}, num_chunks=6, seed=3, return_latents=True,
                          recache=not recache)
    assert [(w.chunk, w.prompt, w.recache) for w in live.switches] == [(0, P1, False), (2, P2, recache),
                                                                       (4, P3, recache)]
    assert (got - ref).abs().max().item() <= 1e-6
    assert (got[:, 6:] - other[:, 6:]).abs().max().item() > 1e-4  # the recache choice matters: not vacuous


def test_live_recache_choice_per_switch_and_collapsed_changes():
    s = make_sampler()
    live = LivePrompt(P1)
    it = s.stream_latents(live, num_chunks=5, seed=2)
    out = [next(it)[2]]
    live.set(P3)  # overwritten before the next chunk: only the last change counts
    live.set(P2, recache=True)
    out += [next(it)[2], next(it)[2]]
    live.set(P1, recache=False)
    out += [x for *_, x in it]
    got = torch.cat(out, dim=1)
    assert [(w.chunk, w.prompt, w.recache) for w in live.switches] == [(0, P1, False), (1, P2, True),
                                                                       (3, P1, False)]
    # reference: re-cache at chunk 1 (schedule up to chunk 2), then a plain switch at chunk 3, built from parts
    _, a = s.generate({0: P1, 1: P2}, num_chunks=3, seed=2, return_latents=True, recache=True)
    assert (got[:, :9] - a).abs().max().item() <= 1e-6
    _, b = s.generate({0: P1, 1: P2, 3: P1}, num_chunks=5, seed=2, return_latents=True, recache=True)
    assert (got[:, 9:] - b[:, 9:]).abs().max().item() > 1e-4  # chunk 3 did not re-cache, b did


def test_live_prompt_is_thread_safe_and_checked():
    live = LivePrompt(P1)
    ts = [threading.Thread(target=lambda i=i: [live.set(f"{P2} {i}") for _ in range(200)]) for i in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert live.take(0).prompt.startswith(P2) and live.take(1) is None
    with pytest.raises(ValueError, match="must be a string"):
        live.set(None)


def test_views_share_networks_not_caches():
    s = make_sampler()
    v = s.with_options(steps=[1000.0], window_chunks=2, sink_chunks=0)
    assert v.model is s.model and v.vae is s.vae and v.text_encoder is s.text_encoder
    assert (v.steps, v.window_chunks, v.sink_chunks) == ([1000.0], 2, 0) and s.steps != v.steps
    a = v.generate(P1, num_chunks=4, seed=1)
    assert v.kv_caches and not s.kv_caches and v.kv_caches[0].capacity == 6
    ref = make_sampler(steps=[1000.0], window_chunks=2, sink_chunks=0).generate(P1, num_chunks=4, seed=1)
    assert np.array_equal(a, ref)
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.with_options(steps=[500.0, 900.0])
    with pytest.raises(TypeError, match="unknown CausalSampler option"):
        s.with_options(height=32)
