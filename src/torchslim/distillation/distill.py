"""``distill``: train a (compressed) student against a frozen teacher."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch
from torch import nn

from ..core.checks import did_you_mean
from ..core.errors import ConfigError, DataError, UnsupportedModelError
from ..core.history import record
from ..data import Splits, first_batch
from ..data.batches import Inputs, batch_size, call_model, output_tensor, select, split_batch, to_device
from ..metrics.evaluate import Metric, model_device
from ..nn.modules import copy_model
from ..training.losses import Loss, LossFn, resolve_loss
from ..training.train import default_device, train
from .config import Distillation
from .losses import (attention_kl, feature_loss, head_mean, make_projection, masked_mean, output_matching_loss,
                     soft_target_loss)

_ATTN = "attention:"  # prefix of the teacher's captured attention maps among its features


def _module(model: nn.Module, name: str, role: str, field: str = "feature_layers") -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = did_you_mean(name, names, n=3)
        shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
        raise ConfigError(f"{field}: the {role} has no layer {name!r}{close}; its layers are: {shown}") from None


def _attention_probs(out, role: str, name: str) -> torch.Tensor:
    probs = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
    if not torch.is_tensor(probs) or probs.dim() != 4:
        raise UnsupportedModelError(
            f"attention_layers: the {role}'s module {name!r} gives no attention probabilities (it returned "
            f"{type(out).__name__}{'' if probs is None else ' whose second element is not (N, heads, L, L)'}); "
            "name a transformers self-attention module that returns (output, probabilities), e.g. "
            "'encoder.layer.0.attention.self' (BERT) or 'transformer.layer.0.attention' (DistilBERT), on a model "
            "whose attention can run eagerly (attn_implementation='eager'; SDPA and flash kernels give none)")
    return probs


class _EagerAttention:
    """Switches ``transformers`` models to eager attention (the one that returns probabilities) and back."""

    def __init__(self, models: list[nn.Module]):
        self.saved = []
        for model in models:
            config = getattr(model, "config", None)
            impl = getattr(config, "_attn_implementation", None)
            if impl not in (None, "eager") and hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("eager")
                self.saved.append((model, impl))

    def restore(self) -> None:
        for model, impl in self.saved:
            model.set_attn_implementation(impl)


def _tensor_output(out, role: str, where: str = "output") -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        out = out[0]  # transformers blocks return (hidden_states, attentions?, ...)
    if not torch.is_tensor(out):
        raise UnsupportedModelError(f"the {role}'s {where} is a {type(out).__name__}, not a tensor; distillation "
                                    "matches tensors: wrap the model so that it returns one tensor")
    return out


def _model_output(out: Any, role: str) -> torch.Tensor:
    try:
        return output_tensor(out)
    except UnsupportedModelError:
        raise UnsupportedModelError(f"the {role}'s output is a {type(out).__name__} with no tensor; distillation "
                                    "matches tensors: return a tensor, a tuple starting with one or a dict with "
                                    "'logits'") from None


def _input_device(inputs: Inputs) -> torch.device:
    first = inputs if torch.is_tensor(inputs) else next(
        (t for t in (inputs.values() if isinstance(inputs, dict) else inputs) if torch.is_tensor(t)), None)
    return first.device if first is not None else torch.device("cpu")


class _Teacher:
    """Runs the frozen teacher without gradients on its own device; optionally memoises per-sample results.

    The cache key is a hash of each input sample's bytes (over every input tensor), so a sample that comes
    back in another batch or order hits the cache, and an augmented (changed) sample misses it rather than
    getting stale targets.
    """

    def __init__(self, teacher: nn.Module, layers: list[str], cache: bool, attention: list[str] = ()):
        self.teacher = teacher
        self.device = model_device(teacher)
        self.layers = list(layers) + [_ATTN + name for name in attention]
        self.features: dict[str, torch.Tensor] = {}
        # all looked up before any hook
        modules = [_module(teacher, name, "teacher") for name in layers]
        attn_modules = [_module(teacher, name, "teacher", "attention_layers") for name in attention]
        self.hooks = [m.register_forward_hook(self._hook(name)) for m, name in zip(modules, layers)]
        self.hooks += [m.register_forward_hook(self._attention_hook(name)) for m, name in zip(attn_modules, attention)]
        self.cache: dict[bytes, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = {} if cache else None

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.features[name] = _tensor_output(output, "teacher", f"layer {name!r} output").detach()
        return hook

    def _attention_hook(self, name: str):
        def hook(module, inputs, output):
            # averaged over heads here: the student's head count may differ, and the cache holds less
            self.features[_ATTN + name] = head_mean(_attention_probs(output, "teacher", name)).detach()
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    @torch.no_grad()
    def _run(self, inputs: Inputs, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.features = {}
        out = _model_output(call_model(self.teacher, to_device(inputs, self.device)), "teacher")
        return out.to(device), {k: v.to(device) for k, v in self.features.items()}

    @torch.no_grad()
    def __call__(self, inputs: Inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = _input_device(inputs)
        if self.cache is None:
            return self._run(inputs, device)
        keys = self._keys(inputs)
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            out, feats = self._run(select(inputs, missing), device)
            for j, i in enumerate(missing):
                self.cache[keys[i]] = (out[j], {k: v[j] for k, v in feats.items()})
        rows = [self.cache[k] for k in keys]
        out = torch.stack([r[0] for r in rows])
        feats = {name: torch.stack([r[1][name] for r in rows]) for name in self.layers}
        return out, feats

    @staticmethod
    def _keys(inputs: Inputs) -> list[bytes]:
        named = sorted(inputs.items()) if isinstance(inputs, dict) else list(enumerate(
            (inputs,) if torch.is_tensor(inputs) else inputs))
        n = batch_size(inputs)
        prefix = b"".join(f"{k}:{t.dtype}{tuple(t.shape[1:])}".encode() for k, t in named if torch.is_tensor(t))
        rows = [prefix] * n
        for _, t in named:
            if not torch.is_tensor(t):
                continue
            flat = t.detach().cpu().contiguous().reshape(n, -1)
            raw = flat.view(torch.uint8).numpy() if flat.numel() else flat.numpy()
            rows = [r + row.tobytes() for r, row in zip(rows, raw)]
        return [hashlib.blake2b(r, digest_size=16).digest() for r in rows]


def _check_independent(student: nn.Module, teacher: nn.Module) -> None:
    if student is teacher:
        raise ConfigError("student and teacher are the same module; distil a compressed copy "
                          "(e.g. copy.deepcopy(model)) from the original")
    teacher_params = {id(p) for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if id(p) in teacher_params]
    if shared:
        raise ConfigError(f"student and teacher share parameters ({shared[:3]}...); training the student would "
                          "change the teacher: pass copy.deepcopy(teacher) as the student's source")


def distill(model: nn.Module, config: Distillation | None = None, *legacy: Any, teacher: nn.Module | None = None,
            data=None, val_data=None, example_inputs=None, loss_fn: LossFn | str | None = None,
            metric: Metric | None = None, inplace: bool = False, val_loader=None) -> nn.Module:
    """Train ``model`` (the student; a copy unless ``inplace``) to mimic the frozen ``teacher`` on ``data``
    and return it, with ``config`` recorded in its history.

    ``data`` yields any batch form of :mod:`torchslim.data.batches`; student and teacher get the same inputs.
    The hard-label term of ``mode="logits"`` (weight ``1 - alpha``) is ``loss_fn`` (default cross-entropy);
    ``alpha=1`` or ``mode="outputs"`` needs no labels. ``metric`` is measured on ``val_data`` after each
    epoch. The teacher is put in eval mode and run without gradients; its modes are restored and it is never
    changed. Feature projections (when widths differ) are trained alongside the student and dropped afterwards.
    ``example_inputs`` is accepted for the shared verb signature and not needed.

    The old form ``distill(student, teacher, data, config, val_loader=...)`` (in place; ``data`` may be a
    :class:`~torchslim.data.Splits`) still works and warns.
    """
    if isinstance(config, nn.Module):  # the old positional form distill(student, teacher, data, config)
        warnings.warn("distill(student, teacher, data, config) is deprecated; use distill(student, config, "
                      "teacher=teacher, data=loader, val_data=...), which returns a trained copy unless "
                      "inplace=True", DeprecationWarning, stacklevel=2)
        if len(legacy) > 2:
            raise TypeError(f"distill() takes at most 4 positional arguments in its old form, got {2 + len(legacy)}")
        teacher, config = config, legacy[1] if len(legacy) > 1 else Distillation()
        data = legacy[0] if legacy else data
        if isinstance(data, Distillation):
            raise ConfigError("distill(student, teacher, config): the old form takes the data third, "
                              "distill(student, teacher, data, config); better, use distill(student, config, "
                              "teacher=teacher, data=loader)")
        if isinstance(data, Splits):
            val_loader = val_loader if val_loader is not None else data.val
            data = data.train
        val_data, inplace = val_loader if val_loader is not None else val_data, True
    elif legacy:
        raise TypeError("distill(model, config, *, teacher=..., data=...) takes the teacher and data as keywords")
    elif val_loader is not None:
        raise TypeError("distill(..., val_loader=) belongs to the old form; pass val_data=")
    if not isinstance(config, Distillation):
        raise ConfigError(f"distill expects a Distillation config, got {type(config).__name__}")
    if teacher is None:
        raise ConfigError("distill needs teacher= (the model to learn from, e.g. the uncompressed original)")
    if isinstance(data, Splits):
        raise ConfigError("distill takes loaders: pass data=splits.train, val_data=splits.val")
    first = first_batch(data, "distillation data")  # one pass of iter(): the emptiness check and the probe batch
    student = model if inplace else copy_model(model)
    _check_independent(student, teacher)
    task = resolve_loss(loss_fn)
    inputs0, y0 = split_batch(first)
    hard = config.mode == "logits" and config.alpha < 1
    if hard and task.needs_target and y0 is None:
        raise DataError(f"the data has no labels but alpha={config.alpha} mixes in the hard-label loss: use "
                        "alpha=1.0 (soft targets only) or mode='outputs' for unlabelled data")

    device = torch.device(config.train.device) if config.train.device else default_device()
    student.to(device)
    pairs = list((config.feature_layers or {}).items())
    attn_pairs = list((config.attention_layers or {}).items())
    student_feats: dict[str, torch.Tensor] = {}

    def student_hook(name: str):
        def hook(module, inputs, output):
            student_feats[name] = _tensor_output(output, "student", f"layer {name!r} output")
        return hook

    def student_attention_hook(name: str):
        def hook(module, inputs, output):
            student_feats[_ATTN + name] = head_mean(_attention_probs(output, "student", name))
        return hook

    def no_attention_dropout(module, inputs):
        module.eval()  # dropped-out probabilities are no distribution; re-applied as train() resets it each epoch

    teacher_modes = {m: m.training for m in teacher.modules()}
    hooks: list = []
    runner = None
    eager = None
    attn_modules = []
    try:
        for s_name, _ in pairs:
            hooks.append(_module(student, s_name, "student").register_forward_hook(student_hook(s_name)))
        for s_name, _ in attn_pairs:
            attn_modules.append(_module(student, s_name, "student", "attention_layers"))
            hooks.append(attn_modules[-1].register_forward_hook(student_attention_hook(s_name)))
            hooks.append(attn_modules[-1].register_forward_pre_hook(no_attention_dropout))
        runner = _Teacher(teacher, [t for _, t in pairs], config.cache_teacher, [t for _, t in attn_pairs])
        if attn_pairs:
            eager = _EagerAttention([student, teacher])
        teacher.eval()
        projections = _probe(student, runner, to_device(inputs0, device), pairs, student_feats, config)
        projections.to(device)
        proj_for = {s: projections[_key(s)] if _key(s) in projections else None for s, _ in pairs}

        def distillation_loss(outputs: Any, batch: Any) -> torch.Tensor:
            s_out = _model_output(outputs, "student")
            inputs = split_batch(batch)[0]
            t_out, t_feats = runner(inputs)
            if config.pooling == "mean":
                mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                s_out, t_out = masked_mean(s_out, mask), masked_mean(t_out, mask)
            if config.mode == "logits":
                # kd_loss's sum, with the hard-label term from loss_fn (cross-entropy by default).
                loss = s_out.new_zeros(())
                if config.alpha > 0:
                    loss = loss + config.alpha * soft_target_loss(s_out, t_out, config.temperature)
                if config.alpha < 1:
                    loss = loss + (1 - config.alpha) * task(outputs, batch)
            else:
                loss = output_matching_loss(s_out, t_out, config.output_loss)
            for s_name, t_name in pairs:
                loss = loss + config.feature_weight * feature_loss(student_feats[s_name], t_feats[t_name],
                                                                   proj_for[s_name])
            if attn_pairs:
                mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                for s_name, t_name in attn_pairs:
                    loss = loss + config.attention_weight * attention_kl(
                        student_feats[_ATTN + s_name], t_feats[_ATTN + t_name], mask)
            return loss

        train(student, data, config.train, val_loader=val_data, metric=metric,
              loss_fn=Loss(distillation_loss, "distillation", keep_labels=hard and task.keep_labels),
              extra_params=list(projections.parameters()))
    finally:
        for h in hooks:
            h.remove()
        if runner is not None:
            runner.remove()
        if eager is not None:
            eager.restore()
        for m in attn_modules:
            m.train(student.training)
        for m, mode in teacher_modes.items():
            m.training = mode
    return record(student, config)


def _key(layer: str) -> str:
    return layer.replace(".", "__")  # ModuleDict keys cannot contain dots


def _probe(student: nn.Module, runner: _Teacher, inputs: Inputs, pairs: list[tuple[str, str]],
           student_feats: dict[str, torch.Tensor], config: Distillation) -> nn.ModuleDict:
    """One no-grad forward of both models: checks that outputs match and builds feature projections."""
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            s_out = _model_output(call_model(student, inputs), "student")
            # Bypasses the cache: the probe is not a training pass.
            t_out, t_feats = runner._run(inputs, _input_device(inputs))
    finally:
        student.train(was_training)
    compared = -1 if config.mode == "outputs" and config.output_loss == "similarity" else None  # widths may differ
    if s_out.shape[:compared] != t_out.shape[:compared]:
        raise UnsupportedModelError(f"teacher and student outputs differ in shape: teacher {tuple(t_out.shape)}, "
                                    f"student {tuple(s_out.shape)}; distillation needs the same output shape "
                                    "(same number of classes / embedding size), or with output_loss='similarity' "
                                    "the same shape but the last (feature) dimension")
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
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    for s_name, t_name in (config.attention_layers or {}).items():
        s_shape, t_shape = student_feats[_ATTN + s_name].shape, t_feats[_ATTN + t_name].shape
        if s_shape != t_shape or s_shape[-1] != s_shape[-2]:
            raise UnsupportedModelError(f"attention_layers {s_name!r} -> {t_name!r}: attention maps of "
                                        f"(batch, query, key) shapes {tuple(s_shape)} and {tuple(t_shape)} (averaged "
                                        "over heads) cannot be matched; both need the same batch and sequence length")
        if torch.is_tensor(mask) and tuple(mask.shape) != tuple(s_shape[:2]):
            raise UnsupportedModelError(f"attention_layers {s_name!r}: the batch's attention_mask has shape "
                                        f"{tuple(mask.shape)}, not (batch, sequence) = {tuple(s_shape[:2])}; "
                                        "pass one mask entry per token")
    return projections


__all__ = ["distill"]
