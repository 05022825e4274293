"""The web app (FastAPI): the page, a WebSocket per tab, server figures and the mp4 of what a tab played.

Routes: ``/`` the page (``static/index.html``), ``/static/*`` its script and style, ``/ws`` the stream protocol
(``docs/demo.md``), ``/api/info`` the model and limits, ``/api/stats`` sessions / streams / live KV caches,
``/api/video?session=TOKEN&frames=N`` the first N frames a tab was sent (= played) as an mp4.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from fastapi import FastAPI, HTTPException, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from causvid.demo.frames import mp4_bytes
from causvid.demo.streams import Outbox, StreamManager

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


async def _send_loop(ws: WebSocket, queue: asyncio.Queue) -> None:
    """Forward a tab's outbox to its socket, in order (text: JSON messages, bytes: frames)."""
    while True:
        item = await queue.get()
        if isinstance(item, str):
            await ws.send_text(item)
        else:
            await ws.send_bytes(item)


def create_app(manager: StreamManager) -> FastAPI:
    """The app over a started :class:`StreamManager` (closed with the app)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(manager.close)

    app = FastAPI(title="causvid live demo", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.manager = manager

    @app.get("/")
    def index():
        return FileResponse(os.path.join(STATIC, "index.html"), headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    def info():
        return manager.info()

    @app.get("/api/stats")
    def stats():
        return manager.stats()

    @app.get("/api/video")
    def video(session: str = Query(...), frames: int = Query(..., ge=1)):
        # a plain def: FastAPI runs it in its thread pool, off the event loop
        try:
            blobs, fps = manager.recording(session)
        except KeyError:
            raise HTTPException(404, "no such session (the tab was closed?)") from None
        if not blobs:
            raise HTTPException(404, "nothing was played yet")
        data = mp4_bytes(blobs[:frames], fps)
        return Response(data, media_type="video/mp4",
                        headers={"Content-Disposition": 'attachment; filename="causvid-demo.mp4"'})

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket):
        await ws.accept()
        queue: asyncio.Queue = asyncio.Queue()
        session = manager.open_session(Outbox(asyncio.get_running_loop(), queue))
        sender = asyncio.create_task(_send_loop(ws, queue))
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                text = msg.get("text")
                if text is None:
                    session.post({"type": "error", "message": "send JSON text messages, not binary data"})
                    continue
                manager.handle(session, text)
        except WebSocketDisconnect:
            pass
        finally:
            manager.close_session(session)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    return app
