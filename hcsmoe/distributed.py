"""Expert-parallel runs under torchrun: which rank reads, runs and writes which experts, and the collectives.

Every rank runs the whole decoder (attention, norms, routers, dense layers) on every calibration token, but
in each MoE layer reads and runs only its contiguous share of the experts. The routed output is assembled
per token in ascending expert order, exactly as one process adds it up, and each expert's statistics are
copied from the rank that computed them: every rank then holds the statistics one process would have,
computes the same plan, and writes the merged experts it owns. A single process is a world of size one.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from dataclasses import dataclass

import torch

from hcsmoe.errors import UserError

DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0 writes what exists once: config, index, plan, model card, dense tensors."""
        return self.rank == 0

    def shares(self, count: int) -> list[range]:
        """Contiguous, balanced ranges of `count` items (experts), one per rank in rank order."""
        bounds = [count * r // self.size for r in range(self.size + 1)]
        return [range(bounds[r], bounds[r + 1]) for r in range(self.size)]

    def share(self, count: int) -> range:
        return self.shares(count)[self.rank]

    def copy_rows(self, tensor: torch.Tensor) -> None:
        """Give every rank the rows of `tensor` (leading axis: experts) that each rank computed, in place."""
        if self.size == 1:
            return
        for rank, rows in enumerate(self.shares(tensor.shape[0])):
            self._collective(torch.distributed.broadcast, tensor[rows.start : rows.stop], src=rank)

    def copy_from(self, rank: int, tensors: list[torch.Tensor]) -> None:
        """Give every rank `rank`'s values of `tensors` (same shapes on every rank), in place."""
        if self.size > 1:
            for tensor in tensors:
                buffer = tensor.contiguous()
                self._collective(torch.distributed.broadcast, buffer, src=rank)
                if buffer is not tensor:
                    tensor.copy_(buffer)

    def sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place (used where every entry has one rank's value and zeros
        elsewhere, so the sum is that value exactly)."""
        if self.size > 1:
            self._collective(torch.distributed.all_reduce, tensor)

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        self._collective(torch.distributed.all_gather_object, values, value)
        return values

    def from_leader(self, value):
        """Rank 0's `value` on every rank."""
        return self.gather(value)[0]

    def barrier(self) -> None:
        if self.size > 1:
            self._collective(torch.distributed.barrier)

    def _collective(self, operation, *args, **kwargs):
        """Run a collective; a rank that died or hung surfaces as a one-line error on the others."""
        try:
            return operation(*args, **kwargs)
        except RuntimeError as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"rank {self.rank}: another rank of this torchrun job stopped or timed out ({reason[:160]}); "
                            "nothing was written under the requested name") from None


SINGLE = World()


def launched_ranks() -> int:
    """How many processes torchrun started for this job (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None) -> World:
    """Join the job torchrun started: gloo on CPU, nccl on CUDA, collectives that give up after `timeout_s`;
    each rank gets `threads`, by default its share of the node's cores (ranks on one node must not
    oversubscribe them). One process outside torchrun only takes `threads` when given."""
    if launched_ranks() == 1:
        if threads:
            torch.set_num_threads(threads)
        else:
            warn_if_busy(cores_here())
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (ValueError, RuntimeError) as error:
            raise UserError(f"WORLD_SIZE={launched_ranks()} but the processes could not form a job "
                            f"({str(error).splitlines()[0][:160]}); start them with torchrun") from None
    world = World(dist.get_rank(), dist.get_world_size())
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    cores = cores_here()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world.size)))
    threads = threads or max(1, cores // local)
    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # torchrun stops the others when one rank fails: clean up
    sys.stderr.write(f"hcsmoe: rank {world.rank} of {world.size} ({dist.get_backend()}), {threads} threads; {cores} "
                     f"cores on this node shared by {local} ranks\n")
    return world


def cores_here() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def warn_if_busy(cores: int, load: float | None = None) -> bool:
    """One process takes every core's worth of threads; on a machine already busy (load average above the
    cores) two such processes slow each other down several times over (measured: 7x for two runs on 2 cores),
    so say so, with the way out (HCSMOE_IGNORE_LOAD=1: never). Returns whether it warned."""
    load = os.getloadavg()[0] if load is None and hasattr(os, "getloadavg") else (load or 0.0)
    if load <= cores or os.environ.get("HCSMOE_IGNORE_LOAD") == "1":
        return False
    sys.stderr.write(f"hcsmoe: this machine is busy (load average {load:.1f} on {cores} cores) and this run takes "
                     f"{cores} threads; give it its share with --threads N (e.g. --threads "
                     f"{max(1, cores // 2)}) if other jobs keep running\n")
    return True


def _stop_on_sigterm(signum, frame):
    raise UserError("stopped by torchrun (another rank failed); nothing was written under the requested name")


def leave(world: World) -> None:
    """Leave the job's process group (nothing to do for a single process)."""
    global _left_a_job
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _left_a_job = True


_left_a_job = False


def exit_now_if_left_a_job(code: int) -> int:
    """A rank that has left its job ends here, skipping the interpreter's teardown: about one job in a hundred
    aborted there (SIGABRT, "terminate called without an active exception", no Python frame left to show)
    after its work was written (docs/scale.md). Nothing is left to do
    by then: output renamed into place, files closed, process group destroyed. Otherwise returns `code`."""
    if _left_a_job:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
