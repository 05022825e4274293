"""The benchmark sections, their targets, the machine description and :func:`run_benchmark`."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import torch

from causvid import schedule as S
from causvid.benchmark.flops import (
    count_flops,
    dit_forward_flops,
    dmd_step_flops,
    kv_cache_bytes,
    linear_flops_per_token,
    recompute_sampling_flops,
    student_sampling_flops,
    teacher_sampling_flops,
)
from causvid.benchmark.measure import Recorder, measure_matmul_peak, pick_device, setup_backend, time_runs
from causvid.benchmark.options import H100_BF16_DENSE_TFLOPS, SIZE_DEFAULTS, BenchOptions, step_list
from causvid.benchmark.report import _jsonable, targets
from causvid.benchmark.workload import TextBench, Workload, build_dit, compile_dit_blocks
from causvid.models.dit import WanDiT
from causvid.sampler import guided_flow
from causvid.train.rollout import self_forcing_rollout

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _med(res: dict, name: str, mark: str = "end") -> float:
    return res[name]["marks"][mark].median


def _tflops_rate(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def section_flops(w: Workload) -> dict[str, Any]:
    """The analytic model checked against ``torch.utils.flop_counter`` on one bidirectional chunk forward."""
    g, cfg = w.geo, w.cfg
    n = min(w.o.chunk, g.latent_frames)
    x = w.noise(1, n)
    t = torch.full((1, n), 500.0, device=w.device)
    with torch.no_grad():
        counted, _ = count_flops(lambda: w.model(x, t, w.cond))
    model = dit_forward_flops(cfg, batch=1, frames=n, tokens_per_frame=g.tokens_per_frame, cross_kv=True)
    params = sum(p.numel() for p in w.model.parameters())
    return {"check_forward": {"frames": n, "tokens": n * g.tokens_per_frame, "model": model.to_dict(),
                              "counted": counted, "rel_err": abs(model.total - counted) / counted},
            "dit_params": params, "linear_flops_per_token": linear_flops_per_token(cfg)}


def section_student_teacher(w: Workload, want_teacher: bool) -> dict[str, Any]:
    """Student pipeline (latency, FPS, memory, prompt-to-mp4) and, side by side, the 50-step CFG teacher."""
    o, g = w.o, w.geo
    steps = step_list(o.steps)
    noise, out = w.noise(1), {}
    ren = w.renoise(noise, len(steps))
    can_write = o.write_mp4 and w.decoder is not None and w.mp4_note.startswith("written")
    tmp = tempfile.mkdtemp(prefix="causvid_bench_") if can_write else None
    counts: dict[str, float] = {}
    # Warm-up doubles as the FLOP-counting run of the decoder and text encoder (its timing is discarded).
    w.pipeline_run(Recorder(w.clock), noise=noise, renoise=ren, steps=steps, mp4_dir=tmp, count=counts)
    fns = {"dit": lambda r: w.student_run(r, noise=noise, renoise=ren, steps=steps),
           "pipeline": lambda r: w.pipeline_run(r, noise=noise, renoise=ren, steps=steps, mp4_dir=tmp)}
    res = time_runs(fns, w.clock, warmup=max(w.o.warmup - 1, 0), reps=o.reps, meter=w.meter)
    chunks = len(w.layout.chunks(g.latent_frames))
    forwards = chunks * (len(steps) + 1)
    flops = student_sampling_flops(w.cfg, batch=1, num_frames=g.latent_frames, tokens_per_frame=g.tokens_per_frame,
                                   layout=w.layout, steps=len(steps))
    dit_s = _med(res, "dit")
    text_bytes = w.text.weight_bytes if w.text is not None else 0
    pm = res["pipeline"]["marks"]
    text_s = pm["text"].median
    first = statistics.median([a - b for a, b in zip(pm["first_chunk"].values, pm["text"].values)])
    gen_decode = statistics.median([a - b for a, b in zip(pm["decoded"].values, pm["text"].values)])
    write_s = statistics.median([a - b for a, b in zip(pm["written"].values, pm["decoded"].values)])
    has_dec = w.decoder is not None  # the student decodes (tiny decoder or VAE); the teacher then has the VAE
    student = {
        "decoder": w.decoder_name,
        "steps": steps, "chunks": chunks, "dit_forwards": forwards,
        "sampling_s": dit_s, "sampling_stats": dataclasses.asdict(res["dit"]["marks"]["end"]),
        "first_chunk_dit_s": res["dit"]["marks"]["first_chunk"].median,
        "first_chunk_s": first if has_dec else None,
        "sampling_decode_s": gen_decode if has_dec else None,
        "decode_s": (gen_decode - dit_s) if has_dec else None,
        "text_encode_s": text_s if w.text is not None else None,
        "mp4_write_s": write_s if tmp else None,
        "prompt_to_output_s": pm["end"].median if (has_dec and tmp) else None,
        "prompt_to_output_includes": [k for k, on in (("text", w.text is not None), ("sampling", True),
                                                       (f"{w.decoder_name}_decode", has_dec), ("mp4", bool(tmp)))
                                     if on],
        "fps_dit": g.frames / dit_s,
        "fps_with_vae": g.frames / gen_decode if has_dec else None,
        "forwards_per_s": forwards / dit_s,
        "model_flops": flops.to_dict(),
        "achieved_tflops": _tflops_rate(flops.total, dit_s),
        "peak_bytes_sampling": res["dit"]["peak_bytes"],
        "peak_bytes_pipeline": res["pipeline"]["peak_bytes"],
        # The text encoder stays resident during these runs; pipelines that release it after encoding (as the
        # official ones do) peak lower by its weights: reported separately, used for the memory target.
        "text_encoder_weight_bytes": text_bytes,
        "peak_bytes_sampling_excl_text": res["dit"]["peak_bytes"] - text_bytes,
        "peak_bytes_pipeline_excl_text": res["pipeline"]["peak_bytes"] - text_bytes,
        "kv_cache_bytes": kv_cache_bytes(w.cfg, g.latent_frames * g.tokens_per_frame, w.dtype),
        "decode_flops": counts.get("decode"),
        "text_encode_flops": counts.get("text_encode"),
    }
    out["student"] = student
    if want_teacher:
        out["teacher"] = _teacher(w, noise)
        out["teacher"]["peak_bytes_excl_text"] = out["teacher"]["peak_bytes"] - text_bytes
        out["comparison"] = _compare(student, out["teacher"], has_dec)
    return out


def _teacher(w: Workload, noise: torch.Tensor) -> dict[str, Any]:
    o, g = w.o, w.geo
    has_vae = w.vae is not None
    fn = {"teacher": lambda r: w.teacher_run(r, noise=noise, num_steps=o.teacher_steps, decode=has_vae)}
    warm = {"teacher": lambda r: w.teacher_run(r, noise=noise, num_steps=1, decode=has_vae)}
    res = time_runs(fn, w.clock, warmup=1 if o.warmup else 0, reps=o.teacher_reps, meter=w.meter, warmup_fns=warm)
    branches = 1 if o.guidance == 1.0 else 2
    flops = teacher_sampling_flops(w.cfg, batch=1, num_frames=g.latent_frames, tokens_per_frame=g.tokens_per_frame,
                                   steps=o.teacher_steps, guidance=o.guidance)
    dit_s, total = _med(res, "teacher", "sampled"), _med(res, "teacher")
    return {"decoder": "vae" if has_vae else None, "steps": o.teacher_steps, "guidance": o.guidance,
            "dit_forwards": o.teacher_steps * branches,
            "sampling_s": dit_s, "sampling_stats": dataclasses.asdict(res["teacher"]["marks"]["sampled"]),
            "latency_s": total if has_vae else None, "decode_s": (total - dit_s) if has_vae else None,
            "fps_dit": g.frames / dit_s, "fps_with_vae": g.frames / total if has_vae else None,
            "forwards_per_s": o.teacher_steps * branches / dit_s, "model_flops": flops.to_dict(),
            "achieved_tflops": _tflops_rate(flops.total, dit_s), "peak_bytes": res["teacher"]["peak_bytes"]}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if (a is not None and b) else None


def _compare(st: dict, te: dict, has_vae: bool) -> dict[str, Any]:
    """Teacher / student ratios: latency = time to the first frames; throughput = frames per second."""
    return {
        "latency_ratio_dit": te["sampling_s"] / st["first_chunk_dit_s"],
        "latency_ratio_with_vae": _ratio(te["latency_s"], st["first_chunk_s"]) if has_vae else None,
        "throughput_ratio_dit": st["fps_dit"] / te["fps_dit"],
        "throughput_ratio_with_vae": _ratio(st["fps_with_vae"], te["fps_with_vae"]) if has_vae else None,
        "flop_ratio_total": te["model_flops"]["total"] / st["model_flops"]["total"],
    }


def section_kv(w: Workload) -> list[dict[str, Any]]:
    """KV cache vs full recomputation over increasing length; also checks both give the same video."""
    o, g = w.o, w.geo
    steps = step_list(o.steps)
    rows = []
    for f in o.lengths:
        noise = w.noise(1, f)
        ren = w.renoise(noise, len(steps))
        with torch.no_grad():
            a = torch.cat(w.student_run(Recorder(w.clock), noise=noise, renoise=ren, steps=steps), dim=1)
            b = w.recompute_run(Recorder(w.clock), noise=noise, renoise=ren, steps=steps)
        fns = {"kv": functools.partial(w.student_run, noise=noise, renoise=ren, steps=steps),
               "recompute": functools.partial(w.recompute_run, noise=noise, renoise=ren, steps=steps)}
        res = time_runs(fns, w.clock, warmup=0, reps=o.reps, meter=w.meter)  # the check above was the warm-up
        kw = dict(batch=1, num_frames=f, tokens_per_frame=g.tokens_per_frame, layout=w.layout, steps=len(steps))
        kv_f = student_sampling_flops(w.cfg, **kw).total
        kv_norefresh = student_sampling_flops(w.cfg, refresh=False, **kw).total
        re_f = recompute_sampling_flops(w.cfg, **kw).total
        re_exec = recompute_sampling_flops(w.cfg, executed_dense=True, **kw).total
        kv_s, re_s = _med(res, "kv"), _med(res, "recompute")
        rows.append({"latent_frames": f, "pixel_frames": g.pixel_frames(f), "kv_s": kv_s, "recompute_s": re_s,
                     "speedup": re_s / kv_s, "flop_ratio": re_f / kv_f, "flop_ratio_no_refresh": re_f / kv_norefresh,
                     "flop_ratio_executed_dense": re_exec / kv_f, "max_abs_diff": float((a - b).abs().max()),
                     "kv_peak_bytes": res["kv"]["peak_bytes"], "recompute_peak_bytes": res["recompute"]["peak_bytes"]})
    return rows


def measure_decode(w: Workload) -> float:
    """Median time of the student's streamed decode (tiny decoder or VAE) of one sampled clip, chunk by chunk."""
    steps = step_list(w.o.steps)
    noise = w.noise(1)
    chunks = [x.to(w.dtype) for x in w.student_run(Recorder(w.clock), noise=noise, renoise=w.renoise(noise, len(steps)),
                                                  steps=steps)]

    @torch.no_grad()
    def decode(rec: Recorder) -> None:
        dec = w.decoder.stream_decoder()
        for z in chunks:
            dec.push(z)

    return _med(time_runs({"d": decode}, w.clock, warmup=w.o.warmup, reps=w.o.reps), "d")


