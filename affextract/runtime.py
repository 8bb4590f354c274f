"""Where a process runs: its rank under torchrun (`ranks`) and its torch device (`resolve_device`), as extraction,
training and seqhead resolve them; `gpu_paths` says which branch device-dependent code takes; `RankGroup`, the
process group through which the ranks of a torchrun extraction agree."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Ranks:
    """The process's place in a torchrun job (rank 0 of 1 when started alone)."""

    rank: int  # global rank, RANK
    world: int  # number of processes, WORLD_SIZE
    local: int  # rank on this machine, LOCAL_RANK: the GPU it owns


def ranks() -> Ranks:
    env = os.environ
    return Ranks(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


class RankGroup:
    """The process group when started by torchrun (WORLD_SIZE > 1), for the little that crosses ranks: barriers and
    small objects. Alone (WORLD_SIZE 1) every call is a no-op on this process's own values."""

    def __init__(self):
        r = ranks()
        self.world, self.rank = r.world, r.rank
        if self.world > 1:
            import datetime

            import torch.distributed as dist

            # gloo: only barriers and small objects cross ranks. Ranks finish their shares at different times, so the
            # timeout is long.
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def resolve_device(device: str) -> torch.device:
    """The torch device for "auto" | "cpu" | "cuda" | "cuda:N".

    "auto" is the GPU when torch sees one, else the CPU. Under torchrun each process owns the GPU of its LOCAL_RANK,
    so "auto" and "cuda" mean cuda:LOCAL_RANK there. A GPU asked for on a build or machine without one is an error
    saying what to pass instead.
    """
    import torch

    local = ranks().local
    if device == "auto":
        return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but this PyTorch build sees no CUDA GPU; use cpu")
        if d.index is None:
            d = torch.device(f"cuda:{local}")
        if d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif d.type != "cpu":
        raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    return d


# Set to 1 to run the GPU branches of device-dependent code on any device (the extraction workers inherit it).
GPU_PATHS_ENV = "AFFEXTRACT_GPU_PATHS"


def gpu_paths(device: torch.device | str) -> bool:
    """Whether code that picks its algorithm by device takes the GPU branch: on any device but the CPU, and on the CPU
    too when the environment sets AFFEXTRACT_GPU_PATHS=1, so that the GPU branches (batched warp, whole-batch face
    mesh, bfloat16 autocast, float pyramid resize, large movement batches) run, and are tested, on a CPU."""
    import torch

    return torch.device(device).type != "cpu" or os.environ.get(GPU_PATHS_ENV, "") == "1"
