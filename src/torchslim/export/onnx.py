"""ONNX export of fp32, pruned and quantized models, and an agreement check with ONNX Runtime.

The model is captured with ``torch.export`` and translated by ``torch.onnx``'s exporter (which folds
BatchNorm into the preceding convolution in eval mode); models ``torch.export`` cannot capture fall back to
the TorchScript exporter. Pruning masks are folded into the weights of a copy first, and a statically
quantized model (:class:`~torchslim.quantization.backends.onnxrt.QuantizedGraphModel`) writes its own
quantized (QDQ or QOperator) graph. Files are written atomically and checked with ``onnx.checker``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from ..core.errors import DataError, TorchslimError
from ..core.files import atomic_write
from ..data.batches import as_example_inputs, call_model, output_tensor, split_batch
from ..nn.masks import masked_names
from ..nn.modules import copy_model

__all__ = ["export_onnx", "onnx_agreement", "to_onnx_proto", "Agreement", "OnnxExportError", "OnnxExistsError",
           "ort_session"]


class OnnxExportError(TorchslimError):
    """The model (one of its ops or layers) cannot be expressed in ONNX."""


class OnnxExistsError(TorchslimError, FileExistsError):
    """The target path exists and ``overwrite=True`` was not passed."""


def export_onnx(model: nn.Module, example_inputs: tuple | dict | torch.Tensor, path: str | os.PathLike, *,
                opset: int | None = None, dynamic_batch: bool = True, overwrite: bool = False) -> Path:
    """Export ``model`` to an ONNX file at ``path`` and return the path.

    ``example_inputs`` is what the model is traced with: a tensor (one input), a tuple of positional inputs or
    a dict of keyword inputs (the graph's inputs then carry those names); ``dynamic_batch`` makes dimension 0
    of every input symbolic. ``opset`` defaults to the exporter's.
    The model is not modified (pruning masks are folded into a copy). Raises :class:`OnnxExportError`
    naming the op and layer that has no ONNX translation, and :class:`OnnxExistsError` when ``path``
    exists and ``overwrite`` is False.
    """
    path = Path(path)
    _check_target(path, overwrite)
    proto = to_onnx_proto(model, example_inputs, opset=opset, dynamic_batch=dynamic_batch)
    _check_proto(proto, f"the ONNX graph of {type(model).__name__}")
    atomic_write(path, proto.SerializeToString(), overwrite=overwrite, exists_error=OnnxExistsError)
    return path


def to_onnx_proto(model: nn.Module, example_inputs: tuple | dict | torch.Tensor, *, opset: int | None = None,
                  dynamic_batch: bool = True, dynamic_dims: dict[str | int, set[int]] | None = None):
    """The ``onnx.ModelProto`` of ``model`` (see :func:`export_onnx`), without writing a file.

    ``dynamic_dims`` names further dimensions, beyond the batch, that may change from call to call (e.g. the
    sequence length of token inputs): ``{input name or position: {dim, ...}}``. The exporter keeps one static
    where the model's code fixes it."""
    if not isinstance(model, nn.Module):
        raise OnnxExportError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, "to_onnx"):  # quantized models carry their own (quantized) graph
        return model.to_onnx()
    args, kwargs = _as_args(example_inputs)
    _check_exportable_modules(model)
    model = _export_copy(model)
    if dynamic_batch:  # torch.export specialises a batch of 1 to a constant
        args = tuple(_double_batch_of_one(a) for a in args)
        kwargs = {k: _double_batch_of_one(a) for k, a in kwargs.items()}
    with _quiet():
        try:
            program = _torch_export(model, args, kwargs, dynamic_batch, dynamic_dims or {})
        except OnnxExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - data-dependent control flow etc.: try the older exporter
            return _torchscript_export(model, args, kwargs, opset, dynamic_batch, exc, dynamic_dims or {})
        try:
            onnx_program = torch.onnx.export(program, args, kwargs=kwargs or None, dynamo=True,
                                             opset_version=opset, verbose=False, optimize=True)
        except Exception as exc:  # noqa: BLE001
            raise _conversion_error(exc, program) from None
    return onnx_program.model_proto


@dataclasses.dataclass
class Agreement:
    """How closely an ONNX file run by ONNX Runtime matches the PyTorch model on the same inputs."""

    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    max_logit: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.no_grad()
