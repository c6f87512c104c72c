"""Shared module helpers: the bit packer, pruning-mask arithmetic and the layer-name matcher."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from torchslim.nn.bitpack import pack_bits, pack_trits, unpack_bits, unpack_trits
from torchslim.nn.masks import effective, effective_state, masked_names
from torchslim.nn.modules import match


def _reference_pack(codes: np.ndarray, bits: int) -> bytes:
    """The format spelled out: each code's low ``bits`` bits, most significant first, as one bit stream."""
    planes = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(planes.reshape(-1)).tobytes()


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 1001])
def test_pack_bits_is_the_msb_first_stream_and_round_trips(bits, n):
    codes = np.random.default_rng(bits * n).integers(0, 1 << bits, size=n)
    packed = pack_bits(torch.from_numpy(codes), bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert packed.numpy().tobytes() == _reference_pack(codes, bits)
    assert np.array_equal(unpack_bits(packed, bits, n).numpy(), codes)
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(torch.tensor([1 << bits]), bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_bits_packs_rows_and_unpacks_under_compile(bits):
    u = torch.randint(0, 1 << bits, (5, 24), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(u, bits)
    assert packed.shape == (5, 24 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), u.to(torch.uint8))
    # the float path that exporters take gives the same codes
    compiled = torch.compile(lambda p: unpack_bits(p, bits), backend="eager", fullgraph=True)
    assert torch.equal(compiled(packed), u.to(torch.uint8))


def test_trits_round_trip_at_five_per_byte():
    codes = np.random.default_rng(0).integers(0, 3, size=1003).astype(np.uint8)
    data = pack_trits(codes)
    assert len(data) == 201
    assert np.array_equal(unpack_trits(data, codes.size), codes)


def test_masks_fold_orig_times_mask():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    assert masked_names(model[0]) == ["weight"] and masked_names(model[2]) == []
    with torch.no_grad():
        model[0].weight_orig.add_(1.0)  # the cached .weight is stale until the next forward pass
    expected = model[0].weight_orig * model[0].weight_mask
    assert torch.equal(effective(model[0]), expected)
    assert effective(model[0]).requires_grad
    assert effective(model[2]) is model[2].weight
    state, masked = effective_state(model)
    assert masked == ["0.weight"]
    assert list(state) == ["0.bias", "0.weight", "2.weight", "2.bias"]
    assert torch.equal(state["0.weight"], expected.detach())


def test_match_returns_the_first_matching_pattern():
    assert match("layers.0.conv1", ("fc*", "layers.*", "*conv1")) == "layers.*"
    assert match("fc1", ("conv*",)) is None
    assert match("fc1", ()) is None
    assert match("", ("",)) == ""