def section_steps(w: Workload, decode_s: Optional[float]) -> list[dict[str, Any]]:
    """DiT-only FPS over the number of student steps; FPS with decode adds the student's decode time (of the
    main run, or measured here), which does not depend on the step count."""
    o, g = w.o, w.geo
    if decode_s is None and w.decoder is not None:
        decode_s = measure_decode(w)
    noise = w.noise(1)
    rows = []
    for k in o.sweep_steps:
        steps = step_list(k)
        ren = w.renoise(noise, len(steps))
        res = time_runs({"s": functools.partial(w.student_run, noise=noise, renoise=ren, steps=steps)}, w.clock,
                        warmup=o.warmup, reps=o.reps)
        dit_s = _med(res, "s")
        forwards = len(w.layout.chunks(g.latent_frames)) * (k + 1)
        rows.append({"steps": k, "sampling_s": dit_s, "first_chunk_dit_s": _med(res, "s", "first_chunk"),
                     "fps_dit": g.frames / dit_s, "forwards_per_s": forwards / dit_s,
                     "fps_with_vae": g.frames / (dit_s + decode_s) if decode_s is not None else None})
    return rows


def section_batch(w: Workload) -> dict[str, Any]:
    """Per-video time at batch 1 and N (sampling + the student's streamed decode when it has a decoder)."""
    o, g = w.o, w.geo
    steps = step_list(o.steps)
    decode = w.decoder is not None
    rows = []
    for b in (1, o.batch):
        noise = w.noise(b)
        ren = w.renoise(noise, len(steps))
        fn = lambda r, noise=noise, ren=ren: w.student_run(r, noise=noise, renoise=ren, steps=steps, decode=decode)
        warm = lambda r, noise=noise, ren=ren: w.student_run(r, noise=noise, renoise=ren, steps=steps)
        res = time_runs({"b": fn}, w.clock, warmup=1 if o.warmup else 0, reps=o.batch_reps, meter=w.meter,
                        warmup_fns={"b": warm})
        total = _med(res, "b")
        rows.append({"batch": b, "total_s": total, "per_video_s": total / b, "fps_per_stream": g.frames / total,
                     "fps_aggregate": b * g.frames / total, "first_chunk_s": _med(res, "b", "first_chunk"),
                     "peak_bytes": res["b"]["peak_bytes"]})
    return {"includes_vae_decode": decode, "rows": rows,
            "per_video_speedup": rows[0]["per_video_s"] / rows[-1]["per_video_s"]}


