"""Flow matching (rectified flow) as pure functions (``causvid_reference.md`` §3, ``wan_architecture.md`` §6).

Conventions: ``t`` in [0, T] with T = ``num_train_timesteps`` (1000); ``sigma = t / T``;
``x_t = (1 - sigma) x0 + sigma eps``; the network predicts the flow ``v = eps - x0``.
Unlike the official code we never quantise ``t`` to a 1000-point grid: ``sigma`` is exactly ``t / T``
(the official lookups snap ``t`` to the nearest grid point, so ``t = 0`` there means sigma ~0.008).
Every conversion runs in float64 and returns the input dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch

T_MAX = 1000


def shift_sigma(sigma, shift: float):
    """The SD3 / Wan timestep shift ``s sigma / (1 + (s - 1) sigma)``; works on floats and tensors."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_of_t(t, num_train_timesteps: int = T_MAX):
    return t / num_train_timesteps


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] or [B, F] per-sample / per-frame values -> broadcastable against ``like`` [B, F, C, H, W]."""
    s = torch.as_tensor(s, device=like.device)
    return s.reshape(*s.shape, *([1] * (like.dim() - s.dim())))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t, num_train_timesteps: int = T_MAX) -> torch.Tensor:
    """``x_t = (1 - sigma) x0 + sigma eps``; ``t`` is a scalar, [B] or [B, F]."""
    s = _bcast(sigma_of_t(torch.as_tensor(t, dtype=torch.float64), num_train_timesteps), x0)
    return ((1 - s) * x0.double() + s * eps.double()).to(x0.dtype)


def x0_from_flow(x_t: torch.Tensor, v: torch.Tensor, t, num_train_timesteps: int = T_MAX) -> torch.Tensor:
    """``x0 = x_t - sigma v``."""
    s = _bcast(sigma_of_t(torch.as_tensor(t, dtype=torch.float64), num_train_timesteps), x_t)
    return (x_t.double() - s * v.double()).to(x_t.dtype)


def flow_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t, num_train_timesteps: int = T_MAX) -> torch.Tensor:
    """``v = (x_t - x0) / sigma`` (undefined at sigma = 0)."""
    s = _bcast(sigma_of_t(torch.as_tensor(t, dtype=torch.float64), num_train_timesteps), x_t)
    return ((x_t.double() - x0.double()) / s).to(x_t.dtype)


def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target of flow matching, ``v = eps - x0``."""
    return eps - x0


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE ``dx/dsigma = v``."""
    return (x.double() + v.double() * (sigma_next - sigma)).to(x.dtype)


def sampling_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The CausVid / DiffSynth ``FlowMatchScheduler`` grid with ``num_steps`` entries plus a final 0.

    raw sigma = linspace(1, 0, N + 1)[:-1], shifted; returns [N + 1] float64 (last entry 0).
    For N = 50, shift 8 the entries 36 and 44 are t = 756.76 and 521.74 (CausVid's 757 / 522).
    """
    raw = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigma(raw, shift), torch.zeros(1, dtype=torch.float64)])


def sampling_timesteps(num_steps: int, shift: float, num_train_timesteps: int = T_MAX) -> torch.Tensor:
    return sampling_sigmas(num_steps, shift) * num_train_timesteps


def warp_denoising_steps(steps: Sequence[float], shift: float, num_train_timesteps: int = T_MAX) -> list[float]:
    """Self-Forcing's ``warp_denoising_step``: a value u is a uniform (pre-shift) timestep; u -> T shift(u / T).

    [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625] at shift 5 and [1000, 960, 888.89, 727.27] at shift 8.
    (The official code indexes its 1000-point grid, ``grid[1000 - u]``, which is the same for integer u.)
    """
    return [float(num_train_timesteps * shift_sigma(u / num_train_timesteps, shift)) for u in steps]


def denoising_steps(steps: Sequence[float], warp: bool, shift: float, num_train_timesteps: int = T_MAX) -> list[float]:
    """The student's step list as used: optionally warped, 0 kept at the end."""
    return warp_denoising_steps(steps, shift, num_train_timesteps) if warp else [float(s) for s in steps]


def sample_training_timesteps(shape, shift: float, min_ratio: float = 0.02, max_ratio: float = 0.98,
                              num_train_timesteps: int = T_MAX, generator: torch.Generator | None = None,
                              device: torch.device | str = "cpu",
                              u_range: tuple[int, int] | None = None) -> torch.Tensor:
    """DMD / critic timesteps (``causvid_reference.md`` §3.5): ``u ~ randint(0, T)``, shifted, clamped.

    ``t = T shift(u / T)`` then ``clamp(t, min_ratio T, max_ratio T)``; float32 tensor of ``shape``.
    ``u_range = (lo, hi)`` draws ``u ~ randint(lo, hi)`` instead (Self-Forcing's ``ts_schedule``).
    """
    lo_u, hi_u = (0, num_train_timesteps) if u_range is None else (int(u_range[0]), int(u_range[1]))
    u = torch.randint(lo_u, hi_u, tuple(shape), generator=generator, device="cpu").double()
    t = num_train_timesteps * shift_sigma(u / num_train_timesteps, shift)
    lo, hi = int(min_ratio * num_train_timesteps), int(max_ratio * num_train_timesteps)
    return t.clamp(lo, hi).float().to(device)


def sample_uniform_timesteps(shape, shift: float = 1.0, num_train_timesteps: int = T_MAX,
                             generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Continuous flow-matching training times (teacher pre-training): ``sigma = shift(U(0, 1))``."""
    u = torch.rand(tuple(shape), generator=generator, device="cpu", dtype=torch.float64)
    return (num_train_timesteps * shift_sigma(u, shift)).float().to(device)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + w (cond - uncond)`` with the true weight ``w``.

    The official CausVid form ``cond + s (cond - uncond)`` is ``w = 1 + s``.
    """
    if weight == 1.0:
        return cond
    return uncond + weight * (cond - uncond)
