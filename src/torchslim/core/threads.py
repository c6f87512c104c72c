"""How many threads each process computes with: the machine's cores shared among the worker processes, so
that workers running side by side do not oversubscribe the CPU. ``TORCHSLIM_THREADS`` (or the command line's
``--threads``) overrides the count."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from .errors import ConfigError

__all__ = ["ENV", "available_cores", "threads_per_worker", "set_threads", "threads_override", "dataloader_worker_init"]

ENV = "TORCHSLIM_THREADS"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def _parse(value, source: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1:
        raise ConfigError(f"{source}={value!r} is not a thread count; give a whole number >= 1")
    return n


def threads_per_worker(workers: int = 1, threads: int | None = None) -> int:
    """Threads for each of ``workers`` processes: ``threads`` when given, else ``TORCHSLIM_THREADS`` when set,
    else the available cores divided among the workers (at least 1)."""
    if threads is not None:
        return _parse(threads, "threads")
    if os.environ.get(ENV):
        return _parse(os.environ[ENV], ENV)
    return max(1, available_cores() // max(1, int(workers)))


def set_threads(workers: int = 1, threads: int | None = None) -> int:
    """Set PyTorch's intra-op thread count for this process (one of ``workers``); returns it."""
    n = threads_per_worker(workers, threads)
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def threads_override(threads: int | None) -> Iterator[None]:
    """For the block: ``threads`` per process through ``TORCHSLIM_THREADS``, so that worker processes started
    inside it inherit the count (``None``: ``TORCHSLIM_THREADS`` if set, else no change); restored after."""
    old_env, old_threads = os.environ.get(ENV), torch.get_num_threads()
    if threads is not None:
        os.environ[ENV] = str(_parse(threads, "--threads"))
    try:
        if os.environ.get(ENV):
            set_threads()
        yield
    finally:
        if old_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old_env
        torch.set_num_threads(old_threads)


def dataloader_worker_init(worker_id: int) -> None:
    """A ``DataLoader`` ``worker_init_fn``: each loader worker gets its share of the cores, counting the main
    process (which runs the model) as one more worker (PyTorch otherwise gives each worker 1 thread)."""
    info = torch.utils.data.get_worker_info()
    set_threads(info.num_workers + 1 if info is not None else 1)
