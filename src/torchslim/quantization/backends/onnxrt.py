"""Running static int8 graphs (written by :mod:`.int8_graph`) as an ``nn.Module`` on ONNX Runtime's integer
kernels (or, through :mod:`.torch_int8`, on PyTorch's). At run time ONNX Runtime fuses ``DequantizeLinear -> op -> QuantizeLinear``
into integer kernels (QLinearConv, QLinearAdd, QGemm, ...), so the model really computes in int8.
"""

from __future__ import annotations

import copy
import re
import statistics
import time
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from ...core.errors import CheckpointError, ConfigError, TorchslimError, UnsupportedModelError
from ...data.batches import call_model
from ...export.checkpoint import ModuleCodec
from ...export.onnx import ort_session
from ...nn.modules import match
from .cpu import cpu_int8
from .int8_graph import (FORMATS, PASS_THROUGH_OPS, calibrate_graph, float_compute_nodes, global_pool_rewrite,
                         feed_inputs, layer_names, quantize_graph)
from .torch_int8 import ENGINES, TorchInt8Program

__all__ = ["QuantizedGraphModel", "calibrate_graph", "quantize_graph", "float_compute_nodes", "layer_names",
           "global_pool_rewrite", "measure_runners", "make_runner", "OrtRunner", "exclude_node_names",
           "FORMATS", "PASS_THROUGH_OPS", "CODECS"]


# ----------------------------------------------------------------------------------------------
# The module


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name) or "_"


_DTYPES = {np.dtype(k): v for k, v in ((np.float32, torch.float32), (np.float16, torch.float16),
                                       (np.float64, torch.float64), (np.int8, torch.int8), (np.uint8, torch.uint8),
                                       (np.int16, torch.int16), (np.int32, torch.int32), (np.int64, torch.int64),
                                       (np.bool_, torch.bool))}


class OrtRunner:
    """Runs a graph in an ONNX Runtime CPU session: torch tensors in (positional or by input name), torch
    tensors out."""

    def __init__(self, model, threads: int | None = None):
        self.session = ort_session(model.SerializeToString(), threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor, **named: torch.Tensor):
        given = {**dict(zip(self.inputs, inputs)), **named} if named else inputs
        feed = {}
        for name, x in feed_inputs(self.inputs, given, "the call", TorchslimError).items():
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
        if backend not in ("ort_qdq", "ort_qop", *ENGINES):
            raise ConfigError(f"unknown int8 backend {backend!r}; choose one of ort_qdq, ort_qop, {', '.join(ENGINES)}")
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
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._check_loaded())

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
            if self._runner is None:
                self._warn_if_saturating()
            self._runner = make_runner(self.backend, self.to_onnx())
            self._runner_threads = threads
        return self._runner

    def _warn_if_saturating(self) -> None:
        """8-bit weights on a CPU whose int8 kernels sum product pairs in int16 (e.g. a model quantized on a
        VNNI machine, loaded on an AVX2 one) lose accuracy silently: say so."""
        cpu = cpu_int8()
        if not cpu.saturates:
            return
        widest = max((int(t.abs().max()) for t in self.tensors.values() if t.dtype == torch.int8 and t.numel()),
                     default=0)
        if widest > 64:
            warnings.warn(f"this int8 model has 8-bit weights (up to {widest}) but this CPU ({cpu.describe()}) "
                          "sums uint8 x int8 products in saturating int16, so some results are clipped; quantize it "
                          "again on this machine (StaticQuantization(reduce_range=None) picks 7-bit weights here)",
                          UserWarning, stacklevel=4)

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
        out = super()._load_from_state_dict(*args, **kwargs)
        # The graph may come from a checkpoint: make sure ONNX Runtime will only run standard operators on it.
        check_stored_graph(self.graph.detach().cpu().numpy().tobytes())
        return out

    def _check_loaded(self) -> None:
        """Run the loaded graph once on zeros: tensors that fit the file but not the graph (an edited reshape
        target, a weight of another width) would otherwise fail inside the kernels at the caller's first forward."""
        if not self.graph.detach().cpu().numpy().any():
            return
        import onnx

        graph = onnx.load_from_string(self.graph.detach().cpu().numpy().tobytes()).graph
        inputs = []
        for spec in graph.input:
            tensor = spec.type.tensor_type
            dtype = _DTYPES.get(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)), torch.float32)
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor.shape.dim]
            inputs.append(torch.zeros(shape, dtype=dtype))
        try:
            with torch.no_grad():
                self(*inputs)
        except Exception as exc:
            raise CheckpointError(f"the stored int8 graph does not run with its stored tensors "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the checkpoint is "
                                  "corrupted or was edited") from None

    def _apply(self, fn, recurse=True):
        self._runner = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runner"] = None  # sessions and packed weights cannot be copied or pickled; rebuilt on demand
        return state

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, graph_bytes={self.graph.numel()}, tensors={len(self._names)}"


_STANDARD_DOMAINS = ("", "ai.onnx")
# ONNX Runtime's own integer kernels that its QOperator quantizer writes (built into every ONNX Runtime, no
# custom-op library involved); any other com.microsoft operator is refused like any other custom domain.
_ORT_QUANT_OPS = frozenset({
    "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere",
    "QLinearConvTranspose", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "QuantizeLinear",
    "DequantizeLinear"})
_ORT_DOMAIN = "com.microsoft"


def check_stored_graph(blob: bytes) -> None:
    """Refuse a stored graph that is not standard ONNX (plus ONNX Runtime's built-in quantized kernels):
    custom domains or operators, local functions, external data or its own initializers (ours are stored as
    tensors) could make ONNX Runtime run foreign code or read files."""
    import onnx

    if not blob.strip(b"\0"):
        return  # a model built but not loaded yet holds zeros
    try:
        model = onnx.load_from_string(blob)
    except Exception as exc:
        raise CheckpointError(f"the stored int8 graph is not a valid ONNX model ({type(exc).__name__}); the "
                              "checkpoint is corrupted") from None
    problems = [f"opset domain {o.domain!r}" for o in model.opset_import
                if o.domain not in (*_STANDARD_DOMAINS, _ORT_DOMAIN)]
    if model.functions:
        problems.append(f"{len(model.functions)} local function(s)")

    def visit(graph) -> None:
        if len(graph.initializer) or len(graph.sparse_initializer):
            problems.append(f"initializers inside the graph {graph.name!r}")
        for node in graph.node:
            if node.domain == _ORT_DOMAIN:
                standard = node.op_type in _ORT_QUANT_OPS
            else:
                standard = node.domain in _STANDARD_DOMAINS and onnx.defs.has(node.op_type, "")
            if not standard:
                problems.append(f"operator {node.domain or 'ai.onnx'}:{node.op_type}")
            for attr in node.attribute:
                tensors = [attr.t, *attr.tensors] if attr.HasField("t") else list(attr.tensors)
                if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
                    problems.append(f"external data in node {node.name!r}")
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)

    visit(model.graph)
    if problems:
        raise CheckpointError(f"the stored int8 graph uses {', '.join(sorted(set(problems))[:5])}; a checkpoint's "
                              "graph may only use standard ONNX operators (and ONNX Runtime's quantized kernels), so it is refused. "
                              "Re-create it with torchslim's int8 quantization if you trust its source")


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
