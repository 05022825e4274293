"""Sampling: the bidirectional teacher's ODE solver with CFG, KV-cached block-autoregressive generation,
and :class:`CausalSampler`, the object users touch (notebooks, ``scripts/sample.py``).

``import causvid.sampler`` pulls in only models, schedule, config and video_io: never accelerate, wandb or the trainer.

Modules: :mod:`.solvers` (the teacher's ODE solvers), :mod:`.causal` (KV-cached chunk-by-chunk generation),
:mod:`.streaming` (:class:`CausalSampler`), :mod:`.live` (:class:`LivePrompt`: a prompt changed while a stream
runs). Core functions (plain, reused by training: ODE pairs, backward simulation):

* :func:`teacher_sample` — many-step Euler (or UniPC) over the shifted grid, CFG with a negative prompt,
  returning the trajectory states asked for (CausVid ``generate_ode_pairs.py``).
* :func:`causal_sample` / :func:`causal_sample_chunks` — CausVid Alg. 2 (``causvid_reference.md`` §2.1): per chunk,
  few-step x0-predict + re-noise, then a cache refresh pass at t = ``context_noise`` (0), with a preallocated
  (optionally rolling) KV cache.

The user-facing :class:`CausalSampler` (``docs/sampling.md``) adds: loading an export folder, prompt encoding,
per-chunk seeded noise, streaming VAE decode, a rolling KV cache with attention sink for unbounded length, the
official overlap-restart long-video mode (§2.2), prompt switching (with optional re-caching), video-to-video and
image-to-video.
"""

from causvid.sampler.causal import (
    causal_sample,
    causal_sample_chunks,
    causal_teacher_sample,
    denoise_chunk,
    student_steps,
    v2v_steps,
)
from causvid.sampler.live import LivePrompt, PromptSwitch
from causvid.sampler.solvers import TeacherResult, UniPCState, guided_flow, teacher_sample
from causvid.sampler.streaming import CausalSampler

__all__ = ["TeacherResult", "guided_flow", "teacher_sample", "UniPCState", "causal_sample_chunks", "causal_sample",
           "causal_teacher_sample", "student_steps", "denoise_chunk", "v2v_steps", "CausalSampler",
           "LivePrompt", "PromptSwitch"]
