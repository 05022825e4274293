#!/usr/bin/env python
"""CausVid Table 4 and Figure 8 on the toy world (see causvid/ablation.py).

    python scripts/reproduce_ablation.py --preset default --seeds 3
"""

import sys

from causvid.ablation import main

if __name__ == "__main__":
    sys.exit(main())
