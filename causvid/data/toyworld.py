"""The toy world: procedural captioned videos of coloured shapes (DESIGN.md §8, docs/toyworld.md).

A *scene* is a small JSON-serialisable dict that says what is shown, independent of resolution,
frame count and frame rate::

    {"objects": [{"color": "red", "shape": "circle", "motion": "left", "speed": "fast",
                  "size": 0.1, "start": [0.8, 0.4], "velocity": [-0.18, 0.0]}, ...],
     "background": {"kind": "stripes", "color": "gray", "color2": "navy", "contrast": 0.5,
                    "angle": 0.7, "period": 0.5, "phase": 1.0}}

Coordinates are normalised per axis (x in widths, y in heights, origin top-left, y down); object
``size`` is the half-extent of its bounding box in units of ``min(H, W)``; ``velocity`` is in frame
widths / heights per second, so the frame rate changes only how the motion is sampled. Objects bounce
off the walls (a triangle wave). :func:`render` turns a scene into pixels; :func:`sample_scene` draws
one from a numpy Generator; :func:`caption_from_scene` / :func:`scene_from_caption` go between scenes
and captions of the grammar in docs/toyworld.md; :class:`ToyWorld` is the map-style data set
(item ``i`` is a pure function of ``(seed, i)``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable

import numpy as np
import torch
from einops import rearrange

# --- attributes -----------------------------------------------------------------------------------

# Object palette: fully saturated hues (HSV s=0.85, v=0.9), all with the same chroma (max - min = 196),
# at least 30 degrees of hue apart. Objects are the only saturated things in the world: every background
# colour has chroma <= 25. docs/toyworld.md §1.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 34, 34),
    "orange": (230, 132, 34),
    "yellow": (230, 230, 34),
    "green": (34, 230, 34),
    "cyan": (34, 230, 230),
    "blue": (34, 34, 230),
    "magenta": (230, 34, 230),
}
COLOR_HUES: dict[str, float] = {"red": 0.0, "orange": 30.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0,
                                "blue": 240.0, "magenta": 300.0}
OBJECT_CHROMA = 196  # max - min of every palette colour (uint8 units)

# Neutral (low-chroma) background colours; plain backgrounds are named by these in captions.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (14, 14, 18),
    "gray": (108, 108, 112),
    "white": (232, 232, 226),
    "navy": (30, 34, 52),
    "brown": (86, 72, 66),
    "beige": (204, 196, 184),
}
BACKGROUND_MAX_CHROMA = 22  # every background pixel has chroma <= this (uint8 units)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right")
MOTIONS: tuple[str, ...] = DIRECTIONS + ("still",)
# Unit direction vectors in image coordinates (x right, y down); diagonals have unit length.
_S = 1.0 / math.sqrt(2.0)
DIRECTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up-left": (-_S, -_S), "up-right": (_S, -_S), "down-left": (-_S, _S), "down-right": (_S, _S),
    "still": (0.0, 0.0),
}
SPEEDS: dict[str, float] = {"slow": 0.08, "fast": 0.18}  # frame sizes per second
SPEED_WORDS: dict[str, str] = {"slow": "slowly", "fast": "quickly"}
TEXTURES: tuple[str, ...] = ("stripes", "clouds")
BACKGROUNDS: tuple[str, ...] = ("plain",) + TEXTURES
SIZE_RANGE: tuple[float, float] = (0.08, 0.12)  # object half-extent, in units of min(H, W)
STILL_PROB = 0.1  # probability that an object does not move
DEFAULT_SCENE_DURATION = 4.0  # seconds over which sampled motions start without bouncing

_ARTICLES = ("a", "an")
_FUNCTION_WORDS = ("and", "on", "moving", "standing", "still")
VOCABULARY: list[str] = sorted(
    set(_ARTICLES) | set(_FUNCTION_WORDS) | set(COLORS) | set(SHAPES) | set(DIRECTIONS)
    | set(SPEED_WORDS.values()) | set(BACKGROUND_COLORS) | set(TEXTURES)
)
MAX_CAPTION_WORDS = 15  # two objects with directions and speeds, plus a background phrase

# --- sampling -------------------------------------------------------------------------------------


def _object_half_extent(size: float, height: int, width: int) -> tuple[float, float]:
    """Half-extent of an object's box in normalised x (widths) and y (heights) units."""
    m = min(height, width)
    return size * m / width, size * m / height


