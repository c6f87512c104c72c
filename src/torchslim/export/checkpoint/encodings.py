"""Tensor encodings: how each tensor of a checkpoint is stored, and choosing the smallest.

Built in: ``"dense"`` (the tensor as is), ``"bitmask"`` (a bit per element plus the non-zeros),
``"relative"`` (Deep Compression's uint8 gaps between non-zeros) and the entropy coders of
:mod:`torchslim.export.coding` (``"huffman"``, ``"ans"``) for weight-sharing codes. Every registered
encoding is tried for every tensor and the one with the fewest bytes wins.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ...core.errors import CheckpointError, TorchslimError
from ...core.registry import Registry
from .. import coding
from .format import field, jsonable

# Parts of an encoded tensor are stored as "<name>::<part>"; the "data" part keeps the bare name so
# that dense tensors stay readable with plain safetensors tools.
PART_SEP = "::"
DATA_PART = "data"
# Every stored part also costs a safetensors header entry (name, dtype, shape, offsets); counting it
# keeps tiny tensors (biases) from being split into two parts that are together larger than one.
_PART_OVERHEAD = 64
_MAX_GAP = 255  # relative indices are uint8
_RESERVED_ENTRY_KEYS = ("encoding", "shape", "dtype", "parts")

Encoded = tuple[dict[str, torch.Tensor], dict[str, Any]]
EncodeFn = Callable[[torch.Tensor], Optional[Encoded]]
DecodeFn = Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Encoding:
    """A lossless tensor encoding named ``name`` in the manifest.

    ``encode(tensor)`` gets a detached, contiguous CPU tensor and returns ``(parts, meta)`` -- a dict of
    named CPU tensors to store and a dict of JSON-serialisable extras for the manifest entry -- or
    ``None`` when it does not apply to that tensor. ``decode(parts, entry)`` gets the same parts and the
    manifest entry (``shape``, ``dtype`` and the extras) and must return the exact tensor. An encoding
    must return ``None`` (cheaply) for tensors it is not meant for; save checks the winner round-trips.
    """

    name: str
    encode: EncodeFn
    decode: DecodeFn

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or PART_SEP in self.name:
            raise TorchslimError(f"encoding name must be a non-empty str without {PART_SEP!r}, got {self.name!r}")
        if not callable(self.encode) or not callable(self.decode):
            raise TorchslimError(f"encoding {self.name!r}: encode and decode must be callables")


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``, as the manifest names dtypes."""
    return str(dtype).removeprefix("torch.")


def stored_name(name: str, part: str) -> str:
    """The safetensors key of ``part`` of tensor ``name``."""
    return name if part == DATA_PART else f"{name}{PART_SEP}{part}"


def nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s elements (what storing it costs, without the header entry)."""
    return t.numel() * t.element_size()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, NaNs included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def encode_tensor(name: str, tensor: torch.Tensor, allowed: set[str] | None = None
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest entry and the parts of ``tensor`` in its smallest registered encoding (of ``allowed``)."""
    best: tuple[int, str, dict[str, torch.Tensor], dict[str, Any]] | None = None
    for enc_name, enc in ENCODINGS.items():
        if allowed is not None and enc_name not in allowed:
            continue
        out = enc.encode(tensor)
        if out is None:
            continue
        parts, extra = out
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts.values()):
            raise TorchslimError(f"encoding {enc_name!r} returned no parts or a non-tensor part for {name!r}")
        cost = sum(nbytes(p) + _PART_OVERHEAD for p in parts.values())
        if best is None or cost < best[0]:  # ties keep the earlier registered (dense first)
            best = (cost, enc_name, parts, extra)
    assert best is not None, "the dense encoding applies to every tensor"
    _, enc_name, parts, extra = best
    clash = [k for k in extra if k in _RESERVED_ENTRY_KEYS]
    if clash:
        raise TorchslimError(f"encoding {enc_name!r} uses reserved manifest keys {clash}")
    parts = {k: v.detach().cpu().contiguous() for k, v in parts.items()}
    # safetensors refuses parts that share storage (e.g. two slices of one tensor): give those their own.
    parts = {k: v if v.untyped_storage().nbytes() == nbytes(v) else v.clone() for k, v in parts.items()}
    entry = {"encoding": enc_name, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype),
             "parts": sorted(parts), **jsonable(extra, f"manifest entry of {name!r}")}
    # A lossy or buggy extension must fail here, not silently when the checkpoint is loaded.
    decoded = ENCODINGS.get(enc_name).decode(dict(parts), entry)
    if not same(decoded, tensor):
        raise TorchslimError(f"encoding {enc_name!r} does not reproduce tensor {name!r} exactly; this is a bug in "
                             "the extension that registered it")
    return entry, parts


