"""The ``.slim`` file layout: a safetensors file whose header metadata names the format and the sha256.

Format 2 (written now) stores one uint8 tensor, the payload of :mod:`.compact` (the compressed manifest and
every tensor part); format 1 (still read) kept the JSON manifest in the header metadata and every part as a
safetensors tensor of its own.

Reading checks everything a damaged or foreign file can get wrong (size limits, truncation, the format
name and version, the sha256 over manifest and tensor bytes) before any tensor is decoded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors.torch
import torch

from ..._version import __version__
from ...core.errors import CheckpointError, TorchslimError
from .compact import PAYLOAD, decode_payload, encode_payload, manifest_text

FORMAT = "torchslim"
FORMAT_VERSION = 2
MANIFEST_KEY = "torchslim"
MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
MAX_DEPTH = 64  # JSON nesting; save writes at most a few levels per module nesting level
SIGNATURE_KEY = "torchslim_hmac"
_UNSIGNED = "0" * 64  # the signature's place while the file is signed
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')


class CheckpointExistsError(TorchslimError, FileExistsError):
    """The target path exists and ``overwrite=True`` was not passed."""


def canonical(obj: Any) -> str:
    """The manifest's JSON text: sorted keys and no spaces, so its digest does not depend on dict order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, as safetensors stores them."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def digest(manifest: dict[str, Any], raw: Mapping[str, Any]) -> str:
    """sha256 over the manifest (without its ``sha256`` field) and the stored tensors' bytes, by name."""
    h = hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != "sha256"}).encode())
    for name in sorted(raw):
        h.update(raw[name])
    return h.hexdigest()


def load_json(text: str | bytes, what: str) -> Any:
    """``json.loads(text)`` with its nesting depth checked first (deep nesting would exhaust the stack);
    ``ValueError`` if it is too deep or not JSON."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    skeleton = np.frombuffer(_STRINGS.sub(b"", raw), dtype=np.uint8)
    step = (np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64)
            - np.isin(skeleton, (ord("]"), ord("}"))).astype(np.int64))
    depth = int(np.cumsum(step).max(initial=0))
    if depth > MAX_DEPTH:
        raise ValueError(f"{what} nests {depth} levels deep, more than the {MAX_DEPTH} torchslim writes")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} nests too deeply") from None


def sign(stored: dict[str, torch.Tensor], manifest_text: str, key: bytes | str | None) -> bytes:
    """The safetensors bytes of ``stored`` with the manifest, signed with HMAC-SHA256 under ``key`` if given."""
    metadata = {MANIFEST_KEY: manifest_text}
    if key is None:
        return safetensors.torch.save(stored, metadata=metadata)
    metadata[SIGNATURE_KEY] = _UNSIGNED
    blob = safetensors.torch.save(stored, metadata=metadata)
    mac = hmac.new(_key(key), blob, hashlib.sha256).hexdigest()
    placeholder = f'"{SIGNATURE_KEY}":"{_UNSIGNED}"'.encode()
    assert blob.count(placeholder) == 1, "safetensors wrote the metadata in an unexpected form"
    return blob.replace(placeholder, f'"{SIGNATURE_KEY}":"{mac}"'.encode())


def pack(manifest: dict[str, Any], stored: dict[str, torch.Tensor], key: bytes | str | None = None) -> bytes:
    """The bytes of a format-2 file holding ``manifest`` (format 1's dict; ``format``, ``format_version`` and
    ``sha256`` are set here) and the ``stored`` parts, signed under ``key`` if given."""
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "sha256")}
    return pack_text(manifest_text(body, stored), stored, key)


def pack_text(text: str, stored: dict[str, torch.Tensor], key: bytes | str | None = None) -> bytes:
    """:func:`pack` from the compact manifest's text (:func:`.compact.manifest_text`)."""
    payload = encode_payload(text, stored)
    sha = hashlib.sha256(tensor_bytes(payload)).hexdigest()
    return sign({PAYLOAD: payload}, canonical({"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": sha}),
                key)


