"""causvid.benchmark: the FLOP model (hand values of docs/performance.md and torch's flop counter), the
timing helpers, the DMD step, and a smoke run of the script at tiny size. Speed is never asserted."""

import json
import os

import pytest
import torch

from causvid import benchmark as B
from causvid.models.attention import ChunkLayout, CrossAttnCache
from causvid.models.registry import dit_config

WAN = dit_config("wan2.1-1.3b")
S_WAN = 1560  # tokens per latent frame at 480x832


def test_linear_flops_per_token_wan():
    # 2 * 30 * (6 * 1536^2 + 2 * 1536 * 8960) = 2.501 GFLOP/token (performance.md §2.2)
    assert B.linear_flops_per_token(WAN) == 2 * 30 * (6 * 1536 ** 2 + 2 * 1536 * 8960)
    assert B.linear_flops_per_token(WAN) == pytest.approx(2.501e9, rel=1e-3)


@pytest.mark.parametrize("fn, kwargs, expected", [
    # performance.md §2.4, TFLOP (linear, self-attn, cross-attn) for 21 latent frames x 1560 tokens
    (B.student_sampling_flops, dict(layout=ChunkLayout(3), steps=4), (409.6, 565.2, 15.5)),
    (B.student_sampling_flops, dict(layout=ChunkLayout(3), steps=4, refresh=False), (327.7, 452.1, 12.4)),
    (B.recompute_sampling_flops, dict(layout=ChunkLayout(3), steps=4), (1310.8, 1356.4, 49.5)),
    (B.teacher_sampling_flops, dict(steps=50, guidance=6.0), (8192.8, 19781.5, 309.2)),
])
def test_flop_model_matches_performance_doc(fn, kwargs, expected):
    f = fn(WAN, batch=1, num_frames=21, tokens_per_frame=S_WAN, **kwargs)
    got = (f.linear / 1e12, f.self_attn / 1e12, f.cross_attn / 1e12)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=0.05)  # the doc gives 0.1 TFLOP
    assert f.other < 0.01 * f.total  # embeddings, head, time MLP, text K/V are small


def test_block_causal_pairs_hand_computed():
    # chunks (0,2), (2,4), 3 tokens/frame: 6 queries x 6 keys + 6 queries x 12 keys
    assert B.block_causal_pairs(ChunkLayout(2), 4, 3) == 6 * 6 + 6 * 12
    # one chunk = bidirectional
    assert B.block_causal_pairs(ChunkLayout(4), 4, 3) == 12 * 12


def test_dmd_flops_composition():
    f = B.dmd_step_flops(WAN, batch=1, num_frames=21, tokens_per_frame=S_WAN, layout=ChunkLayout(3), guidance=4.5)
    g, bi = f["generator_forward"].total, f["bidirectional_forward"].total
    assert f["generator"].total == pytest.approx(3 * g + 3 * bi)
    assert f["critic"].total == pytest.approx(g + 3 * bi)
    # block-causal forward, Flex skipping masked blocks: 198.1 TFLOP; bidirectional 282.8 (+ text K/V)
    assert g / 1e12 == pytest.approx(198.1 + 0.1, rel=3e-3)
    assert bi / 1e12 == pytest.approx(282.8 + 0.1, rel=3e-3)


def _tiny_model():
    cfg = dit_config("tiny")
    return cfg, B.build_dit(cfg, torch.device("cpu"), torch.float32, attention="sdpa", seed=0)


def test_count_flops_hand_computed_on_every_torch_version():
    # softmax(q k^T) v costs 2 * rows * Lq * Lk * (Dqk + Dv) FLOP, whichever CPU kernel runs it (torch 2.14's
    # flop_counter sees nothing of the fused kernel and the math fallback's bmm; 2.15 sees the kernel):
    # self-attention q = k = v [2, 3, 5, 8]: 2 * 6 * 5 * 5 * 16 = 4800;
    # masked attention q [2, 3, 5, 8], k [2, 3, 7, 8], v [2, 3, 7, 4]: 2 * 6 * 5 * 7 * 12 = 5040;
    # a [5, 8] @ [8, 7] matmul: 2 * 5 * 8 * 7 = 560
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, d, generator=g) for n, d in ((5, 8), (7, 8), (7, 4)))
    a, b = torch.randn(5, 8, generator=g), torch.randn(8, 7, generator=g)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fn():
        return sdpa(q, q, q), sdpa(q, k, v, attn_mask=torch.zeros(5, 7)), a @ b

    counted, (self_out, out, _) = B.count_flops(fn)
    assert counted == 4800 + 5040 + 560
    assert self_out.shape == (2, 3, 5, 8) and out.shape == (2, 3, 5, 4)
    assert B.count_flops(lambda: a @ b)[0] == 560


