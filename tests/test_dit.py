"""The Wan2.1 DiT: official names/shapes, exact math, block-causal masks and the KV cache."""

import math

import pytest
import torch
from conftest import read_reference_tsv

from causvid.models.attention import ChunkLayout, KVCache, frame_chunk_mask, token_chunk_mask
from causvid.models.dit import WanDiT, apply_rope, rope_axis_dims, rope_cos_sin, sinusoidal_embedding
from causvid.models.registry import DIT_SIZES, dit_config
from causvid.models.weights import dit_to_diffusers_key


def make_model(size="tiny", seed=0, **kw):
    torch.manual_seed(seed)
    m = WanDiT(dit_config(size), **kw)
    # The official init zeroes the head: re-randomise it so equality tests are not vacuous.
    torch.nn.init.normal_(m.head.head.weight, std=0.2)
    torch.nn.init.normal_(m.head.head.bias, std=0.2)
    for blk in m.blocks:  # non-zero biases too, so every path is exercised
        for lin in (blk.self_attn.o, blk.cross_attn.o, blk.ffn[2]):
            torch.nn.init.normal_(lin.bias, std=0.05)
    return m.eval()


def inputs(B=2, F=6, H=4, W=6, seed=1, size="tiny"):
    cfg = dit_config(size)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, cfg.in_dim, H, W, generator=g)
    t = torch.rand(B, F, generator=g) * 1000
    ctx = torch.randn(B, cfg.text_len - 3, cfg.text_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("size,table", [("wan2.1-1.3b", "wan2.1_t2v_1.3b_dit.tsv"),
                                        ("wan2.1-14b", "wan2.1_t2v_14b_dit.tsv")])
def test_official_state_dict_names_and_shapes(size, table):
    with torch.device("meta"):
        m = WanDiT(dit_config(size))
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert ours == read_reference_tsv(table)
    n = sum(math.prod(s) for s in ours.values())
    assert n == {"wan2.1-1.3b": 1_418_996_800, "wan2.1-14b": 14_288_491_584}[size]


def test_diffusers_names_and_shapes():
    with torch.device("meta"):
        m = WanDiT(dit_config("wan2.1-1.3b"))
    mapped = {dit_to_diffusers_key(k): tuple(v.shape) for k, v in m.state_dict().items()}
    assert mapped == read_reference_tsv("diffusers_wan2.1_t2v_1.3b_transformer.tsv")


def test_fresh_model_outputs_zero_because_official_head_is_zero():
    torch.manual_seed(0)
    m = WanDiT(dit_config("tiny"))
    x, t, ctx = inputs()
    assert torch.count_nonzero(m(x, t, ctx)) == 0  # why every other test re-randomises the head


def test_sinusoid_and_rope_hand_values():
    e = sinusoidal_embedding(torch.tensor([0.0, 500.0]), 8)
    half = 4
    freqs = [10000 ** (-j / half) for j in range(half)]
    want = [math.cos(500 * f) for f in freqs] + [math.sin(500 * f) for f in freqs]
    assert torch.allclose(e[1], torch.tensor(want), atol=1e-6)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert rope_axis_dims(128) == (44, 42, 42) and rope_axis_dims(16) == (8, 4, 4)
    # token (f=2, h=1, w=0) with head_dim 16: pairs 0-3 rotate with f, 4-5 with h, 6-7 with w
    cos, sin = rope_cos_sin(16, torch.tensor([2]), 2, 3)
    tok = 1 * 3 + 0
    ang_t = [2 * 10000 ** (-2 * j / 8) for j in range(4)]
    ang_h = [1 * 10000 ** (-2 * j / 4) for j in range(2)]
    ang_w = [0.0, 0.0]
    assert torch.allclose(cos[tok], torch.tensor([math.cos(a) for a in ang_t + ang_h + ang_w]), atol=1e-6)
    # interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)
    x = torch.randn(1, 1, 1, 4)
    c, s = torch.tensor([[0.3, -0.5]]), torch.tensor([[0.7, 0.2]])
    y = apply_rope(x, c, s)[0, 0, 0]
    assert torch.allclose(y[0], x[0, 0, 0, 0] * 0.3 - x[0, 0, 0, 1] * 0.7)
    assert torch.allclose(y[1], x[0, 0, 0, 0] * 0.7 + x[0, 0, 0, 1] * 0.3)
    assert torch.allclose(y[2], x[0, 0, 0, 2] * -0.5 - x[0, 0, 0, 3] * 0.2)


def _reference_forward(m, x, t, ctx):
    """Independent float64 re-computation of the bidirectional forward (wan_architecture.md §2.2)."""
    cfg = m.cfg
    p = {k: v.double() for k, v in m.state_dict().items()}
    B, F, C, H, W = x.shape
    Hp, Wp = H // 2, W // 2
    D, nh = cfg.dim, cfg.num_heads
    d = D // nh
    # patch as a matmul: patch vector laid out (c, pt, ph, pw), w fastest
    xp = x.double().reshape(B, F, C, Hp, 2, Wp, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, F * Hp * Wp, C * 4)
    h = xp @ p["patch_embedding.weight"].reshape(D, -1).T + p["patch_embedding.bias"]
    half = cfg.freq_dim // 2
    fr = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = t.double().reshape(-1, 1) * fr
    sin_emb = torch.cat([ang.cos(), ang.sin()], 1)
    lin = lambda z, n: z @ p[n + ".weight"].T + p[n + ".bias"]
    e = lin(torch.nn.functional.silu(lin(sin_emb, "time_embedding.0")), "time_embedding.2")  # [B*F, D]
    e0 = lin(torch.nn.functional.silu(e), "time_projection.1").reshape(B, F, 6, D)
    e = e.reshape(B, F, D)
    c = torch.nn.functional.pad(ctx.double(), (0, 0, 0, cfg.text_len - ctx.shape[1]))
    c = lin(torch.nn.functional.gelu(lin(c, "text_embedding.0"), approximate="tanh"), "text_embedding.2")
    ln = lambda z: (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + cfg.eps)
    rms = lambda z, w: z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + cfg.eps) * w
    # RoPE as complex multiplication
    dt, dh, dw = rope_axis_dims(d)
    def tab(n, P):
        inv = 1.0 / 10000 ** (torch.arange(0, n, 2, dtype=torch.float64) / n)
        return torch.polar(torch.ones(P, n // 2, dtype=torch.float64), torch.arange(P).double()[:, None] * inv)
    Tt, Th, Tw = tab(dt, F), tab(dh, Hp), tab(dw, Wp)
    fi, hi, wi = torch.meshgrid(torch.arange(F), torch.arange(Hp), torch.arange(Wp), indexing="ij")
    mult = torch.cat([Tt[fi.flatten()], Th[hi.flatten()], Tw[wi.flatten()]], 1)  # [L, d/2]
    def rope(z):  # [B, L, nh, d]
        zc = torch.view_as_complex(z.reshape(*z.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(zc * mult[None, :, None]).flatten(-2)
    def attn(q, k, v):
        a = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(d), -1)
        return (a @ v.transpose(1, 2)).transpose(1, 2).reshape(B, -1, D)
    S = Hp * Wp
    per_frame = lambda z: z[:, :, None].expand(B, F, S, D).reshape(B, F * S, D)
    for i in range(cfg.num_layers):
        pre = f"blocks.{i}."
        m6 = p[pre + "modulation"][:, None] + e0  # [B, F, 6, D]
        sh1, sc1, g1, sh2, sc2, g2 = (per_frame(m6[:, :, j]) for j in range(6))
        z = ln(h) * (1 + sc1) + sh1
        q = rms(lin(z, pre + "self_attn.q"), p[pre + "self_attn.norm_q.weight"]).reshape(B, -1, nh, d)
        k = rms(lin(z, pre + "self_attn.k"), p[pre + "self_attn.norm_k.weight"]).reshape(B, -1, nh, d)
        v = lin(z, pre + "self_attn.v").reshape(B, -1, nh, d)
        h = h + lin(attn(rope(q), rope(k), v), pre + "self_attn.o") * g1
        z = ln(h) * p[pre + "norm3.weight"] + p[pre + "norm3.bias"]
        q = rms(lin(z, pre + "cross_attn.q"), p[pre + "cross_attn.norm_q.weight"]).reshape(B, -1, nh, d)
        k = rms(lin(c, pre + "cross_attn.k"), p[pre + "cross_attn.norm_k.weight"]).reshape(B, -1, nh, d)
        v = lin(c, pre + "cross_attn.v").reshape(B, -1, nh, d)
        h = h + lin(attn(q, k, v), pre + "cross_attn.o")
        z = ln(h) * (1 + sc2) + sh2
        h = h + lin(torch.nn.functional.gelu(lin(z, pre + "ffn.0"), approximate="tanh"), pre + "ffn.2") * g2
    hm = p["head.modulation"][:, None] + e[:, :, None]  # [B, F, 2, D]
    out = lin(ln(h) * (1 + per_frame(hm[:, :, 1])) + per_frame(hm[:, :, 0]), "head.head")  # [B, L, 4C]
    out = out.reshape(B, F, Hp, Wp, 1, 2, 2, C).permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(B, F, C, H, W)
    return out


def test_forward_equals_independent_float64_reference():
    m = make_model()
    x, t, ctx = inputs()
    with torch.no_grad():
        got = m(x, t, ctx)
        want = _reference_forward(m, x, t, ctx)
    assert want.abs().mean() > 0.1
    assert (got.double() - want).abs().max() < 1e-4


def test_uniform_t_and_full_mask_equal_bidirectional():
    m = make_model()
    x, t, ctx = inputs()
    tu = t[:, :1].expand_as(t)
    with torch.no_grad():
        bi = m(x, tu[:, 0], ctx)  # [B] timesteps
        full = m(x, tu, ctx, layout=ChunkLayout(chunk_size=x.shape[1]))  # one chunk = full mask
    assert (bi - full).abs().max() < 1e-5


@pytest.mark.parametrize("F", [1, 2, 5, 6, 9, 21])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("first", [False, True])
def test_mask_equals_formula(F, k, first):
    lay = ChunkLayout(k, first)
    m = frame_chunk_mask(F, lay)
    def chunk(f):
        if first:
            return 0 if f == 0 else 1 + (f - 1) // k
        return f // k
    for i in range(F):
        for j in range(F):
            assert bool(m[i, j]) == (chunk(j) <= chunk(i))
    tok = token_chunk_mask(F, 3, lay)
    assert tok.shape == (3 * F, 3 * F)
    assert torch.equal(tok[::3, ::3], m)


def _cached_rollout(m, x, t, ctx, lay, start_frame=0, cache=None):
    B, F = x.shape[:2]
    S = m.tokens_per_frame(x.shape[3], x.shape[4])
    cache = cache or m.new_kv_cache(B, F, S)
    outs = []
    for a, b in lay.chunks(F):
        outs.append(m(x[:, a:b], t[:, a:b], ctx, kv_cache=cache, start_frame=a))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("k,first,F", [(1, False, 6), (2, False, 6), (3, False, 6), (3, True, 7), (2, True, 5)])
def test_kv_cached_equals_block_causal(k, first, F):
    m = make_model()
    x, t, ctx = inputs(F=F)
    lay = ChunkLayout(k, first)
    # per-chunk timesteps, as in training and sampling
    ids = lay.chunk_ids(F)
    t = t[:, ids]
    with torch.no_grad():
        full = m(x, t, ctx, layout=lay)
        cached = _cached_rollout(m, x, t, ctx, lay)
    assert full.abs().mean() > 0.1
    assert (full - cached).abs().max() <= 1e-5


def test_causality_later_chunks_do_not_change_earlier_outputs():
    m = make_model()
    x, t, ctx = inputs(F=6)
    lay = ChunkLayout(2)
    x2 = x.clone()
    x2[:, 4:] = torch.randn_like(x2[:, 4:])  # change chunk 2
    with torch.no_grad():
        a, b = m(x, t, ctx, layout=lay), m(x2, t, ctx, layout=lay)
    assert torch.equal(a[:, :4], b[:, :4])
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3
    with torch.no_grad():  # and without the mask they all change (the test can tell)
        a, b = m(x, t, ctx), m(x2, t, ctx)
    assert (a[:, :4] - b[:, :4]).abs().max() > 1e-4


def test_kv_cache_test_fails_without_rope_frame_offset():
    """Negative control: dropping the RoPE frame offset in cached mode breaks the equivalence."""
    m = make_model()
    x, t, ctx = inputs(F=6)
    lay = ChunkLayout(2)
    S = m.tokens_per_frame(4, 6)
    with torch.no_grad():
        full = m(x, t, ctx, layout=lay)
        cache = m.new_kv_cache(2, 6, S)
        outs = []
        orig_plan = cache.plan
        for a, b in lay.chunks(6):
            # write at the right slots, but rotate as if every chunk started at frame 0
            cache.plan = lambda sf, n, a=a: orig_plan(a, n)
            outs.append(m(x[:, a:b], t[:, a:b], ctx, kv_cache=cache, start_frame=0))
        broken = torch.cat(outs, 1)
    assert (full[:, :2] - broken[:, :2]).abs().max() <= 1e-5  # first chunk is unaffected
    assert (full - broken).abs().max() > 1e-2


def test_cross_attention_cache_and_repeated_denoising_of_a_chunk():
    from causvid.models.attention import CrossAttnCache
    m = make_model()
    x, t, ctx = inputs(F=4)
    lay = ChunkLayout(2)
    with torch.no_grad():
        full = m(x, t, ctx, layout=lay)
        cache, cc = m.new_kv_cache(2, 4, 6), CrossAttnCache()
        # chunk 0 denoised twice with garbage first (overwrites its own slots), then the real input
        m(torch.randn_like(x[:, :2]), t[:, :2], ctx, kv_cache=cache, start_frame=0, cross_cache=cc)
        o0 = m(x[:, :2], t[:, :2], None, kv_cache=cache, start_frame=0, cross_cache=cc)
        o1 = m(x[:, 2:], t[:, 2:], None, kv_cache=cache, start_frame=2, cross_cache=cc)
    assert (torch.cat([o0, o1], 1) - full).abs().max() <= 1e-5


def test_rolling_cache_keeps_sink_and_window():
    cache = KVCache(1, 1, capacity_frames=5, tokens_per_frame=1, num_heads=1, head_dim=2, sink_frames=1)
    for start in range(0, 12, 2):
        cache.plan(start, 2)
        cache.plan(start, 2)  # re-denoising the same chunk keeps the slots
    assert cache.resident_frames() == [0, 8, 9, 10, 11]
    with pytest.raises(ValueError):
        cache.plan(0, 2)  # going back in time needs reset()


def test_gradient_checkpointing_same_grads():
    x, t, ctx = inputs(F=4)
    grads = []
    for ckpt in (False, True):
        m = make_model(gradient_checkpointing=ckpt).train()
        out = m(x, t, ctx, layout=ChunkLayout(2))
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_flex_attention_backend_matches_sdpa_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    x, t, ctx = inputs(F=6)
    lay = ChunkLayout(2)
    ms = make_model(attention="sdpa")
    mf = make_model(attention="flex")
    with torch.no_grad():
        a = ms(x, t, ctx, layout=lay)
        b = mf(x, t, ctx, layout=lay)
    assert (a - b).abs().max() < 1e-4


def test_bad_shapes_are_clear_errors():
    m = make_model()
    x, t, ctx = inputs()
    with pytest.raises(ValueError, match="channels"):
        m(x[:, :, :3], t, ctx)
    with pytest.raises(ValueError, match="timesteps"):
        m(x, t[:, :3], ctx)
    with pytest.raises(ValueError, match="text_dim"):
        m(x, t, ctx[..., :5])


def test_sizes_registry():
    assert set(DIT_SIZES) >= {"tiny", "toy", "wan2.1-1.3b", "wan2.1-14b"}
    assert dit_config("wan2.1-1.3b").head_dim == 128 and dit_config("wan2.1-14b").head_dim == 128
