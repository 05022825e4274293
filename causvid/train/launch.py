"""``python -m causvid.train.launch [accelerate launch options] script.py [args]``: ``accelerate launch`` whose
own exit status is 0 after a SIGTERM / SIGINT that ended in a checkpoint (docs/reliability.md, guarantee 7).

A signal to a bare ``accelerate launch`` always ends the launcher itself with a failure status (killed by
SIGTERM with one process; a ``SignalException`` traceback and status 1 from torchrun's agent with several),
although the training processes checkpoint and exit 0. This wrapper runs the launcher in its own session
and, on SIGTERM / SIGINT, passes SIGTERM to the launcher's children (the training processes) only: they
agree on a step, checkpoint and exit 0, so the launcher (and this wrapper) exits 0 as well. Every other
outcome is the launcher's own exit status. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Optional, Sequence

from .preemption import die_with_parent

__all__ = ["children_of", "main"]


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from ``/proc/<id>/stat``)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    # own session: a terminal's Ctrl-C / a group signal reaches only this wrapper; the launcher still dies with it
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *args], start_new_session=True,
                            preexec_fn=die_with_parent)
    requested, told = [False], set()

    def forward(signum=None, frame=None) -> None:
        requested[0] = True
        for child in children_of(proc.pid):
            if child not in told:  # each training process once (it may not have been started yet)
                told.add(child)
                try:
                    os.kill(child, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if requested[0]:
                forward()


if __name__ == "__main__":
    sys.exit(main())
