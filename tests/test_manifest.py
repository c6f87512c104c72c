"""Checkpoint format 2: the compressed manifest and single payload, bounded decoding, format-1 files still load."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch

import torchslim
from torchslim.core.errors import CheckpointError
from torchslim.export.checkpoint import compact
from torchslim.export.checkpoint.format import MANIFEST_KEY, canonical, sign, split
from torchslim.models import LeNet300

DATA = Path(__file__).parent / "data"


def _lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchslim.prune(LeNet300(), torchslim.UnstructuredPruning(sparsity=0.9))
    return torchslim.quantize(model, torchslim.WeightSharing(bits=4)).eval()


def _format1(manifest: dict, stored: dict) -> bytes:
    """The same checkpoint written the format-1 way: JSON manifest in the header, a header entry per part."""
    from torchslim.export.checkpoint.format import digest, tensor_bytes

    m = {**manifest, "format_version": 1}
    m.pop("sha256")
    m["sha256"] = digest(m, {k: tensor_bytes(v.contiguous()) for k, v in stored.items()})
    return sign(stored, canonical(m), None)


def test_manifest_and_header_are_smaller_than_format_1(tmp_path):
    path = torchslim.save(_lenet(), tmp_path / "m.slim")
    new = path.read_bytes()
    manifest, stored = split(new)
    old = _format1(manifest, stored)
    header = int.from_bytes(new[:8], "little")
    old_header = int.from_bytes(old[:8], "little")
    compressed = struct.unpack("<I", new[8 + header: 12 + header])[0]
    # Same tensors, so every byte saved is manifest and per-part header overhead.
    assert len(new) < len(old) - 1500 and header + compressed < old_header / 3
    assert set(json.loads(new[8:8 + header])) == {"__metadata__", compact.PAYLOAD}
    (tmp_path / "old.slim").write_bytes(old)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(torchslim.load(tmp_path / "old.slim")(x), torchslim.load(path)(x))
    assert torchslim.read_manifest(tmp_path / "old.slim")["format_version"] == 1


def test_preset_dictionary_pays(tmp_path):
    manifest, stored = split(torchslim.save(_lenet(), tmp_path / "m.slim").read_bytes())
    text = compact.manifest_text({k: v for k, v in manifest.items()
                                  if k not in ("format", "format_version", "sha256")}, stored)
    plain = len(zlib.compress(text.encode(), 9)) - 6  # without the zlib wrapper, as the payload stores it
    with_dict = len(compact.encode_payload(text, {})) - 4
    assert with_dict < 0.8 * plain


def test_format_1_fixture_still_loads():
    expected = safetensors.torch.load_file(DATA / "v1_lenet300.expected.safetensors")
    model = torchslim.load(DATA / "v1_lenet300.slim")
    assert torchslim.read_manifest(DATA / "v1_lenet300.slim")["format_version"] == 1
    assert isinstance(model.fc1, torchslim.quantization.sharing.SharedWeight)
    assert hasattr(model.fc3, "weight_mask")  # masks re-applied, as format 1 files always were
    with torch.no_grad():
        assert torch.equal(model.eval()(expected["x"]), expected["y"])


def _payload_file(payload: bytes) -> bytes:
    import hashlib

    t = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    meta = canonical({"format": "torchslim", "format_version": 2, "sha256": hashlib.sha256(payload).hexdigest()})
    return safetensors.torch.save({compact.PAYLOAD: t}, metadata={MANIFEST_KEY: meta})


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=compact._ZDICT)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize("payload, message", [
    (b"\x01\x00", "shorter than its length field"),
    (struct.pack("<I", 1000) + b"xx", "needs 1000 bytes"),
    (struct.pack("<I", 3) + b"abc", "does not decompress|truncated"),
    (lambda: (lambda z: struct.pack("<I", len(z)) + z)(_deflate(b" " * (compact.MAX_MANIFEST + 10))),
     "decompresses to more than"),
    (lambda: (lambda z: struct.pack("<I", len(z)) + z)(_deflate(b'{"t":[],"p":[["w","float32",[1000]]]}')),
     "needs 4000 bytes"),
    (lambda: (lambda z: struct.pack("<I", len(z)) + z + b"\0" * 5)(_deflate(b'{"t":[],"p":[]}')),
     "belong to no part"),
    (lambda: (lambda z: struct.pack("<I", len(z)) + z)(_deflate(b'{"t":[],"p":[["w","pickle",[1]]]}')),
     "malformed part row"),
    (lambda: (lambda z: struct.pack("<I", len(z)) + z)(_deflate(b'{"t":[' + b"[" * 5000 + b"]" * 5000 + b'],"p":[]}')),
     "nests"),
])
def test_malformed_payloads_are_checkpoint_errors(tmp_path, payload, message):
    payload = payload() if callable(payload) else payload
    path = tmp_path / "bad.slim"
    path.write_bytes(_payload_file(payload))
    with pytest.raises(CheckpointError, match=message):
        torchslim.load(path)


def test_file_layout_accounts_for_every_byte_in_both_formats(tmp_path):
    from torchslim.export.size import file_layout

    path = torchslim.save(_lenet(), tmp_path / "m.slim")
    manifest, stored = split(path.read_bytes())
    (tmp_path / "old.slim").write_bytes(_format1(manifest, stored))
    new, old = file_layout(path), file_layout(tmp_path / "old.slim")
    assert new["parts"] == old["parts"] and set(new["parts"]) == set(stored)
    assert new["parts"]["fc1.codes"] == stored["fc1.codes"].numel()
    for layout in (new, old):
        assert layout["header"] + sum(layout["parts"].values()) == layout["file"]
        assert layout["manifest"] < layout["header"]
    assert new["header"] < old["header"] / 3
