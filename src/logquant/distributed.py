"""torch.distributed helpers shared by sweeps, training and the quantizers (torchrun).

Objects travel between processes as JSON in uint8 tensors, never pickled: a process
accepts only data, whatever a peer on the rendezvous network sends.
"""

from __future__ import annotations

import json
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


def _device():
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_json(obj) -> list:
    """``obj`` (JSON data) from every process, in rank order."""
    import torch.distributed as dist

    device, world = _device(), dist.get_world_size()
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], device=device))
    longest = max(int(size) for size in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [json.loads(part[:int(size)].cpu().numpy().tobytes())
            for part, size in zip(parts, sizes)]


def gather_lists(items: list, world: int) -> list:
    """Concatenate every process's list, in rank order, on every process."""
    if world == 1:
        return items
    return [item for part in _all_gather_json(items) for item in part]


def broadcast_object(obj, src: int = 0):
    """``obj`` (JSON data) of process ``src``, on every process."""
    if not is_distributed():
        return obj
    return _all_gather_json(obj)[src]


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()
