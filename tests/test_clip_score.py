"""CLIP text-video score (causvid/eval/clip_score.py): the definition by hand, preprocessing, weights, errors.

Randomly initialised open_clip models (no hub here): ViT-B-32 itself for the metric, a small override of it for
weight-file round trips. Scores of random models are meaningless; what is tested is that the code computes the
documented definition exactly.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from causvid.eval import clip_score as cs
from causvid.eval.clip_score import ClipScorer, frame_indices
from causvid.models.weights import WeightsError, save_safetensors

SMALL = {  # ViT-B-32 with tiny towers (same parameter names), for fast round trips
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPT = "a red circle moving left on a plain background"


@pytest.fixture(scope="module")
def vitb32():
    """The real ViT-B-32 architecture (random weights): used sparingly, it is slow on a shared CPU."""
    return ClipScorer("ViT-B-32", random_init=True, seed=0)


@pytest.fixture(scope="module")
def scorer():
    """ViT-B-32 with tiny towers: the same code path, fast."""
    return ClipScorer("ViT-B-32", random_init=True, seed=0, model_kwargs=SMALL)


def make_video(t=5, h=40, w=56, seed=0):
    """uint8 [T, H, W, 3]: smooth random colour fields (so resizing is well behaved)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(t, 3, 4, 5, generator=g)
    frames = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)  # [T, 3, H, W]
    return (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)  # [T, H, W, 3]


def hand_cosines(scorer, video, prompt):
    """The definition from the model's own encoders on the same preprocessed tensors."""
    with torch.no_grad():
        img = scorer.model.encode_image(scorer.preprocess(video))  # [N, D]
        txt = scorer.model.encode_text(scorer.tokenizer([prompt]))  # [1, D]
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img @ txt.T)[:, 0]  # [N]


def test_frame_indices_hand_values():
    assert frame_indices(33, 5) == [0, 8, 16, 24, 32]
    assert frame_indices(10, 4) == [0, 3, 6, 9]
    assert frame_indices(5, None) == [0, 1, 2, 3, 4]
    assert frame_indices(5, 9) == [0, 1, 2, 3, 4]
    assert frame_indices(5, 1) == [2]
    with pytest.raises(ValueError, match="num_frames"):
        frame_indices(5, 0)


def test_vitb32_score_equals_hand_computation(vitb32):
    video = make_video(t=2)
    hand = hand_cosines(vitb32, video, PROMPT)
    assert hand.shape == (2,)
    s = vitb32.score(video, PROMPT)
    assert s == pytest.approx(float(100 * hand.clamp(min=0).mean()), abs=1e-4)
    assert 0.0 <= s <= 100.0


def test_score_definition_clamp_scale_and_determinism(scorer):
    video = make_video()
    hand = hand_cosines(scorer, video, PROMPT)
    torch.testing.assert_close(scorer.frame_cosines(video, PROMPT), hand, atol=1e-5, rtol=0)
    s = scorer.score(video, PROMPT)
    assert s == pytest.approx(float(100 * hand.clamp(min=0).mean()), abs=1e-4)
    assert 0.0 <= s <= 100.0
    assert scorer.score(video, PROMPT) == s  # deterministic

    # The clamp and the scale, made non-vacuous: flipping the text projection flips every cosine, so the two
    # scores add up to 100 * mean|c| and differ by 100 * mean(c).
    proj = scorer.model.text_projection
    try:
        proj.data.neg_()
        s_neg = scorer.score(video, PROMPT)
    finally:
        proj.data.neg_()
    assert 0.0 <= s_neg <= 100.0
    assert s + s_neg == pytest.approx(float(100 * hand.abs().mean()), abs=1e-4)
    assert s - s_neg == pytest.approx(float(100 * hand.mean()), abs=1e-4)
    assert s + s_neg > 0.1


def test_identical_frames_and_single_frame_agree(scorer):
    frame = make_video(t=1, seed=3)
    repeated = frame.expand(4, -1, -1, -1).contiguous()  # [4, H, W, 3]
    c1, c4 = scorer.frame_cosines(frame, PROMPT), scorer.frame_cosines(repeated, PROMPT)
    torch.testing.assert_close(c4, c1.expand(4), atol=1e-5, rtol=0)
    assert scorer.score(repeated, PROMPT) == pytest.approx(scorer.score(frame, PROMPT), abs=1e-4)


