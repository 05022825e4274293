"""A prompt that changes while a stream runs: interactive prompt switching (``docs/sampling.md``, ``docs/demo.md``).

``CausalSampler.stream(live, num_chunks=-1)`` reads a :class:`LivePrompt` before every chunk: a prompt set since
the previous chunk (from any thread) takes effect at the next chunk generated, exactly as the same switch written
in a schedule ``{chunk: prompt}`` would, with re-caching chosen per switch. ``switches`` records where each one
took effect, so a caller can say which frames follow which prompt.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PromptSwitch:
    """A prompt change: the text, whether the resident KV cache is re-computed under it, and (once the stream
    applied it) the chunk it took effect at."""

    prompt: str
    recache: bool = False
    chunk: Optional[int] = None


class LivePrompt:
    """One sample's prompt, changeable while :meth:`CausalSampler.stream` runs (thread-safe).

    ``set(prompt, recache)`` queues a change; the stream takes the latest queued change before each chunk (changes
    set between two chunks collapse into the last one). ``switches``: the changes applied so far, chunk 0 first.
    """

    def __init__(self, prompt: str):
        self._lock = threading.Lock()
        self._pending: Optional[PromptSwitch] = None
        self.prompt = ""  # the latest prompt set (applied or not)
        self.switches: list[PromptSwitch] = []
        self.set(prompt)

    def set(self, prompt: str, recache: bool = False) -> None:
        """Switch to ``prompt`` at the next chunk; ``recache``: re-run the cached chunks' refresh passes under it."""
        if not isinstance(prompt, str):
            raise ValueError(f"invalid prompt {prompt!r}: a prompt must be a string")
        with self._lock:
            self._pending = PromptSwitch(prompt, bool(recache))
            self.prompt = prompt

    def take(self, chunk: int) -> Optional[PromptSwitch]:
        """The change to apply at ``chunk`` (None: keep the current prompt); recorded in ``switches``."""
        with self._lock:
            p, self._pending = self._pending, None
        if p is None:
            return None
        p = PromptSwitch(p.prompt, p.recache, int(chunk))
        self.switches.append(p)
        return p
