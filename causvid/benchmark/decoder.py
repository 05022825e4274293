"""The ``decoder`` section: the tiny streaming decoder (``--tiny-decoder``) against the VAE decoder on the same latents.

Latents: the VAE encoding (normalised posterior means, what the DiT learns to produce) of ``--decoder-videos``
held-out toy-world videos of the benchmark clip's size (e.g. 81 frames of 64x64) when ``--vae-path`` gives trained
VAE weights; otherwise random normal latents, and no PSNR (neither decoder was trained for them). Timed, interleaved
repetition by repetition in one :func:`~causvid.benchmark.measure.time_runs` call, on the first clip: the whole-clip
``decode`` and the streamed decode (``stream_decoder().push`` of ``--chunk`` latent frames at a time, as the
student's pipeline decodes) of each decoder. FLOPs of the streamed decodes are counted with
:func:`causvid.benchmark.flops.count_flops`. Quality, as the mean over the clips of per-clip PSNR
(:func:`causvid.train.vae_trainer.psnr`, range [-1, 1]): tiny against VAE, and each against the video frames.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Optional

import torch

from causvid.benchmark.flops import count_flops
from causvid.benchmark.measure import Recorder, time_runs
from causvid.benchmark.workload import Workload

HELD_OUT_SEED = 1  # the held-out toy world of scripts/train_decoder.py (the toy configs train on seed 0)
TOY_FPS = 8.0  # configs/toy/*.yaml data.fps


@torch.no_grad()
def stream_decode(decoder, latents: torch.Tensor, chunk: int, rec: Optional[Recorder] = None) -> torch.Tensor:
    """``[B, F, z, h, w]`` -> ``[B, T, 3, H, W]`` through ``decoder.stream_decoder()``, ``chunk`` latent frames per
    push; marks ``first_chunk`` on ``rec`` once the first frames are out."""
    dec, out = decoder.stream_decoder(), []
    for i, z in enumerate(latents.split(chunk, dim=1)):
        out.append(dec.push(z))
        if i == 0 and rec is not None:
            rec.mark("first_chunk")
    return torch.cat(out, dim=1)


def held_out_latents(w: Workload, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised VAE latents ``[n, F, z, h, w]`` in the workload dtype, frames ``[n, T, 3, H, W]`` float32) of
    ``n`` held-out toy-world videos of the workload's clip size."""
    from causvid.data.toyworld import ToyWorld

    g = w.geo
    world = ToyWorld(height=g.height, width=g.width, num_frames=g.frames, fps=TOY_FPS, seed=HELD_OUT_SEED,
                     num_videos=n)
    frames = torch.stack([world[i]["video"] for i in range(n)])  # [n, T, 3, H, W] in [-1, 1]
    with torch.no_grad():
        latents = torch.cat([w.vae.encode(v[None].to(w.device, w.dtype), chunk_frames=w.o.chunk) for v in frames])
    return latents, frames


def random_latents(w: Workload) -> torch.Tensor:
    """``[1, F, z, h, w]`` standard normal latents (the VAE's normalised latent space) in the workload dtype."""
    g = w.geo
    gen = torch.Generator().manual_seed(w.o.seed + 30)
    z = torch.randn(1, g.latent_frames, w.vae.arch.z_dim, g.latent_h, g.latent_w, generator=gen)
    return z.to(w.device, w.dtype)


