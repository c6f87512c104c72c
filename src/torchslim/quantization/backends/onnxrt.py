"""Static int8 graphs: calibrate a float ONNX graph with torchslim's observers, write the quantized graph
(QDQ or QOperator) with those exact scales, and run it as an ``nn.Module`` on ONNX Runtime's integer kernels
(or, through :mod:`.torch_int8`, on PyTorch's).

The graph writing itself is ONNX Runtime's quantizer (bias quantization, ReLU folding, per-channel weights);
torchslim supplies every activation's scale and zero point through its tensor overrides, so the observer
choice decides the ranges. At run time ONNX Runtime fuses ``DequantizeLinear -> op -> QuantizeLinear``
into integer kernels (QLinearConv, QLinearAdd, QGemm, ...), so the model really computes in int8.
"""

from __future__ import annotations

import ast
import copy
import logging
import re
import statistics
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from ...core.errors import ConfigError, DataError, TorchslimError, UnsupportedModelError
from ...data.batches import call_model
from ...export.checkpoint import ModuleCodec
from ...export.onnx import ort_session
from ...nn.modules import match
from ..observers import Observer
from .torch_int8 import ENGINES, TorchInt8Program

__all__ = ["QuantizedGraphModel", "calibrate_graph", "quantize_graph", "float_compute_nodes", "layer_names",
           "global_pool_rewrite", "measure_runners", "make_runner", "OrtRunner", "exclude_node_names",
           "FORMATS", "PASS_THROUGH_OPS", "CODECS"]

FORMATS = ("qdq", "qop")

# Ops that move or reshape data without arithmetic: running them on float or int8 costs the same.
PASS_THROUGH_OPS = frozenset({
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Shape", "Gather", "Constant", "Identity", "Concat",
    "Slice", "Cast", "Split", "Expand", "ConstantOfShape", "Range", "Size", "QuantizeLinear", "DequantizeLinear",
    "DynamicQuantizeLinear",
})

# Ops ONNX Runtime's CPU provider runs as integer kernels when they sit between DequantizeLinear and
# QuantizeLinear (QLinearConv, QGemm, QLinearAdd, QLinearSigmoid, ...). Anything else stays float.
INT8_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "AveragePool", "GlobalAveragePool", "MaxPool",
    "LeakyRelu", "Sigmoid", "Softmax", "Concat", "Resize", "Where", "Split", "Pad", "ArgMax", "Relu", "Clip",
})

_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")


# ----------------------------------------------------------------------------------------------
# Graph inspection


def layer_names(model) -> dict[str, str]:
    """Node name -> the PyTorch module path it came from (from the exporter's name-scope metadata)."""
    out = {}
    for node in model.graph.node:
        layer = node.name
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = ast.literal_eval(prop.value)
                except (ValueError, SyntaxError):
                    break
                if isinstance(scopes, list) and len(scopes) >= 2:
                    layer = str(scopes[-2])
                break
        out[node.name] = layer
    return out


def _tensor_layers(model) -> dict[str, str]:
    """Activation tensor name -> a readable name of where it comes from (for errors)."""
    names = layer_names(model)
    out = {i.name: f"model input {i.name!r}" for i in model.graph.input}
    for node in model.graph.node:
        for o in node.output:
            out[o] = f"{names.get(node.name, node.name)} ({node.op_type} output)"
    return out


