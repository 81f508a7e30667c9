"""Scale-out over processes started by ``torchrun``: every rank evaluates its share, results are gathered.

Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) everything runs in one process and nothing is initialised.
Results are gathered on every rank (not only rank 0), so that ranks stay in lock-step: a genetic algorithm's
next generation depends on the fitness of the whole population. Only the main rank writes files.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")


def _destroy_process_group() -> None:
    """Tear down the process group at exit (an undestroyed group warns, and can abort the process, at shutdown)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Distributed:
    """Which share of the work this process does: ``rank`` of ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str | torch.device | None = None) -> Distributed:
        """Join the process group of ``torchrun`` (NCCL on CUDA, gloo on CPU); a single process otherwise."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_initialized():
            on_cuda = torch.device(device or "cpu").type == "cuda"
            if on_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if on_cuda else "gloo")
            atexit.register(_destroy_process_group)  # the group we created is ours to tear down
        log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
        return cls(dist.get_rank(), dist.get_world_size())

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world_size``-th, starting at ``rank`` (balances cheap and costly items)."""
        return list(items[self.rank::self.world_size])

    def gather(self, local: dict) -> dict:
        """Merge the dictionaries of all ranks (keys are disjoint); every rank gets the whole result."""
        if not self.active:
            return dict(local)
        parts: list[dict | None] = [None] * self.world_size
        dist.all_gather_object(parts, local)
        merged: dict = {}
        for part in parts:
            merged.update(part or {})
        return merged

    def image_share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` images (rows): ``n // world_size`` each, one more for the first
        ``n % world_size`` ranks; in rank order the shares tile ``0..n``."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's :meth:`image_share` of ``n`` rows, concatenated in rank order: ``local [share, ...]`` ->
        ``[n, ...]`` on every rank (``all_gather`` of equal padded blocks; the tensors stay where they are: CPU
        for gloo, this rank's GPU for NCCL)."""
        if not self.active:
            return local
        size = -(-n // self.world_size)
        padded = local.new_zeros((size, *local.shape[1:]))
        padded[:len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        shares = [Distributed(rank, self.world_size).image_share(n) for rank in range(self.world_size)]
        return torch.cat([part[:share.stop - share.start] for part, share in zip(parts, shares, strict=True)])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, value: T) -> T:
        """The main rank's ``value`` on every rank (e.g. a decision only the main rank can take)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Distributed()
