"""Video I/O and the video data set: round trips, index formats, the bad-file policy, prompt files."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

import causvid.data.video as video_mod
from causvid.data.prompts import read_prompts, write_prompts
from causvid.data.toyworld import ToyWorld, export_videos
from causvid.data.video import (
    DataBudgetError,
    VideoDataset,
    call_with_timeout,
    collate_videos,
    resize_center_crop,
)
from causvid.video_io import (
    VideoReadError,
    frame_indices,
    read_video,
    to_uint8,
    video_html,
    write_gif,
    write_mp4,
)

WORLD = ToyWorld(seed=11, num_frames=9, height=32, width=32, fps=8.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Four toy videos (9 frames, 32x32, 8 fps) with captions.jsonl, metadata.csv and .txt captions."""
    d = str(tmp_path_factory.mktemp("toy"))
    export_videos(WORLD, d, range(4), write_txt=True)
    return d


def _copy_videos(src, dst, names):
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copy(os.path.join(src, n + ".mp4"), dst)
        shutil.copy(os.path.join(src, n + ".txt"), dst)


def test_to_uint8_values_and_layouts():
    v = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 4).expand(2, 3, 1, 4)  # [T, 3, H, W]
    u = to_uint8(v)
    assert u.shape == (2, 1, 4, 3) and u.dtype == np.uint8
    assert u[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    assert np.array_equal(to_uint8(u), u)  # [T, H, W, 3] uint8 passes through


def test_mp4_round_trip_and_odd_sizes(tmp_path):
    frames = to_uint8(WORLD[0]["video"])
    path = write_mp4(tmp_path / "a.mp4", frames, fps=8.0, crf=10)
    back = read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(float) - frames).mean() < 4.0
    assert np.array_equal(read_video(path, backend="pyav"), back)
    odd = write_mp4(tmp_path / "odd.mp4", frames[:, :31, :29], fps=8.0)
    assert read_video(odd).shape == (9, 32, 30, 3)  # edge-padded to even sizes
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary files left


def test_gif_and_html(tmp_path):
    from PIL import Image

    frames = to_uint8(WORLD[1]["video"])
    path = write_gif(tmp_path / "a.gif", frames, fps=8.0)
    assert Image.open(path).n_frames == 9
    assert 'src="data:video/mp4;base64,' in video_html(frames)
    assert 'src="data:image/gif;base64,' in video_html(WORLD[1]["video"], format="gif")


def test_frame_indices():
    assert frame_indices(33, 16.0, 5, 8.0) == [0, 2, 4, 6, 8]
    assert frame_indices(33, 16.0, 5, 8.0, start=3) == [3, 5, 7, 9, 11]
    assert frame_indices(10, 8.0, 4, None) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        frame_indices(8, 16.0, 5, 8.0)


def test_resize_center_crop():
    frames = np.zeros((2, 20, 40, 3), dtype=np.uint8)
    frames[:, :, 6:34] = 255  # a white band over the middle 28 columns
    x = resize_center_crop(frames, 10, 10)  # 20x40 -> 10x20 -> centre 10 columns: all white
    assert x.shape == (2, 3, 10, 10) and torch.allclose(x, torch.ones_like(x))


def test_dataset_reads_an_exported_folder(folder):
    ds = VideoDataset(folder, height=32, width=32, num_frames=9, fps=8.0)
    assert len(ds) == 4
    for i in range(4):
        item = ds[i]
        ref = WORLD[i]
        assert item["caption"] == ref["caption"] and item["path"].endswith(f"{i:06d}.mp4")
        assert item["video"].shape == (9, 3, 32, 32)
        assert (item["video"] - ref["video"]).abs().mean() < 0.03
    assert ds.stats == {"ok": 4, "skipped": 0, "reasons": {}}


def test_dataset_fps_resampling_and_resize(folder):
    ds = VideoDataset(folder, height=16, width=16, num_frames=5, fps=4.0)
    item = ds[0]
    assert item["video"].shape == (5, 3, 16, 16)
    full = VideoDataset(folder, height=16, width=16, num_frames=9, fps=8.0)[0]["video"]
    assert torch.allclose(item["video"], full[::2], atol=1e-6)  # 4 fps from 8 fps = every other frame


def test_csv_and_jsonl_indexes(folder, tmp_path):
    csv_ds = VideoDataset(os.path.join(folder, "metadata.csv"), 32, 32, 9)
    jsonl_ds = VideoDataset(os.path.join(folder, "captions.jsonl"), 32, 32, 9)
    assert [e[1] for e in csv_ds.entries] == [e[1] for e in jsonl_ds.entries] == [WORLD.caption(i) for i in range(4)]
    assert torch.equal(csv_ds[2]["video"], jsonl_ds[2]["video"])
    # an index elsewhere, with absolute paths and alias column names
    idx = tmp_path / "list.jsonl"
    idx.write_text(json.dumps({"video": os.path.join(folder, "000001.mp4"), "text": "hello"}) + "\n")
    item = VideoDataset(str(idx), 32, 32, 9)[0]
    assert item["caption"] == "hello"


def test_txt_captions_when_no_jsonl(folder, tmp_path):
    d = tmp_path / "txt"
    _copy_videos(folder, str(d), ["000000", "000001"])
    ds = VideoDataset(str(d), 32, 32, 9)
    assert [e[1] for e in ds.entries] == [WORLD.caption(0), WORLD.caption(1)]


