"""The training loop of one process (``train`` in :mod:`torchslim.training.train` dispatches to it or to DDP)."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.config import Config
from ..core.checks import check_choice, check_nonnegative, check_positive
from ..data import check_loader
from ..data.batches import call_model, split_batch, to_device
from ..core.errors import TorchslimError
from ..core.files import atomic_write
from ..metrics.evaluate import Metric, evaluate
from .losses import LossFn, resolve_loss


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """How to (fine-)tune: ``epochs`` passes over the training loader (``max_steps`` caps the total)."""

    epochs: float = 1.0
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    max_steps: int | None = None
    device: str | None = None
    progress: bool = True

    def validate(self) -> None:
        check_positive("epochs", self.epochs)
        check_positive("lr", self.lr)
        check_choice("optimizer", self.optimizer, ("sgd", "adam", "adamw"))
        check_nonnegative("momentum", self.momentum)
        check_nonnegative("weight_decay", self.weight_decay)
        check_choice("schedule", self.schedule, ("cosine", "constant", "step"))
        if self.max_steps is not None:
            check_positive("max_steps", self.max_steps, integer=True)


@dataclasses.dataclass
class History:
    loss: list[float] = dataclasses.field(default_factory=list)
    val_accuracy: list[float] = dataclasses.field(default_factory=list)
    steps: int = 0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def train_local(model: nn.Module, train_loader, config: TrainConfig = TrainConfig(), *, val_loader=None,
                loss_fn: LossFn | str | None = None, metric: Metric | None = None,
                penalty: Callable[[nn.Module], torch.Tensor] | None = None,
                on_step: Callable[[int, int], None] | None = None, extra_params=(),
                state_path: str | os.PathLike | None = None) -> History:
    """:func:`~torchslim.training.train.train` in this process only (no data parallelism).

    ``state_path``: after each epoch but the last, the model, optimizer, schedule, history and random states are
    written there atomically, and a run that finds that file resumes from it (the caller keys the path by
    everything that determines the training, so a state is never resumed by a different run)."""
    check_loader(train_loader, "training loader")
    device = torch.device(config.device) if config.device else default_device()
    model.to(device)
    loss_fn = resolve_loss(loss_fn)
    params = list(model.parameters()) + list(extra_params)
    optimizer = make_optimizer(params, config)
    total = max(1, int(math.ceil(config.epochs * len(train_loader))))
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    elif config.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, max(1, total // 3), gamma=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    history = History()
    model.train()
    # disable=None: bars on a terminal, silence in logs and CI.
    bar = tqdm(total=total, desc="train", disable=None if config.progress else True, leave=False, dynamic_ncols=True)
    step = 0
    if state_path is not None:
        step = _resume(Path(state_path), model, optimizer, scheduler, history, train_loader, total)
        bar.update(step)
    while step < total:
        for batch in train_loader:
            if step >= total:
                break
            if on_step is not None:
                on_step(step, total)
            batch = to_device(batch, device)
            outputs = call_model(model, split_batch(batch, keep_labels=loss_fn.keep_labels)[0])
            loss = loss_fn(outputs, batch)
            if penalty is not None:
                loss = loss + penalty(model)
            if not torch.isfinite(loss):
                raise TorchslimError(f"training diverged at step {step}: loss is {loss.item()}; lower lr "
                                     f"(now {config.lr}) or check the data for NaN values")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            history.loss.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            epoch_end = step % len(train_loader) == 0 or step == total
            if val_loader is not None and epoch_end:
                acc = float(metric(model, val_loader)) if metric is not None else evaluate(model, val_loader, device)
                history.val_accuracy.append(acc)
                bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{acc:.4f}")
            if state_path is not None and epoch_end and step < total:
                _save_state(Path(state_path), model, optimizer, scheduler, history, train_loader, step, total)
    bar.close()
    history.steps = step
    return history


def _generators(loader) -> list[torch.Generator]:
    """The loader's own random generators (shuffling, worker seeds), each once."""
    found: list[torch.Generator] = []
    for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)):
        if isinstance(g, torch.Generator) and not any(g is f for f in found):
            found.append(g)
    return found


def _save_state(path: Path, model: nn.Module, optimizer, scheduler, history: History, loader, step: int,
                total: int) -> None:
    state = {"step": step, "total": total, "batches": len(loader), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "loss": list(history.loss), "val_accuracy": list(history.val_accuracy),
             "rng": torch.get_rng_state(), "loader_rng": [g.get_state() for g in _generators(loader)],
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def _resume(path: Path, model: nn.Module, optimizer, scheduler, history: History, loader, total: int) -> int:
    """Restore a state written by :func:`_save_state`; the step to continue from (0 when there is none)."""
    if not path.is_file():
        return 0
    try:
        # weights_only: tensors and plain containers, never code.
        state = torch.load(path, map_location="cpu", weights_only=True)
        gens = _generators(loader)
        if (state["total"], state["batches"], len(state["loader_rng"])) != (total, len(loader), len(gens)):
            raise ValueError(f"it is for {state['total']} steps of {state['batches']} batches, this run has "
                             f"{total} of {len(loader)}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for g, s in zip(gens, state["loader_rng"]):
            g.set_state(s)
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    except Exception as exc:  # an unusable state costs a restart, not the run
        warnings.warn(f"training from scratch: cannot resume from {path} ({type(exc).__name__}: {exc})")
        return 0
    history.loss[:] = state["loss"]
    history.val_accuracy[:] = state["val_accuracy"]
    return int(state["step"])


__all__ = ["TrainConfig", "History", "train_local", "default_device", "make_optimizer"]