def float_compute_nodes(model, exclude_nodes: Iterable[str] = ()) -> list[dict[str, str]]:
    """Nodes of a quantized graph that still compute in floating point: ``[{node, op, layer}]``.

    In a QDQ graph a node runs as an integer kernel when ONNX Runtime has one for its op (``INT8_OPS``),
    every activation input comes from a DequantizeLinear and every output goes (directly or through
    ReLU/Clip) into QuantizeLinear; in a
    QOperator graph, when its op is an integer one (QLinear*, QGemm, ...). Data-movement ops are ignored.
    """
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in graph.output}
    names = layer_names(model)
    excluded = set(exclude_nodes)

    def to_quant(tensor: str, depth: int = 0) -> bool:
        users = consumers.get(tensor, [])
        if tensor in graph_outputs or not users:
            return False
        for u in users:
            if u.op_type == "QuantizeLinear":
                continue
            if u.op_type in ("Relu", "Clip") and depth < 2 and to_quant(u.output[0], depth + 1):
                continue
            return False
        return True

    out = []
    for node in graph.node:
        op = node.op_type
        if op in PASS_THROUGH_OPS or node.name in excluded or op in ("Relu", "Clip"):
            continue
        if node.domain == "com.microsoft" or op.startswith("QLinear") or op in ("QGemm", "MatMulInteger",
                                                                              "ConvInteger"):
            continue
        acts = [i for i in node.input if i and i not in inits and not _is_constant(producer.get(i))]
        from_dq = all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in acts)
        if op in INT8_OPS and acts and from_dq and all(to_quant(o) for o in node.output if o):
            continue
        if op == "MaxPool" and not from_dq:  # QOperator graphs run MaxPool on uint8 directly
            continue
        out.append({"node": node.name, "op": op, "layer": names.get(node.name, node.name)})
    return out


def _is_constant(node) -> bool:
    return node is not None and node.op_type in ("Constant", "ConstantOfShape")


def global_pool_rewrite(model):
    """Replace ``ReduceMean`` over the spatial axes of a 4-d tensor (keepdims) -- what ``AdaptiveAvgPool2d(1)``
    and ``x.mean((2, 3), keepdim=True)`` export to -- with ``GlobalAveragePool``, which has an int8 kernel."""
    import onnx
    from onnx import numpy_helper

    model = onnx.shape_inference.infer_shapes(copy.deepcopy(model))
    ranks = {}
    for vi in [*model.graph.input, *model.graph.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("keepdims", 1) != 1:
            continue
        if len(node.input) > 1 and node.input[1] in inits:
            axes = numpy_helper.to_array(inits[node.input[1]]).tolist()
        else:
            axes = attrs.get("axes")
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
    return model


# ----------------------------------------------------------------------------------------------
# Calibration


def calibrate_graph(model, batches: Iterable[tuple[np.ndarray, ...] | dict[str, np.ndarray]],
                    make_observer: Callable[[str], Observer],
                    *, make_input_observer: Callable[[str], Observer] | None = None,
                    progress: bool = False) -> dict[str, Observer]:
    """Run the float graph on ``batches`` (tuples of positional inputs or dicts of named ones) with every
    activation exposed, feeding one observer per tensor.

    ``make_observer(layer_description)`` builds an observer (``make_input_observer`` for the graph inputs,
    when given); the result maps tensor name -> observer. ``progress`` shows a bar on a terminal.
    """
    import onnx
    from tqdm.auto import tqdm

    make_input_observer = make_input_observer or make_observer
    aug = copy.deepcopy(model)
    existing = {o.name for o in aug.graph.output}
    producers = {o: n for n in aug.graph.node for o in n.output}
    for node in aug.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            continue
        for o in node.output:
            if o and o not in existing:
                aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(o))
                existing.add(o)
    sess = ort_session(aug.SerializeToString())
    input_names = [i.name for i in sess.get_inputs()]
    outputs = [o for o in sess.get_outputs() if o.type in _FLOAT_TYPES]
    out_names = [o.name for o in outputs]
    where = _tensor_layers(model)
    observers: dict[str, Observer] = {}
    seen = 0
    for batch in tqdm(batches, desc="calibrate", disable=None if progress else True, leave=False):
        feed = _feed(input_names, batch, "a calibration batch", DataError)
        for name, value in feed.items():
            if np.issubdtype(value.dtype, np.floating):
                if name not in observers:
                    observers[name] = make_input_observer(where.get(name, name))
                observers[name].update(torch.from_numpy(value))
        for name, value in zip(out_names, sess.run(out_names, feed)):
            if name in producers:
                if name not in observers:
                    observers[name] = make_observer(where.get(name, name))
                observers[name].update(torch.from_numpy(value))
        seen += 1
    if seen == 0:
        raise DataError("calibration data is empty: it yielded no batch; pass a loader (or list of tensors) with "
                        "at least one batch of representative inputs")
    return observers


