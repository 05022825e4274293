"""Captioned video files as a map-style data set, with a bad-file policy (DESIGN.md §2 data/video.py,
reliability.md §5).

Sources (``VideoDataset(source)``):
    * a folder: every ``*.mp4`` (also .mov/.mkv/.webm/.avi) with its caption from ``captions.jsonl`` in the
      folder when present, else from a same-stem ``.txt`` file;
    * a ``.csv`` with a header and columns ``path,caption`` (aliases: video/file, text/prompt);
    * a ``.jsonl`` with one ``{"path": ..., "caption": ...}`` object per line.
Relative paths are relative to the folder / index file.

Each item is decoded (decord, PyAV fallback), ``num_frames`` (= 1 + 4n) frames are taken at ``fps``
from the first frame (or from a seeded random start), resized so the short side fits and centre
cropped to ``height x width``: ``{"video": float32 [T, 3, H, W] in [-1, 1], "caption": str, "path": str}``.

Bad-file policy — *deterministic replacement*: ``__getitem__(i)`` tries item i, then i+1, i+2, ...
(wrapping) until one reads, so every index yields a sample (batch counts stay equal across ranks and
a resumed run sees the same data). Each bad file is logged once, remembered (never decoded again in
this process) and counted in :attr:`VideoDataset.stats` with its reason (missing, empty,
decode_error, too_short, timeout, missing_caption). ``strict=True`` raises the first error instead.
When more than ``max_bad_fraction`` of the listed files are bad, :class:`DataBudgetError` is raised.
A decode runs in a worker thread and is abandoned after ``decode_timeout_s`` (reason ``timeout``);
a native hang that holds the GIL cannot be interrupted from Python — for that run the loader with
``DataLoader(num_workers > 0, timeout=...)``. Counters are per process (each DataLoader worker keeps
its own).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import threading
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from causvid.video_io import VideoReadError, read_video

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
_PATH_KEYS = ("path", "video", "file")
_CAPTION_KEYS = ("caption", "text", "prompt")


class DataBudgetError(RuntimeError):
    """Too many bad videos (more than ``max_bad_fraction`` of the data set)."""


# --- index ----------------------------------------------------------------------------------------


def _pick(row: dict, keys: tuple[str, ...], where: str) -> Any:
    for k in keys:
        if k in row:
            return row[k]
    raise ValueError(f"{where}: no column {keys[0]!r} (accepted: {list(keys)}); found {sorted(row)}")


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def _index_csv(path: str) -> list[tuple[str, str | None]]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    out = []
    for n, row in enumerate(rows, start=2):
        p = _pick(row, _PATH_KEYS, f"{path}:{n}")
        cap = row.get(next((k for k in _CAPTION_KEYS if k in row), ""), None)
        out.append((_resolve(base, p), cap if cap and cap.strip() else None))
    return out


def _index_jsonl(path: str) -> list[tuple[str, str | None]]:
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
            cap = next((row[k] for k in _CAPTION_KEYS if k in row), None)
            out.append((_resolve(base, _pick(row, _PATH_KEYS, f"{path}:{n}")),
                        cap if isinstance(cap, str) and cap.strip() else None))
    return out


def _index_folder(folder: str) -> list[tuple[str, str | None]]:
    jsonl = os.path.join(folder, "captions.jsonl")
    if os.path.isfile(jsonl):
        return _index_jsonl(jsonl)
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or not name.lower().endswith(VIDEO_EXTENSIONS):
            continue
        txt = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        cap = None
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8-sig") as f:
                cap = f.read().strip() or None
        out.append((os.path.join(folder, name), cap))
    return out


def index_videos(source: str | os.PathLike) -> list[tuple[str, str | None]]:
    """(path, caption or None) for every video a folder / .csv / .jsonl lists, in order."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return _index_folder(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"video data source not found: {source}")
    if source.lower().endswith(".csv"):
        return _index_csv(source)
    if source.lower().endswith((".jsonl", ".json")):
        return _index_jsonl(source)
    raise ValueError(f"video data source {source}: expected a folder, a .csv or a .jsonl file")


# --- decoding helpers -----------------------------------------------------------------------------


