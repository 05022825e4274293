#!/usr/bin/env python
"""Package a finished run as a shipped pretrained toy model (pretrained/toy/<model>/ + provenance.json).

    python scripts/package_pretrained.py vae --run runs/toy/vae --command "python scripts/train_vae.py ..." --commit SHA

See causvid/pretrained_cli.py for what each model records and docs/pretrained.md for the shipped models.
"""

import sys

from causvid.pretrained_cli import main

if __name__ == "__main__":
    sys.exit(main())
