"""The demo server without a browser (causvid.demo through FastAPI's test client, in process): frames and switches
equal the sampler's own output, playback throttles generation, "busy" past the limit, bad input answered, a closed
tab's KV cache freed, the mp4 of what was played. The browser side: tests/test_demo.py."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from test_sampler import P1, P2, make_sampler

from causvid.demo.settings import Limits, SettingsError, StreamSettings, parse_start, step_subset

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from causvid.demo.app import create_app  # noqa: E402
from causvid.demo.streams import StreamManager  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_sensitive(model, scale: float = 30.0):
    """A random DiT whose output depends on the prompt visibly (mean |P1 - P2| ~ 7 of 255 per pixel instead of
    ~0.3 with the official init): large random cross-attention output projections."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in model.blocks:
            w = blk.cross_attn.o.weight
            w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)
    return model


def mp4_of(frames: np.ndarray) -> bytes:
    from causvid.demo.frames import encode_frame, mp4_bytes

    return mp4_bytes([encode_frame(f, "png") for f in frames], 8.0)


def mp4_frames(data: bytes) -> np.ndarray:
    import tempfile

    from causvid.video_io import read_video

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        return read_video(f.name, backend="pyav")


def png_frame(b: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def recv_json(ws) -> dict:
    return json.loads(ws.receive_text())


def recv_chunk(ws, skip=("queued",)) -> tuple[dict, list[np.ndarray]]:
    """The next chunk message and its frames (PNG)."""
    while True:
        msg = recv_json(ws)
        if msg["type"] == "chunk":
            return msg, [png_frame(ws.receive_bytes()) for _ in range(msg["frames"])]
        assert msg["type"] in skip, msg


@pytest.fixture()
def client():
    s = make_sampler()
    text_sensitive(s.model)
    manager = StreamManager(s, Limits(max_streams=1, max_prompt_chars=100), frame_format="png", model_name="tiny")
    with TestClient(create_app(manager)) as c:
        c.manager, c.sampler = manager, s
        yield c


def test_stream_switch_and_download_equal_the_sampler(client):
    s = client.sampler
    with client.websocket_connect("/ws") as ws:
        hello = recv_json(ws)
        assert hello["type"] == "hello" and hello["fps"] == 8.0 and hello["max_steps"] == 3
        ws.send_text(json.dumps({"type": "start", "prompt": P1, "seed": 4, "steps": 2, "window": 2, "sink": 1}))
        started = recv_json(ws)
        assert started["type"] == "started" and started["steps"] == [1000.0, 522.0]
        frames, metas = [], []
        for c in range(5):
            if c == 2:
                ws.send_text(json.dumps({"type": "prompt", "prompt": P2, "recache": True}))
            meta, fr = recv_chunk(ws)
            metas.append(meta)
            frames += fr
            ws.send_text(json.dumps({"type": "played", "frames": len(frames)}))  # the tab keeps up
        switch = [w for m in metas for w in m["switches"]]
        assert len(switch) == 1 and switch[0]["prompt"] == P2 and switch[0]["recache"] is True
        c_sw = switch[0]["chunk"]
        assert c_sw >= 2 and switch[0]["frame"] == 9 + 12 * (c_sw - 1) == metas[c_sw]["first_frame"]
        assert [m["first_frame"] for m in metas] == [0, 9, 21, 33, 45] and metas[0]["first_chunk_ms"] > 0
        view = s.with_options(steps=[1000.0, 522.0], window_chunks=2, sink_chunks=1)
        ref = view.generate({0: P1, c_sw: P2}, num_chunks=5, seed=4, recache=True)
        old = view.generate(P1, num_chunks=5, seed=4)
        got = np.stack(frames)
        assert np.abs(got.astype(int) - ref).max() <= 1  # PNG on the wire: the sampler's frames
        assert np.array_equal(got[:switch[0]["frame"]], old[:switch[0]["frame"]])
        assert np.abs(got[-12:].astype(int) - old[-12:]).mean() > 1.0  # after the switch: not the old prompt
        token = hello["session"]
        r = client.get(f"/api/video?session={token}&frames=30")
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    v, want = mp4_frames(r.content), mp4_frames(mp4_of(ref[:30]))
    assert v.shape == (30, 16, 16, 3) and np.abs(v.astype(int) - want).max() <= 1  # the played frames, as H.264


def test_generation_waits_for_playback(client):
    with client.websocket_connect("/ws") as ws:
        recv_json(ws)
        ws.send_text(json.dumps({"type": "start", "prompt": P1}))
        recv_json(ws)
        recv_chunk(ws)
        recv_chunk(ws)  # 21 frames sent >= one chunk (12) + 1 s at 8 fps (8): no more without "played"
        import time

        time.sleep(0.5)
        st = client.manager.stats()["streams_detail"][0]
        assert st["sent"] == 21 and st["chunks"] == 2
        ws.send_text(json.dumps({"type": "played", "frames": 9}))
        meta, _ = recv_chunk(ws)
        assert meta["chunk"] == 2


def test_busy_bad_input_and_disconnect_frees_the_cache(client):
    import time

    with client.websocket_connect("/ws") as a:
        recv_json(a)
        a.send_text(json.dumps({"type": "start", "prompt": P1}))
        recv_json(a)
        recv_chunk(a)
        with client.websocket_connect("/ws") as b:
            recv_json(b)
            for bad, expect in [("{", "JSON objects"), ("[]", "JSON objects"),
                                (json.dumps({"type": "start", "prompt": ""}), "the prompt is empty"),
                                (json.dumps({"type": "start", "prompt": "x" * 10000}), "10000 characters"),
                                (json.dumps({"type": "start", "prompt": P1, "steps": 0}), "steps must be in [1, 3]"),
                                (json.dumps({"type": "start", "prompt": P1, "seed": 1.5}), "seed must be a whole"),
                                (json.dumps({"type": "stop", "x": 1}), None)]:
                b.send_text(bad)
                if expect is None:
                    continue
                msg = recv_json(b)
                assert msg["type"] == "error" and expect in msg["message"], (bad, msg)
            b.send_bytes(b"\x00")
            assert "not binary" in recv_json(b)["message"]
            b.send_text(json.dumps({"type": "start", "prompt": P2}))
            msg = recv_json(b)
            assert msg["type"] == "busy" and "--max-streams 1" in msg["message"]
        assert client.manager.stats()["caches_alive"] == 1
    deadline = time.time() + 10
    while client.manager.stats()["streams"] or client.manager.stats()["caches_alive"]:
        assert time.time() < deadline, client.manager.stats()
        time.sleep(0.05)
    assert client.manager.stats()["sessions"] == 0
    # the slot is free again
    with client.websocket_connect("/ws") as b:
        recv_json(b)
        b.send_text(json.dumps({"type": "start", "prompt": P2}))
        assert recv_json(b)["type"] == "started"


def test_a_stream_ends_at_the_length_limit():
    s = make_sampler()
    manager = StreamManager(s, Limits(max_stream_seconds=3.0), frame_format="jpeg")  # 24 frames at 8 fps
    with TestClient(create_app(manager)) as c, c.websocket_connect("/ws") as ws:
        recv_json(ws)
        ws.send_text(json.dumps({"type": "start", "prompt": P1}))
        recv_json(ws)
        n = 0
        while True:
            msg = recv_json(ws)
            if msg["type"] == "stopped":
                break
            assert msg["type"] == "chunk"
            n += msg["frames"]
            [ws.receive_bytes() for _ in range(msg["frames"])]
            ws.send_text(json.dumps({"type": "played", "frames": n}))
        assert n == 33 and msg["frames"] == 33 and "length limit: 3 s of video" in msg["reason"]
        assert manager.stats()["streams"] == 0


def test_settings_checks():
    lim, d = Limits(), StreamSettings("", 0, 3, 6, 1, False)
    s = parse_start({"type": "start", "prompt": "  a red circle  ", "seed": "7", "steps": 2.0}, lim, 3, d)
    assert (s.prompt, s.seed, s.steps, s.window, s.sink, s.recache) == ("a red circle", 7, 2, 6, 1, False)
    for msg, expect in [({"prompt": None}, "must be text"), ({"prompt": "a", "window": True}, "window must be"),
                        ({"prompt": "a", "sink": 9}, "sink must be in [0, 8]"), ({"prompt": "a", "x": 1}, "unknown")]:
        with pytest.raises(SettingsError, match=expect.replace("[", r"\[").replace("]", r"\]")):
            parse_start(msg, lim, 3, d)
    assert step_subset([1000, 757, 522], 2) == [1000.0, 522.0] and step_subset([9, 5, 3, 1], 3) == [9.0, 3.0, 1.0]
    with pytest.raises(ValueError, match="max_streams"):
        Limits(max_streams=0)


def test_cli_checks(tmp_path, capsys):
    from causvid.demo import cli

    with pytest.raises(SystemExit, match="no export folder"):
        cli.resolve_model(str(tmp_path))
    (tmp_path / "dmd" / "final").mkdir(parents=True)
    for f in ("config.yaml", "model.safetensors"):
        (tmp_path / "dmd" / "final" / f).write_text("")
    assert cli.resolve_model(str(tmp_path)) == str(tmp_path / "dmd" / "final")
    assert cli.parse_args(["--model", "x"]).host == "127.0.0.1"  # localhost by default
    assert cli.is_loopback("127.0.0.1") and cli.is_loopback("::1") and not cli.is_loopback("0.0.0.0")
    for bad in (["--port", "0"], ["--quality", "101"], ["--max-streams", "0"]):
        with pytest.raises(SystemExit):
            cli.parse_args(["--model", "x", *bad])
        assert "must be" in capsys.readouterr().err
    script = open(os.path.join(ROOT, "scripts", "demo.py")).read()
    assert "from causvid.demo.cli import main" in script and len(script.splitlines()) < 30  # thin
