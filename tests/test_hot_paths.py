"""Issue 24's lean hot paths: each one equals the formula it replaces (bit for bit, or to 1e-6)."""

import pytest
import torch
from test_dit import inputs, make_model

from causvid.models.attention import ChunkLayout, prefix_chunk_attention, sdpa, token_chunk_mask
from causvid.models.dit import rope_axis_dims, rope_cos_sin, rotate


def _whole_grid_cos_sin(head_dim, frames, height, width, theta=10000.0):
    """The former formula: cos / sin of the whole [L, d/2] float64 angle grid."""
    dims = rope_axis_dims(head_dim)

    def angles(pos, n):
        inv = 1.0 / theta ** (torch.arange(0, n, 2, dtype=torch.float64) / n)
        return pos.double()[:, None] * inv[None]

    at, ah, aw = angles(frames, dims[0]), angles(torch.arange(height), dims[1]), angles(torch.arange(width), dims[2])
    Fq = at.shape[0]
    ang = torch.cat([at[:, None, None].expand(Fq, height, width, -1), ah[None, :, None].expand(Fq, height, width, -1),
                     aw[None, None].expand(Fq, height, width, -1)], -1).reshape(Fq * height * width, -1)
    return torch.cos(ang).float(), torch.sin(ang).float()


def _pairwise_rope(x, cos, sin):
    """The former seven-pass formula: (a, b) -> (a c - b s, a s + b c) on interleaved pairs."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


@pytest.mark.parametrize("head_dim,frames,h,w", [(16, (0, 7), 2, 3), (128, (5, 26), 12, 12), (64, (1000, 1003), 8, 8)])
def test_rope_tables_and_rotation_are_bit_equal_to_the_former_formulas(head_dim, frames, h, w):
    fr = torch.arange(*frames)
    cos, sin = rope_cos_sin(head_dim, fr, h, w)
    c0, s0 = _whole_grid_cos_sin(head_dim, fr, h, w)
    assert torch.equal(cos, c0) and torch.equal(sin, s0)
    x = torch.randn(2, cos.shape[0], 3, head_dim, generator=torch.Generator().manual_seed(0))
    got = rotate(x, torch.complex(cos, sin))
    assert torch.equal(got, _pairwise_rope(x, cos, sin))
    assert not torch.equal(got, _pairwise_rope(x, cos, -sin))  # the comparison can tell a wrong rotation


@pytest.mark.parametrize("k,first,F", [(1, False, 4), (2, False, 5), (3, False, 6), (3, True, 7), (2, True, 2)])
def test_prefix_chunk_attention_equals_the_masked_sdpa(k, first, F):
    lay, S = ChunkLayout(k, first), 6
    g = torch.Generator().manual_seed(k + F)
    q, kk, v = (torch.randn(2, F * S, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    want = sdpa(q, kk, v, token_chunk_mask(F, S, lay))
    got = prefix_chunk_attention(q, kk, v, F, S, lay)
    assert (got - want).abs().max() <= 1e-6
    gw = torch.autograd.grad(want.square().sum(), (q, kk, v))
    gg = torch.autograd.grad(got.square().sum(), (q, kk, v))
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(gg, gw))
    if F > k:  # a bidirectional computation differs: the test can tell a missing mask
        assert (sdpa(q, kk, v) - want).abs().max() > 1e-3


def test_block_causal_forward_same_with_prefix_and_mask_backends():
    x, t, ctx = inputs(F=6)
    lay = ChunkLayout(2)
    a, b = make_model(attention="sdpa"), make_model(attention="sdpa_mask")
    with torch.no_grad():
        assert (a(x, t, ctx, layout=lay) - b(x, t, ctx, layout=lay)).abs().max() <= 1e-6


def test_rope_tables_are_reused_and_freed():
    m = make_model()
    x, t, ctx = inputs(F=4)
    with torch.no_grad():
        first = m(x, t, ctx)
        table = m._rope_tables[(0, 4, 2, 3, "cpu")]
        again = m(x, t, ctx)
    assert torch.equal(first, again) and m._rope_tables[(0, 4, 2, 3, "cpu")] is table  # same object, no rebuild
    for start in range(20):
        m.rope(start, 1, 2, 3, "cpu")
    assert len(m._rope_tables) == m.ROPE_CACHE_SIZE  # bounded
    m.free_caches()
    assert not m._rope_tables