# -- DMD -------------------------------------------------------------------------------------------------


def _losses():
    """``causvid.losses`` or the same maths inline (reference §5.3-5.4)."""
    try:
        from causvid import losses

        return losses.dmd_generator_loss, losses.critic_flow_loss
    except ImportError:
        def dmd_generator_loss(x, real_x0, fake_x0):
            xd, r, f = x.double(), real_x0.detach().double(), fake_x0.detach().double()
            grad = torch.nan_to_num((f - r) / (xd.detach() - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True))
            return (0.5 * torch.nn.functional.mse_loss(xd, (xd - grad).detach())).float(), grad

        def critic_flow_loss(v_pred, x0, eps):
            return (v_pred.double() - (eps.double() - x0.double())).pow(2).mean().float()

        return dmd_generator_loss, critic_flow_loss


class DMDBench:
    """The two DMD updates at the benchmark size: a causal generator and a bidirectional critic (trainable,
    fp32 weights, bf16 autocast on CUDA) and the frozen bidirectional teacher (the inference network)."""

    def __init__(self, w: Workload):
        o = w.o
        self.w, self.device = w, w.device
        self.autocast = w.dtype == torch.bfloat16
        self.gen = self._trainable(o.seed + 10)
        self.critic = self._trainable(o.seed + 11)
        self.teacher = w.model
        opt = dict(lr=2e-6, betas=(0.9, 0.999), weight_decay=0.01)
        if w.device.type == "cuda":
            opt["fused"] = True
        self.opt_g = torch.optim.AdamW(self.gen.parameters(), **opt)
        self.opt_c = torch.optim.AdamW(self.critic.parameters(), **opt)
        self.rng = torch.Generator().manual_seed(o.seed + 12)
        self.dmd_loss, self.critic_loss = _losses()
        self._make_batch()

    def _trainable(self, seed: int) -> WanDiT:
        w = self.w
        m = build_dit(w.cfg, w.device, torch.float32, attention=w.o.attention, seed=seed).train().requires_grad_(True)
        m.gradient_checkpointing = bool(w.o.grad_ckpt)
        if w.o.compile:
            compile_dit_blocks(m, w.o.compile_mode)
        return m

    def _make_batch(self) -> None:
        """CausVid data inputs: clean latents noised per chunk to a level drawn from the step list + 0."""
        w, B = self.w, self.w.o.dmd_batch
        clean = w.noise(B, seed=20)
        levels = step_list(w.o.steps) + [0.0]
        chunk_ids = w.layout.chunk_ids(w.geo.latent_frames)  # [F]
        pick = torch.randint(0, len(levels), (B, int(chunk_ids.max()) + 1), generator=self.rng)
        t = torch.tensor(levels)[pick][:, chunk_ids].to(self.device)  # [B, F] constant within a chunk
        self.x_in = S.add_noise(clean, torch.randn_like(clean), t)
        self.t_in = t
        self.cond, self.uncond = w.context(B), w.uncond.expand(B, -1, -1)

    def _amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _noised(self, x0: torch.Tensor):
        B, F = x0.shape[:2]
        o = self.w.o
        t = S.sample_training_timesteps((B,), o.shift, generator=self.rng, device=self.device)[:, None].expand(B, F)
        eps = torch.randn_like(x0)
        return S.add_noise(x0, eps, t), t, eps

    def _step(self, model: WanDiT, opt, loss: torch.Tensor) -> None:
        loss.backward()
        if self.w.o.optimizer_step:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
        opt.zero_grad(set_to_none=True)

    def generator_update(self, rec: Optional[Recorder] = None) -> None:
        with self._amp():
            x0 = S.x0_from_flow(self.x_in, self.gen(self.x_in, self.t_in, self.cond, layout=self.w.layout), self.t_in)
        self._dmd_update(x0)

    def _dmd_update(self, x0: torch.Tensor) -> None:
        """Scores on the generator sample ``x0`` (with grad), the DMD loss, backward, clip, AdamW."""
        with torch.no_grad():
            x_t, t, _ = self._noised(x0.detach())
            with self._amp():
                fake = S.x0_from_flow(x_t, self.critic(x_t, t, self.cond), t)
                real = S.x0_from_flow(x_t, guided_flow(self.teacher, x_t, t, self.cond, self.uncond,
                                                       self.w.o.dmd_guidance), t)
        loss, _ = self.dmd_loss(x0, real, fake)
        self._step(self.gen, self.opt_g, loss)

    def critic_update(self, rec: Optional[Recorder] = None) -> None:
        with torch.no_grad(), self._amp():
            x_gen = S.x0_from_flow(self.x_in, self.gen(self.x_in, self.t_in, self.cond, layout=self.w.layout),
                                   self.t_in)
        self._critic_update(x_gen)

    def _critic_update(self, x_gen: torch.Tensor) -> None:
        x_t, t, eps = self._noised(x_gen)
        with self._amp():
            v = self.critic(x_t, t, self.cond)
        self._step(self.critic, self.opt_c, self.critic_loss(v, x_gen, eps))


