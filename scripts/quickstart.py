#!/usr/bin/env python
"""The whole method on the built-in toy world, end to end (see causvid/quickstart.py).

    python scripts/quickstart.py --fast      # 5-14 minutes on a 2-core CPU: the chain, barely trained
    python scripts/quickstart.py             # the default preset (better numbers, <= 30 minutes)
"""

import sys

from causvid.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