@pytest.fixture()
def bad_folder(folder, tmp_path):
    """3 good videos + a truncated mp4 + a zero-byte mp4 (all with .txt captions)."""
    d = str(tmp_path / "bad")
    _copy_videos(folder, d, ["000000", "000001", "000002"])
    data = open(os.path.join(folder, "000003.mp4"), "rb").read()
    with open(os.path.join(d, "000001a.mp4"), "wb") as f:  # sorts between good files
        f.write(data[: len(data) // 2])
    open(os.path.join(d, "000002a.mp4"), "wb").close()
    for n in ("000001a", "000002a"):
        with open(os.path.join(d, n + ".txt"), "w") as f:
            f.write("a red circle moving left on black\n")
    return d


def test_bad_files_are_skipped_and_counted(bad_folder):
    ds = VideoDataset(bad_folder, 32, 32, 9, max_bad_fraction=0.5)
    assert len(ds) == 5
    paths = [os.path.basename(ds[i]["path"]) for i in range(len(ds))]
    # deterministic replacement: a bad index yields the next readable one
    assert paths == ["000000.mp4", "000001.mp4", "000002.mp4", "000002.mp4", "000000.mp4"]
    assert ds.stats == {"ok": 3, "skipped": 2, "reasons": {"decode_error": 1, "empty": 1}}
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate_videos)
    assert next(iter(loader))["video"].shape == (5, 9, 3, 32, 32)


def test_strict_mode_raises(bad_folder):
    ds = VideoDataset(bad_folder, 32, 32, 9, strict=True)
    ds[0]
    with pytest.raises(VideoReadError) as err:
        ds[2]  # 000001a.mp4, the truncated file
    assert "000001a.mp4" in str(err.value)


def test_failure_budget(bad_folder):
    ds = VideoDataset(bad_folder, 32, 32, 9, max_bad_fraction=0.25)  # 1.25 bad files allowed
    with pytest.raises(DataBudgetError, match="max_bad_fraction"):
        for i in range(len(ds)):
            ds[i]


def test_missing_caption_and_too_short(folder, tmp_path):
    d = str(tmp_path / "mixed")
    _copy_videos(folder, d, ["000000", "000001"])
    os.remove(os.path.join(d, "000001.txt"))
    ds = VideoDataset(d, 32, 32, 9, max_bad_fraction=0.5)
    assert len(ds) == 1 and ds.stats["reasons"] == {"missing_caption": 1}
    with pytest.raises(VideoReadError, match="missing_caption"):
        VideoDataset(d, 32, 32, 9, strict=True)
    short = VideoDataset(folder, 32, 32, 13, fps=8.0, strict=True)  # needs 13 frames, files have 9
    with pytest.raises(VideoReadError) as err:
        short[0]
    assert err.value.reason == "too_short"


def test_hanging_decode_is_bounded(folder, monkeypatch):
    real = video_mod.read_video

    def slow_for_one(path, **kw):
        if path.endswith("000001.mp4"):
            time.sleep(1.5)
        return real(path, **kw)

    monkeypatch.setattr(video_mod, "read_video", slow_for_one)
    ds = VideoDataset(folder, 32, 32, 9, decode_timeout_s=0.3, max_bad_fraction=0.5)
    assert ds[1]["path"].endswith("000002.mp4")
    assert ds.stats["reasons"] == {"timeout": 1}
    with pytest.raises(ZeroDivisionError):  # errors from the worker thread reach the caller
        call_with_timeout(lambda: 1 / 0, 1.0)
    assert call_with_timeout(lambda: 5, 1.0) == 5


def test_random_start_is_seeded(folder):
    i = next(i for i in range(4) if all(o["motion"] != "still" for o in WORLD.scene(i)["objects"]))
    a = VideoDataset(folder, 32, 32, 5, fps=8.0, random_start=True, seed=1)
    b = VideoDataset(folder, 32, 32, 5, fps=8.0, random_start=True, seed=1)
    assert torch.equal(a[i]["video"], b[i]["video"])
    starts = set()
    full = VideoDataset(folder, 32, 32, 9, fps=8.0)[i]["video"]
    for epoch in range(8):
        a.set_epoch(epoch)
        v = a[i]["video"]
        match = [s for s in range(5) if torch.allclose(v, full[s:s + 5], atol=1e-6)]
        assert len(match) == 1  # moving objects: exactly one window of the full clip
        starts.add(match[0])
    assert len(starts) > 1


def test_prompt_files(tmp_path):
    p = tmp_path / "vbench.txt"
    p.write_bytes("\ufeffa person is skiing\r\n\r\n  # a comment\n  a cat eating food  \nlast line no newline".encode())
    assert read_prompts(p) == ["a person is skiing", "a cat eating food", "last line no newline"]
    out = write_prompts(tmp_path / "sub" / "out.txt", ["b", " c "], header="made by a test")
    assert open(out).read() == "# made by a test\nb\nc\n"
    assert read_prompts(out) == ["b", "c"]
    for bad in ["", "two\nlines", "#tag"]:
        with pytest.raises(ValueError):
            write_prompts(tmp_path / "x.txt", ["ok", bad])


def test_make_toyworld_script(tmp_path):
    import runpy

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_toyworld.py")
    main = runpy.run_path(script, run_name="make_toyworld")["main"]
    out, prompts = str(tmp_path / "vids"), str(tmp_path / "prompts.txt")
    main(["--out", out, "--num", "2", "--num-frames", "5", "--height", "16", "--width", "16", "--seed", "3",
          "--prompts", prompts, "--num-prompts", "3"])
    world = ToyWorld(seed=3, num_frames=5, height=16, width=16)
    ds = VideoDataset(out, 16, 16, 5)
    assert [e[1] for e in ds.entries] == [world.caption(0), world.caption(1)]
    assert read_prompts(prompts) == [world.caption(i) for i in range(3)]
    assert sorted(os.listdir(out)) == ["000000.mp4", "000001.mp4", "captions.jsonl", "metadata.csv"]
