"""Post-training quantization: static int8 (calibrated, real integer kernels), dynamic int8, weight-only
low-bit, and fp8 on CUDA. One config and one ``apply_*`` function per technique; each returns a new model
(the input model is never modified).

- :class:`StaticQuantization` -> :func:`apply_static`: Conv-BN folding, export to ONNX, calibration of every
  activation with a torchslim observer, an int8 graph (weights int8 per channel, activations uint8, ReLU
  folded into the producer) run by integer kernels; ``backend="auto"`` measures ONNX Runtime (QDQ and
  QOperator forms) and PyTorch's onednn/x86 engines side by side and keeps the fastest.
- :class:`DynamicQuantization` -> :func:`apply_dynamic`: Linear / LSTM / GRU with int8 weights, activations
  quantized per call (PyTorch's fbgemm/oneDNN kernels).
- :class:`WeightOnly` -> :func:`apply_weight_only`: int8/int4/int2 grouped weights for Linear layers.
- :class:`Float8` -> :func:`apply_fp8`: e4m3 Linear layers through ``torch._scaled_mm``, kept only where
  measured faster than bf16 on the GPU.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ..core.config import Config
from ..core.checks import check_choice, check_positive
from ..core.errors import ConfigError, DataError, UnsupportedModelError
from ..data.batches import as_example_inputs, batch_size, call_model, split_batch
from ..metrics.profile import count_macs
from ..nn.masks import effective, masked_names
from ..nn.modules import copy_model, match
from ..export.onnx import _export_copy, array, ort_session, to_onnx_proto
from .backends import STATIC_BACKENDS
from .backends.cuda import Fp8Linear, faster_than_bf16, fp8_supported
from .backends.dynamic import DynamicInt8Linear, DynamicInt8RNN
from .backends.onnxrt import (
    QuantizedGraphModel,
    calibrate_graph,
    exclude_node_names,
    float_compute_nodes,
    global_pool_rewrite,
    make_runner,
    measure_runners,
    quantize_graph,
)
from .backends.weight_only import WEIGHT_ONLY_BITS, WeightOnlyLinear
from .observers import OBSERVERS, make_observer
from .spec import QuantSpec

__all__ = ["StaticQuantization", "DynamicQuantization", "WeightOnly", "Float8", "apply_static", "apply_dynamic",
           "apply_weight_only", "apply_fp8", "ACTIVATION_SPEC", "calibration_batches"]

ACTIVATION_SPEC = QuantSpec(bits=8, symmetric=False, signed=False)
"""Activations of static int8 models: uint8, affine (what x86 int8 kernels are fastest with)."""

_POLICIES = ("warn", "raise")
_DYNAMIC_LAYERS = {"Linear": nn.Linear, "LSTM": nn.LSTM, "GRU": nn.GRU}


def _check_patterns(name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{name} must be a tuple of layer-name patterns (fnmatch), got {value!r}")


def _check_bits(value: Any, allowed: tuple[int, ...], hint: str) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"bits={value!r} is not supported here; choose one of {list(allowed)}. {hint}")


@dataclasses.dataclass(frozen=True)
class StaticQuantization(Config):
    """Static int8 post-training quantization with real integer kernels (ONNX Runtime on CPU).

    ``observer`` picks how each activation's range is calibrated on ``calibration_batches`` batches
    (``minmax``, ``moving_average``, ``percentile`` at ``percentile``%, ``mse``, ``entropy``). Weights are
    int8 symmetric, per output channel when ``per_channel``. ``backend``: ``auto`` (time every available
    backend side by side on the example batch and keep the fastest), or one of ``ort_qdq`` / ``ort_qop``
    (ONNX Runtime, QDQ or QOperator graph) and ``torch_onednn`` / ``torch_x86`` (PyTorch's quantized
    kernels). The model's inputs are calibrated
    with ``input_observer`` (``minmax`` by default: clipping an input loses information no later layer can
    recover; ``None`` uses ``observer``). ``exclude`` keeps matching layers
    (fnmatch on module names) in float. Ops without an int8 kernel stay in float; ``on_unsupported`` says
    whether that warns (naming them) or raises.
    """

    bits: int = 8
    per_channel: bool = True
    observer: str = "minmax"
    input_observer: str | None = "minmax"
    percentile: float = 99.99
    calibration_batches: int = 16
    backend: str = "auto"
    exclude: tuple[str, ...] = ()
    on_unsupported: str = "warn"
    opset: int | None = None

    def validate(self) -> None:
        _check_bits(self.bits, (8,), "Static quantization runs on int8 kernels; for 4- or 2-bit weights use "
                                     "WeightOnly(bits=4, group_size=32) or QAT")
        check_choice("observer", self.observer, tuple(OBSERVERS))
        if self.input_observer is not None:
            check_choice("input_observer", self.input_observer, tuple(OBSERVERS))
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile!r}")
        check_positive("calibration_batches", self.calibration_batches, integer=True)
        check_choice("backend", self.backend, ("auto", *STATIC_BACKENDS))
        _check_patterns("exclude", self.exclude)
        check_choice("on_unsupported", self.on_unsupported, _POLICIES)
        if self.opset is not None and (isinstance(self.opset, bool) or not isinstance(self.opset, int)
                                       or self.opset < 13):
            raise ConfigError(f"opset must be an int >= 13 (per-channel QDQ needs 13), got {self.opset!r}")


@dataclasses.dataclass(frozen=True)
class DynamicQuantization(Config):
    """Dynamic int8: weights of ``layers`` (any of Linear, LSTM, GRU) stored in int8, activations quantized
    on the fly at every call. Layers with weights but no dynamic kernel (Conv, Embedding, ...) stay float;
    ``on_unsupported`` says whether that warns (naming them) or raises."""

    bits: int = 8
    layers: tuple[str, ...] = ("Linear", "LSTM", "GRU")
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    on_unsupported: str = "warn"

    def validate(self) -> None:
        _check_bits(self.bits, (8,), "Dynamic quantization runs on int8 kernels; for 4-bit weights use WeightOnly")
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ConfigError(f"layers must be a non-empty tuple drawn from {list(_DYNAMIC_LAYERS)}, got "
                              f"{self.layers!r}")
        for layer in self.layers:
            check_choice("layers[...]", layer, tuple(_DYNAMIC_LAYERS))
        _check_patterns("exclude", self.exclude)
        check_choice("on_unsupported", self.on_unsupported, _POLICIES)


@dataclasses.dataclass(frozen=True)
class WeightOnly(Config):
    """Weight-only quantization of Linear layers to ``bits`` (8, 4 or 2) in groups of ``group_size`` inputs,
    symmetric (codes around zero) or affine; activations stay float. On CUDA with ``require_speedup`` a
    layer is kept only where its kernel measures faster than bf16 for its shape."""

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    exclude: tuple[str, ...] = ()
    on_unsupported: str = "warn"
    require_speedup: bool = False

    def validate(self) -> None:
        _check_bits(self.bits, WEIGHT_ONLY_BITS, "Other widths have no packed kernel; QAT covers 1-8 bits")
        check_positive("group_size", self.group_size, integer=True)
        per_byte = 8 // self.bits
        if self.group_size % per_byte:
            raise ConfigError(f"group_size must be a multiple of {per_byte} for {self.bits}-bit codes (whole bytes), "
                              f"got {self.group_size}")
        _check_patterns("exclude", self.exclude)
        check_choice("on_unsupported", self.on_unsupported, _POLICIES)


@dataclasses.dataclass(frozen=True)
class Float8(Config):
    """fp8 (e4m3) Linear layers through ``torch._scaled_mm`` on GPUs with fp8 tensor cores.

    Each layer is timed against bf16 at its own shape (``rows`` input rows; default: measured from
    ``example_inputs``, else 64) and kept in fp8 only when at least ``min_speedup`` times faster. Without such
    a GPU, ``emulate=True`` still converts every layer (exact fp8 numerics in float, no speed-up), otherwise
    an error is raised.
    """

    exclude: tuple[str, ...] = ()
    min_speedup: float = 1.0
    rows: int | None = None
    emulate: bool = False

    def validate(self) -> None:
        _check_patterns("exclude", self.exclude)
        check_positive("min_speedup", self.min_speedup)
        if self.rows is not None:
            check_positive("rows", self.rows, integer=True)


# ----------------------------------------------------------------------------------------------
# Static int8


def apply_static(model: nn.Module, config: StaticQuantization, *, calibration_data=None, example_inputs=None,
                 data=None, val_data=None) -> QuantizedGraphModel:
    """Statically quantize a copy of ``model`` to int8, calibrated on ``calibration_data`` (any batch form of
    :mod:`torchslim.data.batches`, a list of batches or one tensor; ``data`` is used when it is None).

    Returns a :class:`QuantizedGraphModel`: call it with float tensors, get float outputs, computed by
    integer kernels (ONNX Runtime's or PyTorch's, whichever ``config.backend`` names or ``auto`` measured
    fastest). ``example_inputs`` (a tensor, tuple or dict; default: the first calibration batch) is what the
    model is traced and the backends are timed with.
    """
    if not isinstance(config, StaticQuantization):
        raise ConfigError(f"apply_static takes a StaticQuantization config, got {type(config).__name__}")
    batches = calibration_batches(calibration_data if calibration_data is not None else data,
                                  config.calibration_batches)
    example = _detached(batches[0] if example_inputs is None else as_example_inputs(example_inputs))
    float_model, folded = _folded_copy(model)
    proto = global_pool_rewrite(to_onnx_proto(float_model, example, opset=config.opset, dynamic_batch=True))

    def factory(name: str):
        options = {"percentile": config.percentile} if name == "percentile" else {}
        return lambda layer: make_observer(name, ACTIVATION_SPEC, layer=layer, **options)

    observers = calibrate_graph(proto, [_arrays(b) for b in batches], factory(config.observer),
                                make_input_observer=factory(config.input_observer or config.observer), progress=True)
    for inp in proto.graph.input:
        obs = observers.get(inp.name)
        if obs is not None and obs.is_constant:
            raise DataError(f"calibration data is constant: every value of input {inp.name!r} is {obs.data_min:g}, so "
                            "activation ranges calibrated on it would be meaningless; pass representative inputs")
    excluded = exclude_node_names(proto, config.exclude)
    if config.exclude and not excluded:
        raise ConfigError(f"exclude={list(config.exclude)} matches no layer of the model")
    qdq = quantize_graph(proto, observers, fmt="qdq", per_channel=config.per_channel, exclude_nodes=excluded)
    float_layers = float_compute_nodes(qdq, excluded)
    _report_float(float_layers, config.on_unsupported, "StaticQuantization",
                  "they run as dequantize -> float op -> quantize")
    wanted = STATIC_BACKENDS if config.backend == "auto" else (config.backend,)
    qop = None
    if any(b != "ort_qdq" for b in wanted):
        qop = quantize_graph(proto, observers, fmt="qop", per_channel=config.per_channel, exclude_nodes=excluded)
    graphs, runners, skipped = {}, {}, {}
    for backend in wanted:
        graph = qdq if backend == "ort_qdq" else qop
        try:
            runners[backend] = make_runner(backend, graph)
            graphs[backend] = graph
        except UnsupportedModelError as exc:  # e.g. an op PyTorch's int8 kernels lack: measure the others
            if config.backend != "auto":
                raise
            skipped[backend] = str(exc)
    latency = measure_runners(runners, example) if len(runners) > 1 else {}
    chosen = min(latency, key=latency.get) if latency else next(iter(runners))
    info = {
        "observer": config.observer, "input_observer": config.input_observer or config.observer,
        "per_channel": config.per_channel, "weights": "int8 symmetric",
        "activations": "uint8 affine", "conv_bn_folded": folded, "calibration_batches": len(batches),
        "float_layers": float_layers, "excluded_layers": sorted(set(config.exclude)),
        "backend_latency_ms": {k: round(v, 4) for k, v in latency.items()}, "backends_skipped": skipped,
        "check": _agreement(proto, runners[chosen], example),
        # FlopCounterMode cannot see inside the integer kernels: record the float model's work for profiles.
        "macs_per_sample": _macs_per_sample(float_model, example),
    }
    return QuantizedGraphModel.from_onnx(graphs[chosen], backend=chosen, info=info)


def _detached(inputs: tuple | dict) -> tuple | dict:
    if isinstance(inputs, dict):
        return {k: t.detach().cpu() if torch.is_tensor(t) else t for k, t in inputs.items()}
    return tuple(t.detach().cpu() if torch.is_tensor(t) else t for t in inputs)


def _arrays(inputs: tuple | dict) -> tuple | dict:
    if isinstance(inputs, dict):
        return {k: array(t) for k, t in inputs.items()}
    return tuple(array(t) for t in inputs)


def calibration_batches(data, limit: int) -> list[tuple[torch.Tensor, ...] | dict[str, torch.Tensor]]:
    """Up to ``limit`` model inputs (tuples of positional tensors or dicts of keyword tensors) from ``data``:
    a loader (any batch form of :mod:`torchslim.data.batches`), a list of batches, or one tensor. Raises
    DataError when there is none."""
    if data is None:
        raise DataError("static quantization needs calibration data: pass data= a loader (or list) of "
                        "representative input batches")
    items: Iterable = [data] if torch.is_tensor(data) else data
    out: list[tuple[torch.Tensor, ...] | dict[str, torch.Tensor]] = []
    for item in items:
        if len(out) >= limit:
            break
        try:
            x = split_batch(item)[0]
        except DataError:
            x = None
        inputs = (x,) if torch.is_tensor(x) else x
        tensors = list(inputs.values()) if isinstance(inputs, dict) else inputs
        if not tensors or not all(torch.is_tensor(t) for t in tensors):
            raise DataError(f"calibration batch {len(out)} is not a tensor, an (inputs, targets) pair or a dict of "
                            f"tensors: {type(item).__name__}")
        if any(t.numel() == 0 for t in tensors):
            raise DataError(f"calibration batch {len(out)} is empty (shape {[tuple(t.shape) for t in tensors]})")
        out.append(_detached(inputs))
    if not out:
        raise DataError("calibration data is empty: it yielded no batch; pass a loader (or list of tensors) with at "
                        "least one batch of representative inputs")
    return out


def _macs_per_sample(model: nn.Module, example: tuple | dict) -> int | None:
    try:
        return int(count_macs(model, example) // max(1, batch_size(example)))
    except Exception:  # noqa: BLE001 - a profile nicety, never a reason to fail quantization
        return None


def _folded_copy(model: nn.Module) -> tuple[nn.Module, str]:
    """An eval CPU copy with pruning masks folded and Conv-BN folded by ``torch.fx`` (else by the exporter)."""
    model = _export_copy(model).cpu()
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model, "no BatchNorm"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the module imports torch.jit helpers
            from torch.fx.experimental.optimization import fuse

            fused = fuse(model, inplace=False)
        left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        return fused, "torch.fx" if left == 0 else f"torch.fx ({left} BatchNorm left to the exporter)"
    except Exception:  # noqa: BLE001 - not symbolically traceable: the ONNX exporter folds Conv-BN itself
        return model, "onnx exporter"


def _agreement(float_proto, runner, example: tuple | dict) -> dict[str, float]:
    """Float vs int8 outputs on the example batch (a sanity check recorded with the model)."""
    ref = ort_session(float_proto.SerializeToString())
    names = [i.name for i in ref.get_inputs()]
    arrays = _arrays(example)
    a = ref.run(None, {n: arrays[n] for n in names} if isinstance(arrays, dict) else dict(zip(names, arrays)))[0]
    b = call_model(runner, example)
    b = (b[0] if isinstance(b, tuple) else b).numpy()
    out = {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_output": float(np.abs(a).max())}
    if a.ndim >= 2:
        out["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
    return out


def _report_float(layers: list[dict[str, str]], policy: str, what: str, how: str) -> None:
    if not layers:
        return
    names = ", ".join(f"{d['layer']} ({d['op']})" for d in layers[:12])
    more = f" and {len(layers) - 12} more" if len(layers) > 12 else ""
    message = (f"{what}: {len(layers)} layer(s) have no integer kernel and stay in float ({how}): {names}{more}. "
               "Pass exclude=[...] to keep them float on purpose, or on_unsupported='raise' to make this an error")
    if policy == "raise":
        raise UnsupportedModelError(message)
    warnings.warn(message, UserWarning, stacklevel=3)


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
    if exclude and all(match(n, exclude) is None for n, _ in model.named_modules()):
        raise ConfigError(f"exclude={list(exclude)} matches no layer of the model")
    if not converted:
        names = ", ".join(f"{d['layer']} ({d['op']}: {d['reason']})" for d in skipped[:8]) or "none"
        raise UnsupportedModelError(f"{what}: no layer of {type(model).__name__} can be converted ({how}); "
                                    f"layers seen: {names}")
    if skipped:
        names = ", ".join(f"{d['layer']} ({d['op']}: {d['reason']})" for d in skipped[:12])
        more = f" and {len(skipped) - 12} more" if len(skipped) > 12 else ""
        message = (f"{what}: {len(skipped)} layer(s) stay in float: {names}{more}. Pass exclude=[...] to keep them "
                   "float on purpose, or on_unsupported='raise' to make this an error")
        if policy == "raise":
            raise UnsupportedModelError(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return model, converted


def apply_dynamic(model: nn.Module, config: DynamicQuantization, *, calibration_data=None, example_inputs=None,
                  data=None, val_data=None) -> nn.Module:
    """Dynamically quantize a copy of ``model``: its Linear/LSTM/GRU layers (as ``config.layers`` says) get
    int8 weights and quantize their inputs per call. No calibration data is needed."""
    if not isinstance(config, DynamicQuantization):
        raise ConfigError(f"apply_dynamic takes a DynamicQuantization config, got {type(config).__name__}")
    wanted = tuple(_DYNAMIC_LAYERS[k] for k in config.layers)

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
    """Quantize a copy of ``model``'s Linear weights to ``config.bits`` in groups; activations stay float."""
    if not isinstance(config, WeightOnly):
        raise ConfigError(f"apply_weight_only takes a WeightOnly config, got {type(config).__name__}")
    rows = _rows_per_layer(model, example_inputs)

    def choose(name: str, module: nn.Module):
        if type(module) is not nn.Linear:
            return "weight-only quantization covers Linear layers"
        if module.in_features % config.group_size:
            return f"group_size={config.group_size} does not divide in_features={module.in_features}"
        q = WeightOnlyLinear.from_float(module, config.bits, config.group_size, config.symmetric)
        if config.require_speedup and module.weight.is_cuda:
            faster, base, low = faster_than_bf16(module, q, rows.get(name, 64))
            if not faster:
                return f"slower than bf16 at this shape ({low:.3f} vs {base:.3f} ms)"
        return q

    model, _ = _convert(model, choose, config.exclude, "WeightOnly", config.on_unsupported,
                        f"{config.bits}-bit weight-only covers Linear layers")
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
