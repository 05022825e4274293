import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is many times faster than two on a shared, loaded 2-core CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Copies of ../shared/reference/*.tsv (every tensor name and shape of the official checkpoints).
REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")


def read_reference_tsv(name: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from tests/reference/<name>."""
    path = os.path.join(REFERENCE_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or line.startswith("name\t") or not line.strip():
                continue
            k, shape = line.rstrip("\n").split("\t")[:2]
            out[k] = tuple(int(s) for s in shape.split("x")) if shape else ()
    return out


@pytest.fixture
def reference_tsv():
    return read_reference_tsv