def _sample_start(rng: np.random.Generator, lo: float, hi: float, v: float, duration: float) -> float:
    """A start coordinate from which motion with velocity ``v`` runs ``duration`` s without a bounce."""
    travel = abs(v) * duration
    span = hi - lo
    if travel >= span:  # cannot avoid a bounce: start close to the upstream wall
        a, b = (lo, lo + 0.05 * span) if v > 0 else (hi - 0.05 * span, hi)
    elif v > 0:
        a, b = lo, hi - travel
    elif v < 0:
        a, b = lo + travel, hi
    else:
        a, b = lo, hi
    return float(rng.uniform(a, b))


def sample_object(rng: np.random.Generator, color: str, duration: float = DEFAULT_SCENE_DURATION) -> dict:
    """One object with a given colour: shape, size, motion, speed and a start position.

    Positions are drawn for a square frame (the usual case); other aspect ratios clamp at render time.
    """
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = float(rng.uniform(*SIZE_RANGE))
    still = rng.random() < STILL_PROB
    motion = "still" if still else DIRECTIONS[rng.integers(len(DIRECTIONS))]
    speed = None if still else ("slow", "fast")[rng.integers(2)]
    ux, uy = DIRECTION_VECTORS[motion]
    s = 0.0 if speed is None else SPEEDS[speed]
    vx, vy = ux * s, uy * s
    lo, hi = size, 1.0 - size
    start = [_sample_start(rng, lo, hi, vx, duration), _sample_start(rng, lo, hi, vy, duration)]
    return {"color": color, "shape": shape, "motion": motion, "speed": speed, "size": round(size, 6),
            "start": [round(p, 6) for p in start], "velocity": [round(vx, 6), round(vy, 6)]}


def sample_background(rng: np.random.Generator, textured_prob: float = 0.5) -> dict:
    """A plain background (one neutral colour) or a smooth texture blending two of them."""
    names = list(BACKGROUND_COLORS)
    color = names[rng.integers(len(names))]
    if rng.random() >= textured_prob:
        return {"kind": "plain", "color": color}
    others = [c for c in names if c != color]
    color2 = others[rng.integers(len(others))]
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    bg: dict[str, Any] = {"kind": kind, "color": color, "color2": color2,
                          "contrast": round(float(rng.uniform(0.3, 0.6)), 6)}
    if kind == "stripes":  # gentle sinusoidal stripes: 1.4 - 3 periods across the frame
        bg.update(angle=round(float(rng.uniform(0, math.pi)), 6), period=round(float(rng.uniform(0.35, 0.7)), 6),
                  phase=round(float(rng.uniform(0, 2 * math.pi)), 6))
    else:  # clouds: three low-frequency plane waves (0.4 - 1.2 cycles per frame)
        waves = []
        for _ in range(3):
            f, th = rng.uniform(0.4, 1.2), rng.uniform(0, 2 * math.pi)
            waves.append([round(float(f * math.cos(th)), 6), round(float(f * math.sin(th)), 6),
                          round(float(rng.uniform(0, 2 * math.pi)), 6), round(float(rng.uniform(0.5, 1.0)), 6)])
        bg["waves"] = waves
    return bg


def sample_scene(rng: np.random.Generator, max_objects: int = 2, textured_background_prob: float = 0.5,
                 duration: float = DEFAULT_SCENE_DURATION) -> dict:
    """A random scene: 1..max_objects objects of distinct colours on a background (a pure function of rng).

    ``duration`` (seconds) only shapes start positions so that motions run this long before a bounce;
    it does not depend on how the scene is later rendered.
    """
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    n = int(rng.integers(1, max_objects + 1))
    colors = rng.choice(len(COLORS), size=n, replace=False)
    names = list(COLORS)
    objects = [sample_object(rng, names[int(c)], duration) for c in colors]
    return {"objects": objects, "background": sample_background(rng, textured_background_prob)}


# --- rendering ------------------------------------------------------------------------------------


def _bounce(p0: float, v: float, times: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position under constant velocity with elastic reflection at lo and hi (a triangle wave). [T]"""
    span = hi - lo
    if span <= 0:
        return np.full_like(times, (lo + hi) / 2)
    u = np.mod(np.clip(p0, lo, hi) - lo + v * times, 2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


def trajectory(obj: dict, times: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre of ``obj`` at ``times`` (seconds), normalised per axis. Returns [T, 2] (x, y)."""
    hx, hy = _object_half_extent(obj["size"], height, width)
    x = _bounce(obj["start"][0], obj["velocity"][0], times, hx, 1.0 - hx)
    y = _bounce(obj["start"][1], obj["velocity"][1], times, hy, 1.0 - hy)
    return np.stack([x, y], axis=-1)


def _shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape with box half-extent r centred at 0."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        qx, qy = np.abs(dx) - r, np.abs(dy) - r
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
        return outside + np.minimum(np.maximum(qx, qy), 0)
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - r) / math.sqrt(2.0)
    if shape == "triangle":  # apex up at (0, -r), base from (-r, r) to (r, r); max of edge half-planes
        k = 1.0 / math.sqrt(5.0)
        return np.maximum(dy - r, np.maximum((-2 * dx - dy - r) * k, (2 * dx - dy - r) * k))
    raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")