def split(data: bytes, path: Path = Path("<bytes>")) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The verified manifest and the stored parts of a file's bytes (either format): :func:`pack`'s inverse."""
    manifest, data = read_verified(path, data=data)
    return manifest, stored_parts(manifest, data, path)


def stored_parts(manifest: dict[str, Any], data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The stored tensor parts of a file read (and verified) by :func:`read_verified`."""
    try:
        if manifest["format_version"] == 1:
            return safetensors.torch.load(data)
        return decode_payload(_payload(*parse_header(data, path), data, path), load_json)[1]
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the tensor data ({exc}); the file is corrupted, restore a good "
                              "copy") from None


def _payload(header: dict[str, Any], start: int, data: bytes, path: Path) -> memoryview:
    info = header.get(PAYLOAD)
    if set(header) - {"__metadata__"} != {PAYLOAD} or not isinstance(info, dict) or info.get("dtype") != "U8":
        raise CheckpointError(f"{path}: a format-2 checkpoint holds exactly one uint8 tensor {PAYLOAD!r}; the file "
                              "is corrupted or was edited")
    a, b = info["data_offsets"]
    return memoryview(data)[start + a:start + b]


def _key(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise TorchslimError("a signing or verify key must be non-empty bytes or str")
    return bytes(key)


def _verify(data: bytes, metadata: dict[str, Any], start: int, key: bytes | str, path: Path) -> None:
    mac = metadata.get(SIGNATURE_KEY)
    if not isinstance(mac, str) or not re.fullmatch(r"[0-9a-f]{64}", mac):
        raise CheckpointError(f"{path} is not signed, but verify_key was given; load it without verify_key only if "
                              "you trust its source, or ask for a copy saved with save(..., sign_key=...)")
    found = f'"{SIGNATURE_KEY}":"{mac}"'.encode()
    header = data[:start]
    if header.count(found) != 1:
        raise CheckpointError(f"{path}: its signature is malformed; the file was tampered with")
    unsigned = header.replace(found, f'"{SIGNATURE_KEY}":"{_UNSIGNED}"'.encode()) + data[start:]
    if not hmac.compare_digest(hmac.new(_key(key), unsigned, hashlib.sha256).hexdigest(), mac):
        raise CheckpointError(f"{path}: its HMAC-SHA256 signature does not match verify_key: the file was modified "
                              "after it was signed, or signed with another key")


def parse_header(data: bytes, path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header and where the tensor data starts, parsed here to tell truncated files from
    foreign ones."""
    not_safetensors = (f"{path} is not a safetensors file (so not a torchslim checkpoint); check the path, or "
                       "re-create it with torchslim.export.checkpoint.save")
    if len(data) < 8:
        raise CheckpointError(f"{path} is only {len(data)} bytes long: truncated, or not a torchslim checkpoint")
    n = int.from_bytes(data[:8], "little")
    if n == 0 or n > MAX_HEADER or (len(data) > 8 and data[8:9] != b"{"):
        raise CheckpointError(not_safetensors)
    if 8 + n > len(data):
        raise CheckpointError(f"{path} is truncated: its header needs {8 + n} bytes but the file has {len(data)}; "
                              "it was cut short (interrupted copy or download), restore a complete copy")
    try:
        header = load_json(data[8:8 + n].decode("utf-8"), "the header")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{not_safetensors} (its header is not valid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(not_safetensors)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: malformed safetensors header entry for {name!r}; the file is corrupted")
        end = max(end, offsets[1])
    have = len(data) - 8 - n
    if have < end:
        raise CheckpointError(f"{path} is truncated: the tensor data needs {end} bytes but only {have} are present; "
                              "it was cut short (interrupted copy or download), restore a complete copy")
    if have > end:
        raise CheckpointError(f"{path} has {have - end} unexpected bytes after the tensor data; the file is corrupted")
    return header, 8 + n


def field(manifest: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    """``manifest[key]``, which must be a ``kind``."""
    value = manifest.get(key)
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: manifest field {key!r} is missing or not a {kind.__name__}; the file was not "
                              "written by a compatible torchslim")
    return value


def read_verified(path: Path, verify_key: bytes | str | None = None, *, data: bytes | None = None
                  ) -> tuple[dict[str, Any], bytes]:
    """The manifest and the whole file's bytes (``data`` if given, else read from ``path``), after every check
    of the format, the signature (with ``verify_key``) and the sha256."""
    if data is None:
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist; check the path (saved with "
                                  "torchslim.export.checkpoint.save?)")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} is not a regular file (a directory?); pass the .slim file "
                                  "itself")
        data = path.read_bytes()
    header, start = parse_header(data, path)
    metadata = header.get("__metadata__") or {}
    if verify_key is not None:
        _verify(data, metadata if isinstance(metadata, dict) else {}, start, verify_key, path)
    text = metadata.get(MANIFEST_KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise CheckpointError(f"{path} is a safetensors file but has no torchslim manifest (metadata key "
                              f"{MANIFEST_KEY!r}), so it was not written by torchslim.export.checkpoint.save; read "
                              "its raw tensors with safetensors.torch.load_file instead")
    try:
        manifest = load_json(text, "the manifest")
    except ValueError as exc:
        raise CheckpointError(f"{path}: the torchslim manifest is not valid JSON ({exc}); the file is corrupted"
                              ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the manifest does not declare format {FORMAT!r}; not a torchslim checkpoint")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r} in the manifest; the file is corrupted")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format_version {version}, newer than this torchslim ({__version__}) supports "
            f"(up to {FORMAT_VERSION}; written by torchslim {manifest.get('torchslim_version')}); upgrade torchslim")
    if version >= 2:
        payload = _payload(header, start, data, path)
        if hashlib.sha256(payload).hexdigest() != manifest.get("sha256"):
            raise CheckpointError(f"{path} failed its sha256 check: the file was tampered with or corrupted after it "
                                  "was written; restore a good copy or re-create it from the original model")
        try:
            body, _ = decode_payload(payload, load_json, parts=False)
        except ValueError as exc:
            raise CheckpointError(f"{path}: the torchslim payload is malformed ({exc}); the file is corrupted"
                                  ) from None
        return {"format": FORMAT, "format_version": version, **body, "sha256": manifest["sha256"]}, data
    view = memoryview(data)
    raw = {name: view[start + info["data_offsets"][0]: start + info["data_offsets"][1]]
           for name, info in header.items() if name != "__metadata__"}
    try:
        actual = digest(manifest, raw)
    except ValueError:  # the manifest holds NaN/inf, which save never writes
        actual = None
    if actual is None or actual != manifest.get("sha256"):
        raise CheckpointError(f"{path} failed its sha256 check: the file was tampered with or corrupted after it was "
                              "written; restore a good copy or re-create it from the original model")
    return manifest, data


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse to save onto a directory, or onto an existing file without ``overwrite``."""
    if path.is_dir():
        raise TorchslimError(f"cannot save to {path}: it is a directory; pass a file path such as {path / 'model.slim'}")
    if path.exists() and not overwrite:
        raise CheckpointExistsError(f"refusing to overwrite existing file {path}; pass overwrite=True to replace it")


# ----------------------------------------------------------------------------------------------
# Manifest values are plain JSON


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists (as JSON gives them back)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def jsonable(value: Any, where: str) -> Any:
    """Check ``value`` is plain JSON (tuples become lists), naming the offending item otherwise."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TorchslimError(f"{where} is {value}, which JSON cannot hold portably; store None or a string instead")
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TorchslimError(f"{where} has key {k!r} of type {type(k).__name__}; manifest keys must be str")
            out[k] = jsonable(v, f"{where}[{k!r}]")
        return out
    raise TorchslimError(f"{where} is a {type(value).__name__}, which is not JSON-serialisable; use str, int, float, "
                         "bool, None, lists and str-keyed dicts (call .item() or .tolist() on tensors and arrays)")