_DTYPES = {dtype_name(d): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128, torch.int64,
    torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64") if hasattr(torch, n)))}
_MAX_DIMS = 32


def check_entries(manifest: dict[str, Any], stored: dict[str, torch.Tensor], path: Path,
                  max_bytes: int) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, after checking its manifest entry is well formed, names stored parts and a
    registered encoding, and that all tensors together fit in ``max_bytes``."""
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for name, entry in field(manifest, "tensors", dict, path).items():
        enc_name = entry.get("encoding") if isinstance(entry, dict) else None
        if not isinstance(enc_name, str) or enc_name not in ENCODINGS:
            raise CheckpointError(f"{path}: tensor {name!r} uses encoding {enc_name!r}, which is not registered in "
                                  "this process; register the encoding that provides it (torchslim.export.checkpoint"
                                  ".register_codecs), then load again")
        shape, dtype, parts = entry.get("shape"), entry.get("dtype"), entry.get("parts")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {str(shape)[:80]}; the file is "
                                  "corrupted")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has an unknown dtype {str(dtype)[:40]!r}; the file is "
                                  "corrupted or from a newer torch")
        if (not isinstance(parts, list) or not parts
                or not all(isinstance(p, str) and stored_name(name, p) in stored for p in parts)):
            raise CheckpointError(f"{path}: tensor {name!r} lists parts {str(parts)[:80]} that are not all stored; "
                                  "the file is corrupted")
        total += math.prod(shape) * _DTYPES[dtype].itemsize
        if total > max_bytes:
            raise CheckpointError(f"{path}: the tensors up to {name!r} would take {total} bytes, more than the limit "
                                  f"of {max_bytes}; if you expect a model this large, pass load(path, max_bytes=...)")
        shapes[name] = tuple(shape)
    return shapes


def decode_all(manifest: dict[str, Any], stored: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the manifest (checked by :func:`check_entries`), decoded from the stored parts and
    checked against its shape and dtype."""
    state = {}
    for name, entry in field(manifest, "tensors", dict, path).items():
        try:
            parts = {p: stored[stored_name(name, p)] for p in entry["parts"]}
            tensor = ENCODINGS.get(entry["encoding"]).decode(parts, entry)
            shape, dtype = list(tensor.shape), dtype_name(tensor.dtype)
        except BaseException as exc:  # native decoders raise PanicException, a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError)):
                raise
            raise CheckpointError(f"{path}: cannot decode tensor {name!r} ({entry.get('encoding')}): "
                                  f"{type(exc).__name__}: {str(exc)[:200]}; the file is corrupted") from None
        if shape != entry.get("shape") or dtype != entry.get("dtype"):
            raise CheckpointError(f"{path}: tensor {name!r} decodes to {dtype}{shape}, but the manifest says "
                                  f"{entry.get('dtype')}{entry.get('shape')}; the file is corrupted")
        state[name] = tensor
    return state


# ----------------------------------------------------------------------------------------------
# Built-in encodings


def _sparse_candidate(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0


def _encode_dense(t: torch.Tensor) -> Encoded:
    return {DATA_PART: t}, {}


def _decode_dense(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    return parts[DATA_PART].reshape(entry["shape"])


def _encode_bitmask(t: torch.Tensor) -> Encoded | None:
    if not _sparse_candidate(t):
        return None
    flat = t.reshape(-1)
    nonzero = flat != 0  # NaN counts as non-zero; -0.0 becomes +0.0, equal under torch.equal
    mask = torch.from_numpy(np.packbits(nonzero.numpy()))
    return {"mask": mask, "values": flat[nonzero]}, {}


def _decode_bitmask(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    n = math.prod(entry["shape"])
    packed, values = parts["mask"], parts["values"]
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"the mask has {packed.numel()} bytes, not the {(n + 7) // 8} of {n} elements")
    mask = torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))
    if int(mask.sum()) != values.numel():
        raise ValueError(f"the mask marks {int(mask.sum())} non-zeros but {values.numel()} values are stored")
    out = torch.zeros(n, dtype=values.dtype)
    out[mask] = values
    return out.reshape(entry["shape"])


def _encode_relative(t: torch.Tensor) -> Encoded | None:
    """Deep Compression's relative indexing: uint8 gaps between non-zeros, a filler zero per 255 gap."""
    if not _sparse_candidate(t):
        return None
    flat = t.reshape(-1)
    pos = torch.nonzero(flat != 0).reshape(-1)
    gaps_to = torch.diff(pos, prepend=torch.tensor([-1], dtype=pos.dtype))
    fillers = (gaps_to - 1) // _MAX_GAP
    slot = torch.cumsum(fillers + 1, 0) - 1  # where each real non-zero lands among the entries
    total = int(slot[-1]) + 1 if slot.numel() else 0
    gaps = torch.full((total,), _MAX_GAP, dtype=torch.uint8)  # filler entries keep the full gap ...
    values = torch.zeros(total, dtype=t.dtype)  # ... and a zero value
    gaps[slot] = (gaps_to - fillers * _MAX_GAP).to(torch.uint8)
    values[slot] = flat[pos]
    return {"gaps": gaps, "values": values}, {}


def _decode_relative(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    gaps, values = parts["gaps"], parts["values"]
    n = math.prod(entry["shape"])
    if gaps.dtype != torch.uint8 or gaps.numel() != values.numel() or gaps.numel() > n:
        raise ValueError(f"{gaps.numel()} gaps and {values.numel()} values do not fit {n} elements")
    if gaps.numel() and int(gaps.to(torch.int64).sum()) > n:
        raise ValueError(f"the gaps point past the end of {n} elements")
    out = torch.zeros(n, dtype=values.dtype)
    if gaps.numel():
        out[torch.cumsum(gaps.to(torch.int64), 0) - 1] = values
    return out.reshape(entry["shape"])


def _encode_codes(coder: str) -> EncodeFn:
    def encode(t: torch.Tensor) -> Encoded | None:
        if t.dtype != coding.CODE_DTYPE:
            return None
        out = coding.encode_codes(t, coder)
        if out is None:
            return None
        data, meta = out
        return {DATA_PART: torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
                else torch.zeros(0, dtype=torch.uint8)}, meta

    return encode


def _decode_codes(coder: str) -> DecodeFn:
    def decode(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
        if parts[DATA_PART].dtype != torch.uint8:
            raise ValueError("the coded stream must be stored as uint8 bytes")
        return coding.decode_codes(parts[DATA_PART].numpy(), entry, coder, list(entry["shape"]),
                                   getattr(torch, entry["dtype"]))

    return decode


# Registration order breaks ties between equally small encodings (dense first).
BUILTIN_ENCODINGS = (
    Encoding("dense", _encode_dense, _decode_dense),
    Encoding("bitmask", _encode_bitmask, _decode_bitmask),
    Encoding("relative", _encode_relative, _decode_relative),
    *(Encoding(coder, _encode_codes(coder), _decode_codes(coder)) for coder in coding.CODERS),
)

ENCODINGS: Registry[str, Encoding] = Registry("encoding", {e.name: e for e in BUILTIN_ENCODINGS})
"""Every tensor encoding save may choose from, by name."""


def register_encoding(name: str, encode: EncodeFn, decode: DecodeFn, *, replace: bool = False) -> None:
    """Register a lossless tensor encoding (see :class:`Encoding`); a name registered twice is an error
    unless ``replace=True``."""
    ENCODINGS.add(name, Encoding(name, encode, decode), replace=replace)
