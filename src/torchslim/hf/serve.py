"""CPU serving of Hugging Face encoders: ONNX export with dynamic (batch, sequence) axes, ONNX Runtime's
transformer fusions (fused attention, SkipLayerNorm, EmbedLayerNorm, BiasGelu), int8 (MatMul, Attention and the
embedding tables) and an ``nn.Module`` that runs the session, so torchslim metrics and benchmarks read it like
the PyTorch model. :func:`compile_cpu` builds the candidates, times them side by side and keeps the fastest.
"""

from __future__ import annotations

import collections
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError, UnsupportedModelError
from ..core.files import atomic_write
from ..data.batches import as_example_inputs, output_tensor
from ..quantization import DynamicQuantization, quantize
from ..quantization.backends.cpu import cpu_int8
from .arch import arch_of, layer_list, layer_shape

__all__ = ["export_transformer", "fuse", "quantize_int8", "int4_embeddings", "OrtModel", "compile_cpu",
           "OPTIMIZER_TYPES", "file_bytes"]

OPTIMIZER_TYPES = {"bert": "bert", "distilbert": "bert", "roberta": "bert", "xlm-roberta": "bert",
                   "electra": "bert", "mpnet": "bert", "gpt2": "gpt2", "vit": "vit"}
"""``config.model_type`` -> ONNX Runtime transformer optimizer ``model_type`` (those with fused attention)."""

_AXES = {0: "batch", 1: "sequence"}


