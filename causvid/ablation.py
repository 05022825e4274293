"""The paper's ablation (CausVid Table 4) and long-rollout figure (Figure 8), re-measured on the toy world.

Builds on the quickstart pipeline (same run folder, so the VAE, teacher, ODE pairs, ODE init and CausVid DMD
student are shared) and adds the causal teacher and two more DMD students:

| row | network | sampler |
| --- | --- | --- |
| many-step bidirectional | teacher | 50 Euler steps, CFG, whole clip |
| many-step causal | causal teacher (diffusion forcing fine-tune) | 50 Euler steps per chunk, CFG, KV cache |
| few-step, no ODE init, bidirectional teacher | DMD from the teacher weights | k steps per chunk |
| few-step, ODE init, no teacher | ODE regression only | k steps per chunk |
| few-step, ODE init, causal teacher | DMD with the causal teacher as real score | k steps per chunk |
| few-step, ODE init, bidirectional teacher (CausVid) | DMD | k steps per chunk |

Every row is scored on held-out prompts with several sampling seeds; the spread is the std over seeds of the
per-seed means. Figure 8: frame quality per time window over rollouts ``long_factor`` times the training length
(rolling KV cache) for the causal teacher, its DMD student and CausVid.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from causvid.quickstart import CONFIGS, PRESETS, Pipeline

log = logging.getLogger(__name__)

ROWS = [
    ("many-step bidirectional", "teacher"),
    ("many-step causal", "causal_teacher"),
    ("few-step: no ODE init, bidirectional teacher", "dmd_no_ode"),
    ("few-step: ODE init, no teacher", "ode"),
    ("few-step: ODE init, causal teacher", "dmd_causal"),
    ("few-step: ODE init, bidirectional teacher (CausVid)", "dmd"),
]
# Equal-training controls: the causal teacher is the bidirectional teacher plus a fine-tune; these rows give the
# bidirectional teacher the same fine-tune (same steps, lr, data; no chunk mask, one t per video), so a difference
# between the causal-teacher rows and these is the chunk mask's, not the extra training's.
CONTROL_ROWS = [
    ("control: many-step bidirectional, fine-tuned like the causal teacher", "teacher_ft"),
    ("control: few-step, ODE init, fine-tuned bidirectional teacher", "dmd_ft"),
]

# CausVid paper, Table 4 (VBench scores): temporal quality, frame quality, text alignment (the paper's own model,
# not Wan; as transcribed in ../shared/seeds). Our toy metrics are on another scale: compare orderings, not values.
PAPER = {
    "many-step bidirectional": (94.6, 62.7, 29.6),
    "many-step causal": (92.4, 60.1, 28.5),
    "few-step: no ODE init, bidirectional teacher": (93.4, 60.6, 29.4),
    "few-step: ODE init, no teacher": (92.9, 48.1, 25.3),
    "few-step: ODE init, causal teacher": (91.9, 61.7, 28.2),
    "few-step: ODE init, bidirectional teacher (CausVid)": (94.7, 64.4, 30.1),
}

# Issue-7 prompt switching: per segment, these scores against its own prompt vs the other prompts (colour accuracy
# is the part of text alignment that a weak student already gets right; the harmonic mean is 0 if any part is).
SWITCH_KEYS = ("text_alignment", "color_accuracy")


class Ablation(Pipeline):
    def __init__(self, root: str, preset: str, device: str = "cpu", seeds: int = 3, long_factor: int = 10,
                 stream_factor: int = 20, log: Optional[Callable[[str], None]] = None, overrides: Sequence[str] = ()):
        super().__init__(root, preset, device, log, overrides)
        self.num_seeds = seeds
        self.long_factor = long_factor
        self.stream_factor = stream_factor

    # -- the extra networks ---------------------------------------------------------------------------------------
    def causal_teacher(self) -> None:
        self._fine_tune("causal_teacher", [])

    def teacher_control(self) -> None:
        """The bidirectional teacher fine-tuned with the causal teacher's recipe but without the chunk mask."""
        self._fine_tune("teacher_ft", ["train.stage=teacher"])

    def _fine_tune(self, name: str, extra: list[str]) -> None:
        """``causal_teacher.yaml``'s fine-tune of the teacher (diffusion forcing unless ``extra`` changes the stage)."""
        self.train(name, "train_teacher.py", "causal_teacher.yaml",
                   self.p.causal_teacher_steps or max(2, self.p.teacher_steps // 3),
                   [f"data.path={self.path('latents')}", f"train.init_from={self.path('teacher', 'final')}", *extra])

    def dmd_variants(self) -> None:
        common = [f"data.path={self.path('latents')}"]
        self.train("dmd_no_ode", "train_dmd.py", "dmd.yaml", self.p.dmd_steps,
                   common + [f"train.init_from={self.path('teacher', 'final')}",
                             f"train.teacher_path={self.path('teacher', 'final')}"])
        self.train("dmd_causal", "train_dmd.py", "dmd.yaml", self.p.dmd_steps,
                   common + [f"train.init_from={self.path('ode', 'final')}", "dmd.teacher=causal",
                             f"train.teacher_path={self.path('causal_teacher', 'final')}"])
        self.train("dmd_ft", "train_dmd.py", "dmd.yaml", self.p.dmd_steps,
                   common + [f"train.init_from={self.path('ode', 'final')}",
                             f"train.teacher_path={self.path('teacher_ft', 'final')}"])

    # -- generation -----------------------------------------------------------------------------------------------
    def _runner(self, key: str):
        from causvid.eval import toy_eval as E

        if key in ("teacher", "causal_teacher", "teacher_ft"):
            return E.TeacherRunner(self.path(key, "final"), device=self.device)
        return E.StudentRunner(self.path(key, "final"), device=self.device)

    def _generate(self, key: str, prompts, seeds, num_frames: Optional[int] = None, window: int = 0):
        from causvid.eval import toy_eval as E

        r = self._runner(key)
        if isinstance(r, E.StudentRunner):
            if window:
                r.sampler.window_chunks, r.sampler.sink_chunks = window, 1
            return r.generate(prompts, seeds, num_frames=num_frames)[0]
        steps = self.p.teacher_eval_steps
        if r.layout is None:  # bidirectional: the whole clip at once
            return r.generate(prompts, seeds, num_steps=steps, guidance=float(r.cfg.ode_pairs.guidance))[0]
        return r.generate_autoregressive(prompts, seeds, num_steps=steps, guidance=float(r.cfg.ode_pairs.guidance),
                                         num_frames=num_frames, window_chunks=window)

    def table(self) -> dict:
        from causvid.config import load_config
        from causvid.eval import toy_eval as E
        from causvid.models.vae import vae_from_config

        out_json = self.path("ablation.json")
        rows: dict = {}
        if os.path.exists(out_json):  # rows already measured are kept; missing ones (e.g. new controls) are added
            with open(out_json) as f:
                rows = json.load(f)
        cfg = load_config(str(CONFIGS / "teacher.yaml"), self.common())
        prompts, gt = E.heldout_set(self.p.eval_videos, cfg)

        def save() -> None:
            tmp = out_json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(rows, f, indent=2)
            os.replace(tmp, out_json)

        if "ground truth" not in rows:
            rows["ground truth"] = {"per_seed": [E.score(gt, prompts, cfg.data.fps)]}
            rows["ground truth, VAE round trip (ceiling)"] = {"per_seed": [E.score(
                E.vae_roundtrip(vae_from_config(cfg.vae, device=self.device).eval(), gt), prompts, cfg.data.fps)]}
        for name, key in ROWS + CONTROL_ROWS:
            if name in rows:
                continue
            self.log(f"[ablation] {name}")
            per_seed = []
            for s in range(self.num_seeds):
                seeds = [10_000 * (s + 1) + i for i in range(len(prompts))]
                vids = self._generate(key, prompts, seeds)
                per_seed.append(E.score(vids, prompts, cfg.data.fps))
            rows[name] = {"per_seed": per_seed}
            self._summarize(rows)
            save()
        self._summarize(rows)
        save()
        return rows

    @staticmethod
    def _summarize(rows: dict) -> None:
        from causvid.eval import toy_eval as E

        for r in rows.values():
            r["summary"] = {k: (float(np.mean([p["mean"][k] for p in r["per_seed"]])),
                                float(np.std([p["mean"][k] for p in r["per_seed"]])))
                            for k in E.GROUP_KEYS}

    def long_rollout(self) -> dict:
        from causvid.config import load_config
        from causvid.eval import toy_eval as E

        out_json = self.path("long_rollout.json")
        if os.path.exists(out_json):
            with open(out_json) as f:
                return json.load(f)
        cfg = load_config(str(CONFIGS / "teacher.yaml"), self.common())
        n = max(2, self.p.eval_videos // 4)
        prompts, _ = E.heldout_set(n, cfg)
        latent = (cfg.data.num_frames - 1) // 4 + 1
        num_frames = 1 + 4 * (latent * self.long_factor - 1)
        window = latent // cfg.model.chunk_size  # attention window = one training clip
        curves = {}
        for name, key in (("causal teacher (many-step)", "causal_teacher"),
                          ("student of the causal teacher", "dmd_causal"), ("CausVid", "dmd")):
            self.log(f"[long rollout] {name}: {num_frames} frames")
            t0 = time.perf_counter()
            vids = self._generate(key, prompts, [5000 + i for i in range(n)], num_frames=num_frames, window=window)
            wins = E.score_windows(vids, prompts, cfg.data.num_frames, cfg.data.fps)
            curves[name] = {"windows": wins, "seconds": time.perf_counter() - t0}
        result = {"num_frames": num_frames, "window_frames": cfg.data.num_frames, "fps": cfg.data.fps,
                  "curves": curves}
        with open(out_json, "w") as f:
            json.dump(result, f, indent=2, default=float)
        return result

    def plot_long(self, res: dict) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        for name, c in res["curves"].items():
            x = [w["start"] / res["fps"] for w in c["windows"]]
            m = np.array([w["mean"]["frame_quality"] for w in c["windows"]])
            s = np.array([w["std"]["frame_quality"] for w in c["windows"]])
            ax.plot(x, m, label=name)
            ax.fill_between(x, m - s, m + s, alpha=0.2)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("frame quality (toy metric)")
        ax.set_title(f"Long rollout: {res['num_frames']} frames ({self.long_factor}x the training clips)")
        ax.legend(fontsize=8)
        return self.save_plot(fig, "long_rollout.png", dpi=110)

    def markdown(self, rows: dict, long: dict, plot: str) -> str:
        lines = ["| method | temporal quality | frame quality | text alignment | total | paper (TQ / FQ / TA) |",
                 "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            cells = [f"{m:.3f} ± {s:.3f}" for m, s in (r["summary"][k] for k in
                                                        ("temporal_quality", "frame_quality", "text_alignment", "total"))]
            paper = " / ".join(f"{v:.1f}" for v in PAPER[name]) if name in PAPER else ""
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {paper} |")
        lines += ["", "Long rollout (frame quality per window of one training clip):", "",
                  "| model | first window | last window | seconds |", "|---|---|---|---|"]
        for name, c in long["curves"].items():
            w = c["windows"]
            lines.append(f"| {name} | {w[0]['mean']['frame_quality']:.3f} | {w[-1]['mean']['frame_quality']:.3f} "
                         f"| {c['seconds']:.0f} |")
        lines += ["", f"![long rollout]({plot})"]
        text = "\n".join(lines) + "\n"
        with open(self.path("ablation.md"), "w") as f:
            f.write(text)
        return text

    def streaming(self, factor: Optional[int] = None, num_videos: Optional[int] = None) -> dict:
        """Issue-7 measurements for the CausVid student: a rollout ``factor`` x the training clips (rolling
        cache of one training clip plus a sink chunk) scored per window, the same rollout without the sink chunk,
        and text alignment per segment under prompt switching (``num_videos`` prompts each; default half the
        evaluation set, at least 2)."""
        from causvid.config import load_config
        from causvid.eval import toy_eval as E
        from causvid.eval import toyworld_metrics as M

        out_json = self.path("streaming.json")
        if os.path.exists(out_json):
            with open(out_json) as f:
                return json.load(f)
        cfg = load_config(str(CONFIGS / "teacher.yaml"), self.common())
        d = cfg.data
        latent = (d.num_frames - 1) // 4 + 1
        num_videos = num_videos or max(2, self.p.eval_videos // 2)
        factor = factor or self.stream_factor
        prompts, _ = E.heldout_set(num_videos, cfg)
        st = E.StudentRunner(self.path("dmd", "final"), device=self.device).sampler
        num_frames = 1 + 4 * (latent * factor - 1)
        windows, secs = {}, {}
        for sink in (1, 0):  # the rolling cache of one training clip with a sink chunk, and without (same seeds)
            st.window_chunks, st.sink_chunks = latent // cfg.model.chunk_size, sink
            t0 = time.perf_counter()
            vids = [np.asarray(st.generate(p, num_frames=num_frames, seed=9000 + i)) for i, p in enumerate(prompts)]
            secs[sink] = time.perf_counter() - t0
            windows[sink] = E.score_windows(vids, prompts, d.num_frames, d.fps)
        st.sink_chunks = 1  # prompt switching below streams with the sink chunk
        # prompt switching: 3 segments of one training clip each, different prompts
        seg_chunks = latent // cfg.model.chunk_size
        sw_prompts, _ = E.heldout_set(3 * num_videos, cfg)
        rows = []
        for i in range(num_videos):
            ps = sw_prompts[3 * i: 3 * i + 3]
            sched = {0: ps[0], seg_chunks: ps[1], 2 * seg_chunks: ps[2]}
            v = np.asarray(st.generate(sched, num_chunks=3 * seg_chunks, seed=9100 + i))
            bounds = [0, st.pixel_frames(latent), st.pixel_frames(2 * latent), v.shape[0]]
            for k in range(3):
                seg = v[bounds[k]:bounds[k + 1]]
                scores = [M.score_video(seg, ps[j], fps=d.fps) for j in range(3)]  # the segment against each prompt
                row = {"video": i, "segment": k}
                for key in SWITCH_KEYS:
                    row[key] = {"own": float(scores[k][key]),
                                "other": float(np.nanmean([scores[j][key] for j in range(3) if j != k]))}
                rows.append(row)
        res = {"num_frames": num_frames, "factor": factor, "seconds": secs[1], "windows": windows[1],
               "windows_no_sink": windows[0], "switch": rows,
               "fps": d.fps, "window_frames": d.num_frames}
        with open(out_json, "w") as f:
            json.dump(res, f, indent=2, default=float)
        return res

    def streaming_markdown(self, res: dict) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = ("temporal_quality", "frame_quality", "text_alignment", "color_accuracy", "object_count")
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        x = [w["start"] / res["fps"] for w in res["windows"]]
        for k in keys:
            m = np.array([w["mean"][k] for w in res["windows"]])
            ax.plot(x, m, label=k.replace("_", " "))
        if res.get("windows_no_sink"):
            ax.plot(x, [w["mean"]["frame_quality"] for w in res["windows_no_sink"]], "k--",
                    label="frame quality, no sink chunk")
        ax.set_xlabel("time (s)")
        ax.set_ylim(0, 1.05)
        n = res["windows"][0]["n"]
        ax.set_title(f"CausVid student, {res['factor']}x training length ({res['num_frames']} frames, {n} videos)",
                     fontsize=9)
        ax.legend(fontsize=7)
        plot = self.save_plot(fig, "error_accumulation.png", dpi=110)
        ns = res.get("windows_no_sink") or []
        lines = ["| window (s) | " + " | ".join(k.replace("_", " ") for k in keys)
                 + (" | frame quality, no sink chunk" if ns else "") + " |", "|---|" + "---|" * (len(keys) + bool(ns))]
        w = res["windows"]
        for i in sorted({0, 1, len(w) // 4, len(w) // 2, 3 * len(w) // 4, len(w) - 1}):
            lines.append(f"| {w[i]['start'] / res['fps']:.0f}-{w[i]['end'] / res['fps']:.0f} | "
                         + " | ".join(f"{w[i]['mean'][k]:.3f} ± {w[i]['std'][k]:.3f}" for k in keys)
                         + (f" | {ns[i]['mean']['frame_quality']:.3f} ± {ns[i]['std']['frame_quality']:.3f}" if ns else "")
                         + " |")
        if ns:
            fq = [np.array([v["mean"]["frame_quality"] for v in ws]) for ws in (w, ns)]
            lines += ["", f"Frame quality over all windows: with the sink chunk mean {fq[0].mean():.3f} "
                      f"(min {fq[0].min():.3f}), without {fq[1].mean():.3f} (min {fq[1].min():.3f})."]
        nv = len({r["video"] for r in res["switch"]})
        lines += ["", f"Prompt switching ({nv} videos of 3 segments, one training clip each, three different "
                  "prompts): each segment scored against its own prompt and against the other two.", "",
                  "| segment | " + " | ".join(f"{k.replace('_', ' ')}: own / other" for k in SWITCH_KEYS) + " |",
                  "|---|" + "---|" * len(SWITCH_KEYS)]
        for k in (0, 1, 2, None):
            sel = [r for r in res["switch"] if k is None or r["segment"] == k]
            cells = [f"{np.nanmean([r[key]['own'] for r in sel]):.3f} / {np.nanmean([r[key]['other'] for r in sel]):.3f}"
                     for key in SWITCH_KEYS]
            lines.append(f"| {'all' if k is None else k} | " + " | ".join(cells) + " |")
        lines += ["", f"![error accumulation]({plot})"]
        text = "\n".join(lines) + "\n"
        with open(self.path("streaming.md"), "w") as f:
            f.write(text)
        return text

    def run_ablation(self) -> str:
        for stage in (self.text_encoder, self.vae, self.latents, self.teacher, self.ode_pairs, self.ode, self.dmd,
                      self.causal_teacher, self.teacher_control, self.dmd_variants):
            stage()
        rows = self.table()
        stream = self.streaming_markdown(self.streaming())  # before the long rollout: it needs only the student
        long = self.long_rollout()
        return self.markdown(rows, long, self.plot_long(long)) + "\n" + stream


def write_results(root: str, out_md: str = "docs/results.md", img_dir: str = "docs/img", preset: str = "default") -> str:
    """Compose ``docs/results.md`` from a finished quickstart + ablation run folder (copies the plots)."""
    import shutil

    root_p = os.path.abspath(root)
    os.makedirs(img_dir, exist_ok=True)
    rel_img = os.path.relpath(img_dir, os.path.dirname(os.path.abspath(out_md)))

    def img(name: str) -> str:
        src = os.path.join(root_p, "plots", name)
        if not os.path.exists(src):
            return ""
        shutil.copy(src, os.path.join(img_dir, name))
        return f"![{name}]({rel_img}/{name})"

    def read(name: str) -> str:
        path = os.path.join(root_p, name)
        return open(path).read() if os.path.exists(path) else "(not run)\n"

    def strip_images(md: str) -> str:
        return "\n".join(line for line in md.splitlines() if not line.startswith("![")) + "\n"

    index = read("index.md")
    quick = index.split("## Videos")[0].split("\n", 2)[-1] if "## Videos" in index else index
    times = json.load(open(os.path.join(root_p, "times.json"))) if os.path.exists(os.path.join(root_p, "times.json")) else {}
    parts = [
        "# Results on the toy world", "",
        "Everything below was produced by two commands on the 2-core CPU development machine (no GPU), in one run folder:", "",
        "```bash", f"python scripts/quickstart.py --preset {preset} --out {root}",
        f"python scripts/reproduce_ablation.py --preset {preset} --out {root}",
        "```", "",
        "The toy metrics (`causvid/eval/toyworld_metrics.py`, `docs/toyworld.md`) are in [0, 1], higher is better; ground-truth "
        "toy videos score near 1, noise near 0. They are *not* VBench: compare orderings with the paper, not values.", "",
        f"## Quickstart ({preset} preset)", "", quick.strip(), "", img("samples_grid.png"), "",
        "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.get("seconds", {}).items()), "",
        img("teacher_losses.png"), img("ode_losses.png"), img("dmd_losses.png"), "",
        "## CausVid Table 4 on the toy world", "",
        "Mean ± std over sampling seeds (each seed: the mean over the held-out prompts). Paper columns: VBench temporal "
        "quality / frame quality / text alignment of the paper's own model.", "",
        strip_images(read("ablation.md")).strip(), "", img("long_rollout.png"), "",
        "## Streaming: error accumulation over a 20x rollout and prompt switching (DMD student)", "",
        strip_images(read("streaming.md")).strip(), "", img("error_accumulation.png"), "",
    ]
    text = "\n".join(parts) + "\n"
    with open(out_md, "w") as f:
        f.write(text)
    return out_md


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="CausVid Table 4 and Figure 8 on the toy world")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--out", help="run folder (default runs/quickstart-<preset>, shared with the quickstart)")
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds per row")
    ap.add_argument("--long-factor", type=int, default=10, help="rollout length in training clips (Figure 8)")
    ap.add_argument("--stream-factor", type=int, default=20,
                    help="rollout length in training clips of the streaming error-accumulation measurement")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results-md", metavar="PATH", help="also compose this markdown page (e.g. docs/results.md)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=N",
                    help="override preset fields, e.g. eval_videos=8 (see causvid.quickstart.Preset)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_flush_denormal(True)
    try:
        ab = Ablation(args.out or f"runs/quickstart-{args.preset}", args.preset, args.device, args.seeds,
                      args.long_factor, args.stream_factor, overrides=args.set)
    except ValueError as err:
        ap.error(str(err))
    print(ab.run_ablation())
    if args.results_md:
        out = args.out or f"runs/quickstart-{args.preset}"
        log.info("wrote %s", write_results(out, args.results_md,
                                           os.path.join(os.path.dirname(args.results_md) or ".", "img"), preset=args.preset))
    return 0