def test_flop_model_equals_flop_counter_on_tiny_dit():
    torch.manual_seed(0)
    cfg, model = _tiny_model()
    S = 4 * 4 // 4  # latents 4x4, patch 2x2
    ctx = torch.randn(1, 5, cfg.text_dim)
    x = torch.randn(1, 4, cfg.in_dim, 4, 4)
    t = torch.full((1, 4), 500.0)
    with torch.no_grad():
        # bidirectional forward (context K/V projected in the forward)
        counted, _ = B.count_flops(lambda: model(x, t, ctx))
        assert counted == B.dit_forward_flops(cfg, batch=1, frames=4, tokens_per_frame=S).total
        # block-causal: one SDPA per chunk over its key prefix executes only the kept pairs ...
        counted, _ = B.count_flops(lambda: model(x, t, ctx, layout=ChunkLayout(2)))
        kept = B.block_causal_pairs(ChunkLayout(2), 4, S)
        assert kept < (4 * S) ** 2
        assert counted == B.dit_forward_flops(cfg, batch=1, frames=4, tokens_per_frame=S, attn_pairs=kept).total
        # ... one SDPA with the dense mask (attention="sdpa_mask") all L^2 pairs
        model.attention = "sdpa_mask"
        counted, _ = B.count_flops(lambda: model(x, t, ctx, layout=ChunkLayout(2)))
        model.attention = "sdpa"
        assert counted == B.dit_forward_flops(cfg, batch=1, frames=4, tokens_per_frame=S, attn_pairs=(4 * S) ** 2).total
        # second chunk against a KV cache holding 4 frames, cross-attention cache ready
        cache, cross = model.new_kv_cache(1, 4, S), CrossAttnCache()
        model(x[:, :2], t[:, :2], ctx, kv_cache=cache, start_frame=0, cross_cache=cross)
        counted, _ = B.count_flops(lambda: model(x[:, 2:], t[:, 2:], None, kv_cache=cache, start_frame=2,
                                                 cross_cache=cross))
        assert counted == B.dit_forward_flops(cfg, batch=1, frames=2, tokens_per_frame=S, attn_pairs=2 * S * 4 * S,
                                              cross_kv=False).total


