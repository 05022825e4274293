"""Toy world: determinism, resolution/fps independence, captions <-> attributes, rendering facts."""

import json

import numpy as np
import pytest
import torch

from causvid.config import load_config
from causvid.data.toyworld import (
    BACKGROUND_COLORS,
    COLORS,
    MAX_CAPTION_WORDS,
    SHAPES,
    SPEEDS,
    VOCABULARY,
    ToyWorld,
    _bounce,
    caption_from_scene,
    render,
    sample_scene,
    scene_from_caption,
    tokenize,
    toyworld_from_config,
    toyworld_prompts,
    trajectory,
)
from causvid.data.video import collate_videos
from causvid.video_io import to_uint8


def test_same_seed_same_video_different_seed_different():
    a, b, c = ToyWorld(seed=3), ToyWorld(seed=3), ToyWorld(seed=4)
    for i in (0, 7):
        x, y = a[i], b[i]
        assert torch.equal(x["video"], y["video"]) and x["caption"] == y["caption"] and x["attrs"] == y["attrs"]
    assert not torch.equal(a[0]["video"], c[0]["video"])
    assert not torch.equal(a[0]["video"], a[1]["video"])


def test_item_format():
    item = ToyWorld(num_frames=9)[2]
    v = item["video"]
    assert v.shape == (9, 3, 64, 64) and v.dtype == torch.float32
    assert float(v.min()) >= -1.0 and float(v.max()) <= 1.0
    json.dumps(item["attrs"])  # json-serialisable
    assert len(item["attrs"]["objects"][0]["trajectory"]) == 9
    with pytest.raises(IndexError):
        ToyWorld(num_videos=5)[5]


def test_fps_changes_sampling_not_content():
    scene = ToyWorld(seed=1).scene(0)
    slow = render(scene, 9, 8.0, 32, 32)
    fast = render(scene, 17, 16.0, 32, 32)
    np.testing.assert_allclose(fast[::2], slow, atol=1e-5)


def test_any_resolution():
    scene = ToyWorld(seed=2).scene(5)
    for h, w in [(48, 80), (33, 17), (128, 128)]:
        v = render(scene, 5, 8.0, h, w)
        assert v.shape == (5, 3, h, w)


def test_bounce_is_a_triangle_wave():
    t = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(_bounce(0.5, 1.0, t, 0.25, 0.75), [0.5, 0.75, 0.5, 0.25, 0.5])
    np.testing.assert_allclose(_bounce(0.5, -1.0, t, 0.25, 0.75), [0.5, 0.25, 0.5, 0.75, 0.5])


def test_objects_stay_inside_the_frame():
    world = ToyWorld(seed=0, num_frames=129)
    for i in range(20):
        for obj in world.scene(i)["objects"]:
            c = trajectory(obj, np.arange(400) / 8.0, 64, 64)
            assert c.min() >= obj["size"] - 1e-9 and c.max() <= 1 - obj["size"] + 1e-9


def test_captions_parse_back_to_the_rendered_attributes():
    world = ToyWorld(seed=5)
    for i in range(60):
        item = world[i]
        parsed = scene_from_caption(item["caption"])
        objects = item["attrs"]["objects"]
        assert [(o["color"], o["shape"], o["motion"], o["speed"]) for o in parsed["objects"]] == \
            [(o["color"], o["shape"], o["motion"], o["speed"]) for o in objects]
        bg = item["attrs"]["background"]
        assert parsed["background"]["kind"] == bg["kind"]
        if bg["kind"] == "plain":
            assert parsed["background"]["color"] == bg["color"]
        words = tokenize(item["caption"])
        assert set(words) <= set(VOCABULARY) and len(words) <= MAX_CAPTION_WORDS
        assert caption_from_scene(item["attrs"]) == item["caption"]


