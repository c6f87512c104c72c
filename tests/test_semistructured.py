"""N:M (2:4) semi-structured sparsity: exact patterns, fixed-mask training, packed checkpoints, ONNX, CUDA gate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim
from torchslim.core.errors import ConfigError, DataError, UnsupportedModelError
from torchslim.export.checkpoint import ENCODINGS
from torchslim.export.checkpoint.encodings import encode_tensor
from torchslim.nn.masks import effective
from torchslim.pruning import accelerate_semi_structured
from torchslim.pruning.nm import decode_nm, encode_nm, is_nm


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16),
                         nn.ReLU(), nn.Linear(16, 10))


def _batches(n: int = 3) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 4, 6, 6, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _groups_ok(w: torch.Tensor, n: int, m: int) -> bool:
    rows = w.reshape(w.shape[0], -1).reshape(w.shape[0], -1, m)
    return bool(((rows != 0).sum(-1) <= n).all()) and bool(((rows != 0).sum(-1) == n).float().mean() > 0.99)


@pytest.mark.parametrize("method", ["magnitude", "hessian", "obs"])
def test_every_layer_gets_the_exact_pattern(method):
    model, data = _model(), _batches()
    pruned = torchslim.prune(model, torchslim.SemiStructuredPruning(method=method), data=data)
    for i in (0, 3, 5):
        w = effective(pruned[i]).detach()
        assert _groups_ok(w, 2, 4), f"layer {i}"
        assert hasattr(pruned[i], "weight_mask")
    assert not hasattr(model[0], "weight_mask")


def test_one_of_four_and_four_of_eight():
    model, data = _model(), _batches()
    one = torchslim.prune(model, torchslim.SemiStructuredPruning(n=1, m=4), data=data)
    with pytest.warns(RuntimeWarning, match=r"4:8 sparsity leaves \['0'\] dense"):  # 36 inputs per kernel
        four = torchslim.prune(model, torchslim.SemiStructuredPruning(n=4, m=8, method="obs"), data=data)
    assert _groups_ok(effective(one[3]).detach(), 1, 4) and _groups_ok(effective(four[3]).detach(), 4, 8)


def test_obs_reconstructs_better_than_magnitude_at_2_4():
    model, data = _model(), _batches()
    obs = torchslim.prune(model, torchslim.SemiStructuredPruning(method="obs"), data=data)
    mag = torchslim.prune(model, torchslim.SemiStructuredPruning(), data=data)
    with torch.no_grad():
        def err(m):
            return sum(float(((model(x) - m(x)) ** 2).mean()) for x, _ in data)
        assert err(obs) < 0.8 * err(mag)


def test_masks_stay_fixed_while_fine_tuning():
    model, data = _model(), _batches()
    config = torchslim.SemiStructuredPruning(schedule=torchslim.Schedule(
        finetune=torchslim.TrainConfig(epochs=2, lr=1e-2, progress=False)))
    pruned = torchslim.prune(model, config, data=data)
    before = torchslim.prune(model, torchslim.SemiStructuredPruning(), data=data)
    w, w0 = effective(pruned[3]).detach(), effective(before[3]).detach()
    assert not torch.equal(w, w0)  # it trained
    assert torch.equal(w != 0, w0 != 0)  # on the same pattern
    assert is_nm(w, 2, 4)


def test_layers_with_odd_rows_stay_dense_with_a_warning():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(RuntimeWarning, match=r"leaves \['0'\] dense"):
        pruned = torchslim.prune(model, torchslim.SemiStructuredPruning())
    assert not hasattr(pruned[0], "weight_mask") and is_nm(effective(pruned[2]).detach(), 2, 4)
    with pytest.raises(UnsupportedModelError, match="multiple of"):
        torchslim.prune(nn.Sequential(nn.Linear(6, 3)), torchslim.SemiStructuredPruning())


def test_bad_configs_name_the_fix():
    with pytest.raises(ConfigError, match="n must be < m"):
        torchslim.SemiStructuredPruning(n=4, m=4)
    with pytest.raises(ConfigError, match="at most 8"):
        torchslim.SemiStructuredPruning(n=2, m=16)
    with pytest.raises(ConfigError, match="oneshot"):
        torchslim.SemiStructuredPruning(schedule=torchslim.Schedule(
            kind="iterative", steps=2, finetune=torchslim.TrainConfig(epochs=1)))
    with pytest.raises(ConfigError, match="data="):
        torchslim.prune(_model(), torchslim.SemiStructuredPruning(method="obs"))
    with pytest.raises(DataError, match="no batches"):
        torchslim.prune(_model(), torchslim.SemiStructuredPruning(method="obs"), data=[])
    broken = _model()
    with torch.no_grad():
        broken[3].weight[0, 0] = float("nan")
    with pytest.raises(UnsupportedModelError, match="NaN"):
        torchslim.prune(broken, torchslim.SemiStructuredPruning())


def _two_four(rows: int, cols: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    drop = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
    return w.reshape(rows, -1, 4).scatter(-1, drop, 0.0).reshape(rows, cols).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_encoding_round_trips_exactly_and_is_smaller(dtype):
    w = _two_four(64, 128, dtype)
    w[0, :4] = 0  # a group with fewer than n non-zeros
    w[1, :2] = torch.tensor([float("nan"), -0.0])
    parts, meta = encode_nm(w)
    assert meta == {"m": 4, "n": 2}
    entry = {"shape": list(w.shape), "dtype": str(dtype).removeprefix("torch."), **meta}
    out = decode_nm(parts, entry)
    same = (out == w) | (out.isnan() & w.isnan())
    assert out.dtype == dtype and bool(same.all())
    stored = sum(p.numel() * p.element_size() for p in parts.values())
    dense = w.numel() * w.element_size()
    assert stored <= 0.5 * dense + w.numel() * 3 / 32 + 1  # half the values + 3 bits per group of 4
    entry, _ = encode_tensor("w", w)
    assert entry["encoding"] == "nm"  # smaller than the bitmask and dense encodings


def test_encoding_declines_other_tensors_and_rejects_damage():
    assert encode_nm(torch.randn(16, 16)) is None  # dense
    assert encode_nm(torch.ones(4, 4, dtype=torch.int64)) is None
    assert encode_nm(torch.zeros(16, 16)) is None
    parts, meta = encode_nm(_two_four(8, 16))
    entry = {"shape": [8, 16], "dtype": "float32", **meta}
    with pytest.raises(ValueError, match="pattern codes"):
        decode_nm({"data": parts["data"], "meta": parts["meta"][:-1]}, entry)
    with pytest.raises(ValueError, match="N:M"):
        decode_nm(parts, {**entry, "n": 4})
    assert "nm" in ENCODINGS


def test_checkpoint_stores_2_4_weights_packed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 16))
    pruned = torchslim.prune(model, torchslim.SemiStructuredPruning())
    dense_path, path = tmp_path / "dense.slim", tmp_path / "nm.slim"
    torchslim.save(model, dense_path)
    torchslim.save(pruned, path)
    manifest = torchslim.read_manifest(path)
    assert manifest["tensors"]["0.weight"]["encoding"] == "nm"
    assert path.stat().st_size < 0.6 * dense_path.stat().st_size
    again = torchslim.load(path)
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
    assert torch.equal(effective(again[0]), effective(pruned[0]))
    assert hasattr(again[0], "weight_mask")  # the pattern keeps holding while it trains further


def test_onnx_export_keeps_the_pattern(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from torchslim.export.onnx import export_onnx, ort_session

    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    pruned = torchslim.prune(model, torchslim.SemiStructuredPruning())
    x = torch.randn(5, 32)
    path = export_onnx(pruned, x, tmp_path / "nm.onnx")
    sess = ort_session(path.read_bytes())
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), pruned(x), atol=1e-5)
    weights = [numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer if len(i.dims) == 2]
    assert len(weights) == 2
    assert all(is_nm(torch.from_numpy(w.copy()), 2, 4) or is_nm(torch.from_numpy(w.T.copy()), 2, 4)
               for w in weights)


def test_cuda_kernel_path_refuses_cpu_models():
    with pytest.raises(UnsupportedModelError, match="no speed-up"):
        accelerate_semi_structured(torchslim.prune(_model(), torchslim.SemiStructuredPruning()))
