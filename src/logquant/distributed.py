"""torch.distributed helpers shared by sweeps, training and the quantizers (torchrun)."""

from __future__ import annotations

import os

import torch


def init_distributed() -> tuple[int, int]:
    """(rank, world size); initializes the process group when launched by torchrun
    (gloo on CPU, nccl where CUDA exists). One process: (0, 1), nothing initialized."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def global_max(value: torch.Tensor) -> torch.Tensor:
    """``value`` reduced by max over all processes (in place), when distributed."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def gather_lists(items: list, world: int) -> list:
    """Concatenate every process's list, in rank order, on every process."""
    if world == 1:
        return items
    import torch.distributed as dist

    gathered: list[list] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()
