"""CLIP text-video score with open_clip, weights from a local file (DESIGN.md §2 ``eval/clip_score.py``).

Definition (docs/evaluation.md, "CLIP score"; the torchmetrics ``CLIPScore`` convention applied per frame and
averaged over frames, the "CLIPSIM" of text-to-video papers)::

    frames   = the N sampled frames of the video (all T frames by default; N < T: uniform, see frame_indices)
    c_i      = cos(E_I(preprocess(frame_i)), E_T(tokenize(prompt)))          raw open_clip embeddings
    score    = 100 * mean_i max(c_i, 0)                                        in [0, 100]

* ``E_I`` / ``E_T`` are the model's ``encode_image`` / ``encode_text``; the cosine is taken in float32.
* The clamp is applied per frame, before the mean (a frame that matches worse than orthogonal counts 0).
* ``preprocess`` is the model's own eval transform done with torch ops on tensors: pixels to [0, 1], bicubic
  antialiased resize (open_clip's ``resize_mode``: ``shortest`` side to the input size then centre crop,
  ``longest`` side then centred padding with ``fill_color``, or ``squash``), clamp to [0, 1], then the model's
  mean/std normalisation. It matches open_clip's PIL transform up to PIL's uint8 rounding.
* The prompt is tokenised by ``open_clip.get_tokenizer`` (truncated to the model's context length, 77).

Always report the backbone, the weights (tag or file) and the frame sampling with a number: ``describe()``.

Weights are loaded only through :mod:`causvid.models.weights` (safetensors, or ``torch.load(weights_only=True)``
for ``.bin`` / ``.pt`` / ``.pth`` holding a plain state dict), never through open_clip's own loader, which falls
back to an unrestricted ``torch.load`` on old torch versions (and ``open_clip.load_openai_model`` runs
``torch.jit.load`` on OpenAI's TorchScript files).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from causvid.models.weights import WeightsError, load_into, load_state_dict_file, strip_prefixes

# open_clip-format weight files in open_clip's Hugging Face repos, in the order a folder is searched. The same
# repos often hold ``model.safetensors`` / ``pytorch_model.bin`` in the *transformers* (or timm) format, which
# open_clip models cannot load: those names are never picked.
OPEN_CLIP_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
FORMAT_HINT = ("is it an open_clip-format checkpoint of this architecture? Files such as model.safetensors in LAION "
               "or timm repos are in the transformers/timm format; use open_clip_model.safetensors or "
               "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")


def _import_open_clip():
    try:
        import open_clip
    except ImportError as err:  # open_clip needs the registry torch + torchvision (docs/environment.md)
        raise ImportError(f"CLIP score needs open_clip_torch (pip install open_clip_torch): {err}") from None
    return open_clip


@contextlib.contextmanager
def _quiet_logging():
    """open_clip logs "No pretrained weights loaded ... initialized randomly" at WARNING before ours are loaded."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


# ----------------------------------------------------------------------------------------------------------------
# Frame sampling and preprocessing (pure functions on tensors)
# ----------------------------------------------------------------------------------------------------------------


