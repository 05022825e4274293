"""The embedded default end to end: toy world -> VAE -> teacher -> ODE pairs -> ODE init -> DMD -> streamed samples.

By default the VAE, the text encoder and the bidirectional teacher are the shipped pretrained toy models
(``pretrained/toy``, verified against their provenance, :mod:`causvid.pretrained`): the run distils a teacher the
user already has, as the real use does with Wan2.1 (preset ``pretrained``). ``from_scratch=True``
(``--from-scratch``) trains every model from the toy world instead (presets ``smoke`` / ``fast`` / ``default`` /
``full``). Every stage runs the same scripts a user runs (``scripts/train_vae.py``, ``encode_latents.py``, ``train_teacher.py``,
``build_ode_pairs.py``, ``train_ode.py``, ``train_dmd.py``) with the toy configs in ``configs/toy/``, as subprocesses,
so the quickstart is exactly the documented pipeline with fewer steps. A finished stage is skipped on a re-run
(its output file exists); an interrupted training stage resumes from its last checkpoint.

The run folder gets: videos (mp4 + gif), a metrics table (ground truth, teacher, ODE-init student, DMD student),
loss plots, a latency / throughput comparison of teacher and student, and ``index.md`` / ``index.html``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
CONFIGS = REPO / "configs" / "toy"


@dataclass(frozen=True)
class Preset:
    vae_steps: int
    num_videos: int  # toy-world videos encoded to latent shards (the teacher's training set)
    teacher_steps: int
    ode_pairs: int
    ode_steps: int
    dmd_steps: int
    eval_videos: int
    teacher_eval_steps: int  # ODE steps of the teacher when sampled for evaluation
    batch_size: int = 8
    checkpoint_every: int = 200
    ode_pair_steps: int = 50  # teacher ODE steps per pair (the stored levels do not depend on it)
    causal_teacher_steps: int = 0  # reproduce_ablation.py: diffusion-forcing fine-tune (0: teacher_steps // 3)
    teacher_decay_steps: int = 0  # the teacher's lr decays (cosine) over its last steps (train.optim.decay_steps)


PRESETS = {
    # The default: distil the shipped teacher (pretrained/toy); vae_steps / teacher_steps are unused.
    "pretrained": Preset(vae_steps=0, num_videos=96, teacher_steps=0, ode_pairs=32, ode_steps=150, dmd_steps=60,
                         eval_videos=8, teacher_eval_steps=50, ode_pair_steps=25),
    # CI: proves the whole chain runs; the numbers mean nothing.
    "smoke": Preset(vae_steps=6, num_videos=16, teacher_steps=6, ode_pairs=8, ode_steps=4, dmd_steps=5,
                    eval_videos=2, teacher_eval_steps=6, batch_size=4, checkpoint_every=1000, ode_pair_steps=25),
    # 5-14 minutes on 2 CPU cores (by CPU): every stage, every output file; the models are barely trained.
    "fast": Preset(vae_steps=250, num_videos=96, teacher_steps=150, ode_pairs=16, ode_steps=60, dmd_steps=40,
                   eval_videos=4, teacher_eval_steps=25, ode_pair_steps=25),
    # <= 30 minutes on 2 CPU cores (measured 22 min 46 s): a good VAE (29.6 dB), a teacher that has learnt
    # backgrounds and colours but not yet to place objects from pure noise (docs/results.md).
    "default": Preset(vae_steps=1500, num_videos=512, teacher_steps=1200, ode_pairs=48, ode_steps=300,
                      dmd_steps=200, eval_videos=16, teacher_eval_steps=50),
    # The results of docs/results.md: a 16000-step teacher whose lr decays over its last 4000 steps, 128 ODE pairs
    # (about 2 h 40 min on 2 CPU cores, two hours of it the teacher).
    "full": Preset(vae_steps=1500, num_videos=768, teacher_steps=16000, ode_pairs=128, ode_steps=400,
                   dmd_steps=300, eval_videos=16, teacher_eval_steps=50, causal_teacher_steps=600,
                   teacher_decay_steps=4000),
}


def preset_with(name: str, overrides: Sequence[str] = ()) -> Preset:
    """The preset ``name`` with ``FIELD=N`` overrides (integers), e.g. ``["teacher_steps=1800"]``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(Preset)}
    kw = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad preset override {item!r}: expected FIELD=N with FIELD one of {sorted(fields)}")
        try:
            kw[key] = int(value)
        except ValueError:
            raise ValueError(f"bad preset override {item!r}: {value!r} is not an integer") from None
    return dataclasses.replace(PRESETS[name], **kw)