def onnx_agreement(model: nn.Module, path: str | os.PathLike, loader, *, max_batches: int | None = None) -> Agreement:
    """Run ``model`` and the ONNX file at ``path`` (ONNX Runtime, CPU) on ``loader``'s inputs and compare.

    Returns the share of samples whose top-1 class agrees and the max / mean absolute logit difference.
    Batches take any form of :mod:`torchslim.data.batches`; keyword inputs are fed by name.
    """
    sess = ort_session(Path(path).read_bytes())
    names = [i.name for i in sess.get_inputs()]
    was_training = model.training
    model.eval()
    agree = n = 0
    max_diff = sum_diff = max_logit = 0.0
    count = 0
    try:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x = split_batch(batch)[0]
            inputs = (x,) if torch.is_tensor(x) else x
            if isinstance(inputs, dict):
                missing = [n for n in names if n not in inputs]
                if missing:
                    raise DataError(f"the ONNX file takes inputs {names}; the loader's batches lack {missing}")
                feed = {n: inputs[n] for n in names}
            elif len(inputs) != len(names):
                raise DataError(f"the ONNX file takes {len(names)} input(s) {names}, the loader gives {len(inputs)}")
            else:
                feed = dict(zip(names, inputs))
            ref = call_model(model, inputs)
            ref = output_tensor(ref).float().cpu()
            out = torch.from_numpy(sess.run(None, {k: v.detach().cpu().numpy() for k, v in feed.items()})[0])
            if out.shape != ref.shape:
                raise TorchslimError(f"ONNX output shape {tuple(out.shape)} differs from the model's {tuple(ref.shape)}")
            diff = (out.float() - ref).abs()
            max_diff = max(max_diff, float(diff.max()))
            sum_diff += float(diff.sum())
            count += diff.numel()
            max_logit = max(max_logit, float(ref.abs().max()))
            if ref.dim() >= 2:
                agree += int((out.argmax(1) == ref.argmax(1)).sum())
                n += ref.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("onnx_agreement: the loader yielded no batch; pass a loader with at least one batch")
    return Agreement(top1_agreement=agree / n if n else 1.0, max_abs_diff=max_diff, mean_abs_diff=sum_diff / count,
                     max_logit=max_logit, samples=n)


def ort_session(model_bytes: bytes, threads: int | None = None):
    """A CPU ``onnxruntime.InferenceSession`` of ``model_bytes`` using ``threads`` (default: torch's count)."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        raise TorchslimError("onnxruntime is not installed; pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Idle ORT threads otherwise spin for a while after each run, stealing the cores PyTorch work in the same
    # process needs next (measured: PyTorch int8 2x slower right after an ORT run); ORT itself loses ~3%.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------
# Capture


def _as_args(example_inputs: Any) -> tuple[tuple, dict]:
    """``(positional, keyword)`` export arguments."""
    try:
        inputs = as_example_inputs(example_inputs)
    except DataError as exc:
        raise OnnxExportError(str(exc)) from None
    return ((), inputs) if isinstance(inputs, dict) else (inputs, {})


def _double_batch_of_one(a: Any) -> Any:
    return torch.cat([a, a]) if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == 1 else a


def _check_exportable_modules(model: nn.Module) -> None:
    for name, module in model.named_modules():
        reason = getattr(module, "onnx_unsupported", None)
        if reason:
            raise OnnxExportError(f"layer {name or '<root>'!r} ({type(module).__name__}) cannot be exported to ONNX: "
                                  f"{reason}")


def _export_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with ``torch.nn.utils.prune`` masks folded into the weights."""
    model = copy_model(model).eval()
    for module in model.modules():
        for name in masked_names(module):
            prune.remove(module, name)
    return model


def _torch_export(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool,
                  dynamic_dims: dict[str | int, set[int]]):
    dynamic_shapes = None
    if dynamic_batch or dynamic_dims:
        batch = torch.export.Dim("batch")

        def spec(key: str | int, a: Any) -> dict | None:
            if not torch.is_tensor(a) or a.dim() == 0:
                return None
            # AUTO: a dimension the model's code pins (a fixed-size reshape) stays static instead of failing.
            dims = {d: torch.export.Dim.AUTO for d in dynamic_dims.get(key, ()) if 0 < d < a.dim()}
            return {**({0: batch} if dynamic_batch else {}), **dims} or None

        # Keyword inputs are matched to forward's parameters by name.
        dynamic_shapes = ({k: spec(k, a) for k, a in kwargs.items()} if kwargs
                          else tuple(spec(i, a) for i, a in enumerate(args)))
    return torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)