def frame_indices(num_video_frames: int, num_frames: int | None) -> list[int]:
    """The frames a score uses: all of them when ``num_frames`` is None or >= T, else ``num_frames`` evenly spaced
    ones including the first and the last, ``i_k = round(k (T - 1) / (N - 1))`` (N = 1: the middle frame
    ``(T - 1) // 2``)."""
    t = int(num_video_frames)
    if t < 1:
        raise ValueError(f"a video needs at least one frame, got {t}")
    if num_frames is None or num_frames >= t:
        return list(range(t))
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None (all frames), got {num_frames}")
    if num_frames == 1:
        return [(t - 1) // 2]
    return [int(round(k * (t - 1) / (num_frames - 1))) for k in range(num_frames)]


def video_to_unit_frames(video: Any) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` (0..255) or float ``[T, 3, H, W]`` (-1..1) -> float32 ``[T, 3, H, W]`` in [0, 1].

    Float values are clamped to [-1, 1] (decoders overshoot slightly); a float video that looks like 0..255 is
    an error rather than a silent saturation.
    """
    v = torch.from_numpy(np.ascontiguousarray(video)) if isinstance(video, np.ndarray) else video
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor or numpy array, got {type(video).__name__}")
    if v.dtype == torch.uint8:
        if v.ndim != 4 or v.shape[-1] != 3:
            raise ValueError(f"a uint8 video must be [T, H, W, 3], got shape {tuple(v.shape)}")
        return v.permute(0, 3, 1, 2).float() / 255.0  # [T, H, W, 3] -> [T, 3, H, W]
    if not v.is_floating_point():
        raise TypeError(f"video must be uint8 [T, H, W, 3] or float [T, 3, H, W] in [-1, 1], got dtype {v.dtype}")
    if v.ndim != 4 or v.shape[1] != 3:
        raise ValueError(f"a float video must be [T, 3, H, W] in [-1, 1], got shape {tuple(v.shape)}")
    if v.numel() and float(v.detach().abs().max()) > 2.0:
        raise ValueError(
            f"a float video must hold values in [-1, 1], got max |x| = {float(v.abs().max()):.3g} "
            "(pass 0..255 videos as uint8 [T, H, W, 3])"
        )
    return ((v.detach().float().clamp(-1.0, 1.0) + 1.0) / 2.0)


def _as_hw(size: Any) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return (int(size[0]), int(size[1])) if len(size) == 2 else (int(size[0]), int(size[0]))
    return int(size), int(size)


def resize_and_crop(frames: torch.Tensor, size: Any, *, resize_mode: str = "shortest",
                    interpolation: str = "bicubic", fill: float = 0.0) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, 3, h, w]`` in [0, 1] as open_clip's eval transform (``image_transform``).

    shortest: scale so the image covers ``(h, w)``, then centre crop; longest: scale so it fits, then centre
    padding with ``fill``; squash: resize to ``(h, w)`` directly.
    """
    th, tw = _as_hw(size)
    n, c, h, w = frames.shape
    mode = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}.get(interpolation)
    if mode is None:
        raise ValueError(f"unsupported interpolation {interpolation!r}; valid: bicubic, bilinear, nearest")
    if resize_mode == "squash":
        new_h, new_w = th, tw
    elif resize_mode in ("shortest", "longest"):
        scale = max(th / h, tw / w) if resize_mode == "shortest" else min(th / h, tw / w)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        if resize_mode == "shortest":
            new_h, new_w = max(new_h, th), max(new_w, tw)
        else:
            new_h, new_w = min(new_h, th), min(new_w, tw)
    else:
        raise ValueError(f"unsupported resize_mode {resize_mode!r}; valid: shortest, longest, squash")
    x = frames
    if (new_h, new_w) != (h, w):
        kwargs = {"antialias": True} if mode != "nearest" else {}
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, align_corners=False if mode != "nearest" else None,
                          **kwargs).clamp(0.0, 1.0)  # [N, 3, new_h, new_w]
    if (new_h, new_w) == (th, tw):
        return x
    if resize_mode == "longest":  # centred padding up to (th, tw)
        top, left = (th - new_h) // 2, (tw - new_w) // 2
        return F.pad(x, (left, tw - new_w - left, top, th - new_h - top), value=fill)  # [N, 3, th, tw]
    top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
    return x[:, :, top:top + th, left:left + tw]  # centre crop -> [N, 3, th, tw]


def normalize_frames(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel on ``[N, 3, h, w]``."""
    m = torch.tensor(mean, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    return (frames - m) / s


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


def looks_like_path(pretrained: str) -> bool:
    """A ``pretrained`` value is a path (not an open_clip tag) if it exists, has a folder part or a weight suffix."""
    return os.path.exists(pretrained) or os.sep in pretrained or "/" in pretrained \
        or pretrained.lower().endswith(WEIGHT_SUFFIXES)


def find_open_clip_weights(folder: str) -> str:
    """The weight file inside a downloaded open_clip model folder (e.g. a Hugging Face snapshot)."""
    for name in OPEN_CLIP_WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise WeightsError(f"no open_clip weights in folder {folder} (looked for {', '.join(OPEN_CLIP_WEIGHT_NAMES)})")


def load_clip_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A local open_clip checkpoint (file or folder) -> flat state dict, loaded without unpickling code."""
    if os.path.isdir(path):
        path = find_open_clip_weights(path)
    if not os.path.exists(path):
        raise WeightsError(
            f"CLIP weight file not found: {path} (put open_clip weights there, e.g. open_clip_model.safetensors "
            "from the model's Hugging Face repo; see docs/evaluation.md)"
        )
    try:
        sd = load_state_dict_file(path)
    except WeightsError as err:
        if not path.endswith((".pt", ".pth", ".bin", ".ckpt")):
            raise
        raise WeightsError(
            f"{err}. OpenAI's original TorchScript files (e.g. ViT-B-32.pt) cannot be loaded safely: use the "
            "open_clip-format file (open_clip_model.safetensors) instead, see docs/evaluation.md"
        ) from None
    return strip_prefixes(sd, ("module.",))


def adapt_clip_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Benign differences between open_clip checkpoint versions: scalar vs 1-d ``logit_scale`` / ``logit_bias``,
    a stale ``text.transformer.embeddings.position_ids`` buffer."""
    sd = dict(sd)
    own = model.state_dict()
    for key in ("logit_scale", "logit_bias"):
        if key in sd and key in own and sd[key].shape != own[key].shape and sd[key].numel() == own[key].numel():
            sd[key] = sd[key].reshape(own[key].shape)
    stale = "text.transformer.embeddings.position_ids"
    if stale in sd and stale not in own:
        del sd[stale]
    return sd


def resolve_pretrained_tag(model_name: str, tag: str, cache_dir: str | None = None) -> tuple[str, dict]:
    """An open_clip pretrained tag -> (local weight file, the tag's config). Uses open_clip's download helper,
    which reads the Hugging Face cache first; without a network and without a cached copy this is an error
    naming the tag and suggesting a local path."""
    from importlib import metadata

    _import_open_clip()
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(model_name)
        raise WeightsError(
            f"unknown open_clip pretrained tag {tag!r} for model {model_name!r} (known tags: {tags}); "
            f"or pass pretrained=<path to a local weight file> (open_clip_torch {metadata.version('open_clip_torch')})"
        )
    source = cfg.get("hf_hub") or cfg.get("url") or "?"
    try:
        path = download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as err:  # hub / url errors of many types; re-raised with what to do instead
        raise WeightsError(
            f"could not fetch open_clip weights for tag {tag!r} of model {model_name!r} from {source} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). No model hub is reachable "
            "here: download the weights elsewhere and pass pretrained=<local path>, see docs/evaluation.md"
        ) from None
    if not path or not os.path.isfile(path):
        raise WeightsError(f"open_clip tag {tag!r} of model {model_name!r} resolved to no file ({path!r}); "
                           "pass pretrained=<local path>")
    return path, cfg


# ----------------------------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------------------------


class ClipScorer:
    """CLIP text-video score (see the module docstring for the exact definition).

    Args:
        model_name: an open_clip architecture name (``open_clip.list_models()``), e.g. ``ViT-B-32``.
        pretrained: a local weight file or folder (``.safetensors``, or a plain state dict in ``.bin``/``.pt``/
            ``.pth``), or an open_clip pretrained tag (needs a network or the Hugging Face cache).
        device, dtype: where and in which precision the model runs (cosines are computed in float32).
        num_frames: frames sampled per video (None: all frames), see :func:`frame_indices`.
        batch_size: frames per ``encode_image`` call.
        random_init: build a randomly initialised model (tests only; scores are meaningless). Requires
            ``pretrained=None``.
        seed: the RNG seed of the random initialisation (the global RNG is left untouched).
        model_kwargs: architecture overrides passed to open_clip (``embed_dim``, ``vision_cfg``, ``text_cfg``);
            weights must then match the overridden architecture.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, device: str | torch.device = "cpu",
                 *, dtype: torch.dtype = torch.float32, num_frames: int | None = None, batch_size: int = 32,
                 random_init: bool = False, seed: int = 0, cache_dir: str | None = None,
                 model_kwargs: Mapping[str, Any] | None = None):
        if pretrained is None and not random_init:
            raise WeightsError(
                f"ClipScorer({model_name!r}) needs weights: pass pretrained=<local weight file> (or an open_clip tag "
                "where a network exists), or random_init=True for tests"
            )
        if pretrained is not None and random_init:
            raise ValueError("pass either pretrained=... or random_init=True, not both")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        frame_indices(1, num_frames)  # validates num_frames
        self.model_name, self.device, self.dtype = model_name, torch.device(device), dtype
        self.num_frames, self.batch_size = num_frames, batch_size
        self.pretrained = "random-init" if random_init else str(pretrained)

        weight_path, tag_cfg = self._resolve_weights(pretrained, cache_dir)
        self.model, self.preprocess_cfg = self._build(model_name, tag_cfg, seed, dict(model_kwargs or {}))
        if weight_path is not None:
            sd = adapt_clip_state_dict(self.model, load_clip_state_dict(weight_path))
            try:
                load_into(self.model, sd, f"open_clip {model_name} weights {weight_path}")
            except WeightsError as err:
                raise WeightsError(f"{err} ({FORMAT_HINT})") from None
        self.weight_path = weight_path
        self.model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        ctx = _import_open_clip().get_model_tokenize_cfg(self.model).get("context_length")
        self.tokenizer = _import_open_clip().get_tokenizer(model_name, **({"context_length": ctx} if ctx else {}))

    # -- construction -------------------------------------------------------------------------------------------

    def _resolve_weights(self, pretrained: str | None, cache_dir: str | None) -> tuple[str | None, dict]:
        if pretrained is None:
            return None, {}
        pretrained = os.fspath(pretrained)
        if looks_like_path(pretrained):
            if not os.path.exists(pretrained):
                raise WeightsError(
                    f"CLIP weight file not found: {pretrained} (pass the path of a local open_clip weight file, "
                    "e.g. open_clip_model.safetensors; see docs/evaluation.md)"
                )
            return pretrained, {}
        return resolve_pretrained_tag(self.model_name, pretrained, cache_dir)

    @staticmethod
    def _build(model_name: str, tag_cfg: Mapping[str, Any], seed: int,
               model_kwargs: dict) -> tuple[torch.nn.Module, dict]:
        """The open_clip architecture with random weights (ours are loaded after), and its preprocess config
        (the tag's mean/std/interpolation/resize mode override the architecture's defaults)."""
        open_clip = _import_open_clip()
        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r}; valid: {open_clip.list_models()}")
        if tag_cfg.get("quick_gelu") and "quickgelu" not in model_name.lower():
            model_kwargs.setdefault("quick_gelu", True)  # the tag's weights were trained with QuickGELU
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), _quiet_logging():
            torch.manual_seed(seed)
            warnings.simplefilter("ignore")
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=None, **model_kwargs)
        cfg = dict(open_clip.get_model_preprocess_cfg(model))
        cfg.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode", "fill_color")
                    if k in tag_cfg})
        return model, cfg

    def describe(self) -> dict[str, Any]:
        """What to report next to a number: backbone, weights, frame sampling, input size."""
        return {
            "metric": "clip_score = 100 * mean_frames max(cos(image, text), 0)",
            "model": self.model_name,
            "pretrained": self.pretrained,
            "frames": "all" if self.num_frames is None else f"{self.num_frames} evenly spaced (first and last included)",
            "image_size": list(_as_hw(self.preprocess_cfg["size"])),
            "resize_mode": self.preprocess_cfg.get("resize_mode", "shortest"),
        }

    # -- encoding -----------------------------------------------------------------------------------------------

    def preprocess(self, video: Any) -> torch.Tensor:
        """Sampled frames, ready for ``encode_image``: float32 ``[N, 3, s, s]`` on the CPU."""
        frames = video_to_unit_frames(video)  # [T, 3, H, W] in [0, 1]
        frames = frames[frame_indices(frames.shape[0], self.num_frames)]  # [N, 3, H, W]
        cfg = self.preprocess_cfg
        frames = resize_and_crop(frames, cfg["size"], resize_mode=cfg.get("resize_mode", "shortest"),
                                 interpolation=cfg.get("interpolation", "bicubic"),
                                 fill=float(cfg.get("fill_color", 0)) / 255.0)
        return normalize_frames(frames, cfg["mean"], cfg["std"])  # [N, 3, s, s]

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``[N, 3, s, s]`` -> unit-norm float32 embeddings ``[N, D]``, ``batch_size`` frames at a time."""
        out = [self.model.encode_image(chunk.to(self.device, self.dtype)).float()
               for chunk in pixels.split(self.batch_size)]  # each [n, D]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> unit-norm float32 embeddings ``[P, D]``."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a sequence of strings")
        tokens = self.tokenizer(list(prompts)).to(self.device)  # [P, context_length]
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    # -- scores -------------------------------------------------------------------------------------------------

    def frame_cosines(self, video: Any, prompt: str) -> torch.Tensor:
        """Raw cosine of each sampled frame with the prompt: float32 ``[N]`` (before the clamp and the scale)."""
        pixels = self.preprocess(video)  # first, so a malformed video fails before any encoding
        return self._cosines(pixels, self.encode_texts([prompt])[0])

    def _cosines(self, pixels: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return (self.encode_images(pixels) @ text_emb.to(torch.float32)).cpu()  # [N, D] @ [D] -> [N]

    @staticmethod
    def aggregate(cosines: torch.Tensor) -> float:
        """``100 * mean(max(c, 0))`` over frames."""
        return float(100.0 * cosines.clamp(min=0.0).mean())

    def score(self, video: Any, prompt: str) -> float:
        """CLIP score of one video (uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]`` in [-1, 1]) in [0, 100]."""
        return self.aggregate(self.frame_cosines(video, prompt))

    def score_batch(self, videos: Sequence[Any] | torch.Tensor, prompts: Sequence[str]) -> list[float]:
        """One score per (video, prompt) pair; ``videos`` is a list or a ``[B, T, 3, H, W]`` / ``[B, T, H, W, 3]``
        tensor. Prompts are encoded together."""
        videos = list(videos)
        if isinstance(prompts, str) or len(videos) != len(prompts):
            raise ValueError(f"score_batch needs one prompt per video: got {len(videos)} videos and "
                             f"{1 if isinstance(prompts, str) else len(prompts)} prompts")
        text = self.encode_texts(prompts)  # [B, D]
        return [self.aggregate(self._cosines(self.preprocess(v), text[i])) for i, v in enumerate(videos)]
