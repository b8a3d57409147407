"""Data-parallel runs: split per-prompt work across the processes of a launch, gather in order.

Under ``accelerate launch`` or ``torchrun`` (any launcher that sets ``WORLD_SIZE``), the
scorer, the locating stages, HumanEval generation and execution, and the execution-free
locality metrics each take a contiguous block of the prompts (process 0 the first block,
process 1 the next, ...), and every process then receives the results of all blocks, in
prompt order. So every process returns exactly what a single process returns (up to float
summation order), and the code that calls them does not change. Per-prompt statistics are
gathered; sums (the neuron importance) are reduced.

The process group is accelerate's (:class:`accelerate.PartialState`): NCCL on GPUs, gloo on
CPUs. In a plain single process nothing is initialised and every function here is a no-op.

Example (a single process: the whole range, and gathering returns the local part):
    >>> from mg_editing.distributed import shard_bounds, gather_list, world_size
    >>> world_size(), shard_bounds(10)
    (1, (0, 10))
    >>> gather_list(["a", "b"])
    ['a', 'b']
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch

__all__ = [
    "gather_list",
    "gather_tensor",
    "is_distributed",
    "is_main_process",
    "local_part",
    "process_device",
    "process_index",
    "process_state",
    "reduce_sum",
    "shard_bounds",
    "shutdown",
    "wait_for_everyone",
    "world_size",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether this process is one of several (a launcher set ``WORLD_SIZE`` > 1, or a process
    group is already initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state():
    """accelerate's ``PartialState``, set up the way this package needs it: on a machine without
    GPUs a multi-process launch becomes a gloo group (accelerate asks for ``cpu=True`` there).
    Initialises the process group on first use; call it before making an ``Accelerator``."""
    from accelerate import PartialState

    # Without an accelerator accelerate sets up a multi-process group only when asked for CPU.
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return PartialState(cpu=not has_accelerator)


def world_size() -> int:
    return process_state().num_processes if is_distributed() else 1


def process_index() -> int:
    return process_state().process_index if is_distributed() else 0


def is_main_process() -> bool:
    """Process 0 (the one that writes files); ``True`` in a single process."""
    return process_index() == 0


def process_device() -> torch.device:
    """The device of this process's replica in a data-parallel launch (``cuda:<local rank>`` on
    GPUs, ``cpu`` otherwise)."""
    return process_state().device


def wait_for_everyone() -> None:
    if is_distributed():
        process_state().wait_for_everyone()


def shutdown() -> None:
    """End a multi-process run cleanly: wait for every process, then destroy the process group.

    Call it once at the end of a launched script. Without it, a gloo group's threads can still
    be running when the interpreter exits, and a process may abort ("terminate called without
    an active exception") after all its work is done, failing the launch. A no-op in a single
    process or when no group was initialised.
    """
    wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard_bounds(n: int) -> tuple[int, int]:
    """``(start, stop)`` of this process's contiguous block of ``n`` items.

    The first ``n % world_size`` processes take one item more (accelerate's
    ``split_between_processes`` rule); a process may get an empty block when ``n`` is smaller
    than the number of processes.
    """
    size, rank = world_size(), process_index()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def local_part(items: Sequence[T]) -> Sequence[T]:
    """This process's block of ``items`` (all of them in a single process)."""
    start, stop = shard_bounds(len(items))
    return items[start:stop]


def gather_list(local: list[T]) -> list[T]:
    """Concatenate every process's ``local`` list in process order (so, for blocks taken with
    :func:`local_part`, in the original item order). Items must be picklable; tensors are
    moved to the CPU first."""
    if not is_distributed():
        return list(local)
    local = [x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in local]
    return [x for part in _all_gather_objects(local) for x in part]


def _all_gather_objects(obj) -> list:
    """``torch.distributed.all_gather_object`` over accelerate's process group."""
    out = [None] * process_state().num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_tensor(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``local`` tensor along dim 0, in process order (on the CPU).

    Blocks may differ in length, including empty ones.
    """
    if not is_distributed():
        return local
    parts = _all_gather_objects(local.detach().cpu())
    return torch.cat(parts)


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes (a new CPU tensor)."""
    if not is_distributed():
        return tensor
    # NCCL reduces only device tensors; gloo CPU ones. accelerate's state knows which.
    total = tensor.detach().to(process_state().device, copy=True)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total.cpu()
