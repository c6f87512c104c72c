"""Entropy coders, relative indices and the "huffman"/"ans" checkpoint encodings."""

import numpy as np
import pytest
import torch

from torchslim.export import checkpoint as ckpt
from torchslim.export import coding
from torchslim.nn.bitpack import pack_bits


def _skewed(n=20000, alphabet=32, seed=0):
    rng = np.random.default_rng(seed)
    p = 0.6 ** np.arange(alphabet)
    return rng.choice(alphabet, size=n, p=p / p.sum())


def _sparse_codes(shape=(120, 200), density=0.08, alphabet=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.from_numpy(_skewed(int(np.prod(shape)), alphabet, seed) + 1).reshape(shape).to(torch.int16)
    return codes * (torch.rand(shape, generator=g) < density)


@pytest.mark.parametrize("coder", ["huffman", "ans"])
@pytest.mark.parametrize("case", ["skewed", "uniform", "single", "empty", "two"])
def test_coders_round_trip_exactly(coder, case):
    rng = np.random.default_rng(1)
    symbols = {"skewed": _skewed(), "uniform": rng.integers(0, 256, 5000), "single": np.full(300, 7),
               "empty": np.zeros(0, np.int64), "two": rng.integers(0, 2, 999)}[case]
    size = int(symbols.max()) + 1 if symbols.size else 4
    enc = coding.huffman_encode if coder == "huffman" else coding.ans_encode
    dec = coding.huffman_decode if coder == "huffman" else coding.ans_decode
    data = enc(symbols, size)
    assert np.array_equal(dec(data, symbols.size), symbols)


def test_huffman_average_length_within_one_bit_of_entropy():
    symbols = _skewed()
    counts = np.bincount(symbols)
    lengths = coding.huffman_code_lengths(counts)
    entropy = coding.entropy_bits(symbols) / symbols.size
    average = (counts * lengths).sum() / symbols.size
    assert entropy <= average < entropy + 1
    # Kraft equality: a complete prefix code
    assert np.isclose(sum(2.0 ** -lengths[lengths > 0]), 1.0)
    # the exact size helper matches the encoder
    assert coding.huffman_size(counts) == len(coding.huffman_encode(symbols, counts.size))


def test_ans_is_close_to_entropy_and_beats_huffman_on_low_entropy():
    symbols = np.random.default_rng(2).choice(2, size=50000, p=[0.97, 0.03])  # Huffman needs >= 1 bit/symbol
    h = coding.entropy_bits(symbols) / 8
    ans, huff = len(coding.ans_encode(symbols)), len(coding.huffman_encode(symbols))
    assert ans <= h + 16
    assert huff >= symbols.size / 8
    assert ans < 0.3 * huff


@pytest.mark.parametrize("bits", [1, 2, 5, 8])
def test_relative_indices_round_trip_with_fillers(bits):
    positions = np.array([0, 3, 4, 300, 301, 2000, 2001, 2600])
    rel = coding.relative_indices(positions, bits)
    assert rel.max() <= (1 << bits) - 1
    filler = (1 << bits) - 1
    assert (rel != filler).sum() == positions.size
    assert np.array_equal(coding.positions_from_relative(rel, bits), positions)


@pytest.mark.parametrize("coder", ["huffman", "ans"])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.4, 1.0])
def test_encode_codes_round_trip(coder, density):
    codes = _sparse_codes(density=density)
    data, meta = coding.encode_codes(codes, coder)
    assert sum(meta["sizes"]) == len(data)
    back = coding.decode_codes(data, meta, coder, list(codes.shape), codes.dtype)
    assert back.dtype == codes.dtype and torch.equal(back, codes)


@pytest.mark.parametrize("coder", ["huffman", "ans"])
def test_encoded_size_beats_plain_bit_packing_for_skewed_codes(coder):
    codes = _sparse_codes(density=0.08)
    nz = codes[codes != 0].numpy().astype(np.int64) - 1
    # plain Deep-Compression storage: 5-bit codes + 5-bit relative indices (with fillers), bit-packed
    rel = coding.relative_indices(np.flatnonzero(codes.reshape(-1).numpy()), 5)
    plain = pack_bits(torch.from_numpy(nz), 5).numel() + pack_bits(torch.from_numpy(rel), 5).numel()
    data, _ = coding.encode_codes(codes, coder)
    assert len(data) < plain


def test_negative_and_offset_values_and_non_applicable_tensors():
    t = torch.randint(-8, 8, (50, 40), generator=torch.Generator().manual_seed(3)).to(torch.int8)
    for coder in coding.CODERS:
        data, meta = coding.encode_codes(t, coder)
        assert torch.equal(coding.decode_codes(data, meta, coder, [50, 40], torch.int8), t)
    assert coding.encode_codes(torch.randn(100), "ans") is None  # floats: not codes
    assert coding.encode_codes(torch.ones(3, dtype=torch.int64), "ans") is None  # too small to pay off
    assert coding.encode_codes(torch.tensor([1, 1 << 20] * 40), "ans") is None  # alphabet too large


def test_checkpoint_encodings_are_registered_and_exact():
    codes = _sparse_codes(density=0.1)
    for name in coding.CODERS:
        enc = ckpt.ENCODINGS.get(name)
        parts, meta = enc.encode(codes)
        entry = {"shape": list(codes.shape), "dtype": "int16", **meta}
        assert torch.equal(enc.decode(parts, entry), codes)
