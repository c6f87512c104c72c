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


def _group(bits: int) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """The smallest whole group of ``bits``-bit codes -- (codes, bytes, where each code starts as (byte, bit
    offset from its most significant end)) -- e.g. 8 codes of 3 bits fill 3 bytes, 2 codes of 4 bits 1."""
    per = 8 // math.gcd(bits, 8)
    return per, per * bits // 8, tuple(divmod(i * bits, 8) for i in range(per))


# Looked up rather than computed, so that exporters tracing a layer see plain constants.
_GROUPS = {bits: _group(bits) for bits in range(1, 9)}


def _layout(bits: int) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    if bits not in _GROUPS:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return _GROUPS[bits]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of unsigned integer ``codes`` (each < 2**bits) into uint8, ``bits`` per code,
    first code in the most significant bits; a row's last byte is zero-padded."""
    per, size, slots = _layout(bits)
    n = codes.shape[-1]
    if codes.numel() and int(codes.max()) >> bits:
        raise ValueError(f"a code ({int(codes.max())}) does not fit in {bits} bits")
    u = codes.to(torch.uint8)
    if bits == 8:
        return u.contiguous()
    u = F.pad(u, (0, -n % per)).reshape(*u.shape[:-1], -1, per)
    out = torch.zeros(*u.shape[:-1], size, dtype=torch.uint8, device=u.device)
    for i, (j, o) in enumerate(slots):
        spill = o + bits - 8  # bits that run into the next byte
        if spill <= 0:
            out[..., j] |= u[..., i] << (8 - o - bits)
        else:
            out[..., j] |= u[..., i] >> spill
            out[..., j + 1] |= (u[..., i] & ((1 << spill) - 1)) << (8 - spill)
    return out.reshape(*out.shape[:-2], -1)[..., : (n * bits + 7) // 8]


def unpack_bits(packed: torch.Tensor, bits: int, count: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` uint8 codes per row (default: as many as the bytes hold)."""
    per, size, slots = _layout(bits)
    nbytes = packed.shape[-1]
    count = nbytes * 8 // bits if count is None else count
    if bits == 8:
        return packed[..., :count]
    groups = F.pad(packed, (0, -nbytes % size)).reshape(*packed.shape[:-1], -1, size)
    if torch.compiler.is_compiling():
        # Exporters mistype uint8 bit operations (int8 vs uint8 in ONNX); integer-valued float math is exact.
        groups = groups.float()
        parts = []
        for j, o in slots:
            window = groups[..., j] * 256.0 + (groups[..., j + 1] if o + bits > 8 else 0.0)
            shifted = torch.floor(window / 2.0 ** (16 - o - bits))
            parts.append(shifted - torch.floor(shifted / 2.0 ** bits) * 2.0 ** bits)
        codes = torch.stack(parts, -1).to(torch.uint8)
    else:
        mask = (1 << bits) - 1
        parts = []
        for j, o in slots:
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
