"""Losses equal hand computations (docs/method.md eq. 1, 3, 5-7; causvid_reference.md §4.3, §5.3-5.4)."""

import pytest
import torch

from causvid import schedule as S
from causvid.losses import (
    critic_flow_loss,
    diffusion_loss,
    dmd_generator_loss,
    dmd_gradient,
    ode_regression_loss,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_ode_loss_hand_computation_ignores_clean_frames():
    pred = torch.zeros(1, 3, 1, 1, 2)
    target = torch.tensor([[1.0, 1.0], [2.0, 4.0], [100.0, 100.0]]).reshape(1, 3, 1, 1, 2)
    t = torch.tensor([[1000.0, 522.0, 0.0]])
    # frames 0 and 1 count: (1 + 1 + 4 + 16) / 4 = 5.5; frame 2 (t = 0) is ignored
    assert ode_regression_loss(pred, target, t).item() == pytest.approx(5.5)
    # changing a t = 0 frame's target changes nothing
    target2 = target.clone()
    target2[0, 2] = -7.0
    assert ode_regression_loss(pred, target2, t).item() == pytest.approx(5.5)


def test_ode_loss_batch_mask_and_all_clean_zero_grad():
    pred = _rand(2, 4, 2, 3, 3, seed=1).requires_grad_()
    target = _rand(2, 4, 2, 3, 3, seed=2)
    t = torch.tensor([[1000.0, 1000.0, 0.0, 0.0], [0.0, 0.0, 757.0, 757.0]])
    keep = t != 0
    want = ((pred[keep] - target[keep]) ** 2).mean()
    assert torch.allclose(ode_regression_loss(pred, target, t), want, atol=1e-6)
    zero = ode_regression_loss(pred, target, torch.zeros(2, 4))
    assert zero.item() == 0.0
    zero.backward()
    assert pred.grad is not None and torch.count_nonzero(pred.grad) == 0


def test_dmd_gradient_hand_computation():
    x = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 1, 2)
    real = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 1, 2)
    fake = torch.tensor([2.0, 2.0]).reshape(1, 1, 1, 1, 2)
    # mean|x - real| = (1 + 2) / 2 = 1.5; grad = (fake - real) / 1.5 = [4/3, 2/3]
    g = dmd_gradient(x, real, fake)
    assert g.dtype == torch.float64
    assert torch.allclose(g.flatten(), torch.tensor([4 / 3, 2 / 3], dtype=torch.float64))


def test_dmd_gradient_is_per_sample_and_nan_safe():
    x, real, fake = _rand(2, 2, 1, 2, 2, seed=3), _rand(2, 2, 1, 2, 2, seed=4), _rand(2, 2, 1, 2, 2, seed=5)
    g = dmd_gradient(x, real, fake)
    for b in range(2):
        norm = (x[b].double() - real[b].double()).abs().mean()
        assert torch.allclose(g[b], (fake[b].double() - real[b].double()) / norm)
    same = dmd_gradient(real, real, real)  # 0 / 0 -> nan -> 0
    assert torch.count_nonzero(same) == 0 and torch.isfinite(same).all()


def test_dmd_step_moves_toward_real_when_fake_is_x():
    x = _rand(2, 3, 2, 4, 4, seed=6)
    real = _rand(2, 3, 2, 4, 4, seed=7)
    xp = x.clone().requires_grad_()
    loss, grad = dmd_generator_loss(xp, real, x.clone())  # the fake score predicts x itself
    loss.backward()
    # dL/dx = grad / numel
    assert torch.allclose(xp.grad.double(), grad / x.numel(), atol=1e-12)
    # grad = (x - real) / norm: a small descent step on x reduces the distance to real
    x_new = x - 0.1 * x.numel() * xp.grad
    assert (x_new - real).norm() < (x - real).norm()
    # and the loss value is 0.5 * mean(grad^2)
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).mean().item(), rel=1e-6)


def test_critic_and_diffusion_loss_are_flow_matching_mse():
    v, x0, eps = _rand(2, 3, 2, 2, 2, seed=8), _rand(2, 3, 2, 2, 2, seed=9), _rand(2, 3, 2, 2, 2, seed=10)
    want = ((v.double() - (eps.double() - x0.double())) ** 2).mean()
    assert critic_flow_loss(v, x0, eps).item() == pytest.approx(want.item(), rel=1e-6)
    assert diffusion_loss(v, x0, eps).item() == pytest.approx(want.item(), rel=1e-5)
    # the flow target is what makes x0 = x_t - sigma v exact
    t = torch.tensor([300.0, 900.0])
    x_t = S.add_noise(x0, eps, t)
    assert critic_flow_loss(S.flow_from_x0(x_t, x0, t), x0, eps).item() < 1e-10
    # weights: per sample [B] and per frame [B, F]
    w = torch.tensor([2.0, 0.0])
    per = ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3, 4))
    assert diffusion_loss(v, x0, eps, w).item() == pytest.approx((2 * per[0] / 2).item(), rel=1e-5)
    assert diffusion_loss(v, x0, eps, torch.ones(2, 3)).item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="weight"):
        diffusion_loss(v, x0, eps, torch.ones(3))


def test_shape_mismatch_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        ode_regression_loss(torch.zeros(1, 2, 1, 1, 1), torch.zeros(1, 3, 1, 1, 1), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"\[B, F\]"):
        ode_regression_loss(torch.zeros(1, 2, 1, 1, 1), torch.zeros(1, 2, 1, 1, 1), torch.ones(2))


def test_sampled_dmd_timesteps_follow_the_shift_formula():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = S.sample_training_timesteps((4000,), shift=8.0, generator=g1)
    u = torch.randint(0, 1000, (4000,), generator=g2).double()
    want = (1000 * 8 * (u / 1000) / (1 + 7 * (u / 1000))).clamp(20, 980)
    assert torch.allclose(t.double(), want, atol=1e-3)
    assert t.min() >= 20 and t.max() <= 980
    # reference §3.5: about 14% clamp at 980, median ~889
    assert 0.11 < (t == 980).float().mean().item() < 0.17
    assert abs(t.median().item() - 889) < 10
