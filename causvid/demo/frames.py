"""Frames on the wire: each decoded frame is sent as one JPEG or PNG image, and what a tab played comes back as mp4."""

from __future__ import annotations

import io
import os
import tempfile
from typing import Sequence

import numpy as np

FORMATS = {"jpeg": "image/jpeg", "png": "image/png"}


def encode_frame(frame: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> JPEG (``quality`` 1-100, 4:4:4) or PNG (lossless) bytes."""
    from PIL import Image

    if fmt not in FORMATS:
        raise ValueError(f"unknown frame format {fmt!r}; valid: {sorted(FORMATS)}")
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8), "RGB")
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=int(quality), subsampling=0)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_frames(blobs: Sequence[bytes]) -> np.ndarray:
    """Encoded frames -> uint8 [T, H, W, 3]."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def mp4_bytes(blobs: Sequence[bytes], fps: float) -> bytes:
    """The frames (as sent) written as an H.264 mp4 by :func:`causvid.video_io.write_mp4`."""
    from causvid.video_io import write_mp4

    if not blobs:
        raise ValueError("no frames to write")
    with tempfile.TemporaryDirectory(prefix="causvid-demo-") as d:
        path = write_mp4(os.path.join(d, "played.mp4"), decode_frames(blobs), fps)
        with open(path, "rb") as f:
            return f.read()