def call_with_timeout(fn: Callable[[], Any], timeout_s: float | None, path: str = "") -> Any:
    """Run ``fn`` in a daemon thread; raise VideoReadError('timeout') if it does not finish in time.
    (The thread is abandoned, not killed; ``timeout_s`` None or <= 0 calls ``fn`` directly.)"""
    if not timeout_s or timeout_s <= 0:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name="causvid-decode")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise VideoReadError("timeout", path, f"decode did not finish in {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H0, W0, 3] -> float32 [T, 3, height, width] in [-1, 1]: scale so the frame covers the
    target (short side fits), bilinear with antialiasing, then centre crop."""
    x = rearrange(torch.from_numpy(np.ascontiguousarray(frames)), "t h w c -> t c h w").float()
    h0, w0 = x.shape[-2:]
    scale = max(height / h0, width / w0)
    nh, nw = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    if (nh, nw) != (h0, w0):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0).contiguous()


# --- the data set ---------------------------------------------------------------------------------


class VideoDataset(torch.utils.data.Dataset):
    """Captioned videos from a folder / csv / jsonl; see the module docstring for the bad-file policy."""

    def __init__(self, source: str | os.PathLike, height: int = 64, width: int = 64, num_frames: int = 33,
                 fps: float | None = 8.0, random_start: bool = False, seed: int = 0, strict: bool = False,
                 max_bad_fraction: float = 0.1, decode_timeout_s: float | None = 30.0, backend: str = "auto"):
        if num_frames < 1 or (num_frames - 1) % 4 != 0:
            raise ValueError(f"num_frames must be 1 + 4n (the VAE compresses time 4x), got {num_frames}")
        self.source = os.fspath(source)
        self.height, self.width, self.num_frames, self.fps = int(height), int(width), int(num_frames), fps
        self.random_start, self.seed, self.epoch = bool(random_start), int(seed), 0
        self.strict, self.max_bad_fraction = bool(strict), float(max_bad_fraction)
        self.decode_timeout_s, self.backend = decode_timeout_s, backend
        listed = index_videos(self.source)
        self._num_listed = len(listed)
        self._ok: set[int] = set()
        self._bad: dict[str, str] = {}  # path -> reason
        self.entries: list[tuple[str, str]] = []
        for path, caption in listed:
            if caption is None:
                self._record_bad(path, VideoReadError("missing_caption", path, "no caption"))
            else:
                self.entries.append((path, caption))
        if not self.entries:
            raise ValueError(f"video data source {self.source}: no video with a caption "
                             f"({self._num_listed} listed, {len(self._bad)} without a caption)")

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Changes the random start frames (with ``random_start``) from one epoch to the next."""
        self.epoch = int(epoch)

    @property
    def stats(self) -> dict:
        """``{"ok": distinct files read, "skipped": distinct bad files, "reasons": {reason: count}}``."""
        reasons: dict[str, int] = {}
        for r in self._bad.values():
            reasons[r] = reasons.get(r, 0) + 1
        return {"ok": len(self._ok), "skipped": len(self._bad), "reasons": reasons}

    def _record_bad(self, path: str, err: VideoReadError) -> None:
        if self.strict:
            raise err
        if path not in self._bad:
            self._bad[path] = err.reason
            log.warning("skipping bad video (%s): %s", err.reason, err)
        budget = self.max_bad_fraction * self._num_listed
        if len(self._bad) > budget:
            raise DataBudgetError(
                f"{len(self._bad)} of {self._num_listed} videos in {self.source} are bad, more than "
                f"data.max_bad_fraction={self.max_bad_fraction:g}; reasons {self.stats['reasons']}; "
                f"last: {err}")

    def load(self, index: int) -> dict:
        """Decode item ``index`` exactly (no replacement); raises VideoReadError."""
        path, caption = self.entries[index]
        seed = [self.seed, self.epoch, index] if self.random_start else None

        def decode() -> np.ndarray:
            return read_video(path, num_frames=self.num_frames, fps=self.fps,
                              start="random" if self.random_start else 0, seed=seed, backend=self.backend)

        frames = call_with_timeout(decode, self.decode_timeout_s, path)
        return {"video": resize_center_crop(frames, self.height, self.width), "caption": caption, "path": path}

    def __getitem__(self, index: int) -> dict:
        n = len(self.entries)
        if not -n <= index < n:
            raise IndexError(f"VideoDataset index {index} out of range [0, {n})")
        index %= n
        for step in range(n):
            i = (index + step) % n
            path = self.entries[i][0]
            if path in self._bad:
                continue
            try:
                item = self.load(i)
            except VideoReadError as err:
                self._record_bad(path, err)
                continue
            except Exception as err:  # anything else from a decoder is a bad file too
                self._record_bad(path, VideoReadError("decode_error", path, f"{type(err).__name__}: {err}"))
                continue
            self._ok.add(i)
            return item
        raise DataBudgetError(f"no readable video in {self.source}: {self.stats}")


def collate_videos(batch: list[dict]) -> dict:
    """Stack ``video`` to [B, T, 3, H, W]; keep every other key as a list (toy-world ``attrs`` differ in
    structure between items, which torch's default collate cannot stack)."""
    out: dict[str, Any] = {"video": torch.stack([b["video"] for b in batch])}
    for key in batch[0]:
        if key != "video":
            out[key] = [b.get(key) for b in batch]
    return out


def video_dataset_from_config(data_cfg: Any) -> VideoDataset:
    """A :class:`VideoDataset` from ``cfg.data`` (source 'videos', path = folder / csv / jsonl)."""
    if not data_cfg.path:
        raise ValueError("config key 'data.path' must name a folder, .csv or .jsonl when data.source='videos'")
    return VideoDataset(data_cfg.path, height=data_cfg.height, width=data_cfg.width, num_frames=data_cfg.num_frames,
                        fps=data_cfg.fps, strict=data_cfg.strict, max_bad_fraction=data_cfg.max_bad_fraction,
                        decode_timeout_s=data_cfg.decode_timeout_s)