@torch.no_grad()
def decode_quality(vae, tiny, latents: torch.Tensor, frames: Optional[torch.Tensor], chunk: int) -> dict[str, Any]:
    """Mean over clips of per-clip PSNR (dB): ``tiny_vs_vae`` (the tiny decoder's frames against the VAE's) and,
    with ``frames``, ``vae_vs_frames``, ``tiny_vs_frames`` and ``loss_db`` = vae_vs_frames - tiny_vs_frames (what
    the tiny decoder loses against the VAE). Decodes are streamed (equal to whole-clip decodes)."""
    from causvid.train.vae_trainer import psnr

    vs, a_gt, b_gt = [], [], []
    for i in range(latents.shape[0]):
        a = stream_decode(vae, latents[i:i + 1], chunk).float().cpu()  # [1, T, 3, H, W]
        b = stream_decode(tiny, latents[i:i + 1], chunk).float().cpu()
        vs.append(float(psnr(b, a)[0]))
        if frames is not None:
            a_gt.append(float(psnr(a, frames[i:i + 1])[0]))
            b_gt.append(float(psnr(b, frames[i:i + 1])[0]))
    out: dict[str, Any] = {"videos": latents.shape[0], "tiny_vs_vae": statistics.fmean(vs),
                           "vae_vs_frames": None, "tiny_vs_frames": None, "loss_db": None}
    if frames is not None:
        out.update(vae_vs_frames=statistics.fmean(a_gt), tiny_vs_frames=statistics.fmean(b_gt))
        out["loss_db"] = out["vae_vs_frames"] - out["tiny_vs_frames"]
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if (a is not None and b) else None


def section_decoder(w: Workload) -> dict[str, Any]:
    """Times, FLOPs, stream-vs-whole check and PSNR of the VAE decoder and the tiny decoder (see the module)."""
    o = w.o
    if w.tiny is None or w.vae is None:
        raise ValueError("the decoder section needs the VAE and --tiny-decoder")
    if o.vae_path:
        latents, frames = held_out_latents(w, o.decoder_videos)
        source = (f"VAE encoding of {o.decoder_videos} held-out toy-world videos (seed {HELD_OUT_SEED}); timing on "
                  "the first")
    else:
        latents, frames = random_latents(w), None
        source = "random normal latents (no --vae-path: PSNR omitted)"
    z = latents[:1]  # [1, F, z, h, w]
    decoders = {"vae": w.vae, "tiny": w.tiny}
    fns = {}
    for name, dec in decoders.items():
        fns[f"{name}_whole"] = lambda r, dec=dec: dec.decode(z)
        fns[f"{name}_stream"] = lambda r, dec=dec: stream_decode(dec, z, o.chunk, r)
    with torch.no_grad():
        res = time_runs(fns, w.clock, warmup=o.warmup, reps=o.reps, meter=w.meter)
    out: dict[str, Any] = {"latents": source, "latent_shape": list(z.shape), "chunk": o.chunk,
                           "dtype": str(w.dtype).replace("torch.", "")}
    for name, dec in decoders.items():
        with torch.no_grad():
            flops, streamed = count_flops(lambda dec=dec: stream_decode(dec, z, o.chunk))
            whole = dec.decode(z)
        whole_s, stream_s = res[f"{name}_whole"]["marks"]["end"], res[f"{name}_stream"]["marks"]["end"]
        out[name] = {
            "whole_s": whole_s.median, "stream_s": stream_s.median,
            "stream_first_chunk_s": res[f"{name}_stream"]["marks"]["first_chunk"].median,
            "whole_stats": dataclasses.asdict(whole_s), "stream_stats": dataclasses.asdict(stream_s),
            "fps_stream": whole.shape[1] / stream_s.median, "decode_flops": flops,
            "params": sum(p.numel() for p in dec.parameters()),
            "peak_bytes_whole": res[f"{name}_whole"]["peak_bytes"],
            "peak_bytes_stream": res[f"{name}_stream"]["peak_bytes"],
            "stream_vs_whole_max_abs_diff": float((streamed.float() - whole.float()).abs().max()),
        }
        out["pixel_frames"] = whole.shape[1]
    v, t = out["vae"], out["tiny"]
    out.update(speedup_whole=_ratio(v["whole_s"], t["whole_s"]), speedup_stream=_ratio(v["stream_s"], t["stream_s"]),
               speedup_first_chunk=_ratio(v["stream_first_chunk_s"], t["stream_first_chunk_s"]),
               flop_ratio=_ratio(v["decode_flops"], t["decode_flops"]),
               psnr=decode_quality(w.vae, w.tiny, latents, frames, o.chunk) if frames is not None else None)
    return out