def test_float_and_uint8_inputs_agree_and_sampling_picks_frames(scorer):
    video = make_video(t=5, seed=4)
    as_float = video.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [T, 3, H, W] in [-1, 1]
    torch.testing.assert_close(scorer.preprocess(as_float), scorer.preprocess(video), atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.preprocess(video.numpy()), scorer.preprocess(video), atol=0, rtol=0)
    full = scorer.frame_cosines(video, PROMPT)
    scorer.num_frames = 2
    try:
        sampled = scorer.frame_cosines(video, PROMPT)
    finally:
        scorer.num_frames = None
    torch.testing.assert_close(sampled, full[[0, 4]], atol=1e-5, rtol=0)


def test_preprocess_matches_open_clip_pil_transform(vitb32):
    """Our tensor resize + centre crop + normalisation vs open_clip's own PIL eval transform, on a non-square
    frame (a wrong crop offset, size, mean or std would differ by far more than uint8 rounding)."""
    import open_clip
    from PIL import Image

    pil_transform = open_clip.image_transform(224, is_train=False)  # open_clip's defaults: OpenAI mean/std
    h, w = 48, 80
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = (torch.stack([xx, yy, xx * yy], -1) * 255).round().to(torch.uint8)  # [H, W, 3]
    ours = vitb32.preprocess(img[None])[0]  # [3, 224, 224]
    ref = pil_transform(Image.fromarray(img.numpy()))
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().max() < 0.03  # about 2/255 in pixel units after dividing by std ~0.27
    assert (ours - ref).abs().mean() < 0.01


def test_score_batch_matches_single_scores(scorer):
    videos = [make_video(t=3, seed=5), make_video(t=2, h=32, w=32, seed=6)]
    prompts = [PROMPT, "a blue square bouncing"]
    got = scorer.score_batch(videos, prompts)
    assert got == pytest.approx([scorer.score(v, p) for v, p in zip(videos, prompts)], abs=1e-4)
    with pytest.raises(ValueError, match="one prompt per video"):
        scorer.score_batch(videos, prompts[:1])


def test_bad_inputs_are_named(scorer):
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\].*\(5, 3, 8, 8\)"):
        scorer.score(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), PROMPT)
    with pytest.raises(ValueError, match="max"):
        scorer.score(torch.full((2, 3, 8, 8), 200.0), PROMPT)


