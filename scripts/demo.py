"""A live streaming demo in the browser over one loaded model: a thin CLI over :mod:`causvid.demo`.

    python scripts/demo.py --model runs/quickstart-fast/dmd/final        # then open http://127.0.0.1:7860

Every option: ``python scripts/demo.py -h`` (library code: causvid/demo/cli.py) and docs/demo.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from causvid.demo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
