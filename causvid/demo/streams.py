"""The stream manager: one loaded model, one stream (and KV cache) per browser tab, generated off the event loop.

One worker thread runs every model call (the networks are shared, so no two calls overlap; on a GPU that is the
usual serving pattern, on a CPU the cores go to one chunk at a time). It serves the streams chunk by chunk, the one
served least recently first, and only those whose tab has less than ``lead_seconds`` plus one chunk of frames
waiting to be played: a stream faster than real time waits for its viewer instead of filling memory. Everything it
sends goes through the tab's :class:`Outbox` (thread-safe, onto the asyncio loop of the web server).

A tab's session keeps the frames it was sent (as encoded images, for the mp4 download) and at most one stream. A
stream that is stopped, fails, or whose tab disconnects is closed by the worker: its generator is closed and its
sampler view (with the KV cache) dropped, so the memory is freed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

from causvid.demo.frames import FORMATS, encode_frame
from causvid.demo.settings import (
    Limits,
    SettingsError,
    StreamSettings,
    check_bool,
    check_int,
    check_prompt,
    parse_start,
    step_subset,
)
from causvid.sampler.live import LivePrompt

log = logging.getLogger("causvid.demo")


class Busy(RuntimeError):
    """Every stream slot is taken."""


@dataclass
class Outbox:
    """Messages for one connection: JSON text (dicts) and binary frames, posted from any thread."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def post(self, item: Any) -> None:
        payload = json.dumps(item) if isinstance(item, dict) else item
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, payload)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


@dataclass(eq=False)
class Stream:
    """One running stream: settings, live prompt, sampler view (its KV cache) and its counters."""

    id: int
    session: "Session"
    settings: StreamSettings
    live: LivePrompt
    view: Any  # a CausalSampler view (own caches) until the stream is closed
    requested_at: float  # time.perf_counter() of the start request
    ahead_frames: int  # generate only while fewer frames than this wait in the tab
    gen: Any = None
    sent: int = 0  # frames sent
    played: int = 0  # frames the tab reports as played
    chunks: int = 0
    compute_s: float = 0.0
    first_chunk_ms: Optional[float] = None
    last_served: float = 0.0
    switches_sent: int = 1  # live.switches[0] is the start prompt
    stopping: bool = False
    reason: str = ""

    def wants_chunk(self) -> bool:
        return not self.stopping and self.sent - self.played < self.ahead_frames


@dataclass(eq=False)
class Session:
    """One browser tab (one WebSocket): its outbox, its stream, and the frames it was sent."""

    token: str
    outbox: Outbox
    stream: Optional[Stream] = None
    frames: list = field(default_factory=list)  # encoded frames of the latest stream, as sent
    frames_dropped: int = 0  # frames recorded then dropped past the record limit (from the start)
    closed: bool = False

    def post(self, item: Any) -> None:
        if not self.closed:
            self.outbox.post(item)


