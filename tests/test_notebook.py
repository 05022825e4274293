"""examples/streaming.ipynb runs headless (nbclient) with a tiny model and shows a video inline."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "streaming.ipynb")


def test_streaming_notebook_executes(monkeypatch):
    monkeypatch.setenv("CAUSVID_MODEL", "")  # force the tiny model: fast and independent of trained runs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(ROOT, "examples")}})
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs if "data" in o)
    assert "chunk 5:" in text and "stream == generate: True" in text
    assert "data:video/mp4;base64," in html  # the inline player
    assert "data:image/gif;base64," in html  # image-to-video shown as a gif
