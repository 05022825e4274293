#!/usr/bin/env python
"""Export a trained DiT for other tools: the official Wan layout, a diffusers ``transformer/`` folder or a LoRA, with a model card.

    python scripts/export.py runs/toy/dmd --format diffusers --out exports/toy-dmd-diffusers
    python scripts/export.py runs/toy/dmd/final --format wan --out exports/toy-dmd-wan

Library code: causvid/export.py; formats and usage in ComfyUI / diffusers: docs/export.md.
"""

import sys

from causvid.export import main

if __name__ == "__main__":
    sys.exit(main())
