"""Checkpoint support of the quantized layers: the ``"intpack"`` tensor encoding, which stores integer code
tensors at their real bit width (1 bit for binary, base-3 at 1.6 bits for ternary, b bits for b-bit codes),
deflated when that is smaller, and the codecs that rebuild the QAT wrappers, converted modules and quantizers.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.config import config_from_dict
from ..export.checkpoint import Encoding, ModuleCodec
from ..nn.bitpack import pack_bits, pack_trits, unpack_bits, unpack_trits
from .fake import BinaryQuantizer, LSQQuantizer, MinMaxQuantizer, TernaryQuantizer
from .modules import _CONV_ATTRS, CONVERTED_MODULES, QAT_MODULES, QLinear
from .spec import QuantSpec

__all__ = ["encode_intpack", "decode_intpack", "CODECS"]


# ----------------------------------------------------------------------------------------------
# "intpack": integer code tensors stored at their real bit width


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def encode_intpack(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Checkpoint encoding of an integer tensor with at most 256 distinct values.

    The values are replaced by their index in the sorted table of distinct values, and the indices packed
    at ``ceil(log2(k))`` bits (base-3, 1.6 bits, when there are exactly 3 values; nothing at all for a
    constant tensor). The packed bytes are deflated (zlib) when that is smaller: quantized weights are
    bell-shaped, so the middle codes dominate and compress further. Returns None for other tensors.
    """
    if t.dtype not in _INT_DTYPES or t.numel() == 0:
        return None
    flat = t.reshape(-1)
    values = torch.unique(flat)
    k = values.numel()
    if k > 256:
        return None
    idx = torch.searchsorted(values, flat).to(torch.uint8).numpy()
    if k == 1:
        width: int | str = 0
        packed = b""
    elif k == 3:
        width, packed = "trit", pack_trits(idx)
    else:
        width = max(1, math.ceil(math.log2(k)))
        packed = pack_bits(torch.from_numpy(idx), width).numpy().tobytes()
    deflated = zlib.compress(packed, 9) if packed else b""
    use_zlib = len(deflated) < len(packed)
    data = deflated if use_zlib else packed
    lo = int(values[0])
    contiguous = int(values[-1]) - lo + 1 == k
    meta: dict[str, Any] = {"width": width, "zlib": use_zlib, "lo": lo, "levels": k}
    if not contiguous:
        meta["values"] = [int(v) for v in values]
    return {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else
            torch.zeros(0, dtype=torch.uint8)}, meta


