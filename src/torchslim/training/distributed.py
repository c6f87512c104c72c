"""Data-parallel fine-tuning under ``torchrun`` (DistributedDataParallel: NCCL on GPUs, gloo on CPU).

Launched as ``torchrun --nproc-per-node N ...``, every process runs the same pipeline; :func:`train_distributed`
wraps the model in DDP and gives each process a shard of the training data through a ``DistributedSampler`` with
``batch_size / N`` per process, so the global batch (and therefore the learning-rate schedule and the result) is
that of one process. Outside ``torchrun`` it is plain :func:`~torchslim.training.train.train`.

:func:`launch_local` starts N processes on this machine with the environment ``torchrun`` would set (used by the
tests and handy in notebooks).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import socket
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ..core.errors import ConfigError, TorchslimError
from ..core.threads import dataloader_worker_init, set_threads
from .loop import History, TrainConfig, train_local

__all__ = ["launched", "rank", "world_size", "local_rank", "is_main_process", "process_group", "shard_loader",
           "ShardedLoader", "train_distributed", "should_wrap", "launch_local"]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise TorchslimError(f"environment variable {name}={value!r} is not an integer; torchrun sets it") from None


def launched() -> bool:
    """True when this process is one of several started by ``torchrun`` (WORLD_SIZE > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else _env_int("RANK", 0)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True in the process that writes outputs (rank 0, or the only process)."""
    return rank() == 0


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def _init(timeout_s: float = 1800) -> bool:
    """Join the process group torchrun describes; False when not launched or already joined."""
    if not launched() or not dist.is_available() or dist.is_initialized():
        return False
    device = _device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # torchrun's default of 1 thread (OMP_NUM_THREADS=1) leaves cores idle: share them out
        set_threads(_env_int("LOCAL_WORLD_SIZE", 1))
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:
        raise TorchslimError(f"cannot join the {backend} process group (rank {rank()} of {world_size()}, "
                             f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                             f"MASTER_PORT={os.environ.get('MASTER_PORT')}): "
                             f"{exc}; check that every node reaches the master address and port") from None
    return True


@contextlib.contextmanager
def process_group(timeout_s: float = 1800) -> Iterator[None]:
    """Join the process group for the duration of the block when launched by torchrun (else do nothing)."""
    joined = _init(timeout_s)
    try:
        yield
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


class ShardedLoader:
    """One process's share of a loader: same dataset and collation, a ``DistributedSampler`` (reshuffled each
    pass through ``set_epoch``) and ``batch_size / world_size`` samples per batch."""

    def __init__(self, loader: DataLoader, *, rank: int, world_size: int, seed: int = 0):
        if loader.batch_size is None:
            raise ConfigError("distributed training needs a DataLoader built with batch_size= (not a batch_sampler)")
        if loader.batch_size % world_size:
            raise ConfigError(f"batch size {loader.batch_size} is not divisible by {world_size} processes; the global "
                              "batch would change. Use a batch size that is a multiple of the process count")
        self.sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                          shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                          drop_last=False)
        self.loader = DataLoader(loader.dataset, batch_size=loader.batch_size // world_size, sampler=self.sampler,
                                 num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                 pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                                 worker_init_fn=loader.worker_init_fn or (dataloader_worker_init
                                                                          if loader.num_workers else None))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


def shard_loader(loader: Any, *, rank: int, world_size: int, seed: int = 0) -> Any:
    """``loader`` split across ``world_size`` processes with the same global batch (see :class:`ShardedLoader`).

    A view that wraps a DataLoader in its ``loader`` attribute (e.g. one relabelling batches) is copied with that
    DataLoader sharded."""
    if isinstance(loader, DataLoader):
        return ShardedLoader(loader, rank=rank, world_size=world_size, seed=seed)
    inner = getattr(loader, "loader", None)
    if isinstance(inner, DataLoader):
        view = copy.copy(loader)
        view.loader = ShardedLoader(inner, rank=rank, world_size=world_size, seed=seed)
        return view
    raise ConfigError(f"distributed training shards a torch DataLoader (or a view holding one in .loader), got "
                      f"{type(loader).__name__}; pass a DataLoader built with batch_size=")


def should_wrap(model: nn.Module) -> bool:
    """True when :func:`train` should hand over to :func:`train_distributed` (launched, not yet wrapped)."""
    return (launched() or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)) and \
        not isinstance(model, nn.parallel.DistributedDataParallel)


def _average_grads(params: list[nn.Parameter], world: int) -> list[Any]:
    """Average gradients of parameters outside the DDP module (e.g. a distillation projection) across ranks."""
    handles = []
    for p in params:
        if p.requires_grad:
            def hook(param: torch.Tensor) -> None:
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad.div_(world)
            handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles


def train_distributed(model: nn.Module, train_loader, config: TrainConfig = TrainConfig(), *, seed: int = 0,
                      **train_kwargs: Any) -> History:
    """:func:`~torchslim.training.train.train` across the processes of a ``torchrun`` launch (or an initialised
    process group); plain ``train`` otherwise. ``model`` is trained in place and ends identical on every rank.

    The per-process batch is ``train_loader.batch_size / world_size`` (the global batch is unchanged);
    ``seed`` drives the shared shuffling. ``train_kwargs`` are those of ``train`` (``val_loader``, ``loss_fn``,
    ``penalty``, ``on_step``, ``extra_params``)."""
    if not should_wrap(model):
        return train_local(model, train_loader, config, **train_kwargs)
    _init()
    r, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(config.device) if config.device else _device()
    model.to(device)
    # Integer buffers (weight-sharing codes, quantized weights, counters) never change while training and gloo
    # cannot broadcast some of their types (int16): DDP leaves them alone.
    frozen = [n for n, b in model.named_buffers() if not (b.is_floating_point() or b.is_complex())]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    try:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        loader = shard_loader(train_loader, rank=r, world_size=world, seed=seed)
        hooks = _average_grads(list(train_kwargs.get("extra_params", ())), world)
        try:
            return train_local(ddp, loader, config.replace(device=str(device)), **train_kwargs)
        finally:
            for h in hooks:
                h.remove()
    finally:
        model.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local: int, fn: Callable[..., Any], nprocs: int, port: int, args: tuple) -> None:
    os.environ.update({"RANK": str(local), "LOCAL_RANK": str(local), "WORLD_SIZE": str(nprocs),
                       "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    with process_group():
        fn(*args)


def launch_local(fn: Callable[..., Any], nprocs: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes on this machine, each with the environment torchrun sets
    and the process group joined (gloo on CPU). ``fn`` must be importable (defined at module level)."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(fn, nprocs, _free_port(), args), nprocs=nprocs, join=True)