def _rgb(name: str) -> np.ndarray:
    table = COLORS if name in COLORS else BACKGROUND_COLORS
    if name not in table:
        raise ValueError(f"unknown colour {name!r}; valid: {list(COLORS) + list(BACKGROUND_COLORS)}")
    return np.asarray(table[name], dtype=np.float32) / 255.0


def render_background(bg: dict, height: int, width: int) -> np.ndarray:
    """Background image in [0, 1]. Returns [H, W, 3] float32. Textures use min(H, W) as unit length."""
    c1 = _rgb(bg["color"])
    if bg["kind"] == "plain":
        return np.broadcast_to(c1, (height, width, 3)).astype(np.float32)
    c2 = c1 + float(bg["contrast"]) * (_rgb(bg["color2"]) - c1)
    m = float(min(height, width))
    ys = ((np.arange(height, dtype=np.float32) + 0.5) / m)[:, None]  # [H, 1]
    xs = ((np.arange(width, dtype=np.float32) + 0.5) / m)[None, :]  # [1, W]
    if bg["kind"] == "stripes":
        u = (xs * math.cos(bg["angle"]) + ys * math.sin(bg["angle"])) / bg["period"]
        s = 0.5 + 0.5 * np.cos(2 * math.pi * u + bg["phase"])
    elif bg["kind"] == "clouds":
        total = sum(w[3] for w in bg["waves"])
        s = sum(w[3] * np.cos(2 * math.pi * (w[0] * xs + w[1] * ys) + w[2]) for w in bg["waves"])
        s = 0.5 + 0.5 * s / total
    else:
        raise ValueError(f"unknown background kind {bg['kind']!r}; valid: {list(BACKGROUNDS)}")
    return (c1 + s[..., None] * (c2 - c1)).astype(np.float32)  # [H, W, 3]


def _object_window(centre_px: np.ndarray, r: float, size: int) -> tuple[np.ndarray, int]:
    """Per-frame integer origins of a square window of side S that holds the object. ([T], S)"""
    side = min(size, int(math.ceil(2 * r)) + 4)
    origin = np.clip(np.floor(centre_px - r) - 2, 0, size - side).astype(np.int64)
    return origin, side