class _Tensors(nn.Module):
    """The model with keyword inputs in a fixed order and one tensor out (what the exporter needs)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return output_tensor(self.model(**dict(zip(self.names, args))))


def _eager(model: nn.Module) -> nn.Module:
    """A copy whose attention is the explicit softmax(QK^T)V graph: ONNX Runtime fuses that pattern into one
    Attention op, not the scaled_dot_product_attention export."""
    if getattr(getattr(model, "config", None), "_attn_implementation", "eager") == "eager":
        return model
    model = copy.deepcopy(model)
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError):
        model.config._attn_implementation = "eager"
    return model


def export_transformer(model: nn.Module, example_inputs: dict, path: str | os.PathLike, *, opset: int = 17,
                       overwrite: bool = False) -> Path:
    """Export a ``transformers`` model (dict inputs, e.g. ``input_ids``/``attention_mask``) to ONNX with dynamic
    batch and sequence axes on every input and on the output (``last_hidden_state`` or ``logits``)."""
    inputs = as_example_inputs(example_inputs)
    if not isinstance(inputs, dict):
        raise ConfigError("export_transformer takes the tokenizer's dict batch as example_inputs")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass overwrite=True to replace it")
    names = list(inputs)
    wrapper = _Tensors(_eager(model), names).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp_file = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(wrapper, tuple(inputs[n] for n in names), str(tmp_file), dynamo=False,
                              opset_version=opset, input_names=names, output_names=["output"],
                              dynamic_axes={**{n: _AXES for n in names}, "output": _AXES})
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedModelError(f"cannot export {type(model).__name__} to ONNX: "
                                        f"{str(exc).splitlines()[0][:200]}") from None
        atomic_write(path, tmp_file.read_bytes(), overwrite=overwrite)
    return path


def _check_target(dst: str | os.PathLike, overwrite: bool) -> None:
    if Path(dst).exists() and not overwrite:
        raise ConfigError(f"{dst} exists; pass overwrite=True to replace it")


def fuse(src: str | os.PathLike, dst: str | os.PathLike, model: nn.Module, *, embed_layer_norm: bool = True,
         overwrite: bool = False) -> bool:
    """ONNX Runtime's transformer optimizer on ``src`` -> ``dst`` (fp32, fused attention where the model type
    has it); False (``dst`` not written) when the model type has no fusions. ``embed_layer_norm=False`` keeps
    the embedding lookups as plain Gathers (what 4-bit embedding tables need)."""
    _check_target(dst, overwrite)
    config = getattr(model, "config", None)
    kind = OPTIMIZER_TYPES.get(getattr(config, "model_type", None))
    if kind is None:
        return False
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(kind)
    options.enable_embed_layer_norm = embed_layer_norm
    heads, hidden = _attention_shape(model)
    if heads is None:  # layers with different head counts: one fused-attention setting would be wrong for some
        options.enable_attention = False
        heads = hidden = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize_model(str(src), model_type=kind, num_heads=heads, hidden_size=hidden, opt_level=1,
                                   use_gpu=False, optimization_options=options)
    optimized.save_model_to_file(str(dst))
    return True


def _attention_shape(model: nn.Module) -> tuple[int | None, int | None]:
    """(heads, heads x head size) of every layer's attention, read from the weights (a head-pruned BERT keeps
    ``num_attention_heads`` of the original in its config); (None, None) when layers differ."""
    config = model.config
    try:
        arch = arch_of(model)
    except UnsupportedModelError:  # no adapter, so nothing was pruned by torchslim.hf: the config holds
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or getattr(config, "n_embd", 0)
        return heads, hidden
    _, layers = layer_list(model)
    counts = {layer_shape(layer, arch)[0] for layer in layers}
    if len(counts) != 1:
        return None, None
    heads = counts.pop()
    return heads, heads * int(getattr(layers[0].get_submodule(arch.attention), arch.head_size_attr))


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, *, per_channel: bool = False,
                  reduce_range: bool | None = None, embeddings: bool = True, embedding_bits: int = 8,
                  overwrite: bool = False) -> None:
    """Dynamic int8 of an ONNX graph (QOperator: MatMulInteger, QAttention; ``embeddings`` also stores the
    Gather / EmbedLayerNormalization tables in int8, or with ``embedding_bits=4`` the Gather tables in 4 bits,
    see :func:`int4_embeddings`). ``reduce_range`` None: 7-bit weights where the CPU's u8s8 kernels saturate
    (x86 without VNNI)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _check_target(dst, overwrite)
    if embedding_bits not in (4, 8):
        raise ConfigError(f"embedding_bits must be 4 or 8, got {embedding_bits!r}")
    if reduce_range is None:
        reduce_range = cpu_int8().saturates
    ops = ["MatMul", "Attention", "MultiHeadAttention"] + (["Gather", "EmbedLayerNormalization"] if embeddings else [])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if embeddings and embedding_bits == 4:
            proto = onnx.load(str(src))
            int4_embeddings(proto)
            src = Path(tmp) / "int4_embeddings.onnx"
            onnx.save(proto, str(src))
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=ops, per_channel=per_channel,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         # fused contrib ops (Attention, SkipLayerNorm) defeat ONNX shape inference
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def int4_embeddings(proto, block_size: int = 32) -> list[str]:
    """Replace, in place, every ``Gather`` from a 2-D float initializer (word, position and token-type
    embeddings) by ONNX Runtime's ``GatherBlockQuantized``: the table stored as 4-bit codes, asymmetric, one
    scale and zero point per ``block_size`` values of a row, dequantized only for the rows looked up. Returns
    the tables converted. A table that ``EmbedLayerNormalization`` reads (``fuse(..., embed_layer_norm=True)``)
    or whose width ``block_size`` does not divide is refused with the fix."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    fused = [n.name or n.op_type for n in proto.graph.node if n.op_type == "EmbedLayerNormalization"]
    if fused:
        raise ConfigError("4-bit embeddings need plain Gather lookups, but the graph fuses them into "
                          f"EmbedLayerNormalization ({fused[0]}); fuse with embed_layer_norm=False")
    uses = collections.Counter(name for node in proto.graph.node for name in node.input)
    converted = []
    for i, node in enumerate(proto.graph.node):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or node.input[0] not in inits or axis != 0:
            continue
        name = node.input[0]
        table = numpy_helper.to_array(inits[name])
        if table.dtype != np.float32 or table.ndim != 2:
            continue
        rows, width = table.shape
        if width % block_size:
            raise ConfigError(f"embedding table {name!r} is {width} wide, not a multiple of block_size={block_size}; "
                              "pass a block_size that divides it (a power of two >= 16)")
        codes, scales, zeros = _quantize_rows_4bit(table, block_size)
        q = f"{name}_int4"
        proto.graph.initializer.extend([numpy_helper.from_array(codes, q),
                                        numpy_helper.from_array(scales, f"{q}_scales"),
                                        numpy_helper.from_array(zeros, f"{q}_zero_points")])
        proto.graph.node[i].CopyFrom(helper.make_node(
            "GatherBlockQuantized", [q, node.input[1], f"{q}_scales", f"{q}_zero_points"], list(node.output),
            name=node.name, domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block_size, bits=4))
        uses[name] -= 1
        if uses[name] == 0:  # a table also read elsewhere (a tied output layer) stays as it is
            proto.graph.initializer.remove(inits[name])
        converted.append(name)
    if converted and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return converted


def _quantize_rows_4bit(table, block: int):
    """(packed uint8 codes (rows, width/2), float32 scales (rows, width/block), packed uint8 zero points)."""
    import numpy as np

    rows, width = table.shape
    blocks = table.reshape(rows, width // block, block)
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)  # 0 stays exact (padding rows)
    scale = ((hi - lo) / 15).astype(np.float32)
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8).reshape(rows, width)

    def pack(a):  # two 4-bit values per byte, low nibble first; an odd count gets a zero nibble
        if a.shape[1] % 2:
            a = np.concatenate([a, np.zeros((rows, 1), np.uint8)], axis=1)
        return (a[:, 0::2] | (a[:, 1::2] << 4)).astype(np.uint8)

    return pack(q), scale, pack(zero)


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes of an ONNX file plus its external-data files, if any."""
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


