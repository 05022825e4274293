"""Flow-matching schedule against hand-computed tables."""

import pytest
import torch

from causvid import schedule as S


def test_shift_formula():
    assert S.shift_sigma(0.5, 1.0) == 0.5
    assert S.shift_sigma(0.5, 3.0) == pytest.approx(1.5 / 2.0)
    assert S.shift_sigma(0.0, 8.0) == 0.0 and S.shift_sigma(1.0, 8.0) == 1.0


def test_causvid_step_list_on_50_step_shift8_grid():
    t = S.sampling_timesteps(50, 8.0)
    assert t.shape == (51,) and t[0] == 1000 and t[-1] == 0
    assert t[36].item() == pytest.approx(756.7568, abs=1e-3)  # 8*0.28/(1+7*0.28) = 2.24/2.96
    assert t[44].item() == pytest.approx(521.7391, abs=1e-3)  # 8*0.12/(1+7*0.12) = 0.96/1.84
    assert [round(t[i].item()) for i in (0, 36, 44, 50)] == [1000, 757, 522, 0]


def test_warp_tables():
    w5 = S.warp_denoising_steps([1000, 750, 500, 250, 0], 5.0)
    assert w5 == pytest.approx([1000, 937.5, 833.3333, 625.0, 0], abs=1e-3)
    w8 = S.warp_denoising_steps([1000, 750, 500, 250], 8.0)
    assert w8 == pytest.approx([1000, 960.0, 888.8889, 727.2727], abs=1e-3)
    assert S.denoising_steps([1000, 757, 522, 0], warp=False, shift=8) == [1000, 757, 522, 0]


def test_add_noise_and_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    t = torch.tensor([[250.0, 500.0, 1000.0], [0.0, 100.0, 900.0]])
    xt = S.add_noise(x0, eps, t)
    # hand value for one frame: sigma = 0.25
    assert torch.allclose(xt[0, 0], 0.75 * x0[0, 0] + 0.25 * eps[0, 0], atol=1e-6)
    assert torch.equal(xt[1, 0], x0[1, 0])  # t = 0 is exactly clean
    v = S.flow_target(x0, eps)
    assert torch.allclose(S.x0_from_flow(xt, v, t), x0, atol=1e-5)
    mask = t > 0
    back = S.flow_from_x0(xt, x0, t)
    assert torch.allclose(back[mask], v[mask], atol=1e-4)


def test_euler_step_integrates_exact_flow():
    """With the true (straight-line) flow, Euler steps land exactly on x0 at sigma = 0."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 2, 3, generator=g), torch.randn(1, 2, 3, generator=g)
    sig = S.sampling_sigmas(7, 5.0)
    x = eps.clone()
    for i in range(7):
        x = S.euler_step(x, eps - x0, sig[i].item(), sig[i + 1].item())
    assert torch.allclose(x, x0, atol=1e-5)


def test_training_timesteps_follow_shift_and_clamp():
    g = torch.Generator().manual_seed(0)
    t = S.sample_training_timesteps((20000,), shift=8.0, generator=g)
    assert t.min() >= 20 and t.max() <= 980
    # compare against the formula applied to the same integers
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 1000, (20000,), generator=g).double()
    want = (1000 * 8 * (u / 1000) / (1 + 7 * u / 1000)).clamp(20, 980).float()
    assert torch.equal(t, want)
    assert 0.12 < (t == 980).float().mean() < 0.16  # ~14% hit the upper clamp at shift 8
    assert 860 < t.median() < 910  # median ~889


def test_cfg_convention():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert S.cfg_combine(c, u, 1.0) is c
    assert S.cfg_combine(c, u, 4.5).item() == 1.0 + 4.5  # CausVid s = 3.5 is w = 4.5