# ----------------------------------------------------------------------------------------------
# Quantized graph


def quantize_graph(model, observers: dict[str, Observer], *, fmt: str = "qdq", per_channel: bool = True,
                   exclude_nodes: Iterable[str] = (), reduce_range: bool = False):
    """The quantized ``onnx.ModelProto`` of float ``model`` with activations quantized as ``observers`` say
    (uint8, their scale and zero point) and weights int8 symmetric (per output channel when ``per_channel``).
    ``fmt`` is ``"qdq"`` (QuantizeLinear/DequantizeLinear pairs) or ``"qop"`` (QLinear* operators)."""
    import onnx

    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    try:
        from onnxruntime.quantization.calibrate import (
            CalibrationMethod,
            TensorData,
            TensorsData,
        )
        from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
        from onnxruntime.quantization.quant_utils import QuantizationMode, QuantType
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    except ImportError as exc:  # pragma: no cover - depends on the onnxruntime build
        raise TorchslimError(f"this onnxruntime has no quantization tools ({exc}); install onnxruntime>=1.16") from None

    model = onnx.shape_inference.infer_shapes(copy.deepcopy(model))
    observers = _share_through_activations(model, observers)
    ranges, overrides = {}, {}
    for name, obs in observers.items():
        scale, zero = obs.qparams()
        scale_f = np.float32(scale.reshape(-1)[0].item())
        zero_u8 = np.uint8(int(zero.reshape(-1)[0].item()))
        lo = np.float32((0 - int(zero_u8)) * scale_f)
        hi = np.float32((255 - int(zero_u8)) * scale_f)
        ranges[name] = TensorData(lowest=lo, highest=hi)
        overrides[name] = [{"scale": np.array(scale_f, np.float32), "zero_point": np.array(zero_u8, np.uint8)}]
    tensors_range = TensorsData(CalibrationMethod.MinMax, ranges)
    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    extra = {"TensorQuantOverrides": overrides, "ActivationSymmetric": False, "WeightSymmetric": True}
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # ORT's quantizer logs "please pre-process" advice on the root logger
    try:
        if fmt == "qdq":
            q = QDQQuantizer(model, per_channel, reduce_range, QuantType.QInt8, QuantType.QUInt8, tensors_range, [],
                             list(exclude_nodes), ops, extra)
        else:
            q = ONNXQuantizer(model, per_channel, reduce_range, QuantizationMode.QLinearOps, True, QuantType.QInt8,
                              QuantType.QUInt8, tensors_range, [], list(exclude_nodes), ops, extra)
        q.quantize_model()
        q.model.topological_sort()  # ORT runs unsorted graphs, but the ONNX standard (and onnx.checker) wants order
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModelError(f"ONNX Runtime's quantizer cannot quantize this graph ({type(exc).__name__}: "
                                    f"{exc}); exclude the layer named in the message with exclude=[...]") from None
    finally:
        logger.setLevel(level)
    return q.model.model


def _share_through_activations(model, observers: dict[str, Observer]) -> dict[str, Observer]:
    """A tensor consumed only by ReLU/Clip takes that activation's output range, so the activation folds
    into the producer's requantization (uint8 with zero point 0 clamps negatives to 0)."""
    observers = dict(observers)
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    for node in model.graph.node:
        if node.op_type in ("Relu", "Clip") and consumers.get(node.input[0]) == 1 and node.output[0] in observers:
            observers[node.input[0]] = observers[node.output[0]]
    return observers


