"""Helpers for running under torchrun (DistributedDataParallel): which rank this process is, how
many there are, and running a step on rank 0 alone with its outcome shared. Without a process
group (one process) rank is 0 and the world is 1, so every caller works unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    """How many processes train together (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def run_on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and return its result there (None on the other ranks). With
    several processes every rank then raises the exception ``fn`` raised, so no rank is left
    waiting in a collective operation for a rank that failed."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as caught:  # noqa: BLE001 - handed to every rank, then raised
            error = caught
    if world() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return result


def all_agree(flag: bool) -> bool:
    """Whether ``flag`` is True on every rank (with one process: ``flag``). Every rank must call
    it: a choice that takes a collective path on some ranks only would leave the others waiting."""
    if world() == 1:
        return bool(flag)
    gathered: list[Any] = [None] * world()
    dist.all_gather_object(gathered, bool(flag))
    return all(gathered)