class OrtModel(nn.Module):
    """An ONNX graph run by ONNX Runtime on the CPU, called like the ``transformers`` model it came from
    (``model(input_ids=..., attention_mask=...)`` -> the output tensor)."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 1):
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ConfigError(f"the ONNX graph needs inputs {missing}; it takes {self.input_names}")
        feed = {n: inputs[n].detach().cpu().numpy() for n in self.input_names}
        return torch.from_numpy(self.session.run(None, feed)[0])

    @property
    def size_bytes(self) -> int:
        return file_bytes(self.path)


def _latency(model: nn.Module, inputs: dict, repeats: int) -> float:
    with torch.inference_mode():
        model(**inputs)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            best = min(best, time.perf_counter() - start)
    return best


def compile_cpu(model: nn.Module, example_inputs: dict, out_dir: str | os.PathLike, *, threads: int = 1,
                repeats: int = 3, embedding_bits: int = 8, overwrite: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """int8 serving candidates of a ``transformers`` encoder, timed side by side on ``example_inputs``; returns
    the fastest and a report ``{"chosen", "latency_s": {name: s}, "paths": {name: file}}``.

    Candidates: ``ort_fused_int8`` (fusions + dynamic int8, embedding tables in ``embedding_bits`` 8 or 4; the
    file in ``out_dir``), ``ort_int8`` (the same without fusions) and ``torch_int8`` (PyTorch dynamic int8 Linear
    kernels, float embeddings)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = export_transformer(model, example_inputs, out / "model_fp32.onnx", overwrite=overwrite)
    paths: dict[str, Path] = {}
    fused = out / "model_fused.onnx"
    if fuse(fp32, fused, model, embed_layer_norm=embedding_bits == 8, overwrite=overwrite):
        paths["ort_fused_int8"] = out / "model_fused_int8.onnx"
        quantize_int8(fused, paths["ort_fused_int8"], embedding_bits=embedding_bits, overwrite=overwrite)
    paths["ort_int8"] = out / "model_int8.onnx"
    quantize_int8(fp32, paths["ort_int8"], embedding_bits=embedding_bits, overwrite=overwrite)
    candidates: dict[str, nn.Module] = {name: OrtModel(p, threads=threads) for name, p in paths.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings and LayerNorm stay float on this path, by design
        candidates["torch_int8"] = quantize(model, DynamicQuantization(), example_inputs=example_inputs)
    latency = {name: _latency(m, example_inputs, repeats) for name, m in candidates.items()}
    chosen = min(latency, key=latency.get)
    return candidates[chosen], {"chosen": chosen, "latency_s": latency, "paths": {k: str(v) for k, v in paths.items()}}
