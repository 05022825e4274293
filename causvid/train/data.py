"""Deterministic, resumable data order for the trainer (DESIGN.md section 6, "exact RNG/data state").

The order depends only on ``(seed, epoch)``: epoch ``e`` visits ``randperm(len(dataset))`` drawn from a
generator seeded by ``(seed, e)``. The *global* cursor ``(epoch, position)`` counts positions of that
permutation consumed by all ranks together; one micro-batch consumes a window of
``world_size * batch_size`` positions and rank ``r`` takes positions ``r::world_size`` of the window.
A window that would run past the end of the permutation is dropped (every rank always gets a full
batch) and the next epoch starts. The cursor is saved in checkpoints, so a resumed run continues
exactly where it stopped (also with a different number of processes, from the same global position).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["epoch_permutation", "ResumableSampler", "ResumableLoader", "collate", "mix_seed"]


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python versions)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of epoch ``epoch``: a permutation of ``range(n)`` (int64 [n])."""
    g = torch.Generator().manual_seed(mix_seed("data-order", seed, epoch))
    return torch.randperm(n, generator=g)


class ResumableSampler:
    """Yields this rank's index lists, one per micro-batch, from a global ``(epoch, position)`` cursor."""

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.global_batch = batch_size * world_size
        if num_items < self.global_batch:
            raise ValueError(
                f"data set has {num_items} items, fewer than one global batch "
                f"(train.batch_size={batch_size} x {world_size} processes = {self.global_batch})"
            )
        self.num_items, self.batch_size, self.seed, self.rank, self.world_size = num_items, batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._perm: Optional[torch.Tensor] = None
        self._perm_epoch = -1

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.num_items, self.seed, self.epoch), self.epoch
        return self._perm

    def next_indices(self) -> list[int]:
        """This rank's indices for the next micro-batch; advances the global cursor by one window."""
        if self.position + self.global_batch > self.num_items:  # drop the ragged tail of the epoch
            self.epoch, self.position = self.epoch + 1, 0
        window = self._permutation()[self.position : self.position + self.global_batch]  # [world * batch]
        self.position += self.global_batch
        return window[self.rank :: self.world_size].tolist()  # [batch]: positions r, r + world, ...

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def copy(self) -> "ResumableSampler":
        other = ResumableSampler(self.num_items, self.batch_size, seed=self.seed, rank=self.rank, world_size=self.world_size)
        other.load_state_dict(self.state_dict())
        return other


def collate(items: list[Any]) -> Any:
    """``default_collate``, except that dict entries it cannot stack (ragged lists, mixed types) stay lists."""
    if items and isinstance(items[0], dict):
        out = {}
        for key in items[0]:
            values = [it[key] for it in items]
            try:
                out[key] = default_collate(values)
            except (TypeError, RuntimeError):
                out[key] = values
        return out
    return default_collate(items)


class ResumableLoader:
    """Batches of a map-style data set in the order of a :class:`ResumableSampler`.

    ``num_workers == 0`` reads items in this process. With workers, a ``DataLoader`` prefetches along a
    *copy* of the sampler while the saved cursor advances only with batches actually returned (the
    ``DataLoader`` yields batches in order), so the order is identical to the single-process one.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, *, num_workers: int = 0,
                 collate_fn: Callable[[list[Any]], Any] = collate):
        self.dataset, self.sampler, self.num_workers, self.collate_fn = dataset, sampler, num_workers, collate_fn
        self._iter: Optional[Iterator] = None

    def _worker_iter(self) -> Iterator:
        loader = DataLoader(self.dataset, batch_sampler=self.sampler.copy(), num_workers=self.num_workers,
                            collate_fn=self.collate_fn)
        return iter(loader)

    def next(self) -> Any:
        """The next micro-batch for this rank."""
        if self.num_workers <= 0:
            return self.collate_fn([self.dataset[i] for i in self.sampler.next_indices()])
        if self._iter is None:
            self._iter = self._worker_iter()
        batch = next(self._iter)
        self.sampler.next_indices()  # the consumed cursor follows the batches handed out
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
        self._iter = None  # workers restart from the restored cursor