def test_weight_errors_name_the_problem(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "open_clip_model.safetensors"
    with pytest.raises(WeightsError, match="nowhere/open_clip_model.safetensors"):
        ClipScorer("ViT-B-32", pretrained=str(missing))
    with pytest.raises(WeightsError, match=r"'not_a_tag'.*laion2b_s34b_b79k.*local"):
        ClipScorer("ViT-B-32", pretrained="not_a_tag")
    with pytest.raises(WeightsError, match="random_init=True"):
        ClipScorer("ViT-B-32")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("open_clip.pretrained.download_pretrained", offline)
    with pytest.raises(WeightsError, match=r"'laion2b_s34b_b79k'.*'ViT-B-32'.*network is unreachable.*local path"):
        ClipScorer("ViT-B-32", pretrained="laion2b_s34b_b79k")


def test_local_weight_files_round_trip(tmp_path):
    src = ClipScorer("ViT-B-32", random_init=True, seed=1, model_kwargs=SMALL)
    video = make_video(t=3, seed=7)
    want = src.frame_cosines(video, PROMPT)

    path = tmp_path / "open_clip_model.safetensors"
    save_safetensors(src.model.state_dict(), str(path))
    for weights in (str(path), str(tmp_path)):  # a file, or a folder holding the usual file name
        loaded = ClipScorer("ViT-B-32", pretrained=weights, seed=2, model_kwargs=SMALL)
        sd_a, sd_b = src.model.state_dict(), loaded.model.state_dict()
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        torch.testing.assert_close(loaded.frame_cosines(video, PROMPT), want, atol=0, rtol=0)
        assert loaded.score(video, PROMPT) == src.score(video, PROMPT)

    # A plain state dict in a .bin (open_clip's usual name), with a DataParallel "module." prefix.
    bin_path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({f"module.{k}": v for k, v in src.model.state_dict().items()}, bin_path)
    loaded = ClipScorer("ViT-B-32", pretrained=str(bin_path), model_kwargs=SMALL)
    torch.testing.assert_close(loaded.frame_cosines(video, PROMPT), want, atol=0, rtol=0)


def test_weight_file_problems_are_refused(tmp_path):
    sd = ClipScorer("ViT-B-32", random_init=True, seed=1, model_kwargs=SMALL).model.state_dict()
    partial = tmp_path / "partial.safetensors"
    save_safetensors({k: v for k, v in sd.items() if k != "ln_final.weight"}, str(partial))
    with pytest.raises(WeightsError, match=r"partial.safetensors.*missing.*ln_final.weight"):
        ClipScorer("ViT-B-32", pretrained=str(partial), model_kwargs=SMALL)
    # A pickle that references code is never executed (torch.load(weights_only=True) refuses it).
    unsafe = tmp_path / "unsafe.bin"
    torch.save({"weights": dict(sd), "hook": np.save}, unsafe)
    with pytest.raises(WeightsError, match="unsafe.bin"):
        ClipScorer("ViT-B-32", pretrained=str(unsafe), model_kwargs=SMALL)


def test_pretrained_tag_resolves_through_cache_and_sets_quick_gelu(tmp_path, monkeypatch):
    """A tag whose file is already local (the Hugging Face cache) loads through our safe loader, takes the tag's
    preprocessing, and gets QuickGELU when the tag was trained with it (``openai``)."""
    src = ClipScorer("ViT-B-32", random_init=True, seed=1, model_kwargs={**SMALL, "quick_gelu": True})
    path = tmp_path / "open_clip_model.safetensors"
    save_safetensors(src.model.state_dict(), str(path))
    monkeypatch.setattr("open_clip.pretrained.download_pretrained", lambda cfg, cache_dir=None: str(path))
    tagged = ClipScorer("ViT-B-32", pretrained="openai", model_kwargs=SMALL)
    assert type(tagged.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert tagged.weight_path == str(path) and tagged.describe()["pretrained"] == "openai"
    video = make_video(t=2, seed=8)
    torch.testing.assert_close(tagged.frame_cosines(video, PROMPT), src.frame_cosines(video, PROMPT), atol=0, rtol=0)


def test_seeded_random_init_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = ClipScorer("ViT-B-32", random_init=True, seed=4, model_kwargs=SMALL)
    after = torch.rand(1)
    b = ClipScorer("ViT-B-32", random_init=True, seed=4, model_kwargs=SMALL)
    assert torch.equal(before, after)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert cs.looks_like_path("weights/clip.safetensors") and not cs.looks_like_path("laion2b_s34b_b79k")


# --- scripts/evaluate.py (causvid.eval.evaluate, causvid.eval.captions) ---------------------------------


def load_evaluate_script():
    """The library behind scripts/evaluate.py, as one namespace; the script itself must only wrap ``main``."""
    import os
    import types

    from causvid.eval import captions, evaluate
    from causvid.video_io import read_video

    script = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                               "evaluate.py")).read()
    assert "from causvid.eval.evaluate import main" in script and len(script.splitlines()) < 30
    names = {k: v for m in (captions, evaluate) for k, v in vars(m).items() if k[0] != "_"}
    return types.SimpleNamespace(**names, read_video_uint8=read_video)