class StreamManager:
    """Sessions, streams and the worker thread over one :class:`~causvid.sampler.CausalSampler`."""

    def __init__(self, sampler, limits: Limits = Limits(), *, frame_format: str = "jpeg", quality: int = 90,
                 model_name: str = ""):
        if frame_format not in FORMATS:
            raise ValueError(f"unknown frame format {frame_format!r}; valid: {sorted(FORMATS)}")
        self.sampler = sampler
        self.limits = limits
        self.frame_format, self.quality = frame_format, int(quality)
        self.model_name = model_name
        self.defaults = StreamSettings(prompt="", seed=0, steps=len(sampler.steps),
                                       window=min(max(sampler.window_chunks, 1) if sampler.window_chunks else 6,
                                                  limits.max_window),
                                       sink=min(sampler.sink_chunks, limits.max_sink), recache=False)
        self.sessions: dict[str, Session] = {}
        self._streams: list[Stream] = []  # open streams (closing ones included until the worker closed them)
        self._caches = weakref.WeakSet()  # every KV cache a stream used: empty once all are freed
        self._cond = threading.Condition()
        self._next_id = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="causvid-demo-worker", daemon=True)
        self._thread.start()

    # -- what the page is told ---------------------------------------------------------------------------------

    @property
    def chunk_frames(self) -> int:
        """Pixel frames per chunk after the first (4 k)."""
        return self.sampler.temporal_factor * self.sampler.layout.chunk_size

    def info(self) -> dict:
        s = self.sampler
        return {"model": self.model_name, "fps": s.fps, "width": s.width, "height": s.height,
                "chunk_frames": self.chunk_frames, "format": FORMATS[self.frame_format],
                "steps": s.steps, "max_steps": len(s.steps), "defaults": self.defaults.to_dict(),
                "limits": {"max_streams": self.limits.max_streams, "max_prompt_chars": self.limits.max_prompt_chars,
                           "max_window": self.limits.max_window, "max_sink": self.limits.max_sink,
                           "max_seed": self.limits.max_seed}}

    def stats(self) -> dict:
        """Server-wide figures (``/api/stats``); ``caches_alive`` counts KV caches not yet freed."""
        gc.collect()
        with self._cond:
            streams, caches = list(self._streams), list(self._caches)
        return {"sessions": len(self.sessions), "streams": len(streams),
                "caches_alive": len(caches), "kv_cache_bytes": sum(c.num_bytes for c in caches),
                "streams_detail": [{"id": st.id, "sent": st.sent, "played": st.played, "chunks": st.chunks,
                                    "gen_fps": st.sent / st.compute_s if st.compute_s else None,
                                    "first_chunk_ms": st.first_chunk_ms} for st in streams]}

    # -- sessions (called on the event loop) --------------------------------------------------------------------

    def open_session(self, outbox: Outbox) -> Session:
        session = Session(secrets.token_urlsafe(16), outbox)
        self.sessions[session.token] = session
        session.post({"type": "hello", "session": session.token, **self.info()})
        return session

    def close_session(self, session: Session) -> None:
        """The tab went away: stop its stream (the worker frees the cache) and forget its frames."""
        session.closed = True
        self.sessions.pop(session.token, None)
        if session.stream is not None:
            self.stop(session.stream, "disconnected")
        session.frames = []

    def handle(self, session: Session, text: str) -> None:
        """One message from a tab. Never raises: a bad message is answered with an ``error`` message."""
        try:
            try:
                msg = json.loads(text)
            except (TypeError, ValueError):
                raise SettingsError("messages must be JSON objects, e.g. {\"type\": \"start\", \"prompt\": ...}") from None
            if not isinstance(msg, dict):
                raise SettingsError("messages must be JSON objects, e.g. {\"type\": \"start\", \"prompt\": ...}")
            kind = msg.get("type")
            if kind == "start":
                self.start(session, msg)
            elif kind == "prompt":
                self.switch(session, msg)
            elif kind == "stop":
                if session.stream is not None:
                    self.stop(session.stream, "stopped")
            elif kind == "played":
                st = session.stream
                if st is not None:
                    n = check_int("played", msg.get("frames"), 0, 2**53)
                    st.played = max(st.played, min(n, st.sent))
                    with self._cond:
                        self._cond.notify_all()
            else:
                raise SettingsError(f"unknown message type {kind!r}; valid: start, prompt, stop, played")
        except SettingsError as e:
            session.post({"type": "error", "message": str(e)})
        except Busy as e:
            session.post({"type": "busy", "message": str(e)})
        except Exception as e:  # noqa: BLE001 -- a bug must not take the server down: report it and go on
            log.exception("demo: message failed")
            session.post({"type": "error", "message": f"internal error: {type(e).__name__}: {e}"})

    def start(self, session: Session, msg: dict) -> Stream:
        settings = parse_start(msg, self.limits, len(self.sampler.steps), self.defaults)
        with self._cond:
            if session.stream is not None:  # a new start replaces the tab's stream (its slot is freed with it)
                self._stop_locked(session.stream, "restarted")
            # streams being closed (their chunk in flight is dropped) no longer count
            busy = [st for st in self._streams if st.session is not session and not st.stopping]
            if len(busy) >= self.limits.max_streams:
                raise Busy(f"busy: {len(busy)} stream(s) are running, the limit of this server "
                           f"(--max-streams {self.limits.max_streams}); try again when one stops")
            view = self.sampler.with_options(steps=step_subset(self.sampler.steps, settings.steps),
                                             window_chunks=settings.window, sink_chunks=settings.sink)
            fps = self.sampler.fps
            ahead = self.chunk_frames + math.ceil(self.limits.lead_seconds * fps)
            self._next_id += 1
            st = Stream(self._next_id, session, settings, LivePrompt(settings.prompt), view,
                        time.perf_counter(), ahead)
            session.stream, session.frames, session.frames_dropped = st, [], 0
            self._streams.append(st)
            self._cond.notify_all()
        session.post({"type": "started", "stream": st.id, "settings": settings.to_dict(),
                      "steps": view.steps})
        return st

    def switch(self, session: Session, msg: dict) -> None:
        st = session.stream
        if st is None or st.stopping:
            raise SettingsError("no stream is running: start one first")
        prompt = check_prompt(msg.get("prompt"), self.limits)
        recache = check_bool("recache", msg.get("recache", st.settings.recache))
        st.live.set(prompt, recache)
        session.post({"type": "queued", "prompt": prompt, "recache": recache})

    def stop(self, st: Stream, reason: str) -> None:
        with self._cond:
            self._stop_locked(st, reason)

    def _stop_locked(self, st: Stream, reason: str) -> None:
        if not st.stopping:
            st.stopping, st.reason = True, reason
            self._cond.notify_all()

    def recording(self, token: str) -> tuple[list, float]:
        """The encoded frames sent to the tab ``token`` (latest stream) and the frame rate."""
        session = self.sessions.get(token)
        if session is None:
            raise KeyError(token)
        return list(session.frames), self.sampler.fps

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for st in self._streams:
                self._stop_locked(st, "server shutting down")
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # -- the worker thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    closing = [st for st in self._streams if st.stopping]
                    ready = [st for st in self._streams if st.wants_chunk()]
                    if closing or ready or self._closed:
                        break
                    self._cond.wait(0.25)
            for st in closing:
                self._close(st)
            if self._closed and not ready:
                with self._cond:
                    if not self._streams:
                        return
                continue
            if ready:
                st = min(ready, key=lambda s: s.last_served)
                st.last_served = time.perf_counter()
                try:
                    self._step(st)
                except StopIteration:
                    self.stop(st, "finished")
                except Exception as e:  # noqa: BLE001 -- report to the tab, keep serving the others
                    log.exception("demo: stream %d failed", st.id)
                    st.session.post({"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
                    self.stop(st, "failed")

    def _step(self, st: Stream) -> None:
        t0 = time.perf_counter()
        if st.gen is None:
            st.gen = st.view.stream(st.live, num_chunks=-1, seed=st.settings.seed)
        frames = next(st.gen)  # uint8 [t, H, W, 3]: one chunk, decoded
        with self._cond:
            for c in st.view.kv_caches:
                self._caches.add(c)
        blobs = [encode_frame(f, self.frame_format, self.quality) for f in frames]
        dt = time.perf_counter() - t0
        with self._cond:  # start() (event loop) swaps the tab's stream and frames under the same lock
            if not st.stopping:  # a stream stopped while this chunk was computed sends nothing more
                self._deliver(st, blobs, dt)

    def _deliver(self, st: Stream, blobs: list, dt: float) -> None:
        st.compute_s += dt
        if st.first_chunk_ms is None:
            st.first_chunk_ms = (time.perf_counter() - st.requested_at) * 1000
        new = st.live.switches[st.switches_sent:]
        st.switches_sent += len(new)
        msg = {"type": "chunk", "stream": st.id, "chunk": st.chunks, "first_frame": st.sent, "frames": len(blobs),
               "compute_ms": dt * 1000, "gen_fps": (st.sent + len(blobs)) / st.compute_s,
               "first_chunk_ms": st.first_chunk_ms,
               "kv_cache_bytes": sum(c.num_bytes for c in st.view.kv_caches),
               "switches": [{"chunk": w.chunk, "frame": st.sent, "prompt": w.prompt, "recache": w.recache}
                            for w in new]}
        session = st.session
        session.post(msg)
        for b in blobs:
            session.post(b)
        st.sent += len(blobs)
        st.chunks += 1
        session.frames.extend(blobs)
        cap = max(1, int(self.limits.record_seconds * self.sampler.fps))
        if len(session.frames) > cap:  # keep the first frames (what "download" replays from the start)
            session.frames_dropped += len(session.frames) - cap
            del session.frames[cap:]
        if st.sent >= self.limits.max_stream_seconds * self.sampler.fps:
            self._stop_locked(st, f"length limit: {self.limits.max_stream_seconds:g} s of video per stream "
                                  "(--max-seconds)")

    def _close(self, st: Stream) -> None:
        if st.gen is not None:
            st.gen.close()  # runs the sampler's finally: the cache is no longer in use
        st.gen = st.view = None
        with self._cond:
            if st in self._streams:
                self._streams.remove(st)
        if st.session.stream is st:
            st.session.stream = None
        st.session.post({"type": "stopped", "stream": st.id, "reason": st.reason, "frames": st.sent})
