"""Format 2's payload: the manifest, compressed, and every stored tensor part in one byte string.

Format 1 kept the manifest as JSON text in the safetensors header, with a header entry (name, dtype, shape,
offsets) per stored part: 2.6-3.6 KB of a 20-30 KB LeNet file. Format 2 stores one ``uint8`` tensor, the
payload::

    uint32 n | zlib(manifest, n bytes) | part bytes, in the order of the manifest's parts table

The manifest is canonical JSON with short top-level keys, its tensors as rows ``[name, encoding, dtype,
shape, parts, extras]`` and the stored parts as rows ``[key, dtype, shape]``, compressed with zlib against a
preset dictionary of the strings torchslim manifests repeat (module type names, argument names, dtypes). It
expands back into format 1's manifest dict, so everything downstream reads one form. Decoding is bounded: the
decompressed manifest is capped, its nesting depth checked, and every part must lie inside the payload,
which it must fill exactly.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["PAYLOAD", "encode_payload", "decode_payload", "MAX_MANIFEST"]

PAYLOAD = "torchslim"  # the one tensor of a format-2 file
MAX_MANIFEST = 64 << 20  # decompressed manifest bytes; real ones are a few KB (a large model's a few hundred)
_MAX_DIMS = 32
_LEVEL = 9
_KEYS = {"torchslim_version": "v", "arch": "a", "modules": "mo", "masked": "mk", "sparsity": "sp",
         "training": "tr", "history": "h", "metrics": "me"}
_ENTRY_KEYS = ("encoding", "dtype", "shape", "parts")
# Strings that manifests repeat, most frequent last (zlib reaches the end of its window most cheaply). Part of
# format 2: changing it changes how files decode, so a new list needs a new format version.
_ZDICT = ",".join([
    '"torchslim.quantization.modules.QLinear"', '"torchslim.quantization.modules.QConv2d"',
    '"torchslim.lowrank', '"torchslim.pruning', '"padding_mode":"zeros"', '"dilation":[1,1]', '"groups":1',
    '"stride":[1,1]', '"padding":[0,0]', '"kernel_size":[', '"in_channels":', '"out_channels":',
    '"num_features":', '"affine":true', '"eps":1e-05', '"momentum":0.1', '"track_running_stats":true',
    '"WeightSharing"', '"UnstructuredPruning"', '"StructuredPruning"', '"QAT"', '"Finetune"', '"finetune":',
    '"schedule":', '"epochs":', '"lr":', '"max_steps":', '"sparsity":', '"exclude":', '"version":1', '"type":',
    '"torchslim.models:LeNet5"', '"torchslim.models:LeNet300"', '"num_classes":10', '"in_features":784',
    '"torchslim.quantization.sharing.SharedConv2d"', '"torchslim.quantization.sharing.SharedLinear"',
    '"args":{"bias":true,"bits":', '"in_features":', '"num_centroids":', '"out_features":', '"children":',
    '"index":', '"offset":', '"sizes":[', '"n":', '"bitmask"', '"relative"', '"huffman"', '"ans"',
    '["data","float32",[', '["data"],', '"dense","float32",[', '"int16"', '"uint8"', '"float32"',
    '.bias"', '.weight"', '.codebook"', '.codes"', '.codes","ans","int16",[', '"uint8",[', '"float32",[',
]).encode()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPES = {_dtype_name(d): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128, torch.int64,
    torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64") if hasattr(torch, n)))}


def manifest_text(manifest: dict[str, Any], stored: dict[str, torch.Tensor]) -> str:
    """The compact manifest's canonical JSON text for ``manifest`` (format 1's dict, without ``format``,
    ``format_version`` and ``sha256``) and the ``stored`` parts, laid out in sorted key order."""
    out: dict[str, Any] = {short: manifest[long] for long, short in _KEYS.items() if long in manifest}
    out["t"] = [[name, *(entry.get(k) for k in _ENTRY_KEYS), {k: v for k, v in entry.items() if k not in _ENTRY_KEYS}]
                for name, entry in sorted(manifest.get("tensors", {}).items())]
    out["p"] = [[key, _dtype_name(stored[key].dtype), list(stored[key].shape)] for key in sorted(stored)]
    return json.dumps(out, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_payload(text: str, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The payload of ``text`` (from :func:`manifest_text`) and the ``stored`` parts, as one uint8 tensor."""
    comp = zlib.compressobj(_LEVEL, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=_ZDICT)
    z = comp.compress(text.encode("utf-8")) + comp.flush()
    chunks = [struct.pack("<I", len(z)), z]
    for key in sorted(stored):
        t = stored[key].detach().cpu().contiguous()
        chunks.append(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def decode_payload(payload: bytes | memoryview, load_json: Callable[[bytes, str], Any], *, parts: bool = True
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Format 1's manifest dict (without ``format``, ``format_version``, ``sha256``) and the stored parts of a
    payload (checked but not copied out unless ``parts``); ``ValueError`` naming the problem if it is
    malformed. ``load_json`` parses with a depth limit."""
    view = memoryview(payload)
    if len(view) < 4:
        raise ValueError("the payload is shorter than its length field")
    (n,) = struct.unpack("<I", view[:4])
    if 4 + n > len(view):
        raise ValueError(f"the compressed manifest needs {n} bytes but the payload has {len(view) - 4}")
    inflate = zlib.decompressobj(-15, zdict=_ZDICT)
    try:
        text = inflate.decompress(view[4:4 + n], MAX_MANIFEST + 1)
    except zlib.error as exc:
        raise ValueError(f"the compressed manifest does not decompress ({exc})") from None
    if len(text) > MAX_MANIFEST:
        raise ValueError(f"the manifest decompresses to more than {MAX_MANIFEST} bytes")
    if not inflate.eof or inflate.unused_data:
        raise ValueError("the compressed manifest is truncated or followed by stray bytes")
    compact = load_json(text, "the manifest")
    if not isinstance(compact, dict) or not isinstance(compact.get("t"), list) or not isinstance(
            compact.get("p"), list):
        raise ValueError("the manifest has no tensor or part table")
    manifest = {long: compact[short] for long, short in _KEYS.items() if short in compact}
    tensors: dict[str, Any] = {}
    for row in compact["t"]:
        if (not isinstance(row, list) or len(row) != 2 + len(_ENTRY_KEYS) or not isinstance(row[0], str)
                or not isinstance(row[-1], dict) or row[0] in tensors):
            raise ValueError(f"malformed tensor row {str(row)[:80]}")
        tensors[row[0]] = {**row[-1], **dict(zip(_ENTRY_KEYS, row[1:-1]))}
    manifest["tensors"] = tensors
    return manifest, _parts(compact["p"], view, 4 + n, parts)


def _parts(rows: list[Any], view: memoryview, start: int, copy: bool) -> dict[str, torch.Tensor]:
    stored: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    pos = start
    for row in rows:
        if (not isinstance(row, list) or len(row) != 3 or not isinstance(row[0], str) or row[0] in seen
                or row[1] not in DTYPES or not isinstance(row[2], list) or len(row[2]) > _MAX_DIMS
                or not all(type(d) is int and d >= 0 for d in row[2])):
            raise ValueError(f"malformed part row {str(row)[:80]}")
        seen.add(row[0])
        dtype = DTYPES[row[1]]
        size = math.prod(row[2]) * dtype.itemsize
        if size > len(view) - pos:
            raise ValueError(f"part {row[0]!r} needs {size} bytes but only {len(view) - pos} are left")
        if copy:
            raw = torch.from_numpy(np.frombuffer(view[pos:pos + size], dtype=np.uint8).copy())
            stored[row[0]] = raw.view(dtype).reshape(row[2]) if size else torch.zeros(row[2], dtype=dtype)
        pos += size
    if pos != len(view):
        raise ValueError(f"{len(view) - pos} bytes of the payload belong to no part")
    return stored
