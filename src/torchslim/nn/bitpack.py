"""Bit packing of small unsigned integer codes, one implementation per storage format.

- :func:`pack_bits` / :func:`unpack_bits`: ``bits``-bit codes (1 to 8) as one bit stream per row, the first
  code in the most significant bits of the first byte (the ``"intpack"`` checkpoint encoding and the
  weight-only layers' ``packed`` buffers). Torch, so that layers unpack on their own device and under export.
- :func:`pack_trits` / :func:`unpack_trits`: ternary codes as base-3 digits, five per byte (1.6 bits each).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _layout(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole group: 8 codes of 3 bits fill 3 bytes, 2 codes of 4 bits 1."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    g = math.gcd(bits, 8)
    return 8 // g, bits // g


def _slots(bits: int, per: int) -> list[tuple[int, int]]:
    """(byte, bit offset from its most significant end) where each code of a group starts."""
    return [divmod(i * bits, 8) for i in range(per)]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of unsigned integer ``codes`` (each < 2**bits) into uint8, ``bits`` per code,
    first code in the most significant bits; a row's last byte is zero-padded."""
    per, size = _layout(bits)
    n = codes.shape[-1]
    if codes.numel() and int(codes.max()) >> bits:
        raise ValueError(f"a code ({int(codes.max())}) does not fit in {bits} bits")
    u = codes.to(torch.uint8)
    if bits == 8:
        return u.contiguous()
    u = F.pad(u, (0, -n % per)).reshape(*u.shape[:-1], -1, per)
    out = torch.zeros(*u.shape[:-1], size, dtype=torch.uint8, device=u.device)
    for i, (j, o) in enumerate(_slots(bits, per)):
        spill = o + bits - 8  # bits that run into the next byte
        if spill <= 0:
            out[..., j] |= u[..., i] << (8 - o - bits)
        else:
            out[..., j] |= u[..., i] >> spill
            out[..., j + 1] |= (u[..., i] & ((1 << spill) - 1)) << (8 - spill)
    return out.reshape(*out.shape[:-2], -1)[..., : (n * bits + 7) // 8]


def unpack_bits(packed: torch.Tensor, bits: int, count: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` uint8 codes per row (default: as many as the bytes hold)."""
    per, size = _layout(bits)
    nbytes = packed.shape[-1]
    count = nbytes * 8 // bits if count is None else count
    if bits == 8:
        return packed[..., :count]
    groups = F.pad(packed, (0, -nbytes % size)).reshape(*packed.shape[:-1], -1, size)
    if torch.compiler.is_compiling():
        # Exporters mistype uint8 bit operations (int8 vs uint8 in ONNX); integer-valued float math is exact.
        groups = groups.float()
        parts = []
        for j, o in _slots(bits, per):
            window = groups[..., j] * 256.0 + (groups[..., j + 1] if o + bits > 8 else 0.0)
            shifted = torch.floor(window / 2.0 ** (16 - o - bits))
            parts.append(shifted - torch.floor(shifted / 2.0 ** bits) * 2.0 ** bits)
        codes = torch.stack(parts, -1).to(torch.uint8)
    else:
        mask = (1 << bits) - 1
        parts = []
        for j, o in _slots(bits, per):
            spill = o + bits - 8
            if spill <= 0:
                parts.append((groups[..., j] >> (8 - o - bits)) & mask)
            else:
                parts.append(((groups[..., j] & ((1 << (8 - o)) - 1)) << spill) | (groups[..., j + 1] >> (8 - spill)))
        codes = torch.stack(parts, -1)
    return codes.reshape(*codes.shape[:-2], -1)[..., :count]


_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint16)


def pack_trits(codes: np.ndarray) -> bytes:
    """Five base-3 digits per byte (3^5 = 243 <= 256): 1.6 bits per ternary code (0, 1 or 2)."""
    pad = (-codes.size) % 5
    digits = np.concatenate([codes, np.zeros(pad, dtype=np.uint8)]).reshape(-1, 5).astype(np.uint16)
    return (digits * _POW3).sum(1).astype(np.uint8).tobytes()


def unpack_trits(data: bytes, n: int) -> np.ndarray:
    """Inverse of :func:`pack_trits`: ``n`` uint8 codes."""
    b = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
    digits = (b[:, None] // _POW3) % 3
    return digits.reshape(-1)[:n].astype(np.uint8)
