#!/usr/bin/env python
"""CausVid speed benchmarks: causal student vs bidirectional teacher, KV cache vs recomputation,
batching, FPS vs steps and the DMD training step with its MFU (docs/benchmarks.md).

    python scripts/benchmark.py --size toy                          # CPU, toy sizes
    python scripts/benchmark.py --size wan2.1-1.3b --compile        # one H100: bf16, FlexAttention, CUDA events
    python scripts/benchmark.py --size tiny --quick --out-dir /tmp/b   # CI smoke run

Writes ``<out-dir>/benchmark.json`` and ``<out-dir>/benchmark.md`` (and PNG plots); see
``causvid.benchmark`` for the timing protocol and the FLOP model.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from causvid.benchmark import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
