"""Video files: write mp4 (PyAV, libx264) and gif (Pillow), read with decord (PyAV fallback), show inline.

Layouts (DESIGN.md §3): model videos are float ``[T, 3, H, W]`` in [-1, 1]; files and displays use
uint8 ``[T, H, W, 3]``; :func:`to_uint8` converts. Writers are atomic (a temporary file in the same
folder, renamed into place), so a killed process never leaves a half-written video under the real name.
"""

from __future__ import annotations

import base64
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import torch
from einops import rearrange


class VideoReadError(RuntimeError):
    """A video could not be read. ``reason`` is a short tag used in data-set statistics:
    missing | empty | decode_error | too_short | timeout | missing_caption."""

    def __init__(self, reason: str, path: str, detail: str = ""):
        self.reason, self.path = reason, str(path)
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


# --- conversions ----------------------------------------------------------------------------------


def to_uint8(video: Any) -> np.ndarray:
    """A video as uint8 ``[T, H, W, 3]``.

    Accepts float ``[T, 3, H, W]`` in [-1, 1] (torch or numpy; clamped and rounded), uint8
    ``[T, 3, H, W]``, or anything already ``[T, H, W, 3]`` (uint8, or float in [-1, 1]).
    """
    x = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if x.ndim != 4:
        raise ValueError(f"expected a video [T, 3, H, W] or [T, H, W, 3], got shape {tuple(x.shape)}")
    if x.shape[1] == 3 and x.shape[-1] != 3:
        x = rearrange(x, "t c h w -> t h w c")
    elif x.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels at dim 1 or -1, got shape {tuple(x.shape)}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    x = (np.clip(x.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.ascontiguousarray(np.round(x).astype(np.uint8))


def _as_frames(frames: Any) -> np.ndarray:
    x = to_uint8(frames)
    if x.shape[0] < 1:
        raise ValueError("cannot write a video with no frames")
    return x


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Edge-pad height and width to even sizes (yuv420p needs them). [T, H, W, 3] -> [T, H', W', 3]"""
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def _tmp_path(path: str, suffix: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    return tmp


# --- writers --------------------------------------------------------------------------------------


def write_mp4(path: str | os.PathLike, frames: Any, fps: float, crf: int = 17, preset: str = "medium") -> str:
    """Write an H.264 mp4 (libx264, yuv420p) atomically. ``frames``: uint8 [T, H, W, 3] (or a video that
    :func:`to_uint8` accepts). Odd heights / widths are edge-padded by one pixel. Returns the path."""
    import av

    path = os.fspath(path)
    x = _pad_even(_as_frames(frames))
    tmp = _tmp_path(path, ".mp4")
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(float(fps)).limit_denominator(1001))
            stream.height, stream.width = int(x.shape[1]), int(x.shape[2])
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(int(crf)), "preset": preset}
            for frame in x:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_gif(path: str | os.PathLike, frames: Any, fps: float, loop: int = 0) -> str:
    """Write an animated gif atomically (Pillow; adaptive palette per frame). Returns the path."""
    from PIL import Image

    path = os.fspath(path)
    x = _as_frames(frames)
    images = [Image.fromarray(f) for f in x]
    tmp = _tmp_path(path, ".gif")
    try:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(1, round(1000.0 / fps)), loop=loop, optimize=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write a matplotlib figure as an image (tight layout, parent folders made) and close it. Returns the path."""
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# --- readers --------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    num_frames: int
    fps: float  # 0.0 when the container does not say


class _DecordFile:
    """decord.VideoReader: random access by frame index (``get_batch``)."""

    def __init__(self, path: str):
        import decord

        self.path = path
        self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        self.info = VideoInfo(num_frames=len(self._vr), fps=float(self._vr.get_avg_fps() or 0.0))

    def get(self, indices: Sequence[int]) -> np.ndarray:
        return self._vr.get_batch(list(indices)).asnumpy()  # [T, H, W, 3] uint8


class _PyAVFile:
    """PyAV: sequential decode from the start up to the last requested frame."""

    def __init__(self, path: str):
        import av

        self.path = path
        self._av = av
        with av.open(path) as c:
            if not c.streams.video:
                raise VideoReadError("decode_error", path, "no video stream")
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate
            n = int(s.frames or 0)
        self._cache: list[np.ndarray] | None = None
        if n <= 0:  # the container does not say: decode everything once and count
            self._cache = self._decode(None)
            n = len(self._cache)
        self.info = VideoInfo(num_frames=n, fps=float(rate) if rate else 0.0)

    def _decode(self, last: int | None) -> list[np.ndarray]:
        out = []
        with self._av.open(self.path) as c:
            c.streams.video[0].thread_type = "AUTO"
            for frame in c.decode(video=0):
                out.append(frame.to_ndarray(format="rgb24"))
                if last is not None and len(out) > last:
                    break
        return out

    def get(self, indices: Sequence[int]) -> np.ndarray:
        indices = list(indices)
        frames = self._cache if self._cache is not None else self._decode(max(indices))
        if max(indices) >= len(frames):
            raise VideoReadError("too_short", self.path, f"decoded {len(frames)} frames, need index {max(indices)}")
        return np.stack([frames[i] for i in indices])


def open_video(path: str | os.PathLike, backend: str = "decord"):
    """An opened video with ``.info`` (:class:`VideoInfo`) and ``.get(indices) -> uint8 [T, H, W, 3]``.

    backend: ``decord`` or ``pyav``. Raises :class:`VideoReadError` for a missing or empty file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoReadError("missing", path, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoReadError("empty", path, "zero bytes")
    if backend == "decord":
        return _DecordFile(path)
    if backend == "pyav":
        return _PyAVFile(path)
    raise ValueError(f"unknown video backend {backend!r}; valid: ['auto', 'decord', 'pyav']")


def frame_indices(num_src: int, src_fps: float, num_frames: int, fps: float | None = None, start: int = 0) -> list[int]:
    """Source frame indices for ``num_frames`` frames at ``fps`` starting at source frame ``start``.

    Frame k is the source frame nearest to time start/src_fps + k/fps; with ``fps`` None (or an unknown
    source rate) consecutive source frames are taken. Raises ValueError when the source is too short.
    """
    if fps is None or not src_fps or src_fps <= 0:
        idx = [start + k for k in range(num_frames)]
    else:
        idx = [start + int(round(k * src_fps / fps)) for k in range(num_frames)]
    if idx[-1] >= num_src:
        raise ValueError(f"needs source frame {idx[-1]} but the video has {num_src} frames")
    return idx


def max_start(num_src: int, src_fps: float, num_frames: int, fps: float | None = None) -> int:
    """The last valid ``start`` for :func:`frame_indices` (negative when the video is too short)."""
    span = frame_indices(10**12, src_fps, num_frames, fps, 0)[-1]
    return num_src - 1 - span


def _read(path: str, backend: str, num_frames: int | None, fps: float | None, start: int | str,
          rng: np.random.Generator | None) -> np.ndarray:
    f = open_video(path, backend)
    n, src_fps = f.info.num_frames, f.info.fps
    if n <= 0:
        raise VideoReadError("decode_error", path, "no frames")
    if num_frames is None:
        return f.get(range(n) if fps is None else frame_indices(n, src_fps, max(1, _fit(n, src_fps, fps)), fps))
    last = max_start(n, src_fps, num_frames, fps)
    if last < 0:
        raise VideoReadError("too_short", path, f"{n} frames at {src_fps:g} fps; need {num_frames} at {fps} fps")
    s = int(rng.integers(0, last + 1)) if start == "random" else int(start)
    if s > last:
        raise VideoReadError("too_short", path, f"start frame {s} leaves too few frames (last valid start {last})")
    return f.get(frame_indices(n, src_fps, num_frames, fps, s))


def _fit(num_src: int, src_fps: float, fps: float) -> int:
    """How many frames at ``fps`` fit in the source."""
    if not src_fps:
        return num_src
    return int(np.floor((num_src - 1) * fps / src_fps + 1e-6)) + 1


def read_video(path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
               start: int | str = 0, seed: int | None = None, backend: str = "auto") -> np.ndarray:
    """Read frames as uint8 ``[T, H, W, 3]``.

    ``num_frames`` None reads the whole video (resampled to ``fps`` if given). ``start`` is a source frame
    index or ``"random"`` (drawn with ``seed``). ``backend``: ``auto`` tries decord, then PyAV.
    Raises :class:`VideoReadError` (with ``.reason``) when no backend can read it.
    """
    path = os.fspath(path)
    rng = np.random.default_rng(seed) if start == "random" else None
    backends = ["decord", "pyav"] if backend == "auto" else [backend]
    errors = []
    for b in backends:
        try:
            return _read(path, b, num_frames, fps, start, rng)
        except VideoReadError as err:
            if err.reason in ("missing", "empty", "too_short"):
                raise
            errors.append(f"{b}: {err}")
        except ImportError as err:
            errors.append(f"{b}: not installed ({err})")
        except Exception as err:  # decord.DECORDError, av.FFmpegError, ...: try the next backend
            errors.append(f"{b}: {type(err).__name__}: {err}")
    raise VideoReadError("decode_error", path, "; ".join(errors))


# --- display --------------------------------------------------------------------------------------


def video_html(video: Any, fps: float = 8.0, format: str = "mp4", width: int | None = None) -> str:
    """An HTML snippet that embeds the video (base64 mp4 ``<video>`` or gif ``<img>``)."""
    suffix = {"mp4": ".mp4", "gif": ".gif"}.get(format)
    if suffix is None:
        raise ValueError(f"unknown display format {format!r}; valid: ['mp4', 'gif']")
    frames = to_uint8(video)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "video" + suffix)
        (write_mp4 if format == "mp4" else write_gif)(path, frames, fps)
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
    w = width or max(256, frames.shape[2])
    if format == "mp4":
        return (f'<video width="{w}" controls autoplay loop muted playsinline '
                f'src="data:video/mp4;base64,{data}"></video>')
    return f'<img width="{w}" style="image-rendering: pixelated" src="data:image/gif;base64,{data}"/>'


def show(video: Any, fps: float = 8.0, format: str = "mp4", width: int | None = None):
    """Display a video inline in a notebook (returns an ``IPython.display.HTML``)."""
    try:
        from IPython.display import HTML
    except ImportError as err:
        raise ImportError("causvid.video_io.show needs IPython (pip install ipython); "
                          "video_html() returns the same HTML as a string") from err
    return HTML(video_html(video, fps=fps, format=format, width=width))
