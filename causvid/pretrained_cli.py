"""Command line of ``scripts/package_pretrained.py``: a finished run -> a shipped model folder with its provenance.

    python scripts/package_pretrained.py vae --run runs/toy/vae --command "python scripts/train_vae.py ..." \
        --commit <sha> [--out pretrained/toy] [--eval-videos 16]

``--command`` is the exact command that trained the run and ``--commit`` the code it ran (the packager states them;
a run folder does not record its own command line). The scores are measured here, on the held-out toy world of the
evaluation (``causvid.eval.toy_eval.heldout_set``):

* ``text``: the frozen toy text encoder (``ToyTextEncoder(seed=0)``; nothing trained, no run needed);
* ``vae``: the run's held-out PSNR (``metrics.json``) and the toy metrics of ground truth through the VAE (the
  ceiling of anything generated in its latent space);
* ``tiny_decoder``: the run's ``metrics.json`` PSNRs (tiny vs frames, VAE vs frames, tiny vs VAE);
* ``teacher`` / ``causal_teacher``: the toy metrics of ``--eval-videos`` samples (seeds 1000 + i, 50 steps, CFG
  ``ode_pairs.guidance``, as the quickstart's evaluation) with the per-prompt totals, which
  ``tests/test_pretrained.py`` reproduces. The export's ``config.yaml`` is rewritten with the VAE and text encoder
  named relative to the folder (``../vae/vae.safetensors``), and no training paths.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Any, Optional

from causvid.pretrained import TOY_DIR, TOY_MODELS, PretrainedError, package, toy_model_path, update_scores

TEACHER_EVAL = {"num_steps": 50, "seed0": 1000}  # the quickstart's evaluation: seeds 1000 + i, 50 steps


def machine() -> str:
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{cpu or platform.processor()} x{os.cpu_count()}, {platform.system()}, torch {torch.__version__}"


def _json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _wall_seconds(run: str) -> Optional[float]:
    """Training wall time: ``metrics.json``'s ``train_seconds``, else the sum of ``losses.jsonl``'s step times."""
    m = _json(os.path.join(run, "metrics.json"))
    if "train_seconds" in m:
        return float(m["train_seconds"])
    path = os.path.join(run, "losses.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        t = [r["step_time"] for r in recs if isinstance(r.get("step_time"), (int, float))]
        if t:
            return round(sum(t), 1)
    return None


def _steps(run: str) -> Optional[int]:
    m = _json(os.path.join(run, "metrics.json"))
    if "steps" in m:
        return int(m["steps"])
    st = _json(os.path.join(run, "final", "trainer_state.json")) or _json(os.path.join(run, "trainer_state.json"))
    return st.get("step")


def vae_ceiling(vae_path: str, n: int) -> dict:
    """Toy metrics (group means) of ``n`` held-out ground-truth videos through the VAE."""
    from causvid.config import load_config
    from causvid.eval import toy_eval as E
    from causvid.models.vae import load_vae

    cfg = load_config(None, [])
    prompts, gt = E.heldout_set(n, cfg)
    agg = E.score(E.vae_roundtrip(load_vae(vae_path).eval(), gt), prompts, cfg.data.fps)
    return {f"ceiling_{k}": round(agg["mean"][k], 4) for k in E.GROUP_KEYS} | {"ceiling_videos": n}


def teacher_scores(folder: str, n: int) -> dict:
    """Toy metrics of ``n`` teacher samples on held-out prompts, with the per-prompt totals."""
    from causvid.eval import toy_eval as E
    from causvid.eval import toyworld_metrics as M

    runner = E.TeacherRunner(folder)
    prompts, _ = E.heldout_set(n, runner.cfg)
    seeds = [TEACHER_EVAL["seed0"] + i for i in range(n)]
    guidance = float(runner.cfg.ode_pairs.guidance)
    videos, _ = runner.generate(prompts, seeds, num_steps=TEACHER_EVAL["num_steps"], guidance=guidance)
    per_video = [M.score_video(v, p, fps=runner.cfg.data.fps) for v, p in zip(videos, prompts)]
    per = [s["total"] for s in per_video]
    agg = M.aggregate(per_video)  # = E.score, without scoring every video twice
    return {**{k: round(agg["mean"][k], 4) for k in E.GROUP_KEYS}, "per_prompt_total": [round(x, 4) for x in per],
            "eval": {"videos": n, "seeds": f"{seeds[0]}..{seeds[-1]}", "num_steps": TEACHER_EVAL["num_steps"],
                     "guidance": guidance, "shift": float(runner.cfg.ode_pairs.shift)}}


def teacher_config(run_final: str) -> str:
    """The export's config with the shipped VAE / text encoder named relative to the model folder."""
    from omegaconf import OmegaConf

    from causvid.config import load_config

    cfg = load_config(os.path.join(run_final, "config.yaml"))
    cfg.vae.path = f"../{TOY_MODELS['vae'][0]}/{TOY_MODELS['vae'][1]}"
    cfg.text.path = f"../{TOY_MODELS['text'][0]}/{TOY_MODELS['text'][1]}"
    cfg.train.init_from, cfg.train.teacher_path, cfg.data.path = None, None, None
    cfg.train.output_dir = "."
    return "# Shipped toy model (pretrained/toy): paths are relative to this folder.\n" + OmegaConf.to_yaml(cfg)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Package a finished run as a shipped pretrained toy model.")
    p.add_argument("model", choices=sorted(TOY_MODELS))
    p.add_argument("--run", help="the run folder (not for text)")
    p.add_argument("--command", required=True, help="the exact command that trained the run")
    p.add_argument("--commit", required=True, help="git commit of the code that trained the run")
    p.add_argument("--out", default=str(TOY_DIR), help="pretrained root (default: pretrained/toy)")
    p.add_argument("--eval-videos", type=int, default=16, help="held-out prompts for the scores")
    p.add_argument("--wall-seconds", type=float, default=None, help="training wall time when the run lacks it")
    p.add_argument("--notes", default="")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sub, main_file = TOY_MODELS[args.model]
    out = os.path.join(args.out, sub)
    if args.model != "text" and not (args.run and os.path.isdir(args.run)):
        print(f"error: --run must be an existing run folder for {args.model}", file=sys.stderr)
        return 2
    info: dict[str, Any] = dict(command=args.command, commit=args.commit, machine=machine(),
                                made=datetime.date.today().isoformat(), notes=args.notes)
    try:
        if args.model == "text":
            import tempfile

            from causvid.models.text import ToyTextEncoder

            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, main_file)
                ToyTextEncoder(seed=0).save(src)
                prov = package("text", {main_file: src}, out, steps=0, wall_seconds=0.0, scores={}, **info)
        elif args.model == "vae":
            src = os.path.join(args.run, "vae.safetensors")
            m = _json(os.path.join(args.run, "metrics.json"))
            scores = {k: m[k] for k in ("psnr_mean", "psnr_min") if k in m} | vae_ceiling(src, args.eval_videos)
            prov = package("vae", {main_file: src}, out, steps=_steps(args.run),
                           wall_seconds=args.wall_seconds or _wall_seconds(args.run), scores=scores, **info)
        elif args.model == "tiny_decoder":
            m = _json(os.path.join(args.run, "metrics.json"))
            scores = {k: m[k] for k in ("psnr_tiny", "psnr_vae", "psnr_tiny_vs_vae", "eval_videos", "parameters")
                      if k in m}
            prov = package("tiny_decoder", {main_file: os.path.join(args.run, main_file)}, out, steps=_steps(args.run),
                           wall_seconds=args.wall_seconds or _wall_seconds(args.run), scores=scores, **info)
        else:
            final = os.path.join(args.run, "final")
            for need in ("vae", "text"):
                toy_model_path(need, args.out)  # the teacher's config names the shipped ones: package those first
            prov = package(args.model, {main_file: os.path.join(final, main_file)}, out, steps=_steps(args.run),
                           wall_seconds=args.wall_seconds or _wall_seconds(args.run), scores={},
                           texts={"config.yaml": teacher_config(final)}, **info)
            prov = update_scores(out, teacher_scores(out, args.eval_videos))
    except (PretrainedError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"folder": out, "files": prov["files"], "scores": prov["scores"]}, indent=2))
    return 0
