"""Score a folder of generated videos: CLIP text-video score and, for toy-world videos, the toy metrics.

The library side of ``scripts/evaluate.py`` (usage and caption formats there and in docs/evaluation.md): find the
captions (:mod:`causvid.eval.captions`), score every video, write ``metrics.json`` and ``metrics.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from causvid.eval.captions import find_captions, list_videos
from causvid.video_io import open_video, read_video

USAGE = """Score a folder of generated videos: CLIP text-video score (and the toy-world metrics for toy videos).

    python scripts/evaluate.py runs/toy/samples --clip-weights weights/clip/open_clip_model.safetensors
    python scripts/evaluate.py runs/toy/samples --no-clip                 # toy metrics only (no CLIP weights)

Captions, first found: ``--captions FILE``; ``<videos>/captions.jsonl``; ``<videos>/prompts.txt``; a sidecar
``<stem>.json`` (key ``prompt`` or ``caption``) or ``<stem>.txt`` next to each video (formats:
causvid/eval/captions.py). Writes ``<out>/metrics.json`` (per video, summary, and the CLIP setup to report) and
``<out>/metrics.md``. Definitions: docs/evaluation.md.
"""


def video_fps(path: str, default: float = 8.0) -> float:
    """The frame rate the container declares, or ``default`` (the toy world's 8 fps) when it says none."""
    return open_video(path, backend="pyav").info.fps or default


# --- toy-world metrics ------------------------------------------------------------------------------


def toy_metric_fn(mode: str, captions: Sequence[str]) -> Callable | None:
    """``causvid.eval.toyworld_metrics.score_video`` when the videos are toy-world videos: ``on`` requires it,
    ``auto`` uses it if the module exists and every caption parses in the toy-world grammar, ``off`` never."""
    if mode == "off":
        return None
    try:
        from causvid.eval.toyworld_metrics import score_video
    except ImportError as err:
        if mode == "on":
            raise ImportError(f"--toy on needs causvid.eval.toyworld_metrics.score_video: {err}") from None
        return None
    if mode == "auto":
        from causvid.data.toyworld import scene_from_caption

        try:
            for c in captions:
                scene_from_caption(c)
        except ValueError:
            return None
    return score_video


def flatten_numbers(d: Mapping, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict as ``{"a.b": float}``."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[f"{prefix}{k}"] = float(v)
    return out


def toy_scores(score_video: Callable, video: np.ndarray, caption: str, fps: float) -> dict[str, float]:
    """Toy metrics of one uint8 ``[T, H, W, 3]`` video at ``fps`` (speeds are per second)."""
    return flatten_numbers(score_video(video, caption, fps=fps))


# --- evaluation -------------------------------------------------------------------------------------


def evaluate_folder(folder: str, captions: Mapping[str, str], scorer=None, toy_fn: Callable | None = None,
                    fps: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Score every video of ``captions`` ({file name: caption}); returns the JSON-ready result. ``fps``
    overrides the frame rate the files declare (used by the toy metrics' speeds)."""
    rows = []
    items = list(captions.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="evaluate", unit="video")
    for name, caption in items:
        path = os.path.join(folder, name)
        video = read_video(path)  # uint8 [T, H, W, 3]
        rate = fps or video_fps(path)
        row: dict[str, Any] = {"video": name, "caption": caption, "num_frames": int(video.shape[0]),
                               "height": int(video.shape[1]), "width": int(video.shape[2]), "fps": rate}
        if scorer is not None:
            row["clip_score"] = scorer.score(video, caption)
        if toy_fn is not None:
            row["toy"] = toy_scores(toy_fn, video, caption, rate)
        rows.append(row)
    return {"clip": scorer.describe() if scorer is not None else None, "summary": summarize(rows), "videos": rows}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"num_videos": len(rows)}
    if rows and "clip_score" in rows[0]:
        out["clip_score"] = _mean_std([r["clip_score"] for r in rows])
    toy_keys = sorted({k for r in rows for k in r.get("toy", {})})
    for k in toy_keys:
        vals = [r["toy"][k] for r in rows if k in r.get("toy", {}) and math.isfinite(r["toy"][k])]
        if vals:
            out[f"toy.{k}"] = _mean_std(vals)
    return out


def markdown_table(result: Mapping[str, Any], max_caption: int = 60) -> str:
    """One row per video and a mean row; the CLIP setup above the table."""
    rows = result["videos"]
    toy_keys = sorted({k for r in rows for k in r.get("toy", {})})
    has_clip = bool(rows) and "clip_score" in rows[0]
    head = ["video", "caption"] + (["CLIP score"] if has_clip else []) + toy_keys
    lines = []
    if result.get("clip"):
        c = result["clip"]
        lines.append(f"CLIP score: {c['model']} ({c['pretrained']}), frames: {c['frames']}, "
                     f"{c['metric']}.\n")
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def cell(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, float) else str(x)

    for r in rows:
        cap = r["caption"] if len(r["caption"]) <= max_caption else r["caption"][:max_caption - 3] + "..."
        vals = [r["video"], cap.replace("|", "\\|")] + ([r["clip_score"]] if has_clip else [])
        vals += [r.get("toy", {}).get(k, "") for k in toy_keys]
        lines.append("| " + " | ".join(cell(v) for v in vals) + " |")
    s = result["summary"]
    mean = ["**mean**", f"{s['num_videos']} videos"] + ([s["clip_score"]["mean"]] if has_clip else [])
    mean += [s.get(f"toy.{k}", {}).get("mean", "") for k in toy_keys]
    lines.append("| " + " | ".join(cell(v) for v in mean) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(result: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, "metrics.json"), os.path.join(out_dir, "metrics.md")
    for path, text in ((json_path, json.dumps(result, indent=2) + "\n"), (md_path, markdown_table(result))):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return json_path, md_path


# --- CLI --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", help="folder of generated .mp4 files")
    p.add_argument("--captions", help="captions file (.jsonl / .json / .txt); default: found in the folder")
    p.add_argument("--clip-weights", help="local open_clip weight file or folder (or an open_clip tag, needs a network)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    p.add_argument("--frames", type=int, default=None, help="frames sampled per video for CLIP (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="frames per CLIP image batch")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--no-clip", action="store_true", help="skip the CLIP score (e.g. no weights available)")
    p.add_argument("--random-init", action="store_true", help="random CLIP weights: smoke tests only, meaningless")
    p.add_argument("--fps", type=float, default=None, help="frame rate of the videos (default: from each file)")
    p.add_argument("--toy", choices=("auto", "on", "off"), default="auto", help="toy-world metrics")
    p.add_argument("--out", help="output folder (default: <videos>/eval)")
    return p.parse_args(argv)


def build_scorer(args: argparse.Namespace):
    if args.no_clip:
        return None
    if args.clip_weights is None and not args.random_init:
        raise SystemExit("evaluate.py: --clip-weights PATH is required for the CLIP score (see docs/evaluation.md), "
                         "or pass --no-clip")
    from causvid.eval.clip_score import ClipScorer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    return ClipScorer(args.clip_model, pretrained=args.clip_weights, device=device, num_frames=args.frames,
                      batch_size=args.batch_size, random_init=args.random_init)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    videos = list_videos(args.videos)
    captions = find_captions(args.videos, videos, args.captions)
    toy_fn = toy_metric_fn(args.toy, list(captions.values()))
    scorer = build_scorer(args)
    if scorer is None and toy_fn is None:
        raise SystemExit("evaluate.py: nothing to compute (--no-clip and no toy-world metrics for these videos)")
    result = evaluate_folder(args.videos, captions, scorer, toy_fn, fps=args.fps)
    json_path, md_path = write_outputs(result, args.out or os.path.join(args.videos, "eval"))
    print(markdown_table(result))
    print(f"wrote {json_path} and {md_path}")
    return result
