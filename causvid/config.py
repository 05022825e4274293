"""Typed run configuration: dataclass schemas, OmegaConf structured configs, strict validation.

Every default lives here, once. A YAML file holds only what differs from these defaults; the command
line adds a dotlist (``train.max_steps=10 model.size=tiny``). Unknown keys, wrong types, values outside
their choices and incompatible combinations fail in :func:`load_config`, before any model is built,
with a message that names the key and what is valid.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

# The Wan2.1 default negative prompt (used as the unconditional branch of CFG by Wan, CausVid and
# Self-Forcing). Kept in exactly one place.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class ConfigError(ValueError):
    """A configuration problem found before anything was built. The message names the key."""


# LoRA target names (``model.lora.targets``): a group of block linear layers or one of them (original Wan names)
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "self_attn": ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"),
    "cross_attn": ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"),
    "ffn": ("ffn.0", "ffn.2"),
    **{n: (n,) for n in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                         "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")},
}


@dataclass
class LoRAConfig:
    """peft LoRA adapters on the trained networks of the ode / dmd stages (docs/training.md); rank 0: off."""

    rank: int = 0  # r of every adapted layer; 0 trains the full weights
    alpha: Optional[float] = None  # the delta is alpha / r * B @ A; None: alpha = r (scale 1)
    targets: List[str] = field(default_factory=lambda: ["self_attn", "cross_attn", "ffn"])  # keys of LORA_TARGETS


@dataclass
class ModelConfig:
    """The DiT used by every role (teacher, critic, causal student)."""

    size: str = "toy"  # registry name: tiny | toy | wan2.1-1.3b | wan2.1-14b
    num_layers: Optional[int] = None  # the size's widths with this many blocks (rehearsals); None: the size's own
    chunk_size: int = 3  # k: latent frames per causal chunk
    independent_first_frame: bool = False  # frame 0 is its own chunk (image-to-video)
    gradient_checkpointing: bool = False  # per-block activation checkpointing
    attention: str = "auto"  # auto | sdpa | flex  (auto: flex on CUDA, sdpa on CPU)
    dtype: str = "float32"  # compute dtype of the DiT: float32 | bfloat16
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class VAEConfig:
    size: str = "toy"  # tiny | toy | wan2.1
    path: Optional[str] = None  # Wan2.1_VAE.pth, a diffusers AutoencoderKLWan folder, or our safetensors


@dataclass
class TextConfig:
    kind: str = "toy"  # toy | umt5 | tiny-umt5
    dtype: Optional[str] = None  # float32 | bfloat16; None: bf16 for umt5 (as the official pipeline), fp32 otherwise
    path: Optional[str] = None  # umT5 weights (.pth) or the toy encoder's safetensors
    tokenizer_path: Optional[str] = None  # folder with tokenizer.json (google/umt5-xxl)
    offload_after_encode: bool = True  # release / move to CPU once prompts are encoded


@dataclass
class ScheduleConfig:
    """Flow matching (rectified flow), t in [0, num_train_timesteps], sigma = t / num_train_timesteps."""

    num_train_timesteps: int = 1000
    shift: float = 8.0  # shift of the training grid and of the random DMD/critic timesteps
    denoising_step_list: List[float] = field(default_factory=lambda: [1000.0, 757.0, 522.0, 0.0])
    warp_denoising_step: bool = False  # map the list through the shifted grid (Self-Forcing)
    min_timestep_ratio: float = 0.02  # clamp of sampled training timesteps (x num_train_timesteps)
    max_timestep_ratio: float = 0.98


@dataclass
class ToyWorldConfig:
    num_videos: int = 100000  # size of the virtual data set (videos are generated from their index)
    seed: int = 0
    max_objects: int = 2
    textured_background_prob: float = 0.5


@dataclass
class DataConfig:
    source: str = "toyworld"  # toyworld | videos | latents | ode_pairs | prompts
    path: Optional[str] = None  # folder / csv / jsonl / shard index / prompt file
    height: int = 64
    width: int = 64
    num_frames: int = 33  # pixel frames, 1 + 4n
    fps: float = 8.0
    num_workers: int = 0
    strict: bool = False  # raise on the first bad video instead of skipping it
    max_bad_fraction: float = 0.1  # failure budget for skipped videos
    decode_timeout_s: float = 30.0
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)


@dataclass
class OptimConfig:
    lr: float = 2e-6
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 10.0
    warmup_steps: int = 0  # linear warm-up over the first steps
    decay_steps: int = 0  # cosine decay over the last steps of train.max_steps (0: constant after warm-up)
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio


@dataclass
class TrainConfig:
    stage: str = "dmd"  # teacher | causal_teacher | ode | dmd
    output_dir: str = "runs/toy"
    max_steps: int = 1000
    batch_size: int = 1  # per process
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    init_from: Optional[str] = None  # weights the trained network starts from (teacher / ODE init)
    teacher_path: Optional[str] = None  # frozen teacher weights (ODE pairs, DMD real score)
    cond_dropout: float = 0.1  # teacher training: probability of the unconditional (negative) prompt
    ema_decay: float = 0.0  # 0 disables the EMA of the trained network
    ema_start_step: int = 0
    checkpoint_every: int = 200
    keep_last: int = 2  # keep-last-K checkpoints; never fewer than one complete checkpoint
    resume: str = "auto"  # auto | never | latest | <path to checkpoint-N>
    log_every: int = 10
    sample_every: int = 0  # 0: no sample videos during training
    max_consecutive_nonfinite: int = 5
    log_with: str = "none"  # none | wandb | tensorboard
    project: str = "causvid"


@dataclass
class SelfForcingConfig:
    """``dmd.generator_input: self_forcing`` (causvid_reference.md §9.2; docs/method.md)."""

    same_step_across_blocks: bool = True  # one exit step per iteration for all chunks (else one per chunk)
    last_step_only: bool = False  # always exit at the last step of the list
    cache_grad: str = "straight_through"  # straight_through (published recipe) | detached
    rollout_frames: int = 0  # latent frames rolled out; 0: the clip's. Longer: gradient only for the last clip
    ts_schedule: bool = False  # DMD / critic t >= the level after the exit step (reference ts_schedule)
    ts_schedule_max: bool = False  # DMD / critic t <= the exit step's level (reference ts_schedule_max)


@dataclass
class DMDConfig:
    teacher: str = "bidirectional"  # bidirectional | causal | none (ODE regression only)
    generator_input: str = "data"  # data | ode | backward_simulation | self_forcing
    real_guidance: float = 4.5  # true CFG weight w of the real score: uncond + w (cond - uncond)
    fake_guidance: float = 1.0  # CFG weight of the fake score (1 = conditional only)
    update_ratio: int = 5  # critic updates per generator update
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    self_forcing: SelfForcingConfig = field(default_factory=SelfForcingConfig)


@dataclass
class ODEPairsConfig:
    num_steps: int = 50  # teacher Euler steps
    shift: float = 8.0
    guidance: float = 6.0  # true CFG weight of the teacher sampler
    solver: str = "euler"  # euler | unipc
    prompts: Optional[str] = None  # prompt file (one per line); toy world captions if empty
    num_prompts: int = 1000
    seeds_per_prompt: int = 1
    shard_size: int = 64
    output_dir: str = "runs/toy/ode_pairs"


@dataclass
class SamplerConfig:
    num_frames: int = 33  # pixel frames
    context_noise: float = 0.0  # timestep of the cache refresh pass
    sink_chunks: int = 1  # rolling cache: chunks kept from the start
    window_chunks: int = 0  # rolling cache: most recent chunks kept (0 = unbounded, preallocated to length)
    guidance: float = 1.0  # student CFG weight (1 = none; DMD students need none)
    decoder: str = "vae"  # vae | tiny: pixels from the VAE's decoder or a tiny streaming decoder (docs/vae.md)
    tiny_decoder_path: str = ""  # the tiny decoder's safetensors (scripts/train_decoder.py), for decoder=tiny


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    ode_pairs: ODEPairsConfig = field(default_factory=ODEPairsConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


# Allowed values of the string choices, by dotted key.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.attention": ("auto", "sdpa", "sdpa_mask", "flex"),
    "model.dtype": ("float32", "bfloat16"),
    "vae.size": ("tiny", "toy", "wan2.1"),
    "text.kind": ("toy", "umt5", "tiny-umt5"),
    "text.dtype": ("float32", "bfloat16"),
    "data.source": ("toyworld", "videos", "latents", "ode_pairs", "prompts"),
    "train.stage": ("teacher", "causal_teacher", "ode", "dmd"),
    "train.mixed_precision": ("no", "bf16"),
    "train.log_with": ("none", "wandb", "tensorboard"),
    "dmd.teacher": ("bidirectional", "causal", "none"),
    "dmd.generator_input": ("data", "ode", "backward_simulation", "self_forcing"),
    "dmd.self_forcing.cache_grad": ("straight_through", "detached"),
    "ode_pairs.solver": ("euler", "unipc"),
    "sampler.decoder": ("vae", "tiny"),
}


def _valid_keys(node: Any) -> list[str]:
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, base: DictConfig) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        return f"unknown config key '{key}'. Valid keys{' of ' + repr(parent) if parent else ''}: {_valid_keys(node)}"
    if isinstance(err, ValidationError):
        return f"invalid value for config key '{key}': {msg}"
    return f"config error at '{key}': {msg}"


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_explain(err, base)}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                schema: type = Config) -> DictConfig:
    """Defaults <- YAML file (deltas only) <- dotlist overrides; strict and validated.

    A YAML file may name ``defaults: [other.yaml, ...]`` (paths relative to it) merged first, so a
    config can build on another one.
    """
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(path), str(path))
    if overrides:
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as err:
            raise ConfigError(f"command-line overrides {overrides}: {err}") from None
        cfg = _merge(cfg, dot, "command line")
    validate(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _read_yaml(path: str | os.PathLike) -> DictConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping")
    parents = node.pop("defaults", None)
    if parents is None:
        return node
    merged = OmegaConf.create({})
    for parent in ([parents] if isinstance(parents, str) else list(parents)):
        merged = OmegaConf.merge(merged, _read_yaml(os.path.join(os.path.dirname(str(path)), str(parent))))
    return OmegaConf.merge(merged, node)


def validate(cfg: DictConfig) -> None:
    """Choices and cross-field rules. Raises :class:`ConfigError` naming the key."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        # YAML 1.1 reads an unquoted `no` / `off` as false, which a str field stores as "False"
        if value in ("False", "True") and value not in allowed:
            spelled = {"False": ("no", "off", "false"), "True": ("yes", "on", "true")}[value]
            match = [a for a in allowed if str(a).lower() in spelled]
            if len(match) == 1:
                OmegaConf.update(cfg, key, match[0])
                value = match[0]
        if value is not None and value not in allowed:
            raise ConfigError(f"invalid value for config key '{key}': {value!r}; valid: {list(allowed)}")
    if cfg.sampler.decoder == "tiny" and not cfg.sampler.tiny_decoder_path:
        raise ConfigError("config key 'sampler.decoder' is 'tiny' but 'sampler.tiny_decoder_path' is empty")
    from causvid.models.registry import DIT_SIZES  # local: registry imports nothing heavy

    if cfg.model.size not in DIT_SIZES:
        raise ConfigError(f"invalid value for config key 'model.size': {cfg.model.size!r}; valid: {sorted(DIT_SIZES)}")
    if cfg.model.num_layers is not None and cfg.model.num_layers < 1:
        raise ConfigError(f"config key 'model.num_layers' must be >= 1 (or null), got {cfg.model.num_layers}")
    if cfg.model.chunk_size < 1:
        raise ConfigError("config key 'model.chunk_size' must be >= 1")
    _validate_lora(cfg)
    d = cfg.data
    if d.num_frames < 1 or (d.num_frames - 1) % 4 != 0:
        raise ConfigError(f"config key 'data.num_frames' must be 1 + 4n (the VAE compresses time 4x), got {d.num_frames}")
    latent_frames = (d.num_frames - 1) // 4 + 1
    causal_frames = latent_frames - (1 if cfg.model.independent_first_frame else 0)
    if causal_frames % cfg.model.chunk_size != 0:
        raise ConfigError(
            f"config key 'model.chunk_size' = {cfg.model.chunk_size} does not divide the "
            f"{causal_frames} latent frames of 'data.num_frames' = {d.num_frames}"
            + (" (after the independent first frame)" if cfg.model.independent_first_frame else "")
        )
    s = cfg.schedule
    steps = list(s.denoising_step_list)
    if not steps or any(b > a for a, b in zip(steps, steps[1:])):
        raise ConfigError(f"config key 'schedule.denoising_step_list' must be non-empty and decreasing, got {steps}")
    if steps[-1] != 0:
        raise ConfigError(
            "config key 'schedule.denoising_step_list' must end with 0 (the clean level used by ODE regression, "
            f"DMD data inputs and the cache refresh), got {steps}"
        )
    if any(x < 0 or x > s.num_train_timesteps for x in steps):
        raise ConfigError(f"config key 'schedule.denoising_step_list' values must lie in [0, {s.num_train_timesteps}]")
    if not 0.0 <= s.min_timestep_ratio < s.max_timestep_ratio <= 1.0:
        raise ConfigError("config keys 'schedule.min_timestep_ratio' < 'schedule.max_timestep_ratio' must lie in [0, 1]")
    if s.shift <= 0:
        raise ConfigError("config key 'schedule.shift' must be > 0")
    t = cfg.train
    if t.keep_last < 1:
        raise ConfigError("config key 'train.keep_last' must be >= 1")
    if t.batch_size < 1 or t.grad_accum < 1 or t.max_steps < 0:
        raise ConfigError("config keys 'train.batch_size', 'train.grad_accum' must be >= 1 and 'train.max_steps' >= 0")
    if len(t.optim.betas) != 2 or len(cfg.dmd.critic_optim.betas) != 2:
        raise ConfigError("config keys 'train.optim.betas' / 'dmd.critic_optim.betas' need exactly two values")
    if cfg.dmd.update_ratio < 1:
        raise ConfigError("config key 'dmd.update_ratio' must be >= 1")
    if cfg.sampler.window_chunks < 0 or cfg.sampler.sink_chunks < 0:
        raise ConfigError("config keys 'sampler.window_chunks' / 'sampler.sink_chunks' must be >= 0")