def _packed_size(width: Any, n: int) -> int:
    """Bytes the packed indices of ``n`` elements take at ``width`` bits (or trits)."""
    if width == "trit":
        return -(-n // 5)
    if type(width) is not int or not 0 <= width <= 8:
        raise ValueError(f"invalid index width {width!r}")
    return -(-n * width // 8)


def _inflate(data: bytes, size: int) -> bytes:
    """zlib-decompress ``data``, which must give exactly ``size`` bytes; never produces more."""
    d = zlib.decompressobj()
    out = d.decompress(data, size + 1)
    if len(out) != size or not d.eof or d.unconsumed_tail:
        raise ValueError(f"the deflated indices do not inflate to the {size} bytes expected")
    return out


def decode_intpack(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    """Inverse of :func:`encode_intpack`; every field is checked first (a damaged file raises ValueError)."""
    n = math.prod(entry["shape"])
    dtype = getattr(torch, entry["dtype"])
    packed = parts["data"]
    width = entry["width"]
    if packed.dtype != torch.uint8 or type(entry["zlib"]) is not bool:
        raise ValueError("the packed indices must be uint8 bytes and 'zlib' a bool")
    size = _packed_size(width, n)
    data = packed.numpy().tobytes()
    if entry["zlib"]:
        data = _inflate(data, size)
    elif len(data) != size:
        raise ValueError(f"{len(data)} bytes of packed indices, not the {size} of {n} elements")
    values = entry.get("values")
    if values is None:
        lo, levels = entry["lo"], entry["levels"]
        if type(lo) is not int or type(levels) is not int or not 0 < levels <= 256:
            raise ValueError(f"invalid value range lo={lo!r}, levels={levels!r}")
        values = list(range(lo, lo + levels))
    if (not isinstance(values, list) or not 0 < len(values) <= 256
            or not all(type(v) is int for v in values)):
        raise ValueError("the value table must be 1 to 256 integers")
    if not dtype.is_floating_point and dtype != torch.bool:
        info = torch.iinfo(dtype)
        if min(values) < info.min or max(values) > info.max:
            raise ValueError(f"values {min(values)}..{max(values)} do not fit {dtype}")
    if width == 0:
        idx = np.zeros(n, dtype=np.uint8)
    elif width == "trit":
        idx = unpack_trits(data, n)
    else:
        idx = unpack_bits(torch.frombuffer(bytearray(data), dtype=torch.uint8), int(width), n).numpy()
    if idx.size and int(idx.max()) >= len(values):
        raise ValueError(f"an index {int(idx.max())} points past the {len(values)} values")
    table = torch.tensor(values, dtype=torch.int64)
    return table[torch.from_numpy(idx.astype(np.int64))].to(dtype).reshape(entry["shape"])


# ----------------------------------------------------------------------------------------------
# Checkpoint codecs


def _spec_args(spec: QuantSpec) -> dict[str, Any]:
    return spec.to_dict()


def _spec_from(args: dict[str, Any]) -> QuantSpec:
    spec = config_from_dict(dict(args), "QuantSpec")
    assert isinstance(spec, QuantSpec)
    return spec


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _qat_args(m: nn.Module) -> dict[str, Any]:
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    args = {a: getattr(m, a) for a in _CONV_ATTRS}
    args["bias"] = m.bias is not None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def _converted_args(m: nn.Module) -> dict[str, Any]:
    if isinstance(m, QLinear):
        args: dict[str, Any] = {"in_features": m.in_features, "out_features": m.out_features}
    else:
        args = {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
                "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups}
    args["bias"] = m.bias is not None
    return {**args, **m._codes_args()}


def _rebuild(cls: type) -> Callable[[dict[str, Any]], nn.Module]:
    return lambda a: cls(**{k: _tuples(v) for k, v in a.items()})


CODECS = (
    Encoding("intpack", encode_intpack, decode_intpack),
    *(ModuleCodec(cls, _qat_args, _rebuild(cls)) for cls in QAT_MODULES),
    *(ModuleCodec(cls, _converted_args, _rebuild(cls)) for cls in CONVERTED_MODULES),
    ModuleCodec(MinMaxQuantizer,
                lambda m: {"spec": _spec_args(m.spec), "observe": m.observe, "momentum": m.momentum},
                lambda a: MinMaxQuantizer(_spec_from(a["spec"]), observe=a["observe"], momentum=a["momentum"])),
    ModuleCodec(LSQQuantizer,
                lambda m: {"spec": _spec_args(m.spec), "channels": m.step.numel(), "activation": m.activation},
                lambda a: LSQQuantizer(_spec_from(a["spec"]), a["channels"], activation=a["activation"])),
    ModuleCodec(BinaryQuantizer, lambda m: {}, lambda a: BinaryQuantizer()),
    ModuleCodec(TernaryQuantizer,
                lambda m: {"channels": m.alpha.numel() if m.learned_scale else 1, "threshold": m.threshold,
                           "learned_scale": m.learned_scale},
                lambda a: TernaryQuantizer(a["channels"], a["threshold"], a["learned_scale"])),
)
"""Checkpoint support: the ``"intpack"`` encoding and the codecs of the QAT wrappers, converted modules and
quantizers, so that ``torchslim.save`` bit-packs converted models' codes and ``torchslim.load`` rebuilds both
converted and QAT-prepared models."""
