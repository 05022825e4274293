"""A live streaming demo in the browser (``scripts/demo.py``, ``docs/demo.md``): type a prompt, watch the video
play as each chunk is decoded, change the prompt mid-stream (keeping or re-caching the KV cache).

Modules: :mod:`.settings` (limits and the checked settings of a stream), :mod:`.frames` (JPEG / PNG frames on the
wire, the mp4 of what a tab played), :mod:`.streams` (one model, one stream and KV cache per tab, a worker thread
off the event loop), :mod:`.app` (the FastAPI app: page, WebSocket, figures, download), :mod:`.cli` (the command
line). ``static/`` holds the page (HTML, JavaScript, CSS).

Needs the ``demo`` extra (FastAPI, uvicorn, websockets): ``pip install -e ".[demo]"``.
"""
