"""Data-parallel runs under `torchrun` or `accelerate launch`: which share of the work is this process's, and the
collectives that combine the shares.

Nothing here starts processes; a launcher does (`torchrun --nproc_per_node N ...`, `accelerate launch --multi_gpu
--num_processes N ...`). When one did (`WORLD_SIZE` > 1 in the environment, or a process group already set up by the
caller), `data_parallel()` joins its process group through accelerate's `PartialState` (gloo on CPUs, NCCL on GPUs);
otherwise it returns None and everything runs in one process, through the same code.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

# How long a collective waits for the other ranks. It covers the imbalance between ranks at the end of a statistics
# pass (each rank's shards are interleaved, so they finish within a few batches of each other); a rank that died
# under torchrun or accelerate is reported by the launcher long before that, which stops the others.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


class DistributedError(RuntimeError):
    """A collective failed: another rank died, timed out, or disagrees about the work."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run: `rank` of `world_size` processes, computing on `device`."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes and pushes what the run produced."""
        return self.rank == 0

    def shard(self, count: int) -> range:
        """The units (of `0..count-1`) this rank processes: every `world_size`-th from `rank`, so the ranks' shards
        are disjoint and together cover every unit, and long and short units are spread over all ranks."""
        return range(self.rank, count, self.world_size)

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """The elementwise sum of `tensor` over all ranks (a new tensor on `tensor`'s device, same dtype); `what`
        names it in the error raised when the collective fails."""
        buffer = tensor.to(self._collective_device(), copy=True)
        self._collective(lambda: dist.all_reduce(buffer, op=dist.ReduceOp.SUM), what)
        return buffer.to(tensor.device)

    def agree(self, value: int, what: str) -> None:
        """Raise `DistributedError` unless every rank passes the same `value` (e.g. a token count)."""
        extremes = torch.tensor([value, -value], dtype=torch.int64, device=self._collective_device())
        self._collective(lambda: dist.all_reduce(extremes, op=dist.ReduceOp.MAX), what)
        if int(extremes[0]) != -int(extremes[1]):
            raise DistributedError(f"rank {self.rank}: the ranks disagree about {what} (this rank: {value}, others "
                                   f"between {-int(extremes[1])} and {int(extremes[0])}); every rank must read the "
                                   "same model, corpus and settings.")

    def minimum(self, value: int, what: str) -> int:
        """The smallest `value` any rank passes (e.g. a batch size each rank derived from its own free memory)."""
        negated = torch.tensor([-value], dtype=torch.int64, device=self._collective_device())
        self._collective(lambda: dist.all_reduce(negated, op=dist.ReduceOp.MAX), what)
        return -int(negated[0])

    def any(self, flag: bool, what: str) -> bool:
        """Whether `flag` is true on at least one rank."""
        found = torch.tensor([int(flag)], dtype=torch.int64, device=self._collective_device())
        self._collective(lambda: dist.all_reduce(found, op=dist.ReduceOp.MAX), what)
        return bool(found[0])

    def barrier(self, what: str) -> None:
        """Wait until every rank got here."""
        self._collective(dist.barrier, what)

    def _collective_device(self) -> torch.device:
        # NCCL reduces GPU tensors only; gloo takes CPU tensors.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _collective(self, run: Callable[[], object], what: str) -> None:
        try:
            run()
        except RuntimeError as error:  # gloo and NCCL errors, timeouts included
            raise DistributedError(f"rank {self.rank} of {self.world_size}: {what} failed ({type(error).__name__}: "
                                   f"{str(error).splitlines()[0] if str(error) else ''}); another rank died or "
                                   "timed out. Nothing was written.") from error


def data_parallel() -> DataParallel | None:
    """The data-parallel run this process belongs to, or None when it runs alone.

    Joins the launcher's process group on first use (accelerate's `PartialState`, `COLLECTIVE_TIMEOUT`), or uses one
    the caller set up already; a world of one process is no data-parallel run.
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        from accelerate import PartialState  # imported here: it reads the launcher's environment at import

        PartialState(cpu=not torch.cuda.is_available(), timeout=COLLECTIVE_TIMEOUT)
    world_size = dist.get_world_size()
    if world_size <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DataParallel(dist.get_rank(), world_size, device)


def default_device() -> str:
    """The device a model is loaded on when none is named: this rank's GPU in a data-parallel run, else `cuda`
    when there is one, else `cpu`."""
    if not torch.cuda.is_available():
        return "cpu"
    parallel = data_parallel()
    return str(parallel.device) if parallel is not None else "cuda"


def end_data_parallel() -> None:
    """Leave the process group (at the end of a command), so the process exits without the backend's warnings."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
