"""Teacher ODE trajectories for the ODE-regression initialisation (``causvid_reference.md`` §4.1, ``docs/method.md`` §3).

For every (prompt, seed) the frozen teacher solves the probability-flow ODE with
:func:`causvid.sampler.teacher_sample` (official defaults: 50 Euler steps on the shift-8 grid, CFG 6 against
the negative prompt) and we keep the states at the levels of the student's step list, e.g.
``[1000, 757, 522, 0]``. The stored step indices are *derived*: each level is matched to the nearest
timestep of the sampling grid (it must lie within ``max_distance``, and the distance is reported); the
level 0 is the final sample. With 50 steps and shift 8 this gives indices ``[0, 36, 44, 50]`` (timesteps
1000, 756.76, 521.74, 0), the official choice.

Pairs are written as sharded safetensors (``causvid.data.shards``): resumable, with disjoint work per rank.
Item ``i`` is prompt ``i // seeds_per_prompt`` with noise seed :func:`pair_seed` ``(base_seed, i)``, so the
result does not depend on how many processes ran or where a run was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from causvid import schedule as S
from causvid.data.shards import (
    ODE_KIND,
    ShardPlan,
    _progress,
    clean_stale_tmp,
    pack_context,
    prepare_folder,
    shard_done,
    write_shard,
)
from causvid.models.attention import ChunkLayout
from causvid.sampler import teacher_sample

DEFAULT_MAX_DISTANCE = 1.0  # timesteps: how far a level may lie from its grid point


@dataclass(frozen=True)
class StoredLevels:
    """Where the student's levels fall on the teacher's sampling grid."""

    step_list: list[float]  # the student's levels as configured (after warping), last 0
    indices: list[int]  # grid index i: the state *before* Euler step i (num_steps = the final sample)
    grid_timesteps: list[float]  # the grid timestep of each stored state
    distances: list[float]  # |grid timestep - level|

    def describe(self) -> str:
        rows = [f"  level {lv:8.3f} -> grid step {i:3d} (t = {g:8.3f}, distance {d:.3f})"
                for lv, i, g, d in zip(self.step_list, self.indices, self.grid_timesteps, self.distances)]
        return "\n".join(rows)


def stored_levels(step_list: Sequence[float], num_steps: int, shift: float,
                  max_distance: float = DEFAULT_MAX_DISTANCE) -> StoredLevels:
    """Match each level of ``step_list`` to the nearest timestep of the ``num_steps``-step shifted grid.

    The grid is ``causvid.schedule.sampling_timesteps`` ([N + 1] values, the last one 0 = the final sample).
    Raises ValueError if a level lies farther than ``max_distance`` from every grid point or two levels
    share a grid point.
    """
    steps = [float(x) for x in step_list]
    if not steps or steps[-1] != 0.0:
        raise ValueError(f"the step list must end with 0 (the clean level), got {steps}")
    grid = S.sampling_timesteps(num_steps, shift)  # [N + 1] float64, decreasing, last 0
    indices, times, dists = [], [], []
    for lv in steps:
        d = (grid - lv).abs()
        i = int(torch.argmin(d))
        if float(d[i]) > max_distance:
            raise ValueError(
                f"level t = {lv} of the step list is {float(d[i]):.3f} timesteps from the nearest point "
                f"(t = {float(grid[i]):.3f}, step {i}) of the {num_steps}-step shift-{shift} sampling grid "
                f"(allowed: {max_distance}); change ode_pairs.num_steps / ode_pairs.shift so the grid contains "
                "the student's levels (e.g. 48 steps for the warped [1000, 750, 500, 250] list at shift 8)")
        indices.append(i)
        times.append(float(grid[i]))
        dists.append(float(d[i]))
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise ValueError(f"levels {steps} map to grid steps {indices}, which are not strictly increasing "
                         f"(two levels share a grid point of the {num_steps}-step grid)")
    return StoredLevels(steps, indices, times, dists)


@dataclass
class ODEPairSettings:
    """How the pairs are generated (from ``cfg.ode_pairs`` + the student's step list, see :func:`settings_from_config`)."""

    step_list: list[float]
    latent_shape: tuple[int, int, int, int]  # [F, C, h, w]
    num_steps: int = 50
    shift: float = 8.0
    guidance: float = 6.0  # true CFG weight: uncond + w (cond - uncond)
    solver: str = "euler"
    seeds_per_prompt: int = 1
    base_seed: int = 0
    shard_size: int = 64
    batch_size: int = 1
    negative_prompt: str = ""
    causal_chunk_size: Optional[int] = None  # set: a block-causal teacher (the ablation's causal teacher)
    independent_first_frame: bool = False
    max_distance: float = DEFAULT_MAX_DISTANCE
    teacher: str = ""  # description of the teacher weights (recorded in the plan)
    extra: dict = field(default_factory=dict)

    def levels(self) -> StoredLevels:
        return stored_levels(self.step_list, self.num_steps, self.shift, self.max_distance)

    def layout(self) -> Optional[ChunkLayout]:
        if self.causal_chunk_size is None:
            return None
        return ChunkLayout(self.causal_chunk_size, self.independent_first_frame)


def pair_seed(base_seed: int, item: int) -> int:
    """The noise seed of item ``item`` (independent of rank, batch and interruption)."""
    return int(base_seed) * (1 << 32) + int(item)


def pair_noise(seed: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """Initial noise [1, F, C, h, w] float32 of one pair (drawn on the CPU from its own generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, *latent_shape), generator=g, dtype=torch.float32)


def _prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()[:16]


def ode_plan(prompts: Sequence[str], settings: ODEPairSettings, text_len: int, text_dim: int) -> ShardPlan:
    """The shard plan: ``len(prompts) * seeds_per_prompt`` items, settings recorded for resume checks."""
    lv = settings.levels()
    s = {k: v for k, v in asdict(settings).items() if k not in ("batch_size", "extra", "step_list")}
    s.update(settings.extra)
    s.update(step_list=lv.step_list, stored_step_indices=lv.indices, grid_timesteps=lv.grid_timesteps,
             level_distances=lv.distances, latent_shape=list(settings.latent_shape), text_len=int(text_len),
             text_dim=int(text_dim), num_prompts=len(prompts), prompts_sha=_prompts_digest(prompts))
    return ShardPlan(ODE_KIND, len(prompts) * settings.seeds_per_prompt, settings.shard_size, s)


def describe_plan(prompts: Sequence[str], settings: ODEPairSettings, world: int = 1, show: int = 5) -> str:
    """A human-readable plan (``--dry-run``): prompts, seeds, stored levels, shards per rank."""
    lv = settings.levels()
    n_items = len(prompts) * settings.seeds_per_prompt
    plan = ShardPlan(ODE_KIND, n_items, settings.shard_size)
    lines = [
        f"teacher: {settings.teacher or '(given)'}"
        + (f" (block-causal, chunk {settings.causal_chunk_size})" if settings.causal_chunk_size else " (bidirectional)"),
        f"sampler: {settings.num_steps} {settings.solver} steps, shift {settings.shift}, CFG w = {settings.guidance} "
        f"(uncond = negative prompt {settings.negative_prompt[:40]!r}{'...' if len(settings.negative_prompt) > 40 else ''})",
        f"latent shape per pair: {list(settings.latent_shape)}; stored levels ({len(lv.indices)} states per pair):",
        lv.describe(),
        f"prompts: {len(prompts)} x {settings.seeds_per_prompt} seeds = {n_items} pairs "
        f"(seed of pair i = {settings.base_seed} * 2^32 + i)",
    ]
    for i, p in enumerate(prompts[:show]):
        lines.append(f"  [{i}] {p}")
    if len(prompts) > show:
        lines.append(f"  ... ({len(prompts) - show} more)")
    lines.append(f"shards: {plan.num_shards} of up to {settings.shard_size} pairs, batch {settings.batch_size}")
    for r in range(world):
        mine = plan.shards_for_rank(r, world)
        lines.append(f"  rank {r}: {len(mine)} shards {mine[:8]}{' ...' if len(mine) > 8 else ''}")
    return "\n".join(lines)


@torch.no_grad()
def generate_states(teacher, noise: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                    settings: ODEPairSettings, levels: StoredLevels,
                    progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """One batch of trajectories: noise [B, F, C, h, w] -> states [B, K, F, C, h, w] at the stored levels."""
    res = teacher_sample(teacher, noise, cond, uncond, num_steps=settings.num_steps, shift=settings.shift,
                         guidance=settings.guidance, solver=settings.solver, keep_steps=levels.indices,
                         layout=settings.layout(), progress=progress)
    return torch.stack([res.states[i] for i in levels.indices], dim=1)  # [B, K, F, C, h, w]


@torch.no_grad()
def build_ode_pairs(folder: str, teacher, text_encoder, prompts: Sequence[str], settings: ODEPairSettings, *,
                    rank: int = 0, world: int = 1, limit: Optional[int] = None, progress: bool = True,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    on_pair: Optional[Callable[[int], None]] = None) -> list[int]:
    """Generate and write the shards of the plan that rank ``rank`` of ``world`` owns and that are not done yet.

    ``limit``: at most this many shards in this call. ``on_pair(item)`` is called after each generated pair
    (hooks, tests). Returns the shards written. Call :func:`causvid.data.shards.finalize_index` (one process,
    after every rank finished) to write ``index.json``.
    """
    plan = ode_plan(prompts, settings, text_encoder.text_len, text_encoder.dim)
    levels = settings.levels()
    prepare_folder(folder, plan)
    todo = [s for s in plan.shards_for_rank(rank, world) if not shard_done(folder, plan, s)]
    clean_stale_tmp(folder, todo)
    if limit is not None:
        todo = todo[:limit]
    if not todo:
        return []
    uncond1, _ = text_encoder.encode([settings.negative_prompt], device=device) if settings.guidance != 1.0 \
        else (None, None)
    bar = _progress(sum(len(plan.shard_items(s)) for s in todo), f"ODE pairs (rank {rank})", progress)
    written = []
    for s in todo:
        ids = plan.shard_items(s)
        states, embs, lens, caps, seeds = [], [], [], [], []
        for j in range(0, len(ids), settings.batch_size):
            items = ids[j: j + settings.batch_size]
            batch_prompts = [prompts[i // settings.seeds_per_prompt] for i in items]
            cond, n = text_encoder.encode(batch_prompts, device=device)
            noise = torch.cat([pair_noise(pair_seed(settings.base_seed, i), settings.latent_shape)
                               for i in items]).to(device)
            uncond = uncond1.expand(len(items), -1, -1) if uncond1 is not None else None
            st = generate_states(teacher, noise, cond, uncond, settings, levels)
            states.append(st.to("cpu", dtype))
            embs.append(cond.float().cpu())
            lens.append(n.cpu())
            caps += batch_prompts
            seeds += [pair_seed(settings.base_seed, i) for i in items]
            bar.update(len(items))
            if on_pair is not None:
                for i in items:
                    on_pair(i)
        ctx, ctx_lens = pack_context(torch.cat(embs), torch.cat(lens))
        write_shard(folder, plan, s, {"states": torch.cat(states), "context": ctx.to(dtype), "context_lens": ctx_lens},
                    {"captions": caps, "seeds": seeds})
        written.append(s)
    bar.close()
    return written


# ----------------------------------------------------------------------------------------------------
# From the run config
# ----------------------------------------------------------------------------------------------------


def latent_shape_from_config(cfg) -> tuple[int, int, int, int]:
    """[F, C, h, w] of the latents of a ``cfg.data`` video through the ``cfg.vae.size`` VAE (no weights read)."""
    from causvid.models.vae import vae_arch

    a = vae_arch(cfg.vae.size)
    d = cfg.data
    t, s = a.temporal_factor, a.spatial_factor
    if (d.num_frames - 1) % t or d.height % s or d.width % s:
        raise ValueError(f"data {d.num_frames}x{d.height}x{d.width} does not fit the VAE's {t}x time / {s}x space")
    return (1 + (d.num_frames - 1) // t, a.z_dim, d.height // s, d.width // s)


def prompts_from_config(cfg) -> list[str]:
    """``cfg.ode_pairs.prompts`` (a prompt file, first ``num_prompts`` lines) or the first ``num_prompts``
    captions of the toy world of ``cfg.data``."""
    n = int(cfg.ode_pairs.num_prompts)
    if cfg.ode_pairs.prompts:
        from causvid.data.prompts import read_prompts

        prompts = list(read_prompts(cfg.ode_pairs.prompts))
        if not prompts:
            raise ValueError(f"prompt file {cfg.ode_pairs.prompts} (config key 'ode_pairs.prompts') is empty")
        return prompts[:n]
    from causvid.data.toyworld import toyworld_from_config

    world = toyworld_from_config(cfg.data)
    return [world.caption(i) for i in range(min(n, len(world)))]


def settings_from_config(cfg, batch_size: Optional[int] = None) -> ODEPairSettings:
    """The generation settings of a run config: sampler from ``cfg.ode_pairs``, levels from ``cfg.schedule``
    (warped when ``schedule.warp_denoising_step``), a causal teacher when ``dmd.teacher == 'causal'``."""
    sc, op = cfg.schedule, cfg.ode_pairs
    steps = S.denoising_steps(list(sc.denoising_step_list), sc.warp_denoising_step, sc.shift, sc.num_train_timesteps)
    causal = cfg.dmd.teacher == "causal"
    return ODEPairSettings(
        step_list=steps, latent_shape=latent_shape_from_config(cfg), num_steps=int(op.num_steps),
        shift=float(op.shift), guidance=float(op.guidance), solver=str(op.solver),
        seeds_per_prompt=int(op.seeds_per_prompt), base_seed=int(cfg.train.seed), shard_size=int(op.shard_size),
        batch_size=int(batch_size or cfg.train.batch_size), negative_prompt=str(cfg.dmd.negative_prompt),
        causal_chunk_size=int(cfg.model.chunk_size) if causal else None,
        independent_first_frame=bool(cfg.model.independent_first_frame) if causal else False,
        teacher=os.path.abspath(cfg.train.teacher_path) if cfg.train.teacher_path else "")