def _validate_lora(cfg: DictConfig) -> None:
    lo = cfg.model.lora
    if lo.rank < 0:
        raise ConfigError(f"config key 'model.lora.rank' must be >= 0 (0: no LoRA, full fine-tuning), got {lo.rank}")
    if lo.alpha is not None and not lo.alpha > 0:
        raise ConfigError(f"config key 'model.lora.alpha' must be > 0 (or null: alpha = rank), got {lo.alpha}")
    targets = list(lo.targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ConfigError(f"invalid value for config key 'model.lora.targets': {bad}; valid: {list(LORA_TARGETS)}")
    if lo.rank > 0 and not targets:
        raise ConfigError("config key 'model.lora.targets' is empty: name at least one layer group, e.g. [ffn]")
    if lo.rank > 0 and cfg.train.stage not in ("ode", "dmd"):
        raise ConfigError(f"config key 'model.lora.rank' = {lo.rank}: LoRA training applies to train.stage ode | dmd, "
                          f"not {cfg.train.stage!r} (set model.lora.rank=0)")
    if lo.rank > 0 and cfg.train.stage == "dmd" and cfg.dmd.teacher != "none" and cfg.model.gradient_checkpointing:
        raise ConfigError("config key 'model.gradient_checkpointing' cannot be combined with model.lora.rank > 0 in "
                          "DMD: the critic's adapter sits on the teacher's weights, and a block recomputed in the "
                          "backward pass would run with the adapter of the role that ran last")


FOLDER_PATH_KEYS = ("vae.path", "text.path", "text.tokenizer_path", "sampler.tiny_decoder_path")


def resolve_folder_paths(cfg: DictConfig, folder: str | os.PathLike) -> DictConfig:
    """An export folder's config may name its VAE / text encoder / decoder relative to the folder (the shipped
    models under ``pretrained/`` do): such a path that does not exist as given but does from ``folder`` is made
    ``folder``-relative. Absolute paths and paths valid from the working directory are kept. In place; returns cfg."""
    for key in FOLDER_PATH_KEYS:
        sect, name = key.split(".")
        p = cfg[sect][name]
        if p and not os.path.isabs(p) and not os.path.exists(p) and os.path.exists(os.path.join(folder, p)):
            cfg[sect][name] = os.path.normpath(os.path.join(folder, p))
    return cfg


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (atomically) next to a run."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_dataclass(cfg: DictConfig, schema: type = Config) -> Any:
    """The config as plain dataclass objects (for code that wants attribute access without OmegaConf)."""
    obj = OmegaConf.to_object(cfg)
    assert dataclasses.is_dataclass(obj) and isinstance(obj, schema)
    return obj


def as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple, ListConfig)) else [x]