def test_stats_and_time_runs_structure():
    s = B.Stats.of([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.0, 1.0, 3.0, 3)
    with pytest.raises(ValueError):
        B.Stats.of([])
    calls = []

    def fn(rec):
        calls.append(1)
        rec.mark("middle")

    clock = B.Clock(torch.device("cpu"))
    res = B.time_runs({"a": fn, "b": fn}, clock, warmup=2, reps=3, meter=B.MemoryMeter(torch.device("cpu")))
    assert len(calls) == 2 * (2 + 3)
    for name in ("a", "b"):
        marks = res[name]["marks"]
        assert set(marks) == {"middle", "end"} and marks["end"].n == 3
        assert all(m <= e for m, e in zip(marks["middle"].values, marks["end"].values))
        assert res[name]["peak_bytes"] > 0


def test_kv_cache_bytes_wan():
    # 288 MB per latent frame in bf16 (performance.md §2.8)
    assert B.kv_cache_bytes(WAN, S_WAN, torch.bfloat16) == 2 * 30 * 1560 * 1536 * 2
    assert B.kv_cache_bytes(WAN, S_WAN, torch.bfloat16) / 1e6 == pytest.approx(287.5, rel=1e-3)


def test_dmd_updates_change_only_their_network():
    o = B.BenchOptions(size="tiny", height=16, width=16, frames=9, chunk=1, steps=2, vae=False, text_encoder=False,
                       attention="sdpa", precision="fp32").resolved()
    w = B.Workload(o, torch.device("cpu"))
    bench = B.DMDBench(w)
    g0 = [p.detach().clone() for p in bench.gen.parameters()]
    c0 = [p.detach().clone() for p in bench.critic.parameters()]
    bench.critic_update()
    assert all(torch.equal(a, b) for a, b in zip(g0, bench.gen.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(c0, bench.critic.parameters()))
    c1 = [p.detach().clone() for p in bench.critic.parameters()]
    bench.generator_update()
    assert any(not torch.equal(a, b) for a, b in zip(g0, bench.gen.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(c1, bench.critic.parameters()))
    sf = B.SelfForcingBench(w)  # the same updates on the generator's own rollout
    g0 = [p.detach().clone() for p in sf.gen.parameters()]
    c0 = [p.detach().clone() for p in sf.critic.parameters()]
    sf.critic_update_at(1)
    assert all(torch.equal(a, b) for a, b in zip(g0, sf.gen.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(c0, sf.critic.parameters()))
    c1 = [p.detach().clone() for p in sf.critic.parameters()]
    sf.generator_update_at(0)
    assert any(not torch.equal(a, b) for a, b in zip(g0, sf.gen.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(c1, sf.critic.parameters()))


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the script sets the process-wide thread count


def test_script_smoke_run_writes_json_and_markdown(tmp_path, restore_threads):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "benchmark.py")
    spec = importlib.util.spec_from_file_location("benchmark_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "out"
    rc = mod.main(["--size", "tiny", "--quick", "--height", "16", "--width", "16", "--frames", "9", "--chunk", "1",
                   "--steps", "2", "--teacher-steps", "2", "--lengths", "2,3", "--batch", "2", "--threads", "1",
                   "--out-dir", str(out)])
    assert rc == 0
    r = json.loads((out / "benchmark.json").read_text())
    assert not r.get("errors"), r.get("errors")
    assert r["geometry"]["latent_frames"] == 3 and r["geometry"]["tokens_per_frame"] == 4
    st = r["student"]
    assert st["dit_forwards"] == 3 * (2 + 1) and r["teacher"]["dit_forwards"] == 2 * 2
    assert st["sampling_s"] > 0 and st["first_chunk_s"] is not None and st["peak_bytes_pipeline"] > 0
    assert st["prompt_to_output_includes"] == ["text", "sampling", "vae_decode", "mp4"]
    assert [row["latent_frames"] for row in r["kv_vs_recompute"]] == [2, 3]
    for row in r["kv_vs_recompute"]:  # the cached sampler and the recomputation produce the same video
        assert row["max_abs_diff"] < 1e-4
    assert [row["steps"] for row in r["steps_sweep"]] == [1, 2]
    assert [row["batch"] for row in r["batch"]["rows"]] == [1, 2]
    assert set(r["dmd"]) >= {"generator", "critic", "per_iteration_ratio5"}
    assert [row["exit_step"] for row in r["self_forcing"]["rows"]] == [0, 1]
    assert r["flop_model"]["check_forward"]["rel_err"] == 0.0
    md = (out / "benchmark.md").read_text()
    for title in ("Student vs teacher", "KV cache vs recomputation", "Batching", "DMD training step",
                  "Self-Forcing DMD training step", "Targets"):
        assert f"### {title}" in md
    assert all(os.path.isfile(p) for p in r["plots"]) and len(r["plots"]) == 2
    # merging two runs of one setting (sections split over several GPU calls) keeps every command
    merged = tmp_path / "merged"
    assert mod.main(["--merge", str(out / "benchmark.json"), str(out / "benchmark.json"), "--out-dir", str(merged)]) == 0
    m = json.loads((merged / "benchmark.json").read_text())
    assert len(m["meta"]["commands"]) == 2 and m["student"] == r["student"] and m["targets"] == r["targets"]


def test_peer_section_runs_the_same_work_on_diffusers(tmp_path, restore_threads):
    """``--sections peer``: ours and diffusers.WanTransformer3DModel on the same weights and inputs agree, every
    work row is timed (the peer's missing chunk mask / KV cache stated), and the markdown has the table."""
    pytest.importorskip("diffusers")
    from causvid.benchmark.cli import main

    out = tmp_path / "peer"
    assert main(["--size", "tiny", "--quick", "--height", "16", "--width", "16", "--frames", "9", "--chunk", "1",
                 "--steps", "2", "--threads", "1", "--sections", "peer", "--peer-cases", "bench", "--no-vae",
                 "--no-text-encoder", "--out-dir", str(out)]) == 0
    r = json.loads((out / "benchmark.json").read_text())
    assert not r.get("errors"), r.get("errors")
    (case,) = r["peer"]["cases"]
    ch = case["checks"]
    assert case["outputs_agree_1e-5"] and ch["output_scale"] > 1e-3 and ch["train_grad_max_abs_diff"] < 1e-6
    rows = {row["work"].split(",")[0].split(" (")[0]: row for row in case["rows"]}
    assert all(row["ours_s"] > 0 for row in case["rows"])
    assert rows["bidirectional forward"]["peer_s"] > 0 and rows["KV-cached generation"]["peer_s"] is None
    assert "no chunk" in case["rows"][1]["note"] and "no KV cache" in case["rows"][3]["note"]
    assert "Against diffusers.WanTransformer3DModel" in (out / "benchmark.md").read_text()
    with pytest.raises(ValueError, match="unknown peer cases"):
        from causvid.benchmark.options import BenchOptions

        BenchOptions(sections=("peer",), peer_cases=("nope",)).resolved()
