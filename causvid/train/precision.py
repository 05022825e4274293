"""Whether bf16 mixed precision is native on this CPU, and a warning when a run asks for it where it is not.

bf16 autocast on a CPU without bf16 instructions (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``) is emulated:
measured on a 2-core AMD EPYC with only AVX2 (docs/benchmarks.md), a 64-channel Conv3d forward + backward took
26.6 s in bf16 against 0.24 s in fp32. The toy configs therefore train in fp32 on CPUs; a config that asks for
bf16 on such a CPU still gets it, with one warning naming the fix.
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("causvid.train")

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16_is_native(cpuinfo_path: str = "/proc/cpuinfo") -> Optional[bool]:
    """True / False from the CPU flags the kernel lists; None where they cannot be read (not Linux)."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return any(f in flags for f in BF16_FLAGS)


def warn_if_emulated_bf16(mixed_precision: str, device_type: str, cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Log one warning when ``mixed_precision`` is bf16 on a CPU without bf16 instructions; True when it warned."""
    if str(mixed_precision) != "bf16" or device_type != "cpu" or cpu_bf16_is_native(cpuinfo_path) is not False:
        return False
    log.warning("train.mixed_precision=bf16 on a CPU without bf16 instructions (avx512_bf16/amx_bf16): torch "
                "emulates it, often 10-100x slower than fp32; set train.mixed_precision=no on this machine")
    return True