class Pipeline:
    def __init__(self, root: str, preset: str, device: str = "cpu", log: Optional[Callable[[str], None]] = None,
                 overrides: Sequence[str] = (), pretrained: Optional[str] = None):
        """``pretrained``: a folder of shipped toy models (``pretrained/toy``) whose VAE, text encoder and teacher the
        run uses instead of training them; None trains everything from the toy world."""
        self.p = preset_with(preset, overrides)
        self.pretrained = None
        if pretrained is not None:
            from causvid.pretrained import available, toy_model_path

            self.pretrained = {n: toy_model_path(n, pretrained) for n in ("text", "vae", "teacher")}  # verified
            if available(pretrained, ["tiny_decoder"]):
                self.pretrained["tiny_decoder"] = toy_model_path("tiny_decoder", pretrained)
        self.root = Path(root).resolve()
        self.preset_name = preset
        self.device = device
        self.log = log or logging.getLogger(__name__).info  # progress lines
        self.times: dict[str, float] = {}
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ paths and shared overrides
    def path(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def model_path(self, name: str) -> str:
        """The VAE / text encoder file or the teacher's export folder: shipped, or trained by this run."""
        if self.pretrained:
            return self.pretrained[name]
        return {"vae": self.path("vae", "vae.safetensors"), "text": self.path("text", "text_encoder.safetensors"),
                "teacher": self.path("teacher", "final")}[name]

    def common(self) -> list[str]:
        return [f"vae.path={self.model_path('vae')}", f"text.path={self.model_path('text')}",
                f"train.batch_size={self.p.batch_size}", f"train.checkpoint_every={self.p.checkpoint_every}"]

    def _run(self, name: str, script: str, args: list[str], done: str) -> None:
        """Run one stage as a subprocess unless ``done`` exists."""
        if os.path.exists(done):
            self.log(f"[{name}] done already ({os.path.relpath(done, self.root)}), skipping")
            return
        cmd = [sys.executable, str(SCRIPTS / script), *args]
        self.log(f"[{name}] {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
        subprocess.run(cmd, check=True, cwd=str(REPO), env=env)
        self.times[name] = time.perf_counter() - t0
        if not os.path.exists(done):
            raise RuntimeError(f"stage {name} finished but {done} is missing")

    # ------------------------------------------------------------------ stages
    def text_encoder(self) -> None:
        path = self.model_path("text")
        if os.path.exists(path):
            return
        from causvid.models.text import ToyTextEncoder

        os.makedirs(os.path.dirname(path), exist_ok=True)
        ToyTextEncoder(seed=0).save(path)  # frozen, deterministic from its seed (docs/text.md)

    def vae(self) -> None:
        if self.pretrained:
            return
        self._run("vae", "train_vae.py", ["--config", str(CONFIGS / "vae.yaml"), "--output", self.path("vae"),
                                          "--steps", str(self.p.vae_steps)], self.path("vae", "vae.safetensors"))

    def latents(self) -> None:
        self._run("latents", "encode_latents.py",
                  ["--config", str(CONFIGS / "teacher.yaml"), "--out", self.path("latents"), "--source", "toyworld",
                   "--num-videos", str(self.p.num_videos), "--shard-size", str(max(8, self.p.num_videos // 8)),
                   *self.common()], self.path("latents", "index.json"))

    def train(self, name: str, script: str, config: str, steps: int, extra: list[str]) -> None:
        out = self.path(name)
        self._run(name, script, ["--config", str(CONFIGS / config), *self.common(), f"train.output_dir={out}",
                                 f"train.max_steps={steps}", *extra], os.path.join(out, "final", "model.safetensors"))

    def teacher(self) -> None:
        if self.pretrained:
            return
        self.train("teacher", "train_teacher.py", "teacher.yaml", self.p.teacher_steps,
                   [f"data.path={self.path('latents')}", f"train.optim.decay_steps={self.p.teacher_decay_steps}"])

    def ode_pairs(self) -> None:
        self._run("ode_pairs", "build_ode_pairs.py",
                  ["--config", str(CONFIGS / "ode_pairs.yaml"), "--out", self.path("ode_pairs"), *self.common(),
                   f"train.teacher_path={self.model_path('teacher')}", f"ode_pairs.output_dir={self.path('ode_pairs')}",
                   f"ode_pairs.num_prompts={self.p.ode_pairs}",
                   f"ode_pairs.num_steps={self.p.ode_pair_steps}", f"ode_pairs.shard_size={max(8, self.p.ode_pairs // 4)}"],
                  self.path("ode_pairs", "index.json"))

    def ode(self) -> None:
        self.train("ode", "train_ode.py", "ode.yaml", self.p.ode_steps,
                   [f"data.path={self.path('ode_pairs')}", f"train.init_from={self.model_path('teacher')}"])

    def dmd(self) -> None:
        self.train("dmd", "train_dmd.py", "dmd.yaml", self.p.dmd_steps,
                   [f"data.path={self.path('latents')}", f"train.init_from={self.path('ode', 'final')}",
                    f"train.teacher_path={self.model_path('teacher')}"])

    # ------------------------------------------------------------------ evaluation and report
    def evaluate(self) -> dict:
        out_json = self.path("metrics.json")
        if os.path.exists(out_json):
            with open(out_json) as f:
                return json.load(f)
        from causvid.config import load_config
        from causvid.eval import toy_eval as E
        from causvid.video_io import write_gif, write_mp4

        cfg = load_config(str(CONFIGS / "teacher.yaml"), self.common())
        fps = cfg.data.fps
        n = self.p.eval_videos
        prompts, gt = E.heldout_set(n, cfg)
        seeds = list(range(1000, 1000 + n))
        results, videos, timing = {}, {}, {}
        results["ground truth"] = E.score(gt, prompts, fps)
        videos["ground_truth"] = gt
        teacher = E.TeacherRunner(self.model_path("teacher"), device=self.device)
        results["ground truth, VAE round trip (ceiling)"] = E.score(E.vae_roundtrip(teacher.vae, gt), prompts, fps)
        self.log(f"[eval] teacher: {self.p.teacher_eval_steps} steps x CFG on {n} prompts")
        v, tm = teacher.generate(prompts, seeds, num_steps=self.p.teacher_eval_steps,
                                 guidance=float(cfg.ode_pairs.guidance))
        results[f"teacher ({self.p.teacher_eval_steps} steps, CFG)"] = E.score(v, prompts, fps)
        videos["teacher"], timing["teacher"] = v, tm.seconds / n
        del teacher
        # (row, weights, key, keep videos); "untrained" is the causal student as ODE init starts it: the
        # teacher's weights sampled with the chunk mask and few steps
        for name, folder, key, keep in (("untrained causal student", "teacher", "untrained", False),
                                        ("ODE-init student", "ode", "ode", True), ("DMD student", "dmd", "dmd", True)):
            self.log(f"[eval] {name}")
            where = self.model_path("teacher") if folder == "teacher" else self.path(folder, "final")
            st = E.StudentRunner(where, device=self.device)
            v, tm = st.generate(prompts, seeds)
            results[f"{name} ({len(st.sampler.steps)} steps/chunk)"] = E.score(v, prompts, fps)
            timing[key] = tm.seconds / n
            if keep:
                videos[key] = v
        vid_dir = self.path("videos")
        os.makedirs(vid_dir, exist_ok=True)
        for key, vs in videos.items():
            for i, vid in enumerate(vs[: min(4, n)]):
                write_mp4(os.path.join(vid_dir, f"{key}_{i}.mp4"), vid, fps)
                write_gif(os.path.join(vid_dir, f"{key}_{i}.gif"), vid, fps)
        latency = self.latency()
        summary = {"preset": self.preset_name, "prompts": prompts, "metrics": results,
                   "seconds_per_video": timing, "latency": latency}
        with open(out_json + ".tmp", "w") as f:
            json.dump(summary, f, indent=2, default=float)
        os.replace(out_json + ".tmp", out_json)
        return summary

    def latency(self) -> dict:
        """First-chunk latency and throughput of the DMD student vs the 50-step CFG teacher (DiT + VAE decode)."""
        import torch

        from causvid.eval import toy_eval as E

        torch.set_flush_denormal(True)
        prompt = "a red circle moving left"

        def stream(overrides: Sequence[str] = ()) -> tuple[float, float, int]:
            st = E.StudentRunner(self.path("dmd", "final"), device=self.device, overrides=list(overrides)).sampler
            st.generate(prompt, seed=0)  # warm-up
            t0, first, frames = time.perf_counter(), None, 0
            for chunk in st.stream(prompt, seed=1):
                if first is None:
                    first = time.perf_counter() - t0
                frames += len(chunk)
            return first, time.perf_counter() - t0, frames

        first, total, frames = stream()
        tiny = None
        if self.pretrained and self.pretrained.get("tiny_decoder"):  # the shipped tiny streaming decoder
            tiny = stream(["sampler.decoder=tiny", f"sampler.tiny_decoder_path={self.pretrained['tiny_decoder']}"])
        teacher = E.TeacherRunner(self.model_path("teacher"), device=self.device)
        t0 = time.perf_counter()
        v, _ = teacher.generate([prompt], [1], num_steps=50, guidance=6.0)
        t_total = time.perf_counter() - t0  # the teacher shows nothing before the whole clip is done
        out = {"student_first_chunk_s": first, "student_total_s": total, "student_fps": frames / total,
               "teacher_first_frame_s": t_total, "teacher_total_s": t_total, "teacher_fps": len(v[0]) / t_total,
               "latency_speedup": t_total / first, "throughput_speedup": (frames / total) / (len(v[0]) / t_total)}
        if tiny is not None:
            out.update(tiny_first_chunk_s=tiny[0], tiny_total_s=tiny[1], tiny_fps=tiny[2] / tiny[1],
                       tiny_latency_speedup=t_total / tiny[0])
        return out

    def plots(self) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        made = []
        for name in ("teacher", "ode", "dmd"):
            path = self.path(name, "losses.jsonl")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                recs = [json.loads(line) for line in f if line.strip()]
            keys = sorted({k for r in recs for k, v in r.items() if k.startswith("loss") and isinstance(v, (int, float))})
            if not keys:
                continue
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for k in keys:
                pts = [(r["step"], r[k]) for r in recs if isinstance(r.get(k), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=k, lw=1)
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.set_title(f"{name} losses")
            ax.legend(fontsize=7)
            made.append(self.save_plot(fig, f"{name}_losses.png"))
        return made

    def save_plot(self, fig, name: str, dpi: int = 100) -> str:
        """Write a matplotlib figure to ``<run>/plots/<name>`` and close it; returns the path."""
        from causvid.video_io import save_figure

        return save_figure(fig, self.path("plots", name), dpi=dpi)

    def samples_grid(self, keys=("ground_truth", "teacher", "ode", "dmd")) -> Optional[str]:
        """``plots/samples_grid.png``: the first, middle and last frame of each model's sample videos
        (``videos/<key>_<i>.mp4``), one row per held-out prompt, one column group per model."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from causvid.video_io import read_video

        rows = []
        for i in range(4):
            paths = [self.path("videos", f"{k}_{i}.mp4") for k in keys]
            if not all(os.path.exists(q) for q in paths):
                break
            groups = []
            for q in paths:
                v = read_video(q)  # uint8 [T, H, W, 3]
                picks = (0, len(v) // 2, len(v) - 1)
                groups.append(np.concatenate([v[t] for t in picks], axis=1))  # [H, 3W, 3]
            gap = np.full((groups[0].shape[0], 4, 3), 255, np.uint8)
            row = np.concatenate([x for g in groups for x in (g, gap)][:-1], axis=1)  # [H, 3W * len(keys) + gaps, 3]
            rows.append(row)
        if not rows:
            return None
        image = np.concatenate([x for r in rows for x in (r, np.full((4, *r.shape[1:]), 255, np.uint8))][:-1])
        H, width = rows[0].shape[0], rows[0].shape[1] // len(keys)
        fig, ax = plt.subplots(figsize=(image.shape[1] / 60, image.shape[0] / 60 + 0.4))
        ax.imshow(image)
        ax.set_xticks([width * (j + 0.5) for j in range(len(keys))], [k.replace("_", " ") for k in keys])
        ax.set_yticks([(H + 4) * r + H / 2 for r in range(len(rows))], [str(r) for r in range(len(rows))])
        ax.set_ylabel("held-out prompt")
        ax.tick_params(length=0)
        ax.xaxis.tick_top()
        for side in ax.spines.values():
            side.set_visible(False)
        return self.save_plot(fig, "samples_grid.png")

    def report(self, summary: dict, plots: list[str], grid: Optional[str] = None) -> str:
        from causvid.eval import toy_eval as E

        lines = [f"# causvid quickstart ({self.preset_name})", "",
                 (("Shipped toy VAE, text encoder and bidirectional teacher (`pretrained/toy`, provenance-checked) -> "
                   if self.pretrained else "Toy world -> VAE -> bidirectional teacher -> ")
                  + f"ODE pairs -> ODE init -> DMD -> streamed samples, on `{self.device}`. "
                  f"Held-out prompts: {len(summary['prompts'])}."), "",
                 "## Toy-world metrics (mean ± std over prompts; higher is better)", "", E.table_header("s / video")]
        per = summary["seconds_per_video"]
        secs = {"ground truth": "", "teacher": per.get("teacher"), "untrained": per.get("untrained"),
                "ODE-init": per.get("ode"), "DMD": per.get("dmd")}
        for name, agg in summary["metrics"].items():
            s = next((v for k, v in secs.items() if name.startswith(k)), "")
            lines.append(E.table_row(name, agg, f"{s:.2f}" if isinstance(s, float) else ""))
        lat = summary["latency"]
        lines += ["", "## Latency and throughput (one video, DiT + VAE decode)", "",
                  "| | first frames after | total | frames/s |", "|---|---|---|---|",
                  f"| DMD student (KV cache, streamed) | {lat['student_first_chunk_s']:.3f} s | {lat['student_total_s']:.2f} s"
                  f" | {lat['student_fps']:.1f} |",
                  f"| teacher (50 steps, CFG) | {lat['teacher_first_frame_s']:.2f} s | {lat['teacher_total_s']:.2f} s"
                  f" | {lat['teacher_fps']:.2f} |"]
        if "tiny_first_chunk_s" in lat:
            lines.append(f"| DMD student, tiny streaming decoder | {lat['tiny_first_chunk_s']:.3f} s | "
                         f"{lat['tiny_total_s']:.2f} s | {lat['tiny_fps']:.1f} |")
        lines += ["", f"Latency speed-up {lat['latency_speedup']:.0f}x"
                  + (f" ({lat['tiny_latency_speedup']:.0f}x with the tiny decoder)" if "tiny_latency_speedup" in lat
                     else "") + f", throughput speed-up {lat['throughput_speedup']:.1f}x.",
                  "", "## Videos", ""]
        if grid:
            lines += ["First, middle and last frame per model and prompt:", "",
                      f"![samples grid](plots/{os.path.basename(grid)})", ""]
        vids = sorted(f for f in os.listdir(self.path("videos")) if f.endswith(".gif"))
        for f in vids:
            lines.append(f"![{f}](videos/{f})")
        lines += ["", "## Loss curves", ""] + [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots]
        lines += ["", "## Stage times (this run)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in self.times.items()]
        text = "\n".join(lines) + "\n"
        with open(self.path("index.md"), "w") as f:
            f.write(text)
        self._html(text)
        return self.path("index.md")

    def _html(self, md: str) -> None:
        """A dependency-free HTML view of index.md (tables, images, headings)."""
        import html

        out, in_table = [], False
        for line in md.splitlines():
            if line.startswith("|"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                if all(set(c) <= set("-") for c in cells):
                    continue
                if not in_table:
                    out.append("<table border=1 cellpadding=4>")
                    in_table = True
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
                continue
            if in_table:
                out.append("</table>")
                in_table = False
            if line.startswith("!["):
                src = line[line.index("(") + 1:-1]
                out.append(f'<img src="{html.escape(src)}" style="margin:4px">')
            elif line.startswith("#"):
                lvl = len(line) - len(line.lstrip("#"))
                out.append(f"<h{lvl}>{html.escape(line.lstrip('#').strip())}</h{lvl}>")
            elif line.strip():
                out.append(f"<p>{html.escape(line)}</p>")
        if in_table:
            out.append("</table>")
        with open(self.path("index.html"), "w") as f:
            f.write("<html><body style='font-family:sans-serif'>\n" + "\n".join(out) + "\n</body></html>\n")

    def run_all(self) -> str:
        t0 = time.perf_counter()
        for stage in (self.text_encoder, self.vae, self.latents, self.teacher, self.ode_pairs, self.ode, self.dmd):
            stage()
        summary = self.evaluate()
        path = self.report(summary, self.plots(), self.samples_grid())
        self.times["total"] = time.perf_counter() - t0
        with open(self.path("times.json"), "w") as f:
            json.dump({"preset": asdict(self.p), "seconds": self.times}, f, indent=2)
        self.log(f"done in {self.times['total']:.0f} s: {path}")
        return path


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    from causvid.pretrained import TOY_DIR, PretrainedError

    ap = argparse.ArgumentParser(description="Run the whole CausVid method on the built-in toy world.")
    ap.add_argument("--from-scratch", action="store_true",
                    help="train the VAE and the teacher too (default: distil the shipped ones in pretrained/toy)")
    ap.add_argument("--fast", action="store_true",
                    help="from scratch, the short preset (5-14 minutes on 2 CPU cores; barely trained models)")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="pretrained (the default) | smoke | fast | default | full (the last four: with --from-scratch)")
    ap.add_argument("--pretrained", default=str(TOY_DIR), help="folder of the shipped toy models (default: %(default)s)")
    ap.add_argument("--out", help="run folder (default runs/quickstart-<preset>)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=N",
                    help="override preset fields, e.g. teacher_steps=3000 (see causvid.quickstart.Preset)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scratch = args.from_scratch or args.fast
    preset = args.preset or ("fast" if args.fast else "default" if scratch else "pretrained")
    if scratch and preset == "pretrained":
        ap.error("--preset pretrained distils the shipped models: drop --from-scratch / --fast")
    try:
        pipe = Pipeline(args.out or f"runs/quickstart-{preset}", preset, args.device, overrides=args.set,
                        pretrained=None if scratch else args.pretrained)
    except (ValueError, PretrainedError) as err:
        ap.error(f"{err}" + ("" if scratch else " (or train everything with --from-scratch)"))
    pipe.run_all()
    return 0
