"""``distill``: train a (compressed) student against a frozen teacher."""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch import nn

from ..data import Splits
from ..core.errors import ConfigError, DataError, UnsupportedModelError
from ..metrics.evaluate import model_device
from ..training.train import default_device, train
from .config import Distillation
from .losses import feature_loss, kd_loss, make_projection, output_matching_loss


class _LabelledView:
    """Presents batches as ``(x, y)`` for the trainer; unlabelled batches (``x`` or ``(x,)``) get dummy
    labels that the loss never reads."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            x, y = _split_batch(batch)
            yield x, (y if y is not None else torch.zeros(len(x), dtype=torch.long))


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        y = batch[1] if len(batch) > 1 and torch.is_tensor(batch[1]) else None
        return batch[0], y
    raise DataError(f"distillation batches must be a tensor x or a tuple (x, y, ...), got {type(batch).__name__}")


def _module(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
        raise ConfigError(f"feature_layers: the {role} has no layer {name!r}; its layers are: {shown}") from None


def _tensor_output(out, role: str, where: str = "output") -> torch.Tensor:
    if not torch.is_tensor(out):
        raise UnsupportedModelError(f"the {role}'s {where} is a {type(out).__name__}, not a tensor; distillation "
                                    "matches tensors: wrap the model so that it returns one tensor")
    return out


class _Teacher:
    """Runs the frozen teacher without gradients on its own device; optionally memoises per-sample results.

    The cache key is a hash of each input sample's bytes, so a sample that comes back in another batch or
    order hits the cache, and an augmented (changed) sample misses it rather than getting stale targets.
    """

    def __init__(self, teacher: nn.Module, layers: list[str], cache: bool):
        self.teacher = teacher
        self.device = model_device(teacher)
        self.layers = layers
        self.features: dict[str, torch.Tensor] = {}
        modules = [_module(teacher, name, "teacher") for name in layers]  # all looked up before any hook
        self.hooks = [m.register_forward_hook(self._hook(name)) for m, name in zip(modules, layers)]
        self.cache: dict[bytes, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = {} if cache else None

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.features[name] = _tensor_output(output, "teacher", f"layer {name!r} output").detach()
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    @torch.no_grad()
    def _run(self, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.features = {}
        out = _tensor_output(self.teacher(x.to(self.device)), "teacher")
        return out.to(device), {k: v.to(device) for k, v in self.features.items()}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.cache is None:
            return self._run(x, x.device)
        keys = self._keys(x)
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            out, feats = self._run(x[missing], x.device)
            for j, i in enumerate(missing):
                self.cache[keys[i]] = (out[j], {k: v[j] for k, v in feats.items()})
        rows = [self.cache[k] for k in keys]
        out = torch.stack([r[0] for r in rows])
        feats = {name: torch.stack([r[1][name] for r in rows]) for name in self.layers}
        return out, feats

    @staticmethod
    def _keys(x: torch.Tensor) -> list[bytes]:
        flat = x.detach().cpu().contiguous().reshape(len(x), -1)
        raw = flat.view(torch.uint8).numpy() if flat.numel() else flat.numpy()
        prefix = f"{x.dtype}{tuple(x.shape[1:])}".encode()
        return [hashlib.blake2b(prefix + row.tobytes(), digest_size=16).digest() for row in raw]


def _check_independent(student: nn.Module, teacher: nn.Module) -> None:
    if student is teacher:
        raise ConfigError("student and teacher are the same module; distil a compressed copy "
                          "(e.g. copy.deepcopy(model)) from the original")
    teacher_params = {id(p) for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if id(p) in teacher_params]
    if shared:
        raise ConfigError(f"student and teacher share parameters ({shared[:3]}...); training the student would "
                          "change the teacher: pass copy.deepcopy(teacher) as the student's source")


def distill(student: nn.Module, teacher: nn.Module, data, config: Distillation = Distillation(), *,
            val_loader=None) -> nn.Module:
    """Train ``student`` in place to mimic ``teacher`` on ``data`` and return it.

    ``data`` is a loader of ``x`` or ``(x, y, ...)`` batches, or a :class:`~torchslim.data.Splits` (its
    ``train`` split; its ``val`` split is used for validation unless ``val_loader`` is given). The teacher is
    put in eval mode and run without gradients; its modes are restored and it is never changed. Feature
    projections (when widths differ) are trained alongside the student and dropped afterwards.
    """
    if not isinstance(config, Distillation):
        raise ConfigError(f"distill expects a Distillation config, got {type(config).__name__}")
    if isinstance(data, Splits):
        val_loader = val_loader if val_loader is not None else data.val
        data = data.train
    if data is None:
        raise DataError("distillation data is required but None was given")
    first = next(iter(data), None)  # one pass of iter() serves as both the emptiness check and the probe batch
    if first is None:
        raise DataError("distillation data is empty: it yielded no batch. Pass a loader with at least one batch.")
    _check_independent(student, teacher)

    loader = _LabelledView(data)
    x0, y0 = _split_batch(first)
    labelled = y0 is not None
    if config.mode == "logits" and config.alpha < 1 and not labelled:
        raise DataError(f"the data has no labels but alpha={config.alpha} mixes in the hard-label loss: use "
                        "alpha=1.0 (soft targets only) or mode='outputs' for unlabelled data")

    device = torch.device(config.train.device) if config.train.device else default_device()
    student.to(device)
    pairs = list((config.feature_layers or {}).items())
    student_feats: dict[str, torch.Tensor] = {}

    def student_hook(name: str):
        def hook(module, inputs, output):
            student_feats[name] = _tensor_output(output, "student", f"layer {name!r} output")
        return hook

    teacher_modes = {m: m.training for m in teacher.modules()}
    hooks: list = []
    runner = None
    try:
        for s_name, _ in pairs:
            hooks.append(_module(student, s_name, "student").register_forward_hook(student_hook(s_name)))
        runner = _Teacher(teacher, [t for _, t in pairs], config.cache_teacher)
        teacher.eval()
        projections = _probe(student, runner, x0.to(device), pairs, student_feats, config)
        projections.to(device)
        proj_for = {s: projections[_key(s)] if _key(s) in projections else None for s, _ in pairs}

        def loss_fn(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
            outputs = _tensor_output(outputs, "student")
            t_out, t_feats = runner(inputs)
            if config.mode == "logits":
                loss = kd_loss(outputs, t_out, targets if labelled else None, config.temperature, config.alpha)
            else:
                loss = output_matching_loss(outputs, t_out, config.output_loss)
            for s_name, t_name in pairs:
                loss = loss + config.feature_weight * feature_loss(student_feats[s_name], t_feats[t_name],
                                                                   proj_for[s_name])
            return loss

        train(student, loader, config.train, val_loader=val_loader, loss_fn=loss_fn,
              extra_params=list(projections.parameters()))
    finally:
        for h in hooks:
            h.remove()
        if runner is not None:
            runner.remove()
        for m, mode in teacher_modes.items():
            m.training = mode
    return student


def _key(layer: str) -> str:
    return layer.replace(".", "__")  # ModuleDict keys cannot contain dots


def _probe(student: nn.Module, runner: _Teacher, x: torch.Tensor, pairs: list[tuple[str, str]],
           student_feats: dict[str, torch.Tensor], config: Distillation) -> nn.ModuleDict:
    """One no-grad forward of both models: checks that outputs match and builds feature projections."""
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            s_out = _tensor_output(student(x), "student")
            t_out, t_feats = runner._run(x, x.device)  # bypasses the cache: the probe is not a training pass
    finally:
        student.train(was_training)
    if s_out.shape != t_out.shape:
        raise UnsupportedModelError(f"teacher and student outputs differ in shape: teacher {tuple(t_out.shape)}, "
                                    f"student {tuple(s_out.shape)}; distillation needs the same output shape "
                                    "(same number of classes / embedding size)")
    if config.mode == "logits" and s_out.dim() < 2:
        raise UnsupportedModelError(f"mode='logits' needs (N, C) logits, got shape {tuple(s_out.shape)}; "
                                    "use mode='outputs' for other outputs")
    projections = nn.ModuleDict()
    for s_name, t_name in pairs:
        s_shape, t_shape = student_feats[s_name].shape, t_feats[t_name].shape
        try:
            proj = make_projection(s_shape, t_shape)
        except ValueError as exc:
            raise UnsupportedModelError(f"feature_layers {s_name!r} -> {t_name!r}: {exc}") from None
        if proj is None and len(s_shape) != 4 and s_shape != t_shape:
            raise UnsupportedModelError(f"feature_layers {s_name!r} -> {t_name!r}: shapes {tuple(s_shape)} and "
                                        f"{tuple(t_shape)} cannot be matched")
        if proj is not None:
            projections[_key(s_name)] = proj
    return projections


__all__ = ["distill"]
