"""torch.distributed helpers: launch under ``torchrun`` and every rank knows its place.

Nothing here is needed for single-process use: without the torchrun environment (``WORLD_SIZE``
unset or 1) :func:`context` returns rank 0 of 1 and the collectives are no-ops.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .devices import cuda_available
from .errors import HaldStoreError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        """``cuda:local_rank`` when CUDA is available, else the CPU."""
        return torch.device("cuda", self.local_rank) if cuda_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, value: float) -> float:
        """The sum of ``value`` over all ranks."""
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only; every rank gets its result, or raises its error."""
        result = failure = None
        if self.is_main:
            try:
                result = fn()
            except HaldStoreError as e:
                failure = e
        shared, message = self.broadcast((result, None if failure is None else str(failure)))
        if failure is not None:
            raise failure
        if message is not None:
            raise HaldStoreError(f"rank 0 failed: {message}")
        return shared

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def check_same(self, settings: dict[str, Any], what: str = "settings") -> None:
        """Raise on every rank unless all ranks pass equal ``settings`` (JSON-able)."""
        if not self.active:
            return
        gathered = self.gather(json.dumps(settings, sort_keys=True, default=str))
        ref = json.loads(gathered[0])
        for rank, other in enumerate(gathered[1:], start=1):
            if other != gathered[0]:
                theirs = json.loads(other)
                diff = [f"{k}: {ref.get(k)!r} (rank 0) vs {theirs.get(k)!r} (rank {rank})"
                        for k in sorted(set(ref) | set(theirs)) if ref.get(k) != theirs.get(k)]
                raise HaldStoreError(f"ranks were launched with different {what}:\n  " + "\n  ".join(diff))


def default_threads() -> int:
    """Worker threads for this process: the cores it may use (``os.sched_getaffinity``),
    divided among the local ranks under torchrun (``LOCAL_WORLD_SIZE``), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local)


def context() -> DistContext:
    """This process's rank, joining the process group (gloo on CPU, NCCL with CUDA) when
    launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda_available() else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))