# ----------------------------------------------------------------------------------------------
# The module


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name) or "_"


_DTYPES = {np.dtype(k): v for k, v in ((np.float32, torch.float32), (np.float16, torch.float16),
                                       (np.float64, torch.float64), (np.int8, torch.int8), (np.uint8, torch.uint8),
                                       (np.int16, torch.int16), (np.int32, torch.int32), (np.int64, torch.int64),
                                       (np.bool_, torch.bool))}


def _feed(names: list[str], batch: Any, what: str, error: type[Exception]) -> dict[str, Any]:
    """Graph inputs by name from positional values (a tuple) or named ones (a dict)."""
    if isinstance(batch, dict):
        missing = [n for n in names if n not in batch]
        if missing:
            raise error(f"the model takes input(s) {names}; {what} lacks {missing} (it has {sorted(batch)})")
        return {n: batch[n] for n in names}
    if len(batch) != len(names):
        raise error(f"the model takes {len(names)} input(s) {names}, {what} has {len(batch)}")
    return dict(zip(names, batch))


class OrtRunner:
    """Runs a graph in an ONNX Runtime CPU session: torch tensors in (positional or by input name), torch
    tensors out."""

    def __init__(self, model, threads: int | None = None):
        self.session = ort_session(model.SerializeToString(), threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor, **named: torch.Tensor):
        given = {**dict(zip(self.inputs, inputs)), **named} if named else inputs
        feed = {}
        for name, x in _feed(self.inputs, given, "the call", TorchslimError).items():
            if not torch.is_tensor(x):
                raise TorchslimError(f"input {name!r} must be a tensor, got {type(x).__name__}")
            x = x.detach().cpu()
            feed[name] = np.ascontiguousarray((x.float() if x.is_floating_point() else x).numpy())
        outs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def make_runner(backend: str, model) -> Callable[..., Any]:
    """A callable running quantized graph ``model`` on ``backend`` (``ort_qdq``/``ort_qop``: ONNX Runtime;
    ``torch_onednn``/``torch_x86``: PyTorch's quantized kernels, which need the QOperator form)."""
    if backend.startswith("ort_"):
        return OrtRunner(model, torch.get_num_threads())
    if backend in ENGINES:
        return TorchInt8Program(model, backend)
    raise ConfigError(f"unknown int8 backend {backend!r}; choose one of ort_qdq, ort_qop, {', '.join(ENGINES)}")


