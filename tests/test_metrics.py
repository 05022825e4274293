"""Toy-world metrics: calibration (ground truth high; noise, shuffled frames and wrong colours low),
hand-computed pieces, windows and aggregation."""

import copy
import math

import numpy as np
import pytest
import torch

from causvid.data.toyworld import COLORS, ToyWorld, render
from causvid.eval.toyworld_metrics import (
    GROUPS,
    aggregate,
    analyze,
    classify_shape,
    harmonic_mean,
    score_video,
    score_windows,
)
from causvid.video_io import to_uint8


def _moving_items(n: int, seed: int = 0):
    """The first n items whose objects all move (a shuffled still scene is the same video)."""
    world = ToyWorld(seed=seed)
    out = []
    for i in range(100):
        if all(o["motion"] != "still" for o in world.scene(i)["objects"]):
            out.append(world[i])
        if len(out) == n:
            return out
    raise AssertionError("not enough moving scenes")


ITEMS = _moving_items(4, seed=0)


@pytest.fixture(scope="module")
def gt_scores():
    return [score_video(it["video"], it["caption"]) for it in ITEMS]


def test_ground_truth_scores_near_the_top(gt_scores):
    for s, it in zip(gt_scores, ITEMS):
        assert s["temporal_quality"] > 0.85, (it["caption"], s)
        assert s["frame_quality"] > 0.9, (it["caption"], s)
        assert s["text_alignment"] > 0.9, (it["caption"], s)
        assert s["color_accuracy"] == 1.0 and s["shape_accuracy"] == 1.0 and s["object_count"] > 0.85
        for k, v in s.items():
            assert math.isnan(v) or 0.0 <= v <= 1.0, k


def test_noise_scores_near_the_bottom():
    g = torch.Generator().manual_seed(0)
    for it in ITEMS[:2]:
        s = score_video(torch.rand(it["video"].shape, generator=g) * 2 - 1, it["caption"])
        assert s["temporal_quality"] < 0.1 and s["frame_quality"] < 0.1 and s["text_alignment"] < 0.1, s


def test_shuffled_frames_fail_the_temporal_group(gt_scores):
    g = torch.Generator().manual_seed(0)
    for it, gt in zip(ITEMS, gt_scores):
        perm = torch.randperm(it["video"].shape[0], generator=g)
        s = score_video(it["video"][perm], it["caption"])
        assert s["temporal_quality"] < 0.3 and gt["temporal_quality"] - s["temporal_quality"] > 0.6, s
        assert s["motion_smoothness"] < 0.15
        assert abs(s["frame_quality"] - gt["frame_quality"]) < 1e-6  # same frames, same frame scores


def test_recoloured_video_fails_colour_alignment():
    for it in ITEMS:
        scene = copy.deepcopy(it["attrs"])
        used = {o["color"] for o in scene["objects"]}
        spare = [c for c in COLORS if c not in used]
        for o, c in zip(scene["objects"], spare):
            o["color"] = c
        s = score_video(render(scene, 33, 8.0, 64, 64), it["caption"])
        assert s["color_accuracy"] == 0.0 and s["text_alignment"] == 0.0
        assert s["shape_accuracy"] == 1.0 and s["direction_accuracy"] > 0.9  # the rest is still recognised
        assert s["temporal_quality"] > 0.85 and s["frame_quality"] > 0.9


def test_wrong_caption_attributes_fail(gt_scores):
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up", "up-left": "down-right",
                "down-right": "up-left", "up-right": "down-left", "down-left": "up-right"}
    other_shape = {"circle": "square", "square": "diamond", "diamond": "triangle", "triangle": "circle"}
    for it in ITEMS[:2]:
        objs = it["attrs"]["objects"]
        flipped = " and ".join(
            f"{'an' if o['color'][0] in 'aeiou' else 'a'} {o['color']} {other_shape[o['shape']]} moving "
            f"{opposite[o['motion']]} {'slowly' if o['speed'] == 'fast' else 'quickly'}" for o in objs)
        s = score_video(it["video"], flipped)
        assert s["color_accuracy"] == 1.0
        assert s["shape_accuracy"] == 0.0 and s["direction_accuracy"] < 0.1 and s["speed_accuracy"] == 0.0


def test_input_layouts_agree(gt_scores):
    it = ITEMS[0]
    u = score_video(to_uint8(it["video"]), it["caption"])  # uint8 [T, H, W, 3]
    for k, v in gt_scores[0].items():
        assert v == pytest.approx(u[k], abs=1e-6) or (math.isnan(v) and math.isnan(u[k])), k


def test_without_caption_text_is_nan():
    s = score_video(ITEMS[0]["video"])
    assert all(math.isnan(s[k]) for k in GROUPS["text_alignment"]) and math.isnan(s["text_alignment"])
    assert s["temporal_quality"] > 0.85 and not math.isnan(s["total"])


def test_bounces_keep_direction_accuracy():
    world = ToyWorld(seed=0, num_frames=129)  # 16 s: fast objects cross the frame several times
    checked = 0
    for i in range(40):
        objs = world.scene(i)["objects"]
        if len(objs) == 1 and objs[0]["speed"] == "fast":
            it = world[i]
            s = score_video(it["video"], it["caption"])
            assert s["direction_accuracy"] > 0.9 and s["speed_accuracy"] == 1.0, (it["caption"], s)
            checked += 1
        if checked == 2:
            break
    assert checked == 2


def test_score_windows_and_aggregate():
    index = int(ITEMS[0]["path"].rsplit("/", 1)[1])  # toyworld://<seed>/<index>
    it = ToyWorld(seed=0, num_frames=65)[index]
    rows = score_windows(it["video"], it["caption"], window_frames=33, stride=16)
    assert [(r["start"], r["end"]) for r in rows] == [(0, 33), (16, 49), (32, 65)]
    assert all(r["temporal_quality"] > 0.85 and r["text_alignment"] > 0.9 for r in rows)
    agg = aggregate([{"a": 1.0, "b": float("nan")}, {"a": 3.0, "b": 2.0}])
    assert agg == {"n": 2, "mean": {"a": 2.0, "b": 2.0}, "std": {"a": 1.0, "b": 0.0}}


def test_hand_computed_pieces():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([1.0, 0.0]) == 0.0 and harmonic_mean([0.5, float("nan")]) == 0.5
    assert math.isnan(harmonic_mean([]))
    assert classify_shape(-0.57, 0.0) == "triangle"
    assert classify_shape(0.0, 0.6) == "square"
    assert classify_shape(0.0, -0.6) == "diamond"
    assert classify_shape(0.0, 0.02) == "circle"


def test_analysis_of_a_drawn_square():
    scene = {"objects": [{"color": "blue", "shape": "square", "motion": "still", "speed": None, "size": 0.125,
                          "start": [0.5, 0.5], "velocity": [0.0, 0.0]}],
             "background": {"kind": "plain", "color": "black"}}
    a = analyze(render(scene, 2, 8.0, 64, 64))
    k = list(COLORS).index("blue")
    assert a.present[:, k].all() and int(a.present.sum()) == 2  # only blue, in both frames
    np.testing.assert_allclose(a.cx[:, k], 32.0, atol=1e-3)
    np.testing.assert_allclose(a.box_w[:, k], 16.0, atol=1e-3)  # 2 * 0.125 * 64
    np.testing.assert_allclose(a.area[:, k], 256.0, atol=1.0)
    np.testing.assert_allclose(a.hue[:, k], 240.0, atol=0.5)
    assert float(a.flicker.max()) == 0.0 and float(a.hf.max()) == 0.0
