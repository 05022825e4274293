"""Per-device memory plan of a training config, without its weight files (docs/memory_plan.md).

    python scripts/memory_plan.py --config configs/wan2.1_1.3b/dmd.yaml --num-processes 8 --fsdp --device-memory 80GB
    python scripts/memory_plan.py --config configs/wan2.1_1.3b/dmd.yaml --launch-config configs/accelerate/8gpu_fsdp.yaml

Options: --device-memory SIZE, --num-processes N, --fsdp / --no-fsdp, --launch-config ACCELERATE_YAML,
--plan-device cuda|cpu, then dotlist overrides. The trainers' ``--dry-run`` prints the same plan after
checking the run's files. Exit 0, or 2 with one line on bad input.
"""

import sys

from causvid.train.memory_plan import main

if __name__ == "__main__":
    sys.exit(main())