def test_hand_written_captions():
    assert scene_from_caption("a red circle moving left quickly on stripes") == {
        "objects": [{"color": "red", "shape": "circle", "motion": "left", "speed": "fast"}],
        "background": {"kind": "stripes", "color": None}}
    s = scene_from_caption("An orange square standing still and a blue diamond moving up-right on black.")
    assert s["objects"] == [{"color": "orange", "shape": "square", "motion": "still", "speed": None},
                            {"color": "blue", "shape": "diamond", "motion": "up-right", "speed": None}]
    assert s["background"] == {"kind": "plain", "color": "black"}
    with pytest.raises(ValueError, match="pink"):
        scene_from_caption("a pink circle moving left")
    with pytest.raises(ValueError, match="sideways"):
        scene_from_caption("a red circle moving sideways")


def test_rendered_colour_at_centroid_is_the_palette_colour():
    world = ToyWorld(seed=7)
    for i in range(20):
        item = world[i]
        top = item["attrs"]["objects"][-1]  # drawn last: nothing covers it
        frames = to_uint8(item["video"])  # [T, H, W, 3]
        for t in (0, 16, 32):
            x, y = top["trajectory"][t]
            px = frames[t, int(y * 64), int(x * 64)]
            assert tuple(int(c) for c in px) == COLORS[top["color"]], (i, t, top)


def test_motion_follows_the_velocity():
    world = ToyWorld(seed=9)
    checked = 0
    for i in range(30):
        scene = world.scene(i)
        for obj in scene["objects"]:
            c = trajectory(obj, np.array([0.0, 0.125]), 64, 64)
            step = c[1] - c[0]
            np.testing.assert_allclose(step, np.array(obj["velocity"]) * 0.125, atol=1e-9)  # no bounce at start
            if obj["motion"] != "still":
                assert np.isclose(np.linalg.norm(obj["velocity"]), SPEEDS[obj["speed"]], atol=1e-5)
                checked += 1
    assert checked > 10


def test_anti_aliased_edges_and_palette():
    scene = {"objects": [{"color": "red", "shape": "circle", "motion": "still", "speed": None, "size": 0.2,
                          "start": [0.5, 0.5], "velocity": [0.0, 0.0]}],
             "background": {"kind": "plain", "color": "black"}}
    f = to_uint8(render(scene, 1, 8.0, 40, 40))[0]
    red, black = np.array(COLORS["red"]), np.array(BACKGROUND_COLORS["black"])
    on_palette = (f == red).all(-1) | (f == black).all(-1)
    assert (~on_palette).sum() > 10  # soft edge pixels
    area = (f == red).all(-1).sum()
    assert abs(area - np.pi * 8**2) < 2 * np.pi * 8  # radius 0.2 * 40 = 8 px


def test_sampling_covers_the_attributes():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(300)]
    objs = [o for s in scenes for o in s["objects"]]
    assert {o["shape"] for o in objs} == set(SHAPES)
    assert {o["color"] for o in objs} == set(COLORS)
    assert {s["background"]["kind"] for s in scenes} == {"plain", "stripes", "clouds"}
    assert {len(s["objects"]) for s in scenes} == {1, 2}
    for s in scenes:  # objects in a scene have distinct colours
        assert len({o["color"] for o in s["objects"]}) == len(s["objects"])


def test_from_config_and_prompts_and_collate():
    cfg = load_config(overrides=["data.num_frames=9", "data.height=32", "data.width=48", "data.toyworld.seed=2",
                                 "model.chunk_size=3"])
    world = toyworld_from_config(cfg.data)
    assert (world.num_frames, world.height, world.width, world.seed) == (9, 32, 48, 2)
    prompts = toyworld_prompts(5, seed=2)
    assert prompts == [ToyWorld(seed=2).caption(i) for i in range(5)]
    loader = torch.utils.data.DataLoader(world, batch_size=3, collate_fn=collate_videos)
    batch = next(iter(loader))
    assert batch["video"].shape == (3, 9, 3, 32, 48) and len(batch["caption"]) == 3 and len(batch["attrs"]) == 3
