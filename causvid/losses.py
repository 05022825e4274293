"""The training losses of CausVid as small pure functions (``causvid_reference.md`` §4.3, §5.3, §5.4).

Tensors are latents ``[B, F, C, H, W]``; timesteps ``t`` are ``[B, F]`` in [0, 1000]. The DiT predicts
the flow ``v = eps - x0`` (``docs/method.md`` §1). Where the official code computes a loss in float64
(the DMD surrogate, the critic's flow loss after its float64 x0 <-> flow conversion) we do too; the
returned scalar is float32 so it plugs into any optimiser / autocast setup.

Equation numbers refer to ``docs/method.md``.
"""

from __future__ import annotations

from typing import Optional

import torch


def _check_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, 1, ..., 1]: the mean over every axis but the batch axis (keepdim)."""
    return x.mean(dim=tuple(range(1, x.dim())), keepdim=True)


def ode_regression_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. (3), ODE regression (CausVid §4.3; reference §4.3): ``MSE(x0_pred, x0_target)`` over frames with t != 0.

    x0_pred, x0_target: [B, F, C, H, W]; t: [B, F]. The mean runs over every element of the selected
    frames (the official ``F.mse_loss(pred[mask], target[mask])``). Frames whose input was the clean
    latent (t == 0) are context only and carry no loss. If every frame has t == 0 the result is a zero
    that still depends on ``x0_pred`` (so ``backward()`` works and gives zero gradients).
    """
    _check_same(x0_pred, x0_target, "ode_regression_loss")
    if t.shape != x0_pred.shape[:2]:
        raise ValueError(f"ode_regression_loss: t has shape {tuple(t.shape)}, expected [B, F] = "
                         f"{tuple(x0_pred.shape[:2])}")
    keep = t != 0  # [B, F]
    if not bool(keep.any()):
        return (x0_pred * 0.0).sum().float()
    diff = x0_pred[keep].double() - x0_target[keep].double()  # [N_frames, C, H, W]
    return diff.pow(2).mean().float()


@torch.no_grad()
def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """Eq. (5), the normalised DMD gradient (DMD eq. 7-8; reference §5.3 step 4), float64.

    ``grad = (fake_x0 - real_x0) / mean_{F,C,H,W} |x - real_x0|`` per sample, then ``nan_to_num``.
    x: the generator's x0 output; real_x0 / fake_x0: the teacher's (CFG) and the critic's x0 predictions
    from the same noised copy of x. ``-grad`` points from the fake score toward the real score.
    """
    _check_same(x, real_x0, "dmd_gradient (x vs real_x0)")
    _check_same(x, fake_x0, "dmd_gradient (x vs fake_x0)")
    x, r, f = x.double(), real_x0.double(), fake_x0.double()
    norm = _per_sample_mean((x - r).abs())  # [B, 1, 1, 1, 1]
    return torch.nan_to_num((f - r) / norm)


def dmd_generator_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (6), the DMD surrogate (reference §5.3): ``0.5 MSE(x, stopgrad(x - grad))`` in float64.

    Returns ``(loss, grad)``. With mean reduction, ``dloss/dx = grad / x.numel()``: minimising the loss
    is a gradient step on x along ``-grad``. real_x0 / fake_x0 are treated as constants.
    """
    grad = dmd_gradient(x.detach(), real_x0.detach(), fake_x0.detach())  # float64, no graph
    xd = x.double()
    target = (xd - grad).detach()
    loss = 0.5 * torch.nn.functional.mse_loss(xd, target, reduction="mean")
    return loss.float(), grad


def critic_flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. (7), the fake score's denoising loss (reference §5.4, ``denoising_loss_type: flow``), float64.

    ``mean((v_pred - (eps - x0))^2)``; v_pred: the critic's flow on ``x_t = (1 - sigma) x0 + sigma eps``,
    x0: the generator sample (no grad), eps: the noise used. Unweighted.
    """
    _check_same(v_pred, x0, "critic_flow_loss (v_pred vs x0)")
    _check_same(v_pred, eps, "critic_flow_loss (v_pred vs eps)")
    target = eps.double() - x0.double()
    return (v_pred.double() - target).pow(2).mean().float()


def diffusion_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                   weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. (1), flow-matching loss of the teacher (Wan / rectified flow): ``mean(w (v_pred - (eps - x0))^2)``.

    weight: None (plain mean), [B] per sample or [B, F] per frame; the weighted squared error is
    averaged over all elements (a weight of 1 everywhere equals the plain mean).
    """
    _check_same(v_pred, x0, "diffusion_loss (v_pred vs x0)")
    _check_same(v_pred, eps, "diffusion_loss (v_pred vs eps)")
    err = (v_pred.float() - (eps.float() - x0.float())).pow(2)  # [B, F, C, H, W]
    if weight is None:
        return err.mean()
    w = weight.to(err)
    if w.shape not in (err.shape[:1], err.shape[:2]):
        raise ValueError(f"diffusion_loss: weight of shape {tuple(w.shape)}; expected [B] {tuple(err.shape[:1])} "
                         f"or [B, F] {tuple(err.shape[:2])}")
    w = w.reshape(*w.shape, *([1] * (err.dim() - w.dim())))
    return (w * err).mean()