def render(scene: dict, num_frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """Pixels of ``scene``: float32 [T, 3, H, W] in [-1, 1]. Frame k shows time k / fps seconds.

    Shapes are drawn back to front with anti-aliased edges: coverage = clip(0.5 - signed distance, 0, 1),
    evaluated only in a small window around each object per frame (everything else has coverage 0).
    """
    if num_frames < 1 or height < 1 or width < 1 or fps <= 0:
        raise ValueError(f"render needs num_frames, height, width >= 1 and fps > 0; got "
                         f"{num_frames}, {height}, {width}, {fps}")
    times = np.arange(num_frames, dtype=np.float64) / fps
    bg = rearrange(render_background(scene["background"], height, width) * 2.0 - 1.0, "h w c -> c h w")
    video = np.broadcast_to(bg, (num_frames, 3, height, width)).copy()  # [T, 3, H, W]
    m = min(height, width)
    tt = np.arange(num_frames)[:, None, None]  # [T, 1, 1]
    for obj in scene["objects"]:
        r = obj["size"] * m
        centre = trajectory(obj, times, height, width)  # [T, 2] normalised (x, y)
        cx, cy = centre[:, 0] * width, centre[:, 1] * height  # [T] pixels
        ox, sx = _object_window(cx, r, width)
        oy, sy = _object_window(cy, r, height)
        xx = ox[:, None, None] + np.arange(sx)[None, None, :]  # [T, 1, Sx] pixel columns
        yy = oy[:, None, None] + np.arange(sy)[None, :, None]  # [T, Sy, 1] pixel rows
        dx = (xx + 0.5 - cx[:, None, None]).astype(np.float32)
        dy = (yy + 0.5 - cy[:, None, None]).astype(np.float32)
        dx, dy = np.broadcast_arrays(dx, dy)  # [T, Sy, Sx]
        alpha = np.clip(0.5 - _shape_sdf(obj["shape"], dx, dy, r), 0.0, 1.0)[..., None]  # [T, Sy, Sx, 1]
        patch = video[tt, :, yy, xx]  # [T, Sy, Sx, 3] (advanced indices first)
        video[tt, :, yy, xx] = patch + alpha * ((_rgb(obj["color"]) * 2.0 - 1.0) - patch)
    return video


# --- captions -------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: dict) -> str:
    """``a red circle moving left quickly`` / ``an orange square standing still``."""
    head = f"{_article(obj['color'])} {obj['color']} {obj['shape']}"
    if obj["motion"] == "still":
        return f"{head} standing still"
    speed = f" {SPEED_WORDS[obj['speed']]}" if obj.get("speed") else ""
    return f"{head} moving {obj['motion']}{speed}"


def background_phrase(bg: dict) -> str:
    """``on black`` (plain) / ``on stripes`` / ``on clouds``."""
    return f"on {bg['color'] if bg['kind'] == 'plain' else bg['kind']}"


def caption_from_scene(scene: dict) -> str:
    """The caption of a scene (grammar in docs/toyworld.md §2)."""
    return " and ".join(object_phrase(o) for o in scene["objects"]) + " " + background_phrase(scene["background"])


def tokenize(caption: str) -> list[str]:
    """Words of a caption: lower case, whitespace split, a trailing full stop dropped."""
    return caption.strip().lower().rstrip(".").split()


def _parse_object(words: list[str], caption: str) -> dict:
    def fail(why: str) -> ValueError:
        return ValueError(f"cannot parse toy-world caption {caption!r}: {why} in {' '.join(words)!r}")

    if len(words) < 5 or words[0] not in _ARTICLES:
        raise fail("expected '<a|an> <colour> <shape> moving <direction> [<speed>]' or '... standing still'")
    color, shape = words[1], words[2]
    if color not in COLORS:
        raise fail(f"unknown colour {color!r} (valid: {list(COLORS)})")
    if shape not in SHAPES:
        raise fail(f"unknown shape {shape!r} (valid: {list(SHAPES)})")
    rest = words[3:]
    if rest == ["standing", "still"]:
        return {"color": color, "shape": shape, "motion": "still", "speed": None}
    if rest[0] != "moving" or len(rest) not in (2, 3):
        raise fail("expected 'moving <direction> [slowly|quickly]' or 'standing still'")
    if rest[1] not in DIRECTIONS:
        raise fail(f"unknown direction {rest[1]!r} (valid: {list(DIRECTIONS)})")
    speed = None
    if len(rest) == 3:
        by_word = {w: s for s, w in SPEED_WORDS.items()}
        if rest[2] not in by_word:
            raise fail(f"unknown speed {rest[2]!r} (valid: {list(by_word)})")
        speed = by_word[rest[2]]
    return {"color": color, "shape": shape, "motion": rest[1], "speed": speed}


def scene_from_caption(caption: str) -> dict:
    """Parse a caption back into attributes: ``{"objects": [{color, shape, motion, speed}], "background":
    {kind, color}}`` (speed None when not named; background None when no ``on ...`` phrase; the background
    colour None for textures). Raises ValueError naming the caption and the offending word."""
    words = tokenize(caption)
    background = None
    if "on" in words:
        i = len(words) - 1 - words[::-1].index("on")
        tail, words = words[i + 1:], words[:i]
        if len(tail) != 1 or tail[0] not in set(BACKGROUND_COLORS) | set(TEXTURES):
            raise ValueError(f"cannot parse toy-world caption {caption!r}: background must be 'on <word>' with "
                             f"<word> in {list(BACKGROUND_COLORS) + list(TEXTURES)}, got {' '.join(tail)!r}")
        word = tail[0]
        background = {"kind": word, "color": None} if word in TEXTURES else {"kind": "plain", "color": word}
    groups: list[list[str]] = [[]]
    for j, w in enumerate(words):  # 'and' followed by an article starts a new object
        if w == "and" and j + 1 < len(words) and words[j + 1] in _ARTICLES:
            groups.append([])
        else:
            groups[-1].append(w)
    if not groups[0]:
        raise ValueError(f"cannot parse toy-world caption {caption!r}: no object phrase")
    return {"objects": [_parse_object(g, caption) for g in groups], "background": background}


# --- the data set ---------------------------------------------------------------------------------


class ToyWorld(torch.utils.data.Dataset):
    """Map-style data set of toy videos; item ``i`` is a pure function of ``(seed, i)``.

    ``__getitem__(i)`` -> ``{"video": float32 [T, 3, H, W] in [-1, 1], "caption": str, "attrs": dict,
    "path": "toyworld://<seed>/<i>"}``. ``attrs`` is the scene plus each object's ``trajectory``
    (normalised centres per frame) and the render settings. Batch with
    :func:`causvid.data.video.collate_videos` (``attrs`` differ in structure between items).
    """

    def __init__(self, height: int = 64, width: int = 64, num_frames: int = 33, fps: float = 8.0, seed: int = 0,
                 num_videos: int = 100000, max_objects: int = 2, textured_background_prob: float = 0.5,
                 scene_duration: float = DEFAULT_SCENE_DURATION):
        if num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {num_videos}")
        self.height, self.width, self.num_frames, self.fps = int(height), int(width), int(num_frames), float(fps)
        self.seed, self.num_videos, self.max_objects = int(seed), int(num_videos), int(max_objects)
        self.textured_background_prob, self.scene_duration = float(textured_background_prob), float(scene_duration)

    def __len__(self) -> int:
        return self.num_videos

    def _check(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num_videos
        if not 0 <= index < self.num_videos:
            raise IndexError(f"ToyWorld index {index} out of range [0, {self.num_videos})")
        return index

    def scene(self, index: int) -> dict:
        """The scene of item ``index`` (cheap: no pixels)."""
        rng = np.random.default_rng([self.seed, self._check(index)])
        return sample_scene(rng, self.max_objects, self.textured_background_prob, self.scene_duration)

    def caption(self, index: int) -> str:
        return caption_from_scene(self.scene(index))

    def attrs(self, index: int) -> dict:
        scene = self.scene(index)
        times = np.arange(self.num_frames) / self.fps
        for obj in scene["objects"]:
            obj["trajectory"] = np.round(trajectory(obj, times, self.height, self.width), 5).tolist()
        scene.update(num_frames=self.num_frames, fps=self.fps, height=self.height, width=self.width)
        return scene

    def __getitem__(self, index: int) -> dict:
        index = self._check(index)
        attrs = self.attrs(index)
        video = render(attrs, self.num_frames, self.fps, self.height, self.width)
        return {"video": torch.from_numpy(video), "caption": caption_from_scene(attrs), "attrs": attrs,
                "path": f"toyworld://{self.seed}/{index}"}


def toyworld_from_config(data_cfg: Any) -> ToyWorld:
    """A :class:`ToyWorld` from ``cfg.data`` (causvid.config.DataConfig)."""
    t = data_cfg.toyworld
    return ToyWorld(height=data_cfg.height, width=data_cfg.width, num_frames=data_cfg.num_frames, fps=data_cfg.fps,
                    seed=t.seed, num_videos=t.num_videos, max_objects=t.max_objects,
                    textured_background_prob=t.textured_background_prob)


def toyworld_prompts(num: int, seed: int = 1, max_objects: int = 2, textured_background_prob: float = 0.5,
                     start: int = 0) -> list[str]:
    """Captions of items ``start .. start+num-1`` of ``ToyWorld(seed=seed)`` (use a seed other than the
    training seed for held-out evaluation prompts)."""
    world = ToyWorld(seed=seed, num_videos=start + num, max_objects=max_objects,
                     textured_background_prob=textured_background_prob)
    return [world.caption(i) for i in range(start, start + num)]


# --- export as files ------------------------------------------------------------------------------


def _atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_videos(world: ToyWorld, out_dir: str, indices: Iterable[int], crf: int = 12, write_txt: bool = False,
                  progress: bool = False) -> list[dict]:
    """Write items of ``world`` as H.264 mp4 files ``<index:06d>.mp4`` plus ``captions.jsonl``
    ({"path", "caption"} per line, paths relative to ``out_dir``) and ``metadata.csv`` (path,caption);
    optionally a same-stem ``.txt`` caption per video. Returns the index rows."""
    from causvid.video_io import to_uint8, write_mp4

    os.makedirs(out_dir, exist_ok=True)
    rows = []
    indices = list(indices)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="toy videos")
    for i in indices:
        item = world[i]
        name = f"{int(i):06d}.mp4"
        write_mp4(os.path.join(out_dir, name), to_uint8(item["video"]), fps=world.fps, crf=crf)
        if write_txt:
            _atomic_text(os.path.join(out_dir, f"{int(i):06d}.txt"), item["caption"] + "\n")
        rows.append({"path": name, "caption": item["caption"]})
    _atomic_text(os.path.join(out_dir, "captions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "caption"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_text(os.path.join(out_dir, "metadata.csv"), buf.getvalue())
    return rows

