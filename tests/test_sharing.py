"""k-means weight sharing: codebooks, codes, centroid gradients, fine-tuning, checkpoints."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from torchslim import ConfigError, TrainConfig
from torchslim.export import checkpoint as ckpt
from torchslim.models import LeNet5, LeNet300
from torchslim.quantization.sharing import (SharedConv2d, SharedLinear, SharedWeight, WeightSharing,
                                            apply_weight_sharing, kmeans_codebook, sharing_summary)


def _pruned(model: nn.Module, density: float = 0.2, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < density)
    return model


def _small_lenet5(seed: int = 0) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5(width=0.25)


def _loader(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [2, 4, 6])
@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_codebook_size_and_code_range(bits, init):
    w = torch.randn(60, 80, generator=torch.Generator().manual_seed(bits)) * 0.1
    w[torch.rand(60, 80, generator=torch.Generator().manual_seed(9)) < 0.7] = 0
    codebook, codes = kmeans_codebook(w, bits, init)
    assert codebook.dtype == torch.float32 and 1 < codebook.numel() <= 2 ** bits
    assert codes.dtype == torch.int16 and codes.shape == w.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits  # 1..2**bits: fits `bits` bits after -1
    assert torch.equal(codes == 0, w == 0)  # zeros (and only zeros) get the zero code
    shared = torch.nn.functional.pad(codebook, (1, 0))[codes.long()]
    # nearest-centroid assignment: every weight maps to (one of) its closest centroids
    dist = (w[w != 0].reshape(-1, 1) - codebook.reshape(1, -1)).abs()
    assert torch.allclose((shared[w != 0] - w[w != 0]).abs(), dist.min(1).values, atol=1e-6)


def test_few_distinct_values_are_kept_exactly():
    w = torch.tensor([[0.0, 0.5, -0.25], [0.5, 0.0, 1.0]])
    codebook, codes = kmeans_codebook(w, 3)
    assert torch.equal(torch.nn.functional.pad(codebook, (1, 0))[codes.long()], w)


def test_linear_init_spans_the_weight_range():
    # the paper's argument for linear init: rare large weights keep a centroid of their own
    w = torch.cat([torch.randn(2000) * 0.01, torch.tensor([1.0, -1.0])])
    lin, codes = kmeans_codebook(w, 4, "linear")
    assert lin.max() == pytest.approx(1.0) and lin.min() == pytest.approx(-1.0)
    assert (codes == codes[-1]).sum() == 1 and (codes == codes[-2]).sum() == 1


def test_shared_layers_match_dense_layers():
    torch.manual_seed(0)
    model = _pruned(_small_lenet5())
    shared = apply_weight_sharing(model, WeightSharing(bits=8))
    assert isinstance(shared.conv1, SharedConv2d) and isinstance(shared.fc1, SharedLinear)
    assert isinstance(model.conv1, nn.Conv2d)  # not modified in place
    for name in ("conv1", "conv2", "fc1", "fc2"):
        w, sw = getattr(model, name).weight, getattr(shared, name).weight
        assert (sw - w).abs().max() < 0.02 * w.abs().max()
    x = torch.randn(3, 1, 28, 28)
    # a dense model with the shared weights computes the same function
    dense = _small_lenet5()
    with torch.no_grad():
        for name in ("conv1", "conv2", "fc1", "fc2"):
            getattr(dense, name).weight.copy_(getattr(shared, name).weight)
            getattr(dense, name).bias.copy_(getattr(shared, name).bias)
    assert torch.allclose(dense(x), shared(x), atol=1e-6)


def test_inference_decodes_once_and_follows_every_change():
    layer = apply_weight_sharing(_pruned(nn.Sequential(nn.Linear(20, 7)), 0.5), WeightSharing(bits=3))[0].eval()
    x = torch.randn(4, 20)

    def dense(book, codes):
        return torch.nn.functional.linear(x, torch.nn.functional.pad(book, (1, 0))[codes.long()], layer.bias)

    with torch.no_grad():
        assert layer.weight is layer.weight  # decoded once, not per call
        layer.codebook.data.mul_(2)  # an edit the version counter does not see: caught by value
        assert torch.equal(layer(x), dense(layer.codebook, layer.codes))
        codes = layer.codes.clone()
        codes[codes > 0] = 1
        layer.set_sharing(layer.codebook, codes)
        assert torch.equal(layer(x), dense(layer.codebook, codes))
        layer.load_state_dict({**layer.state_dict(), "codes": torch.zeros_like(codes)})
        assert torch.equal(layer(x), layer.bias.expand(4, 7))
    layer.train()
    assert layer.weight.requires_grad and layer.weight is not layer.weight  # training always decodes afresh


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_shared_conv_padding_modes(mode):
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode=mode)
    model = nn.Sequential(conv)
    shared = apply_weight_sharing(model, WeightSharing(bits=8))[0]
    ref = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode=mode)
    with torch.no_grad():
        ref.weight.copy_(shared.weight)
        ref.bias.copy_(shared.bias)
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(shared(x), ref(x), atol=1e-6)


def test_centroid_gradient_is_the_sum_of_member_gradients():
    torch.manual_seed(0)
    layer = _pruned(nn.Sequential(nn.Linear(20, 7)), 0.5)
    shared = apply_weight_sharing(layer, WeightSharing(bits=3))[0]
    dense_w = shared.weight.detach().clone().requires_grad_(True)
    x = torch.randn(5, 20)
    torch.nn.functional.linear(x, dense_w, shared.bias.detach()).pow(2).sum().backward()
    shared(x).pow(2).sum().backward()
    codes = shared.codes.long()
    expected = torch.zeros(shared.codebook.numel() + 1).index_add_(0, codes.reshape(-1), dense_w.grad.reshape(-1))
    assert torch.allclose(shared.codebook.grad, expected[1:], atol=1e-5)
    assert shared.codes.grad is None


def test_finetuning_keeps_zeros_and_codes_and_changes_centroids():
    model = _small_lenet5()
    prune.l1_unstructured(model.fc1, "weight", amount=0.8)  # a torch prune mask, not plain zeros
    cfg = WeightSharing(bits={"fc1": 4, "conv2": 5}, finetune=TrainConfig(epochs=1, lr=1e-2, progress=False))
    shared = apply_weight_sharing(model, cfg, data=_loader())
    assert isinstance(shared.conv1, nn.Conv2d)  # not named: left alone
    before = apply_weight_sharing(model, WeightSharing(bits={"fc1": 4, "conv2": 5}))
    for name in ("fc1", "conv2"):
        a, b = getattr(shared, name), getattr(before, name)
        assert torch.equal(a.codes, b.codes)  # fine-tuning moves centroids, never reassigns weights
        assert not torch.allclose(a.codebook, b.codebook)
    assert torch.equal(shared.fc1.weight == 0, model.fc1.weight_mask == 0)
    summary = sharing_summary(shared)
    assert summary["fc1"]["bits"] == 4 and summary["fc1"]["centroids"] <= 16
    assert summary["fc1"]["density"] == pytest.approx(0.2, abs=1e-3)


def test_config_validation_and_errors():
    with pytest.raises(ConfigError, match="bits"):
        WeightSharing(bits=0)
    with pytest.raises(ConfigError, match=r"bits\['fc1'\]"):
        WeightSharing(bits={"fc1": 20})
    with pytest.raises(ConfigError, match="init"):
        WeightSharing(init="kmeans++")
    with pytest.raises(ConfigError, match="unknown or excluded layer.*'nope'"):
        apply_weight_sharing(LeNet300(), WeightSharing(bits={"nope": 4}))
    with pytest.raises(Exception, match="data"):
        apply_weight_sharing(LeNet300(), WeightSharing(finetune=TrainConfig(epochs=1)))
    shared = apply_weight_sharing(LeNet300(), WeightSharing(bits=2, exclude=("fc3",)))
    assert isinstance(shared.fc3, nn.Linear) and isinstance(shared.fc2, SharedLinear)
    cfg = WeightSharing(bits={"fc1": 3}, finetune=TrainConfig(epochs=2))
    from torchslim.core.config import config_from_dict
    assert config_from_dict(cfg.to_dict()) == cfg


def _file_accounting(path):
    """(file size, header bytes, {stored tensor name: payload bytes}, manifest bytes as stored)."""
    from torchslim.export import file_layout

    layout = file_layout(path)
    return layout["file"], layout["header"], layout["parts"], layout["manifest"]


def test_checkpoint_round_trip_and_sizes(tmp_path):
    torch.manual_seed(0)
    model = apply_weight_sharing(_pruned(LeNet300(), 0.1), WeightSharing(bits={"fc1": 5, "fc2": 5, "fc3": 6}))
    path = ckpt.save(model, tmp_path / "m.slim")
    loaded = ckpt.load(path)
    x = torch.randn(4, 1, 28, 28)
    assert isinstance(loaded.fc1, SharedLinear) and loaded.fc1.bits == 5
    assert torch.equal(loaded(x), model(x))
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b)

    size, header, parts, manifest_bytes = _file_accounting(path)
    manifest = ckpt.read_manifest(path)
    # bytes on disk are exactly the encoded parts plus the header (manifest + safetensors entries)
    assert size == header + sum(parts.values())
    assert header - manifest_bytes < 100 * len(parts) + 200
    for layer in ("fc1", "fc2", "fc3"):
        entry = manifest["tensors"][f"{layer}.codes"]
        assert entry["encoding"] in ("huffman", "ans")
        assert parts[f"{layer}.codes"] == sum(entry["sizes"])  # stored bytes == recorded stream sizes
        assert parts[f"{layer}.codebook"] == 4 * model.get_submodule(layer).codebook.numel()  # fp32
    # in-memory estimate of each codes tensor = what landed on disk
    from torchslim.export import coding
    for layer in ("fc1", "fc2"):
        data, _ = coding.encode_codes(model.get_submodule(layer).codes, manifest["tensors"][f"{layer}.codes"]["encoding"])
        assert len(data) == parts[f"{layer}.codes"]
    # 10% density, 5-bit codes: far below the fp32 size, and below the plain pruned checkpoint
    assert size < 266_610 * 4 / 20


def test_load_in_fresh_process_imports_the_extension(tmp_path):
    model = apply_weight_sharing(_pruned(_small_lenet5(), 0.3), WeightSharing(bits=4))
    path = ckpt.save(model, tmp_path / "m.slim")
    x = torch.randn(2, 1, 28, 28)
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    code = ("import sys, torch; from torchslim.export.checkpoint import load; m = load(sys.argv[1]); "
            "io = torch.load(sys.argv[2]); assert torch.equal(m(io['x']), io['y']); print(type(m.fc1).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "io.pt")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SharedLinear"


def test_shared_weight_is_a_module_base():
    assert issubclass(SharedLinear, SharedWeight) and not issubclass(SharedLinear, nn.Linear)
