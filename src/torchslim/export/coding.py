"""Entropy coding for checkpoints.

Two lossless coders for streams of small non-negative integers, both from the ``constriction`` library:

- **Huffman** (``constriction.symbol``): a static per-stream Huffman code. Only the code *lengths* are
  stored; both sides rebuild the same tree from the dyadic probabilities ``2**-length``, whose Huffman
  tree has exactly those lengths.
- **ANS** (``constriction.stream.stack.AnsCoder``): asymmetric numeral systems with a static categorical
  model per stream, stored as quantized frequencies; within a few bytes of the model's cross-entropy.

On top of them, :func:`encode_codes` / :func:`decode_codes` store an integer tensor whose zeros are pruned
positions (weight-sharing codes): positions as Deep Compression's relative indices (gaps of at most
``2**b - 2`` zeros; a filler symbol skips ``2**b - 1`` zeros), then the non-zero values. The checkpoint
stores int16 code tensors this way as its ``"huffman"`` (Deep Compression: index bounds of 5 bits for fully
connected and 8 bits for conv weights) and ``"ans"`` (index bound chosen per tensor) encodings, keeping the
smaller per tensor.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import constriction
import numpy as np
import torch

__all__ = [
    "entropy_bits", "huffman_code_lengths",
    "huffman_encode", "huffman_decode", "ans_encode", "ans_decode",
    "relative_indices", "positions_from_relative", "encode_codes", "decode_codes", "CODERS",
    "huffman_size", "ans_size", "index_bits_for", "PAPER_INDEX_BITS", "CODE_DTYPE",
]

CODERS = ("huffman", "ans")
# Deep Compression (Han et al. 2016, section 2): index differences bounded by 8 bits in conv layers and
# 5 bits in fully connected layers, with filler entries for longer runs of zeros.
PAPER_INDEX_BITS = {"fc": 5, "conv": 8}
_MAX_ALPHABET = 1 << 16
_MIN_ELEMENTS = 64  # below this, model tables cost more than entropy coding saves (counters, scalars)


# ----------------------------------------------------------------------------------------------
# Small integers


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if shift > 63:
            raise ValueError("a length field is longer than 64 bits; the data is corrupted")
        if pos >= len(buf):
            raise ValueError("the data ends inside a length field; it is truncated")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def entropy_bits(symbols_or_counts: np.ndarray, *, counts: bool = False) -> float:
    """Shannon information of a stream, in bits, under its own empirical distribution."""
    c = np.asarray(symbols_or_counts, dtype=np.int64)
    if not counts:
        c = np.bincount(c.reshape(-1)) if c.size else np.zeros(0, np.int64)
    c = c[c > 0].astype(np.float64)
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum()) if n else 0.0


# ----------------------------------------------------------------------------------------------
# Huffman (constriction.symbol)


def huffman_code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length of every symbol (0 for absent symbols; 1 when only one symbol occurs)."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = np.flatnonzero(counts)
    if len(present) == 1:
        lengths[present] = 1
        return lengths
    # (count, tie-breaker, members); deterministic, so encoder and tests agree on the lengths.
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(present)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        lengths[a + b] += 1
        heapq.heappush(heap, (c1 + c2, tie, a + b))
        tie += 1
    return lengths


def _huffman_tables(lengths: np.ndarray):
    present = np.flatnonzero(lengths)
    # A Huffman tree built on dyadic probabilities 2**-l has exactly the code lengths l, so storing
    # the lengths is enough for encoder and decoder to build the same tree.
    probs = np.ldexp(1.0, -lengths[present].astype(np.int32))
    return present, probs


def _pack_lengths(lengths: np.ndarray) -> bytes:
    wide = int(lengths.max(initial=0)) > 15
    head = _varint(len(lengths) * 2 + int(wide))
    if wide:
        return head + lengths.astype(np.uint8).tobytes()
    padded = np.zeros(len(lengths) + len(lengths) % 2, dtype=np.uint8)
    padded[: len(lengths)] = lengths
    return head + (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack_lengths(buf: memoryview, pos: int) -> tuple[np.ndarray, int]:
    head, pos = _read_varint(buf, pos)
    n, wide = head >> 1, head & 1
    if n > _MAX_ALPHABET or (n if wide else (n + 1) // 2) > len(buf) - pos:
        raise ValueError(f"a code table of {n} symbols does not fit the {len(buf) - pos} bytes left")
    if wide:
        return np.frombuffer(buf[pos:pos + n], dtype=np.uint8).astype(np.int64), pos + n
    nb = (n + 1) // 2
    packed = np.frombuffer(buf[pos:pos + nb], dtype=np.uint8)
    out = np.empty(nb * 2, dtype=np.int64)
    out[0::2], out[1::2] = packed & 15, packed >> 4
    return out[:n], pos + nb


def huffman_encode(symbols: np.ndarray, alphabet_size: int | None = None) -> bytes:
    """Huffman-code ``symbols`` (non-negative ints): code lengths, then the bits, LSB first."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    size = alphabet_size if alphabet_size is not None else (int(symbols.max()) + 1 if symbols.size else 0)
    counts = np.bincount(symbols, minlength=size)
    lengths = huffman_code_lengths(counts)
    out = _pack_lengths(lengths)
    present, probs = _huffman_tables(lengths)
    if len(present) <= 1:  # a single symbol carries no information
        return out
    remap = np.zeros(size, dtype=np.int64)
    remap[present] = np.arange(len(present))
    tree = constriction.symbol.huffman.EncoderHuffmanTree(probs)
    encoder = constriction.symbol.QueueEncoder()
    for s in remap[symbols].tolist():
        encoder.encode_symbol(s, tree)
    words, nbits = encoder.get_compressed()
    # Bits fill each 32-bit word from its least significant end, so the padding is the tail bytes.
    return out + words.astype("<u4").tobytes()[: (nbits + 7) // 8]


def huffman_decode(data: bytes | memoryview, count: int) -> np.ndarray:
    """Decode ``count`` symbols written by :func:`huffman_encode`."""
    buf = memoryview(data)
    lengths, pos = _unpack_lengths(buf, 0)
    present, probs = _huffman_tables(lengths)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if len(present) == 1:
        return np.full(count, present[0], dtype=np.int64)
    if count > 8 * (len(buf) - pos):  # every symbol of a code with two or more symbols takes a bit at least
        raise ValueError(f"{count} Huffman symbols cannot fit in {len(buf) - pos} bytes")
    payload = bytes(buf[pos:])
    payload += b"\0" * (-len(payload) % 4)
    decoder = constriction.symbol.QueueDecoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    tree = constriction.symbol.huffman.DecoderHuffmanTree(probs)
    out = [decoder.decode_symbol(tree) for _ in range(count)]
    return present[np.asarray(out, dtype=np.int64)]


def huffman_size(counts: np.ndarray) -> int:
    """Exact byte size :func:`huffman_encode` produces for a stream with these symbol counts."""
    lengths = huffman_code_lengths(counts)
    nbits = int((np.asarray(counts, dtype=np.int64) * lengths).sum()) if np.count_nonzero(lengths) > 1 else 0
    return len(_pack_lengths(lengths)) + (nbits + 7) // 8


# ----------------------------------------------------------------------------------------------
# ANS (constriction.stream)


def _quantize_counts(counts: np.ndarray, wide: bool) -> np.ndarray:
    top = 65535 if wide else 255
    counts = np.asarray(counts, dtype=np.float64)
    freq = np.ceil(counts * (top / max(counts.max(initial=0), 1.0)))
    return np.where(counts > 0, np.clip(freq, 1, top), 0).astype(np.uint16 if wide else np.uint8)


def _ans_model(freq: np.ndarray):
    probs = freq.astype(np.float64)
    return constriction.stream.model.Categorical(probs / probs.sum(), perfect=False)


def _ans_cost_bits(counts: np.ndarray, freq: np.ndarray) -> float:
    mask = counts > 0
    q = freq[mask].astype(np.float64) / freq.sum()
    return float(-(counts[mask] * np.log2(q)).sum())


def ans_encode(symbols: np.ndarray, alphabet_size: int | None = None, *, wide: bool | None = None) -> bytes:
    """ANS-code ``symbols`` with a static categorical model (8- or 16-bit frequencies, the smaller
    total when ``wide`` is None); the model table is stored in front of the payload."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    size = alphabet_size if alphabet_size is not None else (int(symbols.max()) + 1 if symbols.size else 0)
    counts = np.bincount(symbols, minlength=size)
    if wide is None:
        wide = _ans_estimate(counts, True) < _ans_estimate(counts, False)
    freq = _quantize_counts(counts, wide)
    out = _varint(size * 2 + int(wide)) + freq.astype("<u2" if wide else np.uint8).tobytes()
    if np.count_nonzero(counts) <= 1:
        return out
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), _ans_model(freq))
    return out + coder.get_compressed().astype("<u4").tobytes()


def ans_decode(data: bytes | memoryview, count: int) -> np.ndarray:
    """Decode ``count`` symbols written by :func:`ans_encode`."""
    buf = memoryview(data)
    head, pos = _read_varint(buf, 0)
    size, wide = head >> 1, head & 1
    nb = size * (2 if wide else 1)
    if size > _MAX_ALPHABET or nb > len(buf) - pos:
        raise ValueError(f"a model table of {size} symbols does not fit the {len(buf) - pos} bytes left")
    freq = np.frombuffer(buf[pos:pos + nb], dtype="<u2" if wide else np.uint8).astype(np.int64)
    pos += nb
    present = np.flatnonzero(freq)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if len(present) == 1:
        return np.full(count, present[0], dtype=np.int64)
    if not len(present) or (len(buf) - pos) % 4:
        raise ValueError("the ANS model is empty or the payload is not whole 32-bit words")
    # The likeliest symbol costs the fewest bits; the payload plus the coder's initial state bounds the count.
    min_bits = -math.log2(freq.max() / freq.sum())
    if count * min_bits > 8 * (len(buf) - pos) + 64:
        raise ValueError(f"{count} ANS symbols cannot fit in {len(buf) - pos} bytes")
    words = np.frombuffer(bytes(buf[pos:]), dtype="<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    out = np.asarray(coder.decode(_ans_model(freq), count), dtype=np.int64)
    if not coder.is_empty():  # fewer symbols than were encoded
        raise ValueError(f"the ANS stream holds more than {count} symbols")
    return out


def _ans_estimate(counts: np.ndarray, wide: bool) -> float:
    """Approximate bytes of :func:`ans_encode` (model table + cross-entropy + one state word)."""
    counts = np.asarray(counts, dtype=np.int64)
    table = len(_varint(len(counts) * 2 + 1)) + len(counts) * (2 if wide else 1)
    if np.count_nonzero(counts) <= 1:
        return table
    return table + 4 * math.ceil((_ans_cost_bits(counts, _quantize_counts(counts, wide)) + 32) / 32)


def ans_size(counts: np.ndarray) -> float:
    """Approximate byte size of :func:`ans_encode` for a stream with these symbol counts."""
    return min(_ans_estimate(counts, True), _ans_estimate(counts, False))


# ----------------------------------------------------------------------------------------------
# Relative (gap) indices


def relative_indices(positions: np.ndarray, bits: int) -> np.ndarray:
    """Deep Compression's relative indices of sorted ``positions`` of non-zeros.

    Each non-zero is one symbol ``r < 2**bits - 1``: the number of zeros skipped since the previous
    non-zero. A run of ``2**bits - 1`` or more zeros first emits filler symbols ``2**bits - 1``, each
    skipping that many zeros without a value.
    """
    positions = np.asarray(positions, dtype=np.int64)
    filler = (1 << bits) - 1
    zeros_before = np.diff(positions, prepend=-1) - 1
    fillers, rest = np.divmod(zeros_before, filler)
    slot = np.cumsum(fillers + 1) - 1  # where each non-zero's own symbol lands
    out = np.full(int(slot[-1]) + 1 if slot.size else 0, filler, dtype=np.int64)
    out[slot] = rest
    return out


def positions_from_relative(symbols: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`relative_indices`: the positions of the non-zeros."""
    symbols = np.asarray(symbols, dtype=np.int64)
    filler = (1 << bits) - 1
    is_value = symbols != filler
    advance = np.where(is_value, symbols + 1, filler)
    return (np.cumsum(advance) - 1)[is_value]


# ----------------------------------------------------------------------------------------------
# Integer tensors with pruned zeros (weight-sharing codes)


def _stream(coder: str, symbols: np.ndarray, size: int) -> bytes:
    return huffman_encode(symbols, size) if coder == "huffman" else ans_encode(symbols, size)


def _unstream(coder: str, data: memoryview, count: int) -> np.ndarray:
    return huffman_decode(data, count) if coder == "huffman" else ans_decode(data, count)


def _stream_size(coder: str, counts: np.ndarray) -> float:
    return huffman_size(counts) if coder == "huffman" else ans_size(counts)


def index_bits_for(shape: tuple[int, ...] | list[int], coder: str) -> tuple[int, ...]:
    """Index bit bounds to try for a weight of ``shape``: the paper's fixed bound for Huffman, 1..8
    (1 is a plain bitmask) for ANS."""
    if coder == "huffman":
        return (PAPER_INDEX_BITS["conv"] if len(shape) > 2 else PAPER_INDEX_BITS["fc"],)
    return tuple(range(1, 9))


def encode_codes(t: torch.Tensor, coder: str, index_bits: tuple[int, ...] | None = None
                 ) -> tuple[bytes, dict[str, Any]] | None:
    """Entropy-code an integer tensor whose zeros are pruned positions; ``None`` if it does not apply.

    Returns the bytes (index stream, then the stream of non-zero values minus their minimum) and the
    manifest extras: ``index`` (the relative-index bit bound, 0 when there are no zeros), ``n`` (index
    symbols), ``offset`` (minimum non-zero value) and ``sizes`` (bytes of the two streams).
    """
    if coder not in CODERS:
        raise ValueError(f"coder must be one of {CODERS}, got {coder!r}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.numel() < _MIN_ELEMENTS:
        return None
    flat = t.reshape(-1).to(torch.int64).numpy()
    positions = np.flatnonzero(flat)
    values = flat[positions]
    offset = int(values.min()) if values.size else 0
    size = (int(values.max()) - offset + 1) if values.size else 0
    if size > _MAX_ALPHABET:
        return None
    symbols = values - offset
    if positions.size == flat.size:
        candidates = [0]
    else:
        candidates = list(index_bits if index_bits is not None else index_bits_for(tuple(t.shape), coder))
    # Sizes are computed from histograms (exact for Huffman, within a few bytes for ANS), so only the
    # chosen index bound is actually encoded.
    best = None
    for bits in candidates:
        rel = relative_indices(positions, bits) if bits else np.zeros(0, np.int64)
        cost = _stream_size(coder, np.bincount(rel, minlength=1 << bits)) if bits else 0
        if best is None or cost < best[0]:
            best = (cost, bits, rel)
    _, bits, rel = best
    index = _stream(coder, rel, 1 << bits) if bits else b""
    codes = _stream(coder, symbols, size) if values.size else b""
    meta = {"index": bits, "n": int(rel.size), "offset": offset, "sizes": [len(index), len(codes)]}
    return index + codes, meta


def decode_codes(data: bytes | memoryview | np.ndarray, meta: dict[str, Any], coder: str,
                 shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`encode_codes`."""
    buf = memoryview(np.ascontiguousarray(data, dtype=np.uint8) if isinstance(data, np.ndarray) else data)
    n_total = math.prod(shape)
    fields = [meta["index"], meta["n"], meta["offset"], *meta["sizes"]]
    if len(fields) != 5 or not all(type(f) is int for f in fields):
        raise ValueError(f"the stream fields {fields} must be five integers")
    bits, n_index, offset, index_size, codes_size = fields
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        if not info.min <= offset <= info.max:
            raise ValueError(f"offset {offset} does not fit {dtype}")
    if not 0 <= bits <= 16 or not 0 <= n_index <= n_total or min(index_size, codes_size) < 0:
        raise ValueError(f"index bits {bits}, {n_index} index symbols or stream sizes {meta['sizes']} are out of "
                         f"range for a tensor of {n_total} elements")
    if len(buf) != index_size + codes_size:
        raise ValueError(f"{len(buf)} bytes of data but the manifest lists streams of {index_size} + {codes_size}")
    if bits:
        positions = positions_from_relative(_unstream(coder, buf[:index_size], n_index), bits)
    else:
        positions = np.arange(n_total if codes_size else 0, dtype=np.int64)
    if positions.size and positions[-1] >= n_total:
        raise ValueError(f"relative indices point past the end of a tensor of {n_total} elements")
    out = np.zeros(n_total, dtype=np.int64)
    if positions.size:
        out[positions] = _unstream(coder, buf[index_size:], positions.size) + offset
        if not dtype.is_floating_point and int(out.max()) > torch.iinfo(dtype).max:
            raise ValueError(f"decoded values exceed the range of {dtype}")
    return torch.from_numpy(out).to(dtype).reshape(shape)


CODE_DTYPE = torch.int16
"""The dtype the checkpoint's "huffman" and "ans" encodings apply to: weight-sharing codes. Other integer
tensors (e.g. the QAT modules' int8 codes, which have their own "intpack" encoding) are left to their own
encodings."""