class SelfForcingBench(DMDBench):
    """The DMD updates with Self-Forcing's generator input: the generator's own KV-cached rollout
    (:func:`causvid.train.rollout.self_forcing_rollout`, straight-through cache gradient) from noise, every chunk
    exiting at step ``k``; scores, losses and optimiser steps as :class:`DMDBench`."""

    def _rollout(self, k: int) -> torch.Tensor:
        w = self.w
        noise = w.noise(w.o.dmd_batch, seed=21)
        n_chunks = len(w.layout.chunks(w.geo.latent_frames))
        with self._amp():
            return self_forcing_rollout(self.gen, noise, self.cond, layout=w.layout, steps=step_list(w.o.steps),
                                        exit_steps=[k] * n_chunks, generator=self.rng)

    def generator_update_at(self, k: int, rec: Optional[Recorder] = None) -> None:
        self._dmd_update(self._rollout(k))

    def critic_update_at(self, k: int, rec: Optional[Recorder] = None) -> None:
        with torch.no_grad():
            x_gen = self._rollout(k)
        self._critic_update(x_gen)


def section_self_forcing(w: Workload) -> dict[str, Any]:
    """Self-Forcing generator / critic update times per exit step k, and their mean (the expectation under the
    published uniform exit step); the CausVid DMD step of the ``dmd`` section is the baseline."""
    o = w.o
    bench = SelfForcingBench(w)
    n = len(step_list(o.steps))
    fns = {}
    for k in range(n):
        fns[f"generator_k{k}"] = functools.partial(bench.generator_update_at, k)
        fns[f"critic_k{k}"] = functools.partial(bench.critic_update_at, k)
    res = time_runs(fns, w.clock, warmup=o.warmup, reps=o.reps, meter=w.meter)
    rows = [{"exit_step": k, "generator_s": _med(res, f"generator_k{k}"), "critic_s": _med(res, f"critic_k{k}"),
             "generator_peak_bytes": res[f"generator_k{k}"]["peak_bytes"],
             "critic_peak_bytes": res[f"critic_k{k}"]["peak_bytes"]} for k in range(n)]
    gen = statistics.fmean(r["generator_s"] for r in rows)
    crit = statistics.fmean(r["critic_s"] for r in rows)
    out = {"batch": o.dmd_batch, "gradient_checkpointing": bool(o.grad_ckpt), "optimizer_step": o.optimizer_step,
           "autocast_bf16": bench.autocast, "rows": rows, "generator_mean_s": gen, "critic_mean_s": crit,
           "per_iteration_ratio5_s": (gen + 5 * crit) / 5}
    del bench
    if w.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def section_dmd(w: Workload, peak_tflops: float) -> dict[str, Any]:
    """DMD generator and critic update times, model FLOPs and MFU (``--peak-tflops``)."""
    o, g = w.o, w.geo
    bench = DMDBench(w)
    fns = {"generator": bench.generator_update, "critic": bench.critic_update}
    res = time_runs(fns, w.clock, warmup=o.warmup, reps=o.reps, meter=w.meter)
    flops = dmd_step_flops(w.cfg, batch=o.dmd_batch, num_frames=g.latent_frames, tokens_per_frame=g.tokens_per_frame,
                           layout=w.layout, guidance=o.dmd_guidance)
    out: dict[str, Any] = {"batch": o.dmd_batch, "gradient_checkpointing": bool(o.grad_ckpt),
                           "optimizer_step": o.optimizer_step, "autocast_bf16": bench.autocast,
                           "attention": o.attention, "real_guidance": o.dmd_guidance}
    for name in fns:
        sec = _med(res, name)
        f = flops[name].total
        out[name] = {"step_s": sec, "stats": dataclasses.asdict(res[name]["marks"]["end"]), "model_flops": f,
                     "achieved_tflops": _tflops_rate(f, sec), "mfu": _tflops_rate(f, sec) / peak_tflops,
                     "peak_bytes": res[name]["peak_bytes"]}
    ratio = 5  # CausVid / Self-Forcing dfake_gen_update_ratio: 1 generator update per 5 critic updates
    per_iter_s = (out["generator"]["step_s"] + ratio * out["critic"]["step_s"]) / ratio
    per_iter_f = (flops["generator"].total + ratio * flops["critic"].total) / ratio
    out["per_iteration_ratio5"] = {"step_s": per_iter_s, "model_flops": per_iter_f,
                                   "mfu": _tflops_rate(per_iter_f, per_iter_s) / peak_tflops}
    del bench
    if w.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# Targets, machine, driver
