"""Post-training conversion of layers: dynamic int8, weight-only low-bit and fp8 (CUDA)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..core.errors import ConfigError, UnsupportedModelError
from ..data.batches import as_example_inputs, call_model
from ..nn.masks import effective, masked_names
from ..nn.modules import check_patterns, copy_model, match
from .backends.cuda import Fp8Linear, faster_than_bf16, fp8_supported
from .backends.dynamic import DynamicInt8Linear, DynamicInt8RNN
from .backends.weight_only import WeightOnlyLinear
from .gptq import gptq_layers
from .ptq import DYNAMIC_LAYERS, DynamicQuantization, Float8, WeightOnly, report_float

__all__ = ["apply_dynamic", "apply_weight_only", "apply_fp8"]


# ----------------------------------------------------------------------------------------------
# Module replacement (dynamic, weight-only, fp8)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if name == "":
        return module
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
    return root


def _weighted_leaves(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own a parameter directly (the layers a quantizer could touch)."""
    return {n: m for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}


def _inside(name: str, parents: Iterable[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in parents)


def _convert(model: nn.Module, choose, exclude: tuple[str, ...], what: str, policy: str, how: str
             ) -> tuple[nn.Module, list[str]]:
    """Replace every layer ``choose(name, module)`` returns a module for; report weighted layers left float."""
    check_patterns(f"{what}.exclude", exclude, [n for n, _ in model.named_modules() if n])
    model = copy_model(model)
    for module in model.modules():  # refresh pruned weights (the cached value can be one step stale)
        for name in masked_names(module):
            setattr(module, name, effective(module, name).detach())
    converted: list[str] = []
    skipped: list[dict[str, str]] = []
    opaque = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, module in list(_weighted_leaves(model).items()):
        if match(name, exclude) is not None or _inside(name, converted):
            continue
        if _inside(name, opaque):  # MultiheadAttention reads its projections' weights directly
            skipped.append({"layer": name, "op": type(module).__name__, "reason": "inside MultiheadAttention"})
            continue
        result = choose(name, module)
        if isinstance(result, nn.Module):
            model = _set_module(model, name, result)
            converted.append(name)
        else:
            skipped.append({"layer": name, "op": type(module).__name__, "reason": result or "no kernel"})
    if not converted:
        names = ", ".join(f"{d['layer']} ({d['op']}: {d['reason']})" for d in skipped[:8]) or "none"
        raise UnsupportedModelError(f"{what}: no layer of {type(model).__name__} can be converted ({how}); "
                                    f"layers seen: {names}")
    report_float(skipped, policy, what)
    return model, converted


def apply_dynamic(model: nn.Module, config: DynamicQuantization, *, calibration_data=None, example_inputs=None,
                  data=None, val_data=None) -> nn.Module:
    """Dynamically quantize a copy of ``model``: its Linear/LSTM/GRU layers (as ``config.layers`` says) get
    int8 weights and quantize their inputs per call. No calibration data is needed."""
    if not isinstance(config, DynamicQuantization):
        raise ConfigError(f"apply_dynamic takes a DynamicQuantization config, got {type(config).__name__}")
    wanted = tuple(DYNAMIC_LAYERS[k] for k in config.layers)

    def choose(name: str, module: nn.Module):
        if type(module) is nn.Linear:
            return DynamicInt8Linear.from_float(module, config.per_channel) if nn.Linear in wanted \
                else "Linear not in config.layers"
        if type(module) in (nn.LSTM, nn.GRU):
            if type(module) not in wanted:
                return f"{type(module).__name__} not in config.layers"
            if getattr(module, "proj_size", 0):
                return "LSTM with proj_size has no dynamic int8 kernel"
            return DynamicInt8RNN.from_float(module, config.per_channel)
        return "no dynamic int8 kernel"

    model, _ = _convert(model, choose, config.exclude, "DynamicQuantization", config.on_unsupported,
                        f"dynamic int8 covers {list(config.layers)}")
    return model


def apply_weight_only(model: nn.Module, config: WeightOnly, *, calibration_data=None, example_inputs=None,
                      data=None, val_data=None) -> nn.Module:
    """Quantize a copy of ``model``'s Linear weights to ``config.bits`` in groups; activations stay float.
    ``config.method="gptq"`` reconstructs each layer from calibration activations of ``data``."""
    if not isinstance(config, WeightOnly):
        raise ConfigError(f"apply_weight_only takes a WeightOnly config, got {type(config).__name__}")
    rows = _rows_per_layer(model, example_inputs)
    prebuilt: dict[str, nn.Module] = {}

    def fit(name: str, module: nn.Module) -> int | str:
        """The layer's group size, or why it stays float."""
        if type(module) is not nn.Linear:
            return "weight-only quantization covers Linear layers"
        group_size = config.group_size or module.in_features
        if module.in_features % group_size:
            return f"group_size={config.group_size} does not divide in_features={module.in_features}"
        return group_size

    if config.method == "gptq":
        model = _unmasked_copy(model)
        check_patterns("WeightOnly.exclude", config.exclude, [n for n, _ in model.named_modules() if n])
        opaque = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        layers = {name: (m, fit(name, m)) for name, m in model.named_modules()
                  if type(m) is nn.Linear and match(name, config.exclude) is None and not _inside(name, opaque)}
        layers = {k: v for k, v in layers.items() if isinstance(v[1], int)}
        prebuilt = gptq_layers(model, layers, data if data is not None else calibration_data, bits=config.bits,
                               symmetric=config.symmetric, batches=config.calibration_batches, damp=config.damp,
                               act_order=config.act_order)
        for name, (linear, _) in layers.items():  # float layers back: the speed check below may keep them
            model = _set_module(model, name, linear)

    def choose(name: str, module: nn.Module):
        group_size = fit(name, module)
        if isinstance(group_size, str):
            return group_size
        q = prebuilt[name] if name in prebuilt else WeightOnlyLinear.from_float(module, config.bits, group_size,
                                                                                config.symmetric)
        if config.require_speedup and module.weight.is_cuda:
            faster, base, low = faster_than_bf16(module, q, rows.get(name, 64))
            if not faster:
                return f"slower than bf16 at this shape ({low:.3f} vs {base:.3f} ms)"
        return q

    model, _ = _convert(model, choose, config.exclude, "WeightOnly", config.on_unsupported,
                        f"{config.bits}-bit weight-only covers Linear layers")
    return model


def _unmasked_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with pruning masks folded into plain weights (GPTQ rewrites them)."""
    model = copy_model(model)
    for module in model.modules():
        for name in masked_names(module):
            torch_prune.remove(module, name)
    return model


def apply_fp8(model: nn.Module, config: Float8, *, calibration_data=None, example_inputs=None, data=None,
              val_data=None) -> nn.Module:
    """Convert a copy of ``model``'s Linear layers to fp8 (e4m3) where that is measured faster than bf16."""
    if not isinstance(config, Float8):
        raise ConfigError(f"apply_fp8 takes a Float8 config, got {type(config).__name__}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    real = fp8_supported(device)
    if not real and not config.emulate:
        raise UnsupportedModelError(
            f"fp8 needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+, torch._scaled_mm); the model is on "
            f"{device}{' (CUDA present)' if torch.cuda.is_available() else ''}. Move it to such a GPU, or pass "
            "Float8(emulate=True) to get fp8 numerics without a speed-up")
    rows = _rows_per_layer(model, example_inputs)

    def choose(name: str, module: nn.Module):
        if type(module) is not nn.Linear:
            return "fp8 covers Linear layers"
        q = Fp8Linear.from_float(module)
        if not real:
            return q
        if module.in_features % 16 or module.out_features % 16:
            return "torch._scaled_mm needs in/out features that are multiples of 16"
        _, base, low = faster_than_bf16(module, q, config.rows or rows.get(name, 64))
        if base / low < config.min_speedup:
            return f"not {config.min_speedup}x faster than bf16 at this shape ({low:.3f} vs {base:.3f} ms)"
        return q

    model, _ = _convert(model, choose, config.exclude, "Float8", "warn", "fp8 covers Linear layers")
    return model


@torch.no_grad()
def _rows_per_layer(model: nn.Module, example_inputs) -> dict[str, int]:
    """Rows (batch x tokens) each Linear sees on ``example_inputs``; empty without them."""
    if example_inputs is None:
        return {}
    rows: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: rows.__setitem__(
        name, int(inp[0].numel() // inp[0].shape[-1])))
        for name, m in model.named_modules() if type(m) is nn.Linear]
    was_training = model.training
    try:
        model.eval()
        call_model(model, as_example_inputs(example_inputs))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows
