"""Prompt files: one prompt per line (the format of VBench's and MovieGen's prompt lists, and of the
CausVid reference's ``TextDataset``; causvid_reference.md §6)."""

from __future__ import annotations

import os
from typing import Iterable


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file: one per line, surrounding whitespace stripped; empty lines and lines
    starting with ``#`` skipped. A UTF-8 byte-order mark and Windows line ends are accepted."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def write_prompts(path: str | os.PathLike, prompts: Iterable[str], header: str | None = None) -> str:
    """Write prompts one per line, atomically; ``header`` lines are written as ``# ...`` comments.
    Raises ValueError for a prompt that would not read back as itself (empty, multi-line, or '#...')."""
    path = os.fspath(path)
    lines = []
    for i, p in enumerate(prompts):
        q = str(p).strip()
        if not q or "\n" in q or "\r" in q or q.startswith("#"):
            raise ValueError(f"prompt {i} cannot be stored one per line: {p!r}")
        lines.append(q)
    comments = [f"# {h}" for h in header.splitlines()] if header else []
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in comments + lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
