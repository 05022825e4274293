"""The ``peer`` section: the same work on our :class:`WanDiT` and on ``diffusers.WanTransformer3DModel``.

Both networks hold the same weights (ours, renamed by :func:`causvid.models.weights.dit_to_diffusers_key`), get
the same inputs in their native layouts (ours ``[B, F, C, H, W]``, diffusers ``[B, C, F, H, W]``) and are timed
interleaved, repetition by repetition, in one :func:`~causvid.benchmark.measure.time_runs` call. Outputs are
compared (max abs difference). What the peer cannot do is stated, not timed:

* diffusers has no chunk (block-causal) mask: our block-causal training step is compared against its
  bidirectional one (same tokens and matmuls; the mask only removes attention work);
* diffusers has no KV cache: our KV-cached generation is reported without a peer time.

Cases: ``bench`` (the ``--size`` DiT at the benchmark's latent geometry) and ``wan-mini`` (a dim-256, 4-layer,
16-channel Wan config, head dim 128 as in Wan2.1, at 21x24x24 latents: 3,024 tokens).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch

from causvid.benchmark.measure import Recorder, time_runs
from causvid.benchmark.options import step_list
from causvid.benchmark.workload import Workload, build_dit
from causvid.models.attention import ChunkLayout, CrossAttnCache
from causvid.models.registry import DiTConfig
from causvid.sampler import causal_sample_chunks

# dim 256 / 2 heads (head dim 128 = Wan2.1's), ffn 4x, Wan's text width and length, 16 latent channels
WAN_MINI = DiTConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, freq_dim=256, text_dim=4096, text_len=512,
                     in_dim=16, out_dim=16)
PEER_CASES = ("bench", "wan-mini")
NO_CHUNK_MASK = ("diffusers.WanTransformer3DModel has no chunk (block-causal) mask: our block-causal step is "
                 "compared against its bidirectional step")
NO_KV_CACHE = "diffusers.WanTransformer3DModel has no KV cache: no peer time for KV-cached generation"


def diffusers_peer(model, dtype: Optional[torch.dtype] = None):
    """A ``diffusers.WanTransformer3DModel`` holding ``model``'s weights (our names mapped to diffusers')."""
    import diffusers

    from causvid.export import diffusers_config
    from causvid.models.weights import dit_to_diffusers_key

    p = next(model.parameters())
    kw = {k: v for k, v in diffusers_config(model.cfg).items() if not k.startswith("_")}
    with torch.device(p.device):
        peer = diffusers.WanTransformer3DModel(**kw)
    sd = {dit_to_diffusers_key(k): v for k, v in model.state_dict().items()}
    missing, unexpected = peer.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"diffusers peer: weights do not map (missing {missing[:4]}, unexpected {unexpected[:4]})")
    dtype = dtype or p.dtype
    if dtype != torch.float32:  # as ``from_pretrained(torch_dtype=...)``: its float32 modules stay float32
        keep = set(getattr(peer, "_keep_in_fp32_modules", None) or ())
        for name, prm in peer.named_parameters():
            if not keep.intersection(name.split(".")):
                prm.data = prm.data.to(dtype)
    return peer.eval().requires_grad_(False)


def _diffusers_out(peer, x_cf: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """diffusers forward on ``x_cf`` [B, C, F, H, W] -> flow [B, C, F, H, W]."""
    return peer(hidden_states=x_cf, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


@dataclass
class _Case:
    name: str
    cfg: DiTConfig
    frames: int  # latent frames
    h: int  # latent height
    w: int  # latent width


def _cases(w: Workload) -> list[_Case]:
    g, out = w.geo, []
    for name in w.o.peer_cases:
        if name == "bench":
            out.append(_Case(f"bench ({w.o.size})", w.cfg, g.latent_frames, g.latent_h, g.latent_w))
        elif name == "wan-mini":
            out.append(_Case("wan-mini", WAN_MINI, 21, 24, 24))
        else:
            raise ValueError(f"unknown peer case {name!r}; valid: {list(PEER_CASES)}")
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def run_case(w: Workload, case: _Case) -> dict[str, Any]:
    """One case: forward, training forward + backward, KV-cached generation and peak memory, interleaved."""
    o, dev, dtype = w.o, w.device, w.dtype
    ours = build_dit(case.cfg, dev, dtype, attention=o.attention, seed=o.seed + 30)
    theirs = diffusers_peer(ours)
    ours_t = copy.deepcopy(ours).train().requires_grad_(True)  # trainable copies (fp32 master weights on CUDA)
    theirs_t = copy.deepcopy(theirs).train().requires_grad_(True)
    gen = torch.Generator().manual_seed(o.seed + 31)
    B, cfg = 1, case.cfg
    x = torch.randn(B, case.frames, cfg.in_dim, case.h, case.w, generator=gen).to(dev, dtype)  # [B, F, C, H, W]
    x_cf = x.transpose(1, 2).contiguous()  # [B, C, F, H, W]: diffusers' native layout
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=gen).to(dev, dtype)
    t = torch.full((B,), 500.0, device=dev)
    layout = ChunkLayout(o.chunk)
    tokens = case.frames * (case.h // cfg.patch_size[1]) * (case.w // cfg.patch_size[2])

    @torch.no_grad()
    def ours_fwd(rec: Recorder):
        return ours(x, t, ctx)

    @torch.no_grad()
    def theirs_fwd(rec: Recorder):
        return _diffusers_out(theirs, x_cf, t, ctx)

    def train_step(fn, model):
        out = fn()
        out.float().square().mean().backward()
        grad = model.patch_embedding.weight.grad.clone()  # same name in both networks
        model.zero_grad(set_to_none=True)
        return out.detach(), grad

    def ours_train_causal(rec: Recorder):
        return train_step(lambda: ours_t(x, t, ctx, layout=layout), ours_t)

    def ours_train_bidir(rec: Recorder):
        return train_step(lambda: ours_t(x, t, ctx), ours_t)

    def theirs_train(rec: Recorder):
        return train_step(lambda: _diffusers_out(theirs_t, x_cf, t, ctx), theirs_t)

    steps = step_list(o.steps)
    renoise = torch.randn(B, case.frames, max(len(steps) - 1, 0), cfg.in_dim, case.h, case.w, generator=gen).to(dev)
    S_tok = ours.tokens_per_frame(case.h, case.w)
    kv = ours.new_kv_cache(B, case.frames, S_tok)
    cross = CrossAttnCache()

    @torch.no_grad()
    def ours_generate(rec: Recorder):
        kv.reset()
        cross.clear()
        return torch.cat([x0 for _, _, x0 in causal_sample_chunks(ours, x.float(), ctx, layout=layout, steps=steps,
                                                                  kv_cache=kv, cross_cache=cross,
                                                                  renoise=renoise)], dim=1)

    # correctness first (doubles as the warm-up of the compared functions)
    a, b = ours_fwd(None), theirs_fwd(None).transpose(1, 2)
    (ta, ga), (tb, gb) = ours_train_bidir(None), theirs_train(None)
    checks = {"forward_max_abs_diff": _max_diff(a, b), "output_scale": float(a.abs().mean()),
              "train_forward_max_abs_diff": _max_diff(ta, tb.transpose(1, 2)),
              "train_grad_max_abs_diff": _max_diff(ga, gb), "grad_scale": float(ga.abs().mean())}
    fns = {"ours_forward": ours_fwd, "diffusers_forward": theirs_fwd, "ours_train_block_causal": ours_train_causal,
           "ours_train_bidirectional": ours_train_bidir, "diffusers_train_bidirectional": theirs_train,
           "ours_kv_generate": ours_generate}
    base = w.meter.current_bytes()  # weights, inputs and the preallocated KV cache are resident already
    res = time_runs(fns, w.clock, warmup=max(o.warmup - 1, 0), reps=o.reps, meter=w.meter)
    med = {k: res[k]["marks"]["end"].median for k in fns}
    peak = {k: res[k]["peak_bytes"] - base for k in fns}  # peak above the resident baseline
    rows = [
        {"work": "bidirectional forward", "ours_s": med["ours_forward"], "peer_s": med["diffusers_forward"],
         "ours_peak_bytes": peak["ours_forward"], "peer_peak_bytes": peak["diffusers_forward"], "note": ""},
        {"work": "training fwd+bwd, block-causal (ours) vs bidirectional (peer)",
         "ours_s": med["ours_train_block_causal"], "peer_s": med["diffusers_train_bidirectional"],
         "ours_peak_bytes": peak["ours_train_block_causal"], "peer_peak_bytes": peak["diffusers_train_bidirectional"],
         "note": NO_CHUNK_MASK},
        {"work": "training fwd+bwd, bidirectional", "ours_s": med["ours_train_bidirectional"],
         "peer_s": med["diffusers_train_bidirectional"], "ours_peak_bytes": peak["ours_train_bidirectional"],
         "peer_peak_bytes": peak["diffusers_train_bidirectional"], "note": ""},
        {"work": f"KV-cached generation ({len(steps)} steps + refresh per chunk of {o.chunk})",
         "ours_s": med["ours_kv_generate"], "peer_s": None, "ours_peak_bytes": peak["ours_kv_generate"],
         "peer_peak_bytes": None, "note": NO_KV_CACHE},
    ]
    for r in rows:
        r["ratio"] = r["ours_s"] / r["peer_s"] if r["peer_s"] else None
    out = {"case": case.name, "memory": f"{w.meter.kind} above the resident baseline ({base} bytes)", "dit": cfg.to_dict(), "latents": [case.frames, cfg.in_dim, case.h, case.w],
           "tokens": tokens, "params": sum(p.numel() for p in ours.parameters()), "rows": rows,
           "checks": checks, "outputs_agree_1e-5": checks["forward_max_abs_diff"] <= 1e-5
           and checks["train_forward_max_abs_diff"] <= 1e-5}
    fns.clear()  # the closures hold the four networks: released with this frame
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def section_peer(w: Workload) -> dict[str, Any]:
    """Every case of ``--peer-cases``; needs diffusers (the ``interop`` extra)."""
    import diffusers

    return {"peer": f"diffusers {diffusers.__version__} WanTransformer3DModel", "batch": 1, "timestep": 500.0,
            "cases": [run_case(w, c) for c in _cases(w)]}