def write_mp4(path, video, fps=8):
    """uint8 [T, H, W, 3] -> H.264 mp4 with PyAV (independent of causvid.video_io)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = video.shape[1], video.shape[2], "yuv420p"
        for frame in video.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def video_folder(tmp_path):
    for i, seed in enumerate((10, 11)):
        write_mp4(tmp_path / f"{i:03d}.mp4", make_video(t=4, h=32, w=48, seed=seed))
    return tmp_path


def test_evaluate_folder_scores_writes_json_and_table(video_folder, scorer):
    ev = load_evaluate_script()
    captions = ["a red circle moving left", "a blue square bouncing"]
    with open(video_folder / "captions.jsonl", "w") as f:
        f.write('{"video": "000.mp4", "caption": "%s"}\n\n{"file": "sub/001.mp4", "prompt": "%s"}\n' % tuple(captions))
    videos = ev.list_videos(str(video_folder))
    table = ev.find_captions(str(video_folder), videos)
    assert table == {"000.mp4": captions[0], "001.mp4": captions[1]}

    def fake_toy(video, caption, fps):  # the call evaluate.py makes to toyworld_metrics.score_video
        assert video.dtype == np.uint8 and video.shape == (4, 32, 48, 3) and fps == 8.0
        return {"text_alignment": 0.5 if "red" in caption else 1.0, "temporal": {"flicker": 2}, "label": "x"}

    result = ev.evaluate_folder(str(video_folder), table, scorer, fake_toy, progress=False)
    want = [scorer.score(ev.read_video_uint8(str(video_folder / v)), c) for v, c in table.items()]
    assert [r["clip_score"] for r in result["videos"]] == want
    assert result["summary"]["clip_score"]["mean"] == pytest.approx(sum(want) / 2, abs=1e-12)
    assert result["videos"][0]["toy"] == {"text_alignment": 0.5, "temporal.flicker": 2.0}
    assert result["summary"]["toy.text_alignment"]["mean"] == pytest.approx(0.75)
    assert result["clip"]["model"] == "ViT-B-32" and result["clip"]["frames"] == "all"
    assert result["videos"][1]["fps"] == 8.0 and result["videos"][1]["num_frames"] == 4

    json_path, md_path = ev.write_outputs(result, str(video_folder / "eval"))
    import json

    with open(json_path) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    md = open(md_path).read().splitlines()
    rows = [ln for ln in md if ln.startswith("| ")]
    assert rows[0] == "| video | caption | CLIP score | temporal.flicker | text_alignment |"
    assert rows[1].startswith("| 000.mp4 | a red circle moving left | ") and rows[1].endswith(" | 2.0000 | 0.5000 |")
    assert rows[-1].startswith("| **mean** | 2 videos | ") and rows[-1].endswith(" | 2.0000 | 0.7500 |")


def test_evaluate_caption_formats_and_errors(video_folder):
    ev = load_evaluate_script()
    folder, videos = str(video_folder), ["000.mp4", "001.mp4"]
    (video_folder / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert ev.find_captions(folder, videos, str(video_folder / "p.txt")) == {"000.mp4": "first prompt",
                                                                               "001.mp4": "second prompt"}
    (video_folder / "t.txt").write_text("001.mp4\tB\n000.mp4\tA\n")
    assert ev.find_captions(folder, videos, str(video_folder / "t.txt")) == {"000.mp4": "A", "001.mp4": "B"}
    (video_folder / "c.json").write_text('{"000.mp4": "A", "001.mp4": "B"}')
    assert ev.find_captions(folder, videos, str(video_folder / "c.json")) == {"000.mp4": "A", "001.mp4": "B"}
    (video_folder / "one.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="1 prompts for 2 videos"):
        ev.find_captions(folder, videos, str(video_folder / "one.txt"))
    (video_folder / "000.json").write_text('{"prompt": "side A", "seed": 0}')
    with pytest.raises(ValueError, match=r"no caption for 1 video.*001.mp4"):
        ev.find_captions(folder, videos)  # sidecars: 001 has none
    (video_folder / "001.txt").write_text("side B\n")
    assert ev.find_captions(folder, videos) == {"000.mp4": "side A", "001.mp4": "side B"}
    with pytest.raises(SystemExit, match="--clip-weights"):
        ev.main([folder, "--toy", "off"])
    with pytest.raises(SystemExit, match="nothing to compute"):
        ev.main([folder, "--toy", "off", "--no-clip"])


def test_evaluate_reads_the_same_frames_and_fps_with_the_pyav_backend(video_folder):
    ev = load_evaluate_script()
    path = str(video_folder / "000.mp4")
    first = ev.read_video_uint8(path)  # decord, or PyAV where decord cannot (it fails on this 48-pixel width)
    fallback = ev.read_video_uint8(path, backend="pyav")
    assert fallback.dtype == np.uint8 and fallback.shape == (4, 32, 48, 3)
    np.testing.assert_array_equal(fallback, first)
    assert ev.video_fps(path) == 8.0


def test_evaluate_toy_metrics_only_for_toy_captions():
    ev = load_evaluate_script()
    metrics = pytest.importorskip("causvid.eval.toyworld_metrics")
    from causvid.data.toyworld import ToyWorld

    toy_caption = ToyWorld(num_videos=1).caption(0)
    assert ev.toy_metric_fn("auto", [toy_caption]) is metrics.score_video
    assert ev.toy_metric_fn("auto", [toy_caption, "a cat sleeping on a sofa"]) is None
    assert ev.toy_metric_fn("off", [toy_caption]) is None
    assert ev.toy_metric_fn("on", ["a cat sleeping on a sofa"]) is metrics.score_video
