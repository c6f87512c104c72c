"""Static int8 post-training quantization: calibrated activations, an int8 graph run by integer kernels."""

from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError, DataError, UnsupportedModelError
from ..data.batches import as_example_inputs, batch_size, call_model, split_batch
from ..export.onnx import _export_copy, array, ort_session, to_onnx_proto
from ..metrics.profile import count_macs
from ..nn.modules import check_patterns
from .backends import STATIC_BACKENDS
from .backends.cpu import cpu_int8
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
from .observers import make_observer
from .ptq import ACTIVATION_SPEC, StaticQuantization, report_float

__all__ = ["apply_static", "calibration_batches", "AGREEMENT_TOLERANCE"]

AGREEMENT_TOLERANCE = {"top1_agreement": 0.95, "relative_error": 0.1}
"""The int8 model's outputs on the example batch drift from the float model's when its top-1 agreement falls
below ``top1_agreement`` or its largest error exceeds ``relative_error`` times the largest float output."""


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
    check_patterns("StaticQuantization.exclude", config.exclude, [n for n, _ in model.named_modules() if n])
    batches = calibration_batches(calibration_data if calibration_data is not None else data,
                                  config.calibration_batches)
    example = _detached(batches[0] if example_inputs is None else as_example_inputs(example_inputs))
    float_model, folded = _folded_copy(model)
    proto = global_pool_rewrite(to_onnx_proto(float_model, example, opset=config.opset, dynamic_batch=True,
                                              dynamic_dims=dynamic_dims([example, *batches])))

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
    cpu = cpu_int8()
    # 7-bit weights keep the uint8 x int8 pair sums of non-VNNI x86 kernels inside their saturating int16.
    reduce_range = cpu.saturates if config.reduce_range is None else config.reduce_range
    excluded = exclude_node_names(proto, config.exclude)
    if config.exclude and not excluded:
        raise ConfigError(f"exclude={list(config.exclude)} matches no layer of the model")
    huge = huge_range_nodes(proto, observers)
    if huge:
        warnings.warn(f"StaticQuantization: {len(huge)} node(s) stay in float because an activation they produce or "
                      f"read was calibrated beyond +-{HUGE_RANGE:g} (an additive attention mask, typically), where one "
                      f"uint8 step would swallow every other value: {', '.join(huge[:8])}"
                      + (f" and {len(huge) - 8} more" if len(huge) > 8 else ""), UserWarning, stacklevel=3)
    excluded = sorted(set(excluded) | set(huge))
    qdq = quantize_graph(proto, observers, fmt="qdq", per_channel=config.per_channel, exclude_nodes=excluded,
                         reduce_range=reduce_range)
    float_layers = float_compute_nodes(qdq, excluded)
    report_float(float_layers, config.on_unsupported, "StaticQuantization",
                  "they run as dequantize -> float op -> quantize")
    wanted = STATIC_BACKENDS if config.backend == "auto" else (config.backend,)
    qop = None
    if any(b != "ort_qdq" for b in wanted):
        qop = quantize_graph(proto, observers, fmt="qop", per_channel=config.per_channel, exclude_nodes=excluded,
                             reduce_range=reduce_range)
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
        "per_channel": config.per_channel,
        "weights": "int8 symmetric, 7-bit range (reduce_range)" if reduce_range else "int8 symmetric",
        "cpu_int8": cpu.describe(),
        "reduce_range": {"on": reduce_range, "why": _reduce_range_reason(config.reduce_range, cpu.saturates)},
        "activations": "uint8 affine", "conv_bn_folded": folded, "calibration_batches": len(batches),
        "float_layers": float_layers, "excluded_layers": sorted(set(config.exclude)),
        "float_for_huge_range": huge,
        "backend_latency_ms": {k: round(v, 4) for k, v in latency.items()}, "backends_skipped": skipped,
        "check": _check_agreement(proto, runners[chosen], example, chosen, reduce_range, cpu.saturates),
        # FlopCounterMode cannot see inside the integer kernels: record the float model's work for profiles.
        "macs_per_sample": _macs_per_sample(float_model, example),
    }
    return QuantizedGraphModel.from_onnx(graphs[chosen], backend=chosen, info=info)