# ------------------------------------------------------------------------------------------------




def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device_type": device.type}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu_model"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=p.total_memory / 1e9, cuda=torch.version.cuda)
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def _section(results: dict, name: str, fn: Callable[[], Any]) -> Any:
    """Run one section; an exception (e.g. out of memory) is recorded and the run goes on."""
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as err:  # noqa: BLE001 - a benchmark reports failures, it does not stop at them
        results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"
        value = None
    if value is None and torch.cuda.is_available():
        torch.cuda.empty_cache()  # after the except block, so the failed frames' tensors are gone
    results.setdefault("section_wall_s", {})[name] = time.perf_counter() - t0
    log.info("%s: %.1f s%s", name, time.perf_counter() - t0, " (failed)" if value is None else "")
    return value


def run_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Run the selected sections and return the results dictionary (see :func:`write_reports`)."""
    device = pick_device(opts.device)
    o = opts.resolved()
    if o.precision == "auto":
        o.precision = "bf16" if device.type == "cuda" else "fp32"
    if o.attention == "auto":
        o.attention = "flex" if device.type == "cuda" else "sdpa"
    setup_backend(device, o.threads)
    t_start = time.perf_counter()
    w = Workload(o, device)
    results: dict[str, Any] = {"meta": machine_info(device), "options": _jsonable(dataclasses.asdict(o))}
    decoders = {"tiny": f"tiny streaming decoder {o.tiny_decoder}", "vae": "the VAE (streamed)", None: "none"}
    results["meta"].update(student_decoder=decoders[w.decoder_name],
                           teacher_decoder=decoders["vae" if w.vae is not None else None])
    results["meta"].update(command=o.command, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), vae=w.vae_note or "ok",
                           dit_params=sum(p.numel() for p in w.model.parameters()), mp4=w.mp4_note,
                           memory_meter=w.meter.kind, clock="cuda_events" if device.type == "cuda" else "perf_counter")
    if o.text_encoder:
        kind = SIZE_DEFAULTS[o.size]["text"]
        w.text = _section(results, "build_text_encoder",
                          lambda: TextBench(kind, w.cfg, device, w.dtype, o.prompt_tokens))
        w.text_note = w.text.note if w.text is not None else "not available (see errors)"
    results["meta"]["text_encoder"] = w.text_note
    results["geometry"] = dataclasses.asdict(w.geo)
    dtype = torch.bfloat16 if (o.precision == "bf16") else torch.float32
    if o.peak_tflops:
        peak, src = o.peak_tflops, "--peak-tflops"
    elif device.type == "cuda":
        peak, src = H100_BF16_DENSE_TFLOPS, "H100/H200 dense bf16 datasheet (default on CUDA)"
    else:
        peak = measure_matmul_peak(device, dtype, n=1024 if o.quick else 2048)
        src = f"measured: best {dtype} {1024 if o.quick else 2048}^3 matmul on this CPU"
    results["peak"] = {"tflops": peak, "source": src}
    if device.type == "cuda":
        results["peak"]["measured_matmul_tflops"] = measure_matmul_peak(device, dtype, n=8192)
    if "flops" in o.sections:
        results["flop_model"] = _section(results, "flops", lambda: section_flops(w))
    if o.compile:
        compile_dit_blocks(w.model, o.compile_mode)
    if "student" in o.sections or "teacher" in o.sections:
        st = _section(results, "student_teacher", lambda: section_student_teacher(w, "teacher" in o.sections))
        if st:
            results.update(st)
            results["student"]["mfu"] = results["student"]["achieved_tflops"] / peak
            if "teacher" in st:
                results["teacher"]["mfu"] = results["teacher"]["achieved_tflops"] / peak
    if w.text is not None:
        w.text.release()  # like the official pipelines: the encoder leaves the device once prompts are encoded
        w.text = None
    if "kv" in o.sections:
        results["kv_vs_recompute"] = _section(results, "kv", lambda: section_kv(w))
    if "steps" in o.sections:
        decode_s = (results.get("student") or {}).get("decode_s")
        results["steps_sweep"] = _section(results, "steps", lambda: section_steps(w, decode_s))
    if "batch" in o.sections:
        results["batch"] = _section(results, "batch", lambda: section_batch(w))
    if "dmd" in o.sections:
        results["dmd"] = _section(results, "dmd", lambda: section_dmd(w, peak))
    if "self_forcing" in o.sections:
        results["self_forcing"] = _section(results, "self_forcing", lambda: section_self_forcing(w))
    if "decoder" in o.sections:
        from causvid.benchmark.decoder import section_decoder

        results["decoder"] = _section(results, "decoder", lambda: section_decoder(w))
    if "peer" in o.sections:
        from causvid.benchmark.peer import section_peer

        results["peer"] = _section(results, "peer", lambda: section_peer(w))
    results["targets"] = targets(results)
    if hasattr(os, "getloadavg"):
        results["meta"]["loadavg_end"] = list(os.getloadavg())
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    return results