def _torchscript_export(model: nn.Module, args: tuple, kwargs: dict, opset: int | None, dynamic_batch: bool,
                        first: Exception, dynamic_dims: dict[str | int, set[int]]):
    import onnx

    names = list(kwargs) if kwargs else [f"input_{i}" for i in range(len(args))]
    values = list(kwargs.values()) if kwargs else list(args)
    keys = list(kwargs) if kwargs else list(range(len(args)))
    axes = {n: {**({0: "batch"} if dynamic_batch else {}),
                **{d: f"{n}_dim{d}" for d in dynamic_dims.get(k, ()) if 0 < d < a.dim()}}
            for n, k, a in zip(names, keys, values) if torch.is_tensor(a) and a.dim() > 0}
    axes = {n: a for n, a in axes.items() if a} or None
    buf = _BytesSink()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # A trailing dict in args is passed to forward as keyword arguments.
            torch.onnx.export(model, (*args, kwargs) if kwargs else args, buf, dynamo=False,
                              opset_version=opset or 17, input_names=names, dynamic_axes=axes)
    except Exception as exc:  # noqa: BLE001
        raise OnnxExportError(f"cannot export {type(model).__name__} to ONNX. torch.export failed "
                              f"({_first_line(first)}) and the TorchScript exporter failed too ({_first_line(exc)}). "
                              "Make forward traceable (no data-dependent Python control flow) or replace the "
                              "op named above") from None
    return onnx.load_from_string(buf.getvalue())


class _BytesSink:
    """A file-like sink the TorchScript exporter can write to."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, b: bytes) -> int:
        self._chunks.append(bytes(b))
        return len(b)

    def flush(self) -> None:
        pass

    def getvalue(self) -> bytes:
        return b"".join(self._chunks)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


_OP_PATTERNS = (re.compile(r"op='([\w.]+)'"), re.compile(r"target=torch\.ops\.([\w.]+)"),
                re.compile(r"(aten::\w+)"))


def _conversion_error(exc: Exception, program) -> OnnxExportError:
    """Name the op without an ONNX translation and the layer (and source line) it comes from."""
    text = str(exc)
    op = None
    for pattern in _OP_PATTERNS:
        m = pattern.search(text)
        if m:
            op = m.group(1).replace("::", ".")
            break
    if op is None:
        return OnnxExportError(f"ONNX conversion failed: {_first_line(exc)}")
    base = op.split(".")[-2] if op.count(".") >= 2 else op.split(".")[-1]
    base = base.lstrip("_")
    layer, where = "<root>", ""
    for node in program.graph.nodes:
        if node.op == "call_function" and base in str(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, cls = list(stack.values())[-1]
                layer = f"{path or '<root>'} ({str(cls).rsplit('.', 1)[-1]})"
            trace = (node.meta.get("stack_trace") or "").strip().splitlines()
            files = [t.strip() for t in trace if t.strip().startswith("File ")]
            if files:
                where = f" at {files[-1]}"
            break
    return OnnxExportError(f"cannot export to ONNX: op {op!r} in layer {layer}{where} has no ONNX translation in "
                           f"torch {torch.__version__}'s exporter. Replace the op with supported ones, or register "
                           "an ONNX function for it (torch.onnx.export(custom_translation_table=...))")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints and its torchvision warnings for the duration of an export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration",
                                              "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as sink:
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                sink.close()
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ----------------------------------------------------------------------------------------------
# Files


def _check_proto(proto, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001
        raise OnnxExportError(f"{what} fails onnx.checker: {_first_line(exc)}") from None


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise OnnxExportError(f"cannot export to {path}: it is a directory; pass a file path such as "
                              f"{path / 'model.onnx'}")
    if path.exists() and not overwrite:
        raise OnnxExistsError(f"refusing to overwrite existing file {path}; pass overwrite=True to replace it")


def array(t: torch.Tensor) -> np.ndarray:
    """A contiguous numpy view of a CPU tensor (float32 for floating inputs)."""
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    return np.ascontiguousarray(t.numpy())