class QuantizedGraphModel(nn.Module):
    """A statically quantized model: a quantized ONNX graph run by integer kernels, float tensors in and out.

    ``backend`` says which kernels: ONNX Runtime (``ort_qdq``, ``ort_qop``) or PyTorch's quantized CPU
    engines (``torch_onednn``, ``torch_x86``, lowered from the QOperator graph). The graph structure is kept
    as serialized bytes (``graph``) and every initializer (int8 weights, int32 biases, scales, zero points)
    as a frozen parameter under ``tensors``, so checkpoints store the integer weights as tensors and a
    loaded model is lowered to its backend again. ``info`` records the observer, float-kept layers and
    the latencies measured when the backend was chosen. The runner is built lazily (ONNX Runtime with
    ``torch.get_num_threads()`` threads).
    """

    onnx_unsupported = None  # export writes this model's own graph (see to_onnx)

    def __init__(self, graph_size: int, initializers: list[list[Any]], backend: str = "ort_qdq",
                 info: dict[str, Any] | None = None):
        super().__init__()
        self.init_kwargs = {"graph_size": int(graph_size), "initializers": [list(i) for i in initializers],
                            "backend": backend, "info": dict(info or {})}
        self.backend = backend
        self.info = self.init_kwargs["info"]
        self.register_buffer("graph", torch.zeros(int(graph_size), dtype=torch.uint8))
        self.tensors = nn.ParameterDict()
        self._names: list[tuple[str, str]] = []
        used: set[str] = set()
        for name, dtype, shape in initializers:
            key = _safe(name)
            while key in used:
                key += "_"
            used.add(key)
            self._names.append((name, key))
            self.tensors[key] = nn.Parameter(torch.zeros(shape, dtype=getattr(torch, dtype)), requires_grad=False)
        self._runner = None
        self._runner_threads = 0

    @classmethod
    def from_onnx(cls, model, backend: str = "ort_qdq", info: dict[str, Any] | None = None) -> "QuantizedGraphModel":
        """Wrap a quantized ``onnx.ModelProto``."""
        from onnx import numpy_helper

        model = copy.deepcopy(model)
        arrays = [(init.name, numpy_helper.to_array(init)) for init in model.graph.initializer]
        unsupported = [(n, a.dtype) for n, a in arrays if a.dtype not in _DTYPES]
        if unsupported:
            raise UnsupportedModelError(f"initializers of unsupported dtype in the quantized graph: {unsupported[:3]}")
        del model.graph.initializer[:]
        blob = model.SerializeToString()
        specs = [[n, str(_DTYPES[a.dtype]).removeprefix("torch."), list(a.shape)] for n, a in arrays]
        module = cls(len(blob), specs, backend, info)
        with torch.no_grad():
            module.graph.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
            for (name, key), (_, a) in zip(module._names, arrays):
                module.tensors[key].copy_(torch.from_numpy(np.array(a, order="C", copy=True)))
        return module

    def to_onnx(self):
        """The full quantized ``onnx.ModelProto`` (graph plus initializers)."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load_from_string(self.graph.cpu().numpy().tobytes())
        for name, key in self._names:
            model.graph.initializer.append(numpy_helper.from_array(self.tensors[key].detach().cpu().numpy(), name))
        return model

    def _get_runner(self):
        threads = torch.get_num_threads()
        if self._runner is None or (self.backend.startswith("ort_") and self._runner_threads != threads):
            self._runner = make_runner(self.backend, self.to_onnx())
            self._runner_threads = threads
        return self._runner

    def forward(self, *inputs: torch.Tensor, **named: torch.Tensor):
        first = next(iter([*inputs, *named.values()]), None)
        device = first.device if torch.is_tensor(first) else torch.device("cpu")
        out = self._get_runner()(*(x.detach().cpu() if torch.is_tensor(x) else x for x in inputs),
                                 **{k: x.detach().cpu() if torch.is_tensor(x) else x for k, x in named.items()})
        if isinstance(out, tuple):
            return tuple(o.to(device) for o in out)
        return out.to(device)

    def _load_from_state_dict(self, *args, **kwargs):
        self._runner = None  # rebuilt from the loaded tensors on the next call
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._runner = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runner"] = None  # sessions and packed weights cannot be copied or pickled; rebuilt on demand
        return state

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, graph_bytes={self.graph.numel()}, tensors={len(self._names)}"


def measure_runners(runners: dict[str, Callable[..., Any]], inputs: tuple | dict, *, rounds: int = 12,
                    warmup: int = 2) -> dict[str, float]:
    """Median latency (ms) of each runner on ``inputs`` (positional or named), measured round-robin."""
    for run in runners.values():
        for _ in range(warmup):
            call_model(run, inputs)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            call_model(run, inputs)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def exclude_node_names(model, patterns: Iterable[str]) -> list[str]:
    """Names of nodes whose layer (module path) matches one of the fnmatch ``patterns``."""
    patterns = list(patterns)
    if not patterns:
        return []
    return [node for node, layer in layer_names(model).items()
            if match(layer, patterns) is not None]


CODECS = (ModuleCodec(QuantizedGraphModel, lambda m: copy.deepcopy(m.init_kwargs), lambda a: QuantizedGraphModel(**a)),)
"""Checkpoint codec of :class:`QuantizedGraphModel` (its graph is rebuilt from its constructor arguments)."""
