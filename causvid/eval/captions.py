"""Captions of a folder of generated videos, for ``scripts/evaluate.py``.

First found: an explicit captions file; ``<videos>/captions.jsonl``; ``<videos>/prompts.txt``; a sidecar
``<stem>.json`` (key ``prompt`` or ``caption``) or ``<stem>.txt`` next to each video. Caption files:
``.jsonl`` lines ``{"video": "a.mp4", "caption": "..."}`` (``file``/``path``/``name`` and ``prompt``/``text`` also
accepted); ``.json`` ``{"a.mp4": "..."}`` or a list of such records; ``.txt`` either ``a.mp4<TAB>caption`` lines or
one prompt per line, matched to the videos in sorted file-name order (the counts must agree).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

VIDEO_KEYS = ("video", "file", "path", "name", "filename")
CAPTION_KEYS = ("caption", "prompt", "text")


def list_videos(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"videos folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".mp4"))
    if not names:
        raise FileNotFoundError(f"no .mp4 files in {folder}")
    return names


def _record_pair(rec: Mapping, where: str) -> tuple[str, str]:
    video = next((rec[k] for k in VIDEO_KEYS if k in rec), None)
    caption = next((rec[k] for k in CAPTION_KEYS if k in rec), None)
    if not isinstance(video, str) or not isinstance(caption, str):
        raise ValueError(f"{where}: a record needs a video name ({'/'.join(VIDEO_KEYS)}) and a caption "
                         f"({'/'.join(CAPTION_KEYS)}), got keys {sorted(rec)}")
    return os.path.basename(video), caption


def read_caption_file(path: str, videos: Sequence[str]) -> dict[str, str]:
    """A captions file -> {video file name: caption} (formats in the module docstring)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        return dict(_record_pair(json.loads(ln), f"{path}:{i}") for i, ln in lines)
    if path.endswith(".json"):
        obj = json.loads(text)
        if isinstance(obj, Mapping):
            return {os.path.basename(k): str(v) for k, v in obj.items()}
        return dict(_record_pair(rec, f"{path}[{i}]") for i, rec in enumerate(obj))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and all("\t" in ln and ln.split("\t", 1)[0].lower().endswith(".mp4") for ln in lines):
        return {os.path.basename(ln.split("\t", 1)[0]): ln.split("\t", 1)[1].strip() for ln in lines}
    if len(lines) != len(videos):
        raise ValueError(f"{path} has {len(lines)} prompts for {len(videos)} videos; with one prompt per line the "
                         "counts must agree (prompts match videos in sorted file-name order)")
    return dict(zip(videos, (ln.strip() for ln in lines)))


def sidecar_caption(folder: str, video: str) -> str | None:
    stem = os.path.splitext(os.path.join(folder, video))[0]
    if os.path.isfile(stem + ".json"):
        with open(stem + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        return next((meta[k] for k in CAPTION_KEYS if isinstance(meta, Mapping) and k in meta), None)
    if os.path.isfile(stem + ".txt"):
        with open(stem + ".txt", encoding="utf-8") as f:
            return f.read().strip()
    return None


def find_captions(folder: str, videos: Sequence[str], captions_path: str | None = None) -> dict[str, str]:
    """{video: caption} for every video; an error names the first video without one."""
    if captions_path is None:
        captions_path = next((os.path.join(folder, n) for n in ("captions.jsonl", "prompts.txt")
                              if os.path.isfile(os.path.join(folder, n))), None)
    if captions_path is not None:
        if not os.path.isfile(captions_path):
            raise FileNotFoundError(f"captions file not found: {captions_path}")
        table = read_caption_file(captions_path, videos)
    else:
        table = {v: c for v in videos if (c := sidecar_caption(folder, v)) is not None}
    missing = [v for v in videos if v not in table]
    if missing:
        where = captions_path or "sidecar .json/.txt files"
        raise ValueError(f"no caption for {len(missing)} video(s) in {where}, e.g. {missing[:3]}")
    return {v: table[v] for v in videos}