HUGE_RANGE = 1e4
"""An activation whose calibrated range reaches this magnitude is left in float with the nodes that produce and
consume it: in practice an additive attention mask, whose stand-in for -inf (about -3.4e38) would make one uint8
step wider than every other value of the tensor."""


def huge_range_nodes(proto, observers: dict) -> list[str]:
    """Names of the nodes that produce or consume a tensor calibrated beyond ``HUGE_RANGE``."""
    tensors = {name for name, obs in observers.items()
               if max(abs(obs.data_min), abs(obs.data_max)) >= HUGE_RANGE}
    return sorted(n.name for n in proto.graph.node if tensors & {*n.input, *n.output})


def dynamic_dims(batches: list[tuple | dict]) -> dict[str | int, set[int]]:
    """The non-batch dimensions of each input that may vary between calls: those whose size differs between
    ``batches`` (dynamically padded text), and every dimension of integer inputs (token ids, attention masks,
    positions), whose lengths follow the text rather than the model."""
    dims: dict[str | int, set[int]] = {}
    first = batches[0]
    items = first.items() if isinstance(first, dict) else enumerate(first)
    for key, t in items:
        if not torch.is_tensor(t) or t.dim() < 2:
            continue
        others = [b.get(key) if isinstance(b, dict) else (b[key] if key < len(b) else None) for b in batches]
        shapes = {tuple(o.shape) for o in others if torch.is_tensor(o) and o.dim() == t.dim()}
        varying = {d for d in range(1, t.dim()) if len({s[d] for s in shapes}) > 1}
        if not t.is_floating_point() and not t.is_complex():
            varying |= set(range(1, t.dim()))
        if varying:
            dims[key] = varying
    return dims


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


def _reduce_range_reason(asked: bool | None, saturates: bool) -> str:
    if asked is not None:
        return "set in the config"
    if saturates:
        return "this CPU's int8 kernels sum uint8 x int8 products in saturating int16 (no VNNI)"
    return "this CPU's int8 kernels accumulate in int32 (VNNI, AMX or ARM): full 8-bit weights are exact"


def _check_agreement(float_proto, runner, example: tuple | dict, backend: str, reduce_range: bool,
                     saturates: bool) -> dict[str, float]:
    """Float vs int8 outputs on the example batch, recorded with the model (the first output's figures);
    warns naming each output that drifts beyond :data:`AGREEMENT_TOLERANCE`."""
    ref = ort_session(float_proto.SerializeToString())
    names = [i.name for i in ref.get_inputs()]
    arrays = _arrays(example)
    expected = ref.run(None, {n: arrays[n] for n in names} if isinstance(arrays, dict) else dict(zip(names, arrays)))
    got = call_model(runner, example)
    got = got if isinstance(got, tuple) else (got,)
    checks, drifted = [], []
    for output, a, b in zip(ref.get_outputs(), expected, got):
        b = b.numpy()
        out = {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_output": float(np.abs(a).max())}
        if a.ndim >= 2 and a.shape[1] > 1:
            out["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
        checks.append(out)
        relative = out["max_abs_diff"] / max(out["max_abs_output"], 1e-12)
        if out.get("top1_agreement", 1.0) < AGREEMENT_TOLERANCE["top1_agreement"] \
                or relative > AGREEMENT_TOLERANCE["relative_error"]:
            top1 = f"top-1 agreement {out['top1_agreement']:.3f}, " if "top1_agreement" in out else ""
            drifted.append(f"output {output.name!r} ({top1}max error {relative:.1%} of the largest output)")
    if drifted:
        hint = ("this CPU's int8 kernels saturate without reduce_range: leave reduce_range=None or set it True"
                if saturates and not reduce_range else
                "keep the sensitive layers float with exclude=[...], or try observer='percentile' or 'mse'")
        warnings.warn(f"StaticQuantization ({backend}): the int8 model drifts from the float one on the example "
                      f"batch: {'; '.join(drifted)}. {hint}", UserWarning, stacklevel=3)
    return checks[0]
