"""Objective scores for toy-world videos, in the spirit of VBench's three groups (DESIGN.md §8).

Every score lies in [0, 1], higher is better; formulas and constants are in docs/toyworld.md §4.

The toy world makes segmentation exact: objects are the only saturated pixels (palette chroma 196,
background chroma <= 22), so a pixel's object coverage is ``alpha = clip((chroma - 32) / 164, 0, 1)``
(chroma = max(R,G,B) - min(R,G,B), uint8 units) and its object colour is the palette hue nearest to its
hue (within 20 degrees). Per frame and palette colour we measure the soft area, centroid, box size, fill
ratio, vertical skewness and diagonal-minus-axis kurtosis of that colour's coverage, which gives objects,
their tracks and shapes without any learned model (:func:`analyze`, once per video).

Groups:
    temporal quality  = H(motion_smoothness, background_stability, subject_consistency)
    frame quality     = H(object_count, object_size, color_saturation, background_clean, edge_sharpness)
    text alignment    = H(color_accuracy, shape_accuracy, direction_accuracy[, speed_accuracy])
    total             = mean of the groups
with H the harmonic mean (high only when every part is high). Inputs: uint8 or float [-1, 1] videos
``[T, 3, H, W]`` (or ``[T, H, W, 3]``), torch or numpy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from causvid.data.toyworld import (
    COLOR_HUES,
    DIRECTION_VECTORS,
    OBJECT_CHROMA,
    SIZE_RANGE,
    SPEEDS,
    scene_from_caption,
)
from causvid.video_io import to_uint8

# --- constants (docs/toyworld.md §4) ----------------------------------------------------------------
CHROMA_LO = 32.0  # chroma (uint8) at which object coverage starts; backgrounds stay below 22
HUE_TOL = 20.0  # degrees: a pixel belongs to the nearest palette hue within this distance
MIN_AREA = 0.003  # smallest object, fraction of H*W
MIN_FILL = 0.3  # smallest fill ratio (area / box) of an object; scattered noise has far less
MAX_EXTENT = 0.6  # largest object box side, fraction of the frame side
PRESENCE = 0.5  # an object is "seen" in a window when present in at least this fraction of its frames
SIZE_OK = (0.5 * 2 * SIZE_RANGE[0] ** 2, 2.0 * 4 * SIZE_RANGE[1] ** 2)  # plausible area / min(H,W)^2
SMOOTH_DEADZONE, SMOOTH_TAU = 0.004, 0.02  # acceleration dead zone and scale, fractions of min(H, W) per frame^2
FLICKER_TAU = 0.02  # background change scale per frame, fraction of full range
HF_RAMP = (0.06, 0.4)  # mean |Laplacian| of background luma (fraction of range): 1 below, 0 above
SHARP_REF = 0.55  # sum|grad a|^2 / sum|grad a| of an anti-aliased edge (a hard edge gives 1)
SATURATION_REF = 170.0  # core chroma giving full colour saturation score
CONSISTENCY_TAU = (0.15, 15.0, 0.15)  # relative area, hue (degrees), relative chroma
STILL_SPEED = 0.03  # frame sizes per second below which an object counts as still
SPEED_SPLIT = math.sqrt(SPEEDS["slow"] * SPEEDS["fast"])  # slow / fast boundary
SKEW_TRIANGLE, KURT_SPLIT = 0.28, 0.25  # shape classification thresholds

_NAMES = list(COLOR_HUES)


def _hue_lut() -> torch.Tensor:
    """Palette index of each whole-degree hue (nearest palette hue within HUE_TOL), else -1. [360]"""
    h = torch.arange(360, dtype=torch.float32) + 0.5
    d = (h[:, None] - torch.tensor([COLOR_HUES[n] for n in _NAMES])).abs()
    d = torch.minimum(d, 360.0 - d)
    dmin, idx = d.min(-1)
    return torch.where(dmin <= HUE_TOL, idx, torch.full_like(idx, -1))


_HUE_LUT = _hue_lut()
_PALETTE_HUES = torch.tensor([COLOR_HUES[n] for n in _NAMES])
GROUPS = {
    "temporal_quality": ("motion_smoothness", "background_stability", "subject_consistency"),
    "frame_quality": ("object_count", "object_size", "color_saturation", "background_clean", "edge_sharpness"),
    "text_alignment": ("color_accuracy", "shape_accuracy", "direction_accuracy", "speed_accuracy"),
}


# --- per-frame analysis -----------------------------------------------------------------------------


@dataclass
class Analysis:
    """Per-frame measurements of one video. K = number of palette colours; coordinates in pixels."""

    height: int
    width: int
    fps: float
    area: torch.Tensor  # [T, K] soft area (pixels)
    cx: torch.Tensor  # [T, K] centroid
    cy: torch.Tensor  # [T, K]
    box_w: torch.Tensor  # [T, K] soft box width
    box_h: torch.Tensor  # [T, K]
    fill: torch.Tensor  # [T, K] shape-map area / (box_w * box_h)
    skew_y: torch.Tensor  # [T, K] skewness of the vertical coverage distribution
    kurt_diff: torch.Tensor  # [T, K] kurtosis along the diagonals minus along the axes
    hue: torch.Tensor  # [T, K] circular mean hue (degrees)
    core_chroma: torch.Tensor  # [T, K] mean chroma where coverage >= 0.95
    present: torch.Tensor  # [T, K] bool: a compact object of this colour
    flicker: torch.Tensor  # [T-1] mean |x_t - x_{t-1}| over background pixels (fraction of range)
    hf: torch.Tensor  # [T] mean |Laplacian(luma)| over background pixels (fraction of range)
    sharp: torch.Tensor  # [T] sum |grad alpha|^2 / sum |grad alpha|

    @property
    def num_frames(self) -> int:
        return self.area.shape[0]


def _as_frames(video: Any) -> torch.Tensor:
    """float32 [T, 3, H, W] in [0, 255]."""
    x = torch.from_numpy(to_uint8(video)).float()  # [T, H, W, 3]
    return x.permute(0, 3, 1, 2).contiguous()


def _hue(x: torch.Tensor, mx: torch.Tensor, chroma: torch.Tensor) -> torch.Tensor:
    """Hue in degrees [0, 360). x: [T, 3, H, W]; mx, chroma: [T, H, W]."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    c = chroma.clamp_min(1e-6)
    h = torch.where(mx == r, torch.remainder((g - b) / c, 6.0),
                    torch.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return h * 60.0


def _extent(mass: torch.Tensor, peak: torch.Tensor, q: float = 0.01) -> torch.Tensor:
    """Soft box side from a coverage map's mass profile and max profile along one axis ([T, L] each): the
    sum of the max profile over the 1%..99% mass range extended by one pixel (stray pixels far away do
    not count). Returns [T]."""
    c = mass.cumsum(-1)
    total = c[:, -1:]
    lo = (c < q * total).sum(-1, keepdim=True) - 1
    hi = (c < (1 - q) * total).sum(-1, keepdim=True) + 1
    pos = torch.arange(mass.shape[-1])[None]
    return (peak * ((pos >= lo) & (pos <= hi))).sum(-1)


def _moments(p: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mean and central moments 2, 3, 4 of the distributions p [T, L] at positions pos [L]. Each [T]."""
    mass = p.sum(-1).clamp_min(1e-6)
    mean = (p * pos).sum(-1) / mass
    d = pos[None] - mean[:, None]
    return (mean,) + tuple((p * d**n).sum(-1) / mass for n in (2, 3, 4))


def _colour_stats(w: torch.Tensor, chroma: torch.Tensor, hue_offset: torch.Tensor, palette_hue: float) -> dict:
    """Stats of one colour's coverage maps w [T, H, W]. Returns a dict of [T] tensors.

    Area, centroid, hue (palette hue + mean offset from it) and chroma use w. Box sides, fill ratio and shape moments use the shape map
    g(w) = clip((w - 0.25) / 0.5, 0, 1): g is point-symmetric about w = 0.5, so a symmetric blur of an edge
    (a VAE, mp4 chroma subsampling) leaves sum g(w) and the half-coverage extents where they were.
    Moments come from the projections of g on the x, y and the two diagonal axes.
    """
    T, H, W = w.shape
    ys, xs = torch.arange(H, dtype=torch.float32) + 0.5, torch.arange(W, dtype=torch.float32) + 0.5
    area = w.sum((1, 2))
    cx, cy = _moments(w.sum(1), xs)[0], _moments(w.sum(2), ys)[0]
    g = ((w - 0.25) / 0.5).clamp(0.0, 1.0)
    gx, gy = g.sum(1), g.sum(2)  # [T, W], [T, H] projections
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    flat = g.reshape(T, H * W)  # [T, H*W]
    gu = torch.zeros(T, H + W - 1).index_add_(1, (ii + jj).reshape(-1), flat)  # projection on x + y
    gv = torch.zeros(T, H + W - 1).index_add_(1, (jj - ii + H - 1).reshape(-1), flat)  # on x - y
    diag = torch.arange(H + W - 1, dtype=torch.float32) / math.sqrt(2.0)
    mx_, my_, mu_, mv_ = (_moments(gx, xs), _moments(gy, ys), _moments(gu, diag), _moments(gv, diag))
    kurt = lambda m: m[3] / m[1].clamp_min(1e-6) ** 2
    skew = my_[2] / my_[1].clamp_min(1e-6) ** 1.5
    kurt_diff = 0.5 * (kurt(mu_) + kurt(mv_)) - 0.5 * (kurt(mx_) + kurt(my_))
    bw, bh = _extent(gx, g.amax(1)), _extent(gy, g.amax(2))
    fill = g.sum((1, 2)) / (bw * bh).clamp_min(1e-6)
    hue_mean = (palette_hue + (w * hue_offset).sum((1, 2)) / area.clamp_min(1e-6)) % 360.0
    core = (w >= 0.95).float()
    core_chroma = (core * chroma).sum((1, 2)) / core.sum((1, 2)).clamp_min(1.0)
    present = (area >= MIN_AREA * H * W) & (fill >= MIN_FILL) & (bw <= MAX_EXTENT * W) & (bh <= MAX_EXTENT * H)
    return dict(area=area, cx=cx, cy=cy, box_w=bw, box_h=bh, fill=fill, skew_y=skew, kurt_diff=kurt_diff,
                hue=hue_mean, core_chroma=core_chroma, present=present)


def _masked_mean(v: torch.Tensor, mask: torch.Tensor, min_frac: float = 0.05) -> torch.Tensor:
    """Per-frame mean of v [T, H, W] over mask; over all pixels where the mask has < min_frac of them. [T]"""
    n = mask.sum((1, 2))
    masked = (v * mask).sum((1, 2)) / n.clamp_min(1)
    return torch.where(n >= min_frac * mask[0].numel(), masked, v.mean((1, 2)))


def analyze(video: Any, fps: float = 8.0) -> Analysis:
    """Measure a video once (all window scores reuse it). See the module docstring."""
    x = _as_frames(video)  # [T, 3, H, W] in [0, 255]
    T, _, H, W = x.shape
    mx, mn = x.amax(1), x.amin(1)
    chroma = mx - mn  # [T, H, W]
    alpha = ((chroma - CHROMA_LO) / (OBJECT_CHROMA - CHROMA_LO)).clamp(0.0, 1.0)
    hue = _hue(x, mx, chroma)
    label = _HUE_LUT[hue.long().clamp(0, 359)]  # [T, H, W] palette index, -1 when no hue is near
    alpha = alpha * (label >= 0)
    K = len(_NAMES)
    per_colour = torch.zeros(T, K + 1).scatter_add_(1, (label + 1).reshape(T, -1), alpha.reshape(T, -1))[:, 1:]
    hue_offset = torch.remainder(hue - _PALETTE_HUES[label.clamp_min(0)] + 180.0, 360.0) - 180.0  # [T, H, W]
    cols = {key: torch.zeros(T, K) for key in ("area", "cx", "cy", "box_w", "box_h", "fill", "skew_y",
                                               "kurt_diff", "hue", "core_chroma")}
    cols["present"] = torch.zeros(T, K, dtype=torch.bool)
    for k in range(K):
        if float(per_colour[:, k].max()) < MIN_AREA * H * W:  # never big enough to be an object
            cols["area"][:, k] = per_colour[:, k]
            continue
        for key, value in _colour_stats(alpha * (label == k), chroma, hue_offset, float(_PALETTE_HUES[k])).items():
            cols[key][:, k] = value

    # background: no coverage within one pixel (3x3 dilation), in this frame (and the previous one)
    near = F.max_pool2d((chroma > CHROMA_LO).float()[:, None], 3, stride=1, padding=1)[:, 0] > 0  # [T, H, W]
    bg = ~near
    both = bg[1:] & bg[:-1]  # [T-1, H, W]
    diff = (x[1:] - x[:-1]).abs().mean(1) / 255.0  # [T-1, H, W]
    flicker = _masked_mean(diff, both)

    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None] / 255.0  # [T, 1, H, W]
    lap_k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    lap = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), lap_k)[:, 0].abs()  # [T, H, W]
    inner = F.max_pool2d(near.float()[:, None], 3, stride=1, padding=1)[:, 0] == 0  # 2 px from objects
    hf = _masked_mean(lap, inner)

    gx, gy = (alpha[:, :, 1:] - alpha[:, :, :-1]).abs(), (alpha[:, 1:] - alpha[:, :-1]).abs()
    sharp = ((gx**2).sum((1, 2)) + (gy**2).sum((1, 2))) / (gx.sum((1, 2)) + gy.sum((1, 2))).clamp_min(1e-6)
    return Analysis(height=H, width=W, fps=float(fps), flicker=flicker, hf=hf, sharp=sharp, **cols)


# --- shapes and motion --------------------------------------------------------------------------------


def classify_shape(skew_y: float, kurt_diff: float) -> str:
    """Shape from moments of its coverage (docs/toyworld.md §4.3). Only the (apex-up) triangle is vertically
    asymmetric (|skew_y| ~ 0.57). Of the symmetric ones, projected on an axis a square is uniform (kurtosis
    1.8) and on a diagonal triangular (2.4), a diamond the other way round, a circle the same (2.0) both
    ways: kurt_diff = kurtosis(diagonals) - kurtosis(axes) is ~ +0.6, ~ -0.6 and ~ 0."""
    if abs(skew_y) >= SKEW_TRIANGLE:
        return "triangle"
    if kurt_diff >= KURT_SPLIT:
        return "square"
    if kurt_diff <= -KURT_SPLIT:
        return "diamond"
    return "circle"


def _direction_terms(a: Analysis, k: int, motion: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-step numerator / denominator of the direction score of colour track k for a captioned motion.

    Steps between consecutive frames where the object is present; displacement d in frame sizes.
    still:  num = [|d| * fps < STILL_SPEED], den = 1.
    moving: the expected direction u starts as the caption's and flips per axis when the object, after a
            step towards a wall, reverses next to that wall (a bounce); num = max(0, d . u), den = max(|d|, v_min / fps)
            with v_min = slow / 2, so a window's score sum(num) / sum(den) is the speed-weighted cosine.
    Returns two float arrays [T-1] (zeros where the step is not observed).
    """
    T = a.num_frames
    num, den = np.zeros(max(T - 1, 0)), np.zeros(max(T - 1, 0))
    pres = a.present[:, k].numpy()
    x, y = (a.cx[:, k] / a.width).numpy(), (a.cy[:, k] / a.height).numpy()
    hx, hy = (a.box_w[:, k] / (2 * a.width)).numpy(), (a.box_h[:, k] / (2 * a.height)).numpy()
    u = np.array(DIRECTION_VECTORS[motion], dtype=np.float64)
    sign = np.sign(u)
    towards = [False, False]  # last observed step moved in the expected direction (needed for a bounce)
    v_min = 0.5 * SPEEDS["slow"] / a.fps
    for t in range(T - 1):
        if not (pres[t] and pres[t + 1]):
            continue
        d = np.array([x[t + 1] - x[t], y[t + 1] - y[t]])
        if motion == "still":
            num[t], den[t] = float(np.linalg.norm(d) * a.fps < STILL_SPEED), 1.0
            continue
        for ax, (p, h, size) in enumerate(((x, hx, a.width), (y, hy, a.height))):
            if sign[ax] == 0:
                continue
            if np.sign(d[ax]) == -sign[ax] and towards[ax]:
                margin = min(2 * abs(d[ax]), 0.06) + 1.5 / size
                edge = max(p[t] + h[t], p[t + 1] + h[t + 1]) if sign[ax] > 0 else \
                    min(p[t] - h[t], p[t + 1] - h[t + 1])
                if (sign[ax] > 0 and edge >= 1 - margin) or (sign[ax] < 0 and edge <= margin):
                    sign[ax] = -sign[ax]  # bounced off the wall it was moving towards
            towards[ax] = bool(np.sign(d[ax]) == sign[ax])
        num[t] = max(0.0, float(d @ (sign * np.abs(u))))
        den[t] = max(float(np.linalg.norm(d)), v_min)
    return num, den


def _speeds(a: Analysis, k: int) -> np.ndarray:
    """Per-step speed of track k in frame sizes per second (NaN where unobserved). [T-1]"""
    pres = a.present[:, k]
    dx = (a.cx[1:, k] - a.cx[:-1, k]) / a.width
    dy = (a.cy[1:, k] - a.cy[:-1, k]) / a.height
    sp = torch.sqrt(dx**2 + dy**2) * a.fps
    return torch.where(pres[1:] & pres[:-1], sp, torch.full_like(sp, float("nan"))).numpy()


# --- scoring ------------------------------------------------------------------------------------------


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of the finite values (NaN when there are none; 0 when any is 0)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return float("nan")
    if min(v) <= 0:
        return 0.0
    return len(v) / sum(1.0 / x for x in v)


def _ramp_down(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((hi - x) / (hi - lo)).clamp(0.0, 1.0)


def _track_consistency(a: Analysis, k: int, sl: slice) -> float:
    """Mean per-frame stability of area, hue and chroma around the track's medians; absent frames score 0."""
    pres = a.present[sl, k]
    if not bool(pres.any()):
        return 0.0
    area, hue, chroma = a.area[sl, k], a.hue[sl, k], a.core_chroma[sl, k]
    med_a, med_c = area[pres].median(), chroma[pres].median()
    ref = torch.deg2rad(hue[pres])
    med_h = torch.rad2deg(torch.atan2(ref.sin().mean(), ref.cos().mean()))
    dh = (hue - med_h).abs() % 360.0
    dh = torch.minimum(dh, 360.0 - dh)
    ta, th, tc = CONSISTENCY_TAU
    dev = (area / med_a.clamp_min(1e-6) - 1).abs() / ta + dh / th + (chroma / med_c.clamp_min(1e-6) - 1).abs() / tc
    return float((torch.exp(-dev) * pres).mean())


def _track_smoothness(a: Analysis, k: int, sl: slice) -> float:
    """Mean over interior frames of exp(-max(0, |c_{t+1} - 2 c_t + c_{t-1}| - dead) / tau), with dead and tau
    fractions SMOOTH_DEADZONE, SMOOTH_TAU of min(H, W); frames where the track is not observed score 0."""
    pres = a.present[sl, k]
    if pres.shape[0] < 3:
        return float("nan")
    c = torch.stack([a.cx[sl, k], a.cy[sl, k]], -1)  # [t, 2]
    acc = (c[2:] - 2 * c[1:-1] + c[:-2]).norm(dim=-1)
    ok = pres[2:] & pres[1:-1] & pres[:-2]
    m = min(a.height, a.width)
    s = torch.exp(-(acc - SMOOTH_DEADZONE * m).clamp_min(0.0) / (SMOOTH_TAU * m)) * ok
    return float(s.mean())


def _agreement(a: Analysis, terms: dict, o: dict, j: int, k: int, sl: slice) -> dict:
    """Shape / direction / speed agreement of captioned object j (attributes o) with colour track k."""
    steps = slice(sl.start, max(sl.start, sl.stop - 1))
    p = a.present[sl, k]
    area = a.area[sl, k]
    p = p & (area >= 0.85 * area[p].max())  # unoccluded frames
    skew, kurt = float(a.skew_y[sl, k][p].median()), float(a.kurt_diff[sl, k][p].median())
    num, den = terms[(j, k)]
    s_num, s_den = num[steps].sum(), den[steps].sum()
    out = {"shape": float(classify_shape(skew, kurt) == o["shape"]),
           "direction": float(s_num / s_den) if s_den > 0 else 0.0, "speed": float("nan")}
    if o["speed"] is not None:
        sp = _speeds(a, k)[steps]
        sp = sp[~np.isnan(sp)]
        label = "fast" if sp.size and float(np.median(sp)) >= SPEED_SPLIT else "slow"
        out["speed"] = float(sp.size > 0 and label == o["speed"])
    return out


def _match(a: Analysis, terms: dict, objects: list[dict], seen: list[int], sl: slice) -> list[int | None]:
    """Colour track of each captioned object: its own colour when seen; the remaining objects take the
    remaining seen colours in the assignment that agrees best in shape and direction (so a wrong colour is
    counted once, by color_accuracy, and does not also fail shape and motion)."""
    tracks: list[int | None] = [(_NAMES.index(o["color"]) if _NAMES.index(o["color"]) in seen else None)
                                for o in objects]
    free_objects = [j for j, k in enumerate(tracks) if k is None]
    free_colours = [k for k in seen if k not in tracks]
    best, best_score = None, -1.0
    for perm in itertools.permutations(free_colours + [None] * len(free_objects), len(free_objects)):
        score = 0.0
        for j, k in zip(free_objects, perm):
            if k is not None:
                ag = _agreement(a, terms, objects[j], j, k, sl)
                score += 1.0 + ag["shape"] + ag["direction"]  # 1: prefer assigning over leaving unmatched
        if score > best_score:
            best, best_score = perm, score
    for j, k in zip(free_objects, best or ()):
        tracks[j] = k
    return tracks


def _window_scores(a: Analysis, caption_scene: dict | None, terms: dict, t0: int, t1: int) -> dict:
    """All scores over frames [t0, t1) (docs/toyworld.md §4)."""
    sl = slice(t0, t1)
    pres = a.present[sl]  # [n, K]
    frac = pres.float().mean(0)  # [K]
    seen = [k for k in range(len(_NAMES)) if frac[k] >= PRESENCE]
    objects = caption_scene["objects"] if caption_scene else None
    tracks = _match(a, terms, objects, seen, sl) if objects else seen
    expected = len(objects) if objects else 1
    nan = float("nan")

    # temporal quality (a captioned object without a track scores 0)
    smooth = [0.0 if k is None else _track_smoothness(a, k, sl) for k in tracks]
    consist = [0.0 if k is None else _track_consistency(a, k, sl) for k in tracks]
    out = {
        "motion_smoothness": harmonic_mean(smooth) if smooth else 0.0,
        "background_stability": float(torch.exp(-a.flicker[t0:max(t0, t1 - 1)] / FLICKER_TAU).mean())
        if t1 - t0 > 1 else nan,
        "subject_consistency": harmonic_mean(consist) if consist else 0.0,
    }

    # frame quality (frames without any object score 0 on the object terms)
    count = pres.sum(1)  # [n]
    m2 = float(min(a.height, a.width)) ** 2
    size_ok = ((a.area[sl] / m2 >= SIZE_OK[0]) & (a.area[sl] / m2 <= SIZE_OK[1]) & pres).sum(1)
    any_obj = count > 0
    chroma = (a.core_chroma[sl] * pres).sum(1) / count.clamp_min(1)
    out.update({
        "object_count": float((count == expected).float().mean()),
        "object_size": float(torch.where(any_obj, size_ok / count.clamp_min(1), 0.0).mean()),
        "color_saturation": float(torch.where(any_obj, (chroma / SATURATION_REF).clamp(0, 1), 0.0).mean()),
        "background_clean": float(_ramp_down(a.hf[sl], *HF_RAMP).mean()),
        "edge_sharpness": float(torch.where(any_obj, (a.sharp[sl] / SHARP_REF).clamp(0, 1), 0.0).mean()),
    })

    # text alignment
    if objects:
        rows = []
        for j, (o, k) in enumerate(zip(objects, tracks)):
            ag = _agreement(a, terms, o, j, k, sl) if k is not None else \
                {"shape": 0.0, "direction": 0.0, "speed": nan if o["speed"] is None else 0.0}
            rows.append({"color": float(_NAMES.index(o["color"]) in seen), **ag})
        speeds = [r["speed"] for r in rows if not math.isnan(r["speed"])]
        out.update({"color_accuracy": float(np.mean([r["color"] for r in rows])),
                    "shape_accuracy": float(np.mean([r["shape"] for r in rows])),
                    "direction_accuracy": float(np.mean([r["direction"] for r in rows])),
                    "speed_accuracy": float(np.mean(speeds)) if speeds else nan})
    else:
        out.update({"color_accuracy": nan, "shape_accuracy": nan, "direction_accuracy": nan, "speed_accuracy": nan})

    for group, keys in GROUPS.items():
        out[group] = harmonic_mean([out[k] for k in keys])
    groups = [out[g] for g in GROUPS if not math.isnan(out[g])]
    out["total"] = float(np.mean(groups)) if groups else nan
    return out


def _prepare(video: Any, caption: str | None, fps: float) -> tuple[Analysis, dict | None, dict]:
    a = analyze(video, fps)
    scene = scene_from_caption(caption) if caption else None
    terms = {}
    if scene:
        for j, o in enumerate(scene["objects"]):
            for k in range(len(_NAMES)):
                if bool(a.present[:, k].any()):
                    terms[(j, k)] = _direction_terms(a, k, o["motion"])
    return a, scene, terms


def score_video(video: Any, caption: str | None = None, fps: float = 8.0) -> dict:
    """All scores of one video (dict of floats in [0, 1]; NaN where not applicable, e.g. text alignment
    without a caption or speed when the caption names none). ``fps`` is the video's frame rate, used for
    speeds. The caption must follow the toy-world grammar (:func:`scene_from_caption`)."""
    a, scene, terms = _prepare(video, caption, fps)
    return _window_scores(a, scene, terms, 0, a.num_frames)


def score_windows(video: Any, caption: str | None, window_frames: int, stride: int | None = None,
                  fps: float = 8.0) -> list[dict]:
    """Scores per time window ``[start, start + window_frames)`` every ``stride`` frames (error-accumulation
    curves over long rollouts). The video is analysed once; bounce state for direction scores carries over
    windows. Each dict also has ``start`` and ``end`` (frame indices)."""
    if window_frames < 2:
        raise ValueError(f"window_frames must be >= 2, got {window_frames}")
    stride = stride or window_frames
    a, scene, terms = _prepare(video, caption, fps)
    out = []
    for t0 in range(0, max(1, a.num_frames - window_frames + 1), stride):
        t1 = min(a.num_frames, t0 + window_frames)
        out.append({"start": t0, "end": t1, **_window_scores(a, scene, terms, t0, t1)})
    return out


def aggregate(scores: Sequence[dict]) -> dict:
    """``{"n": N, "mean": {key: mean}, "std": {key: std}}`` over score dicts, ignoring NaNs per key."""
    keys = [k for k in scores[0] if isinstance(scores[0][k], (int, float))] if scores else []
    mean, std = {}, {}
    for k in keys:
        v = np.array([float(s[k]) for s in scores], dtype=np.float64)
        v = v[~np.isnan(v)]
        mean[k] = float(v.mean()) if v.size else float("nan")
        std[k] = float(v.std()) if v.size else float("nan")
    return {"n": len(scores), "mean": mean, "std": std}
