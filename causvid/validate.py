"""The pre-flight check: paths, sizes and ranges of a run, before any model or accelerator is built.

:func:`causvid.config.validate` checks the config's own consistency (choices, step lists, chunking);
this module checks it against the world and against what the networks need, for every entry point:

* :func:`check_run` — the trainer (``Trainer.__init__``, hence also ``--dry-run``) and every script
  that reads weights or data named by the config;
* :func:`check_data` — the trainer's data: ``data.path`` opens as the ``data.source`` it names (a finished
  shard folder, a video list with captioned videos, a prompt file with prompts); only indexes and
  listings are read, no video is decoded;
* :func:`check_count` — a command-line size (``--num-videos``, ``--shard-size``, ``--batch-size``).

(The sampler checks its own arguments — seed, prompts, schedule, steps — in ``causvid.sampler.streaming``.)

Each raises :class:`causvid.config.ConfigError` with one line naming the key or argument; the scripts
print it and exit 2. ``docs/reliability.md`` lists the bad inputs the tests cover.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional

from omegaconf import OmegaConf

from causvid.config import ConfigError

__all__ = ["PATH_KEYS", "TRAIN_PATH_KEYS", "DATA_PATH_SOURCES", "train_path_keys", "check_run", "check_data", "check_paths", "check_output_dir", "check_sizes", "check_count"]

# Config keys that name a file or folder that must exist when set.
PATH_KEYS = ("train.init_from", "train.teacher_path", "vae.path", "text.path", "text.tokenizer_path",
             "data.path", "ode_pairs.prompts")
# The ones the trainer reads (ode_pairs.prompts is build_ode_pairs.py's: a training config may carry it unused).
TRAIN_PATH_KEYS = tuple(k for k in PATH_KEYS if k != "ode_pairs.prompts")
# The data sources that read data.path (toyworld renders its videos: a data.path left over from a config it
# overrides, e.g. configs/toy/teacher.yaml's latent folder with data.source=toyworld, is not read).
DATA_PATH_SOURCES = ("latents", "ode_pairs", "videos", "prompts")


def train_path_keys(cfg) -> tuple[str, ...]:
    """The path keys the trainer reads with this config."""
    reads_data = str(OmegaConf.select(cfg, "data.source")) in DATA_PATH_SOURCES
    return tuple(k for k in TRAIN_PATH_KEYS if reads_data or k != "data.path")


def check_paths(cfg, keys: Iterable[str] = PATH_KEYS) -> None:
    """Every key of ``keys`` that is set names an existing file or folder."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value and not os.path.exists(str(value)):
            raise ConfigError(f"config key '{key}' = {str(value)!r}: no such file or folder")


def check_output_dir(path: str, key: str = "train.output_dir") -> None:
    """``path`` is a folder or can become one (no file in its place or on the way to it)."""
    if not str(path):
        raise ConfigError(f"config key '{key}' must be a folder path")
    p = os.path.abspath(str(path))
    while True:
        if os.path.exists(p):
            if not os.path.isdir(p):
                raise ConfigError(f"config key '{key}' = {str(path)!r}: {p} exists and is not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"config key '{key}' = {str(path)!r}: {p} is not writable")
            return
        parent = os.path.dirname(p)
        if parent == p:
            return
        p = parent


def check_sizes(cfg) -> None:
    """Video size against the VAE and the DiT patch; data and toy-world counts; rates and budgets."""
    from causvid.models.registry import dit_config
    from causvid.models.vae import vae_arch

    d = cfg.data
    for key in ("data.height", "data.width"):
        if int(OmegaConf.select(cfg, key)) < 1:
            raise ConfigError(f"invalid value for config key '{key}': {OmegaConf.select(cfg, key)}; must be >= 1")
    s = vae_arch(cfg.vae.size).spatial_factor * dit_config(cfg.model.size).patch_size[1]
    for key in ("data.height", "data.width"):
        if int(OmegaConf.select(cfg, key)) % s:
            raise ConfigError(f"invalid value for config key '{key}': {OmegaConf.select(cfg, key)}; must be a "
                              f"multiple of {s} (VAE {cfg.vae.size!r} x DiT patch of model.size={cfg.model.size!r})")
    rules = [
        (d.fps > 0 and math.isfinite(d.fps), "data.fps", "> 0"),
        (d.toyworld.num_videos >= 1, "data.toyworld.num_videos", ">= 1"),
        (d.toyworld.max_objects >= 1, "data.toyworld.max_objects", ">= 1"),
        (0.0 <= d.toyworld.textured_background_prob <= 1.0, "data.toyworld.textured_background_prob", "in [0, 1]"),
        (0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", "in [0, 1]"),
        (d.decode_timeout_s > 0, "data.decode_timeout_s", "> 0"),
        (cfg.sampler.num_frames >= 1 and (cfg.sampler.num_frames - 1) % 4 == 0, "sampler.num_frames", "1 + 4n"),
        (cfg.ode_pairs.num_steps >= 1, "ode_pairs.num_steps", ">= 1"),
        (cfg.ode_pairs.num_prompts >= 1, "ode_pairs.num_prompts", ">= 1"),
        (cfg.ode_pairs.seeds_per_prompt >= 1, "ode_pairs.seeds_per_prompt", ">= 1"),
        (cfg.ode_pairs.shard_size >= 1, "ode_pairs.shard_size", ">= 1"),
        (cfg.ode_pairs.shift > 0, "ode_pairs.shift", "> 0"),
    ]
    for ok, key, what in rules:
        if not ok:
            raise ConfigError(f"invalid value for config key '{key}': {OmegaConf.select(cfg, key)!r}; must be {what}")


def check_run(cfg, *, paths: Iterable[str] = PATH_KEYS, output_key: Optional[str] = "train.output_dir") -> None:
    """Everything about ``cfg`` that can be checked without building anything (``paths``: the path keys
    this entry point reads)."""
    check_sizes(cfg)
    check_paths(cfg, paths)
    if output_key:
        check_output_dir(str(OmegaConf.select(cfg, output_key)), output_key)


def check_data(cfg) -> None:
    """``data.path`` opens as the data ``data.source`` names (indexes and listings only, nothing decoded)."""
    src, path = str(cfg.data.source), cfg.data.path
    if src not in DATA_PATH_SOURCES or not path:
        return  # a source without a path is the stage's check (Stage.check_config names the key)
    from causvid.data.shards import LatentShardDataset, ODEPairDataset, ShardError

    try:
        if src == "latents":
            LatentShardDataset(str(path))
        elif src == "ode_pairs":
            ODEPairDataset(str(path))
        elif src == "videos":
            from causvid.data.video import video_dataset_from_config

            video_dataset_from_config(cfg.data)
        else:
            from causvid.data.prompts import read_prompts

            if not read_prompts(str(path)):
                raise ValueError("the prompt file holds no prompt")
    except (ShardError, ValueError, OSError, KeyError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config key 'data.path' = {str(path)!r} (data.source={src}): {msg}") from None


def check_count(name: str, value: Optional[int], *, minimum: int = 1, available: Optional[int] = None) -> None:
    """A command-line count: ``>= minimum`` and, if ``available`` is given, at most that many."""
    if value is None:
        return
    if value < minimum:
        raise ConfigError(f"invalid value for {name}: {value}; must be >= {minimum}")
    if available is not None and value > available:
        raise ConfigError(f"invalid value for {name}: {value}; only {available} available")
