"""Stop requests (SIGTERM / SIGINT) that work under every launcher (docs/reliability.md, guarantee 7).

The handler only records the signal; the trainer acts on it at the next step boundary (every rank agrees,
checkpoints, exits 0). Three launch paths need more than a handler:

* ``accelerate launch`` with one process runs the script as a child and dies on SIGTERM without forwarding
  it. Under a launcher the training process therefore asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG)``)
  to send it SIGTERM when its parent dies, so it checkpoints and exits instead of training on as an orphan.
* ``torchrun`` / ``accelerate launch --multi_gpu`` forward the signal they got; with a signal to the whole
  process group a worker then sees it twice (from the terminal and from the agent).
* Hence a repeated SIGINT aborts at once (without a checkpoint) only when the process was started directly
  (an interactive second Ctrl-C); under a launcher every further signal is the same request.

A launcher is recognised by the variables it sets for its children (``LOCAL_RANK`` / ``TORCHELASTIC_RUN_ID``
for torchrun, ``ACCELERATE_USE_CPU``, always set by accelerate's single-process launcher).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

__all__ = ["StopRequest", "under_launcher", "die_with_parent"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def under_launcher(env=None) -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env or "ACCELERATE_USE_CPU" in env


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux); True if armed.

    If the parent is already gone (re-parented before the call) the signal is sent at once. ``sig=0``
    disarms it.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if sig and (parent == 1 or os.getppid() != parent):  # the launcher died before we armed the signal
        os.kill(os.getpid(), sig)
    return True


class StopRequest:
    """Installs SIGTERM / SIGINT handlers that record a stop request (``with stop.installed(): ...``)."""

    def __init__(self, *, launched: bool | None = None):
        self.signal = 0
        self.launched = under_launcher() if launched is None else launched

    def __bool__(self) -> bool:
        return bool(self.signal)

    def handle(self, signum: int = signal.SIGTERM, frame=None) -> None:
        if self.signal and signum == signal.SIGINT and not self.launched:
            raise KeyboardInterrupt  # a second Ctrl-C in a terminal: stop now, without a checkpoint
        if not self.signal:
            self.signal = int(signum)

    @contextlib.contextmanager
    def installed(self):
        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread
                pass
        armed = bool(old) and self.launched and die_with_parent(signal.SIGTERM)
        try:
            yield self
        finally:
            if armed:
                die_with_parent(0)
            for sig, handler in old.items():
                signal.signal(sig, handler)
