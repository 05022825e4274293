"""What a browser may ask for: the server's limits and the checked settings of one stream.

Everything a client sends is checked here before anything runs; a bad value becomes a :class:`SettingsError` whose
one-line message the page shows (the server and the other streams go on).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence


class SettingsError(ValueError):
    """A client's request that cannot be served as sent (the message says why, in one line)."""


@dataclass(frozen=True)
class Limits:
    """The server's limits (``scripts/demo.py`` options)."""

    max_streams: int = 2  # streams generating at once (each holds a KV cache); past it a client is told "busy"
    max_prompt_chars: int = 1000
    max_window: int = 64  # rolling cache: most recent chunks kept
    max_sink: int = 8  # rolling cache: first chunks kept
    max_seed: int = 2**31 - 1
    record_seconds: float = 600.0  # frames kept per tab for the mp4 download (the last ones past it are dropped)
    lead_seconds: float = 1.0  # how far generation may run ahead of playback (plus one chunk)
    max_stream_seconds: float = 600.0  # a stream ends after this much video (frees its slot for others)

    def __post_init__(self):
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {self.max_streams}")
        if self.max_prompt_chars < 1 or self.max_window < 1 or self.max_sink < 0:
            raise ValueError("max_prompt_chars and max_window must be >= 1, max_sink >= 0")
        if self.lead_seconds < 0 or self.record_seconds <= 0 or self.max_stream_seconds <= 0:
            raise ValueError("lead_seconds must be >= 0, record_seconds and max_stream_seconds > 0")


@dataclass(frozen=True)
class StreamSettings:
    """One stream's request: its first prompt and sampling options (checked by :func:`parse_start`)."""

    prompt: str
    seed: int
    steps: int  # denoising steps per chunk, 1 .. the model's step count (see :func:`step_subset`)
    window: int  # rolling KV cache: most recent chunks kept (>= 1: the stream is endless)
    sink: int  # rolling KV cache: first chunks kept
    recache: bool  # prompt switches re-compute the cached window under the new prompt (LongLive)

    def to_dict(self) -> dict:
        return asdict(self)


def check_prompt(value: Any, limits: Limits) -> str:
    """A non-empty prompt of at most ``limits.max_prompt_chars`` characters (surrounding spaces removed)."""
    if not isinstance(value, str):
        raise SettingsError("the prompt must be text")
    text = value.strip()
    if not text:
        raise SettingsError("the prompt is empty: type what the video should show")
    if len(text) > limits.max_prompt_chars:
        raise SettingsError(f"the prompt is too long: {len(text)} characters, the limit is {limits.max_prompt_chars}")
    return text


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer in [lo, hi] (a whole-number float or a decimal string is accepted, a bool is not)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{name} must be true or false, got {value!r}")
    return value


def parse_start(msg: dict, limits: Limits, max_steps: int, defaults: StreamSettings) -> StreamSettings:
    """The settings of a ``start`` message; a missing key takes ``defaults``' value, an unknown key is an error."""
    known = {"type", "prompt", "seed", "steps", "window", "sink", "recache"}
    unknown = sorted(set(msg) - known)
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown}; valid: {sorted(known - {'type'})}")
    get = lambda k: msg.get(k, getattr(defaults, k))
    return StreamSettings(prompt=check_prompt(msg.get("prompt"), limits),
                          seed=check_int("seed", get("seed"), 0, limits.max_seed),
                          steps=check_int("steps", get("steps"), 1, max_steps),
                          window=check_int("window", get("window"), 1, limits.max_window),
                          sink=check_int("sink", get("sink"), 0, limits.max_sink),
                          recache=check_bool("recache", get("recache")))


def step_subset(steps: Sequence[float], k: int) -> list[float]:
    """``k`` of the model's denoising timesteps, evenly spread and always keeping the first and (k > 1) the last:
    ``[1000, 757, 522]`` -> k=1 ``[1000]``, k=2 ``[1000, 522]``, k=3 all."""
    n = len(steps)
    if not 1 <= k <= n:
        raise ValueError(f"steps per chunk must be in [1, {n}], got {k}")
    if k == 1:
        return [float(steps[0])]
    idx = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return [float(steps[i]) for i in idx]
