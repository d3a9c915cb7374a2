"""Processes and threads: torchrun's DistributedDataParallel, and CPU thread counts.

    torchrun --standalone --nproc_per_node=N -m restorenet.train ...

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` then
joins the process group -- NCCL when training on CUDA (each process on GPU
``LOCAL_RANK``), Gloo on CPU. Without torchrun (or with one process) nothing is
initialised and the trainer runs as before.

Threads. PyTorch's default is one thread per *logical CPU of the machine*,
which on a shared or containerised machine oversubscribes the cores it may
really use. :func:`default_threads` is the CPUs this process may run on
(``os.sched_getaffinity``), capped by the cgroup's CPU quota
(``/sys/fs/cgroup/cpu.max``) where one is set, divided among the processes
torchrun starts on this machine (``LOCAL_WORLD_SIZE``), at least 1: a function
of the machine, not of its momentary load, so two runs of one command use the
same thread count (bitwise resume needs that). On a machine busy with other
jobs an intra-op thread that is descheduled stalls its siblings at every OpenMP
barrier; pass ``--threads 1`` there (the README's timings).
"""
from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["DistContext", "setup", "teardown", "default_threads", "available_cpus",
           "spawn_local", "free_port"]


def _cgroup_cpu_limit(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """CPUs allowed by a cgroup v2 quota (``"quota period"``), None when unlimited."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(cpus, math.ceil(limit)) if limit else cpus)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def default_threads() -> int:
    """:func:`available_cpus` shared by the processes torchrun runs on this machine."""
    return max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank among ``world_size`` processes, its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() joined the group, so teardown() leaves it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, logs, plots and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over all processes (itself when alone)."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def gather(self, obj) -> list:
        """Every process's ``obj`` (a picklable value), in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def setup(device: str = "cpu") -> DistContext:
    """The process group torchrun asked for (if any) and this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world_size <= 1:
        return DistContext(device=dev)
    if dist.is_initialized():  # a caller already set it up
        return DistContext(dist.get_rank(), dist.get_world_size(), dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, owns_group=True)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on (now)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world_size: int, port: int, fn, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    fn(**kwargs)


def spawn_local(fn, world_size: int, *, start_method: str = "spawn", **kwargs) -> None:
    """Run ``fn(**kwargs)`` in ``world_size`` new processes on this machine with the
    environment torchrun gives them (loopback rendezvous on a free port), and wait.

    ``fn`` must be importable by name (spawned processes import it afresh), e.g.
    ``spawn_local(restorenet.train.train, 2, model="hyperres", ...)``; a failing
    process raises here. torchrun does the same from the command line.

    ``start_method="fork"`` starts the processes as copies of this one, which skips
    importing torch again (seconds per process) -- safe only while this process runs
    one intra-op thread (OpenMP's thread pool does not survive a fork) and has not
    touched CUDA."""
    import torch.multiprocessing as mp

    mp.start_processes(_spawned, args=(world_size, free_port(), fn, kwargs), nprocs=world_size,
                       join=True, start_method=start_method)
