"""Issue 24: a repeat ``generate()`` reuses the sampler's caches (KV, cross-attention K/V, RoPE tables) and
allocates none; ``free_caches()`` drops them; stale cross-attention K/V are never reused."""

import numpy as np
import torch
from test_sampler import P1, P2, _one_thread, randomize  # noqa: F401  (the fixture: one thread)

from causvid.benchmark.measure import torch_cpu_alloc_peak
from causvid.config import load_config
from causvid.sampler import CausalSampler

STEPS = [1000.0, 757.0, 522.0]


def toy_sampler() -> CausalSampler:
    torch.manual_seed(0)
    cfg = load_config(None, ["model.size=toy", "vae.size=toy", "data.height=64", "data.width=64",
                             "sampler.num_frames=33"])
    s = CausalSampler.from_config(cfg, device="cpu", steps=STEPS)
    randomize(s.model)
    return s


def test_second_generate_reuses_every_cache_and_allocates_none():
    s = toy_sampler()
    allocs_first, allocs_second = [], []
    peak_first, first = torch_cpu_alloc_peak(lambda: s.generate(P1, seed=3), allocs_first)  # new torch tensors
    kv, cross = s.kv_caches[0], s._cross_pool[0][2]
    tables = dict(s.model._rope_tables)
    assert cross.ready and tables
    peak_second, second = torch_cpu_alloc_peak(lambda: s.generate(P1, seed=3), allocs_second)
    assert np.array_equal(first, second)
    assert s.kv_caches[0] is kv and s._cross_pool[0][2] is cross  # the same objects, reset / reused
    assert all(s.model._rope_tables[k] is v for k, v in tables.items())
    assert peak_second <= peak_first + 2 ** 20, (peak_first, peak_second)  # <= 1 MiB above the first call's peak
    cache_tensor = kv.num_bytes // 2  # keys, values: allocated by the first call only (other tensors may share the size)
    assert allocs_first.count(cache_tensor) - allocs_second.count(cache_tensor) == 2


def test_cross_cache_follows_prompts_and_weights_and_is_freed():
    s = toy_sampler()
    a = s.generate(P1, num_frames=9, seed=1)
    b = s.generate(P2, num_frames=9, seed=1)  # another prompt: new K/V
    assert not np.array_equal(a, b)
    assert np.array_equal(s.generate(P1, num_frames=9, seed=1), a)
    with torch.no_grad():  # an in-place weight update (an optimiser step) invalidates the cached K/V
        s.model.blocks[0].cross_attn.k.weight.mul_(3.0)
    changed = s.generate(P1, num_frames=9, seed=1)
    s.free_caches()
    assert not s._kv_pool and not s._cross_pool and not s.model._rope_tables
    assert np.array_equal(s.generate(P1, num_frames=9, seed=1), changed)  # equal to a cold start
    assert not np.array_equal(changed, a)
