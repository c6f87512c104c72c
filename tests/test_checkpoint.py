"""The .slim checkpoint: round trips, rebuilt shapes, packed sparse storage, masks, errors, atomic writes."""

import importlib
import json
import os
import re
import sys

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import prune

from torchslim import CheckpointError, TorchslimError
from torchslim.export import checkpoint as ckpt
from torchslim.export.checkpoint import codecs, encodings
from torchslim.export.checkpoint import format as fmt
from torchslim.models import LeNet5, LeNet300, SmallMobileNet, SmallResNet


# Module-level so checkpoints can import them by name.
class NoArgNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)


class NeedsArgsNet(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(6, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def make_net(hidden: int) -> nn.Module:
    return NeedsArgsNet(hidden)


class Scaled(nn.Module):
    """A custom layer type, registered in a test to exercise register_module."""

    def __init__(self, features: int, scale: float):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x):
        return x * self.weight * self.scale


def _img(n=2, seed=1):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _weights(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("build", [
    LeNet300, LeNet5, lambda: SmallResNet(widths=(8, 16, 32), blocks=(1, 1, 1)), lambda: SmallMobileNet(width=8),
], ids=["lenet300", "lenet5", "resnet", "mobilenet"])
def test_builtin_models_round_trip(tmp_path, build):
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():  # non-default BN running stats, then compare in eval mode
        model(_img(4))
    model.eval()
    path = ckpt.save(model, tmp_path / "sub" / "m.slim", history=[{"type": "X", "a": 1}], metrics={"acc": 0.5})
    loaded = ckpt.load(path)
    assert type(loaded) is type(model) and not loaded.training
    _assert_same_state(model, loaded)
    assert torch.equal(model(_img()), loaded(_img()))
    manifest = ckpt.read_manifest(path)
    assert manifest["format"] == "torchslim" and manifest["format_version"] == ckpt.FORMAT_VERSION == 2
    assert manifest["arch"]["factory"] == f"torchslim.models:{type(model).__name__}"
    assert manifest["arch"]["kwargs"] == model.init_kwargs
    assert manifest["modules"] == {} and manifest["masked"] == []
    assert manifest["history"] == [{"type": "X", "a": 1}] and manifest["metrics"] == {"acc": 0.5}
    assert len(manifest["sha256"]) == 64


def test_load_does_not_disturb_global_rng(tmp_path):
    path = ckpt.save(LeNet300(), tmp_path / "m.slim")
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    ckpt.load(path)
    assert torch.equal(torch.rand(3), expected)


def test_shrunk_layers_round_trip(tmp_path):
    """Structured pruning keeps layer classes but shrinks them; both replaced and edited-in-place layers."""
    torch.manual_seed(0)
    model = LeNet5()
    model.conv1 = nn.Conv2d(1, 12, 5)
    model.conv2 = nn.Conv2d(12, 30, 5)
    model.fc1 = nn.Linear(30 * 16, 200)
    # In place, as a pruner does: slice the parameters and update the constructor attributes.
    keep = torch.arange(0, 200, 2)
    model.fc1.weight = nn.Parameter(model.fc1.weight.detach()[keep])
    model.fc1.bias = nn.Parameter(model.fc1.bias.detach()[keep])
    model.fc1.out_features = 100
    model.fc2.weight = nn.Parameter(model.fc2.weight.detach()[:, keep])
    model.fc2.in_features = 100
    model.eval()
    path = ckpt.save(model, tmp_path / "m.slim")
    specs = ckpt.read_manifest(path)["modules"]
    assert set(specs) == {"conv1", "conv2", "fc1", "fc2"}
    assert specs["fc1"] == {"type": "Linear", "args": {"in_features": 480, "out_features": 100, "bias": True}}
    loaded = ckpt.load(path).eval()
    _assert_same_state(model, loaded)
    assert torch.equal(model(_img()), loaded(_img()))


def test_shrunk_batchnorm_in_resnet_block(tmp_path):
    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16), blocks=(1, 1))
    block = model.layers[0]
    block.conv1 = nn.Conv2d(8, 5, 3, 1, 1, bias=False)
    block.bn1 = nn.BatchNorm2d(5)
    block.conv2 = nn.Conv2d(5, 8, 3, 1, 1, bias=False)
    with torch.no_grad():
        model(_img(4))
    model.eval()
    loaded = ckpt.load(ckpt.save(model, tmp_path / "m.slim")).eval()
    assert set(ckpt.read_manifest(tmp_path / "m.slim")["modules"]) == {"layers.0.conv1", "layers.0.bn1",
                                                                        "layers.0.conv2"}
    _assert_same_state(model, loaded)
    assert torch.equal(model(_img()), loaded(_img()))


def test_low_rank_sequential_replacements_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LeNet5()
    model.fc1 = nn.Sequential(nn.Linear(800, 16, bias=False), nn.Linear(16, 500))
    model.conv2 = nn.Sequential(nn.Conv2d(20, 6, 1, bias=False), nn.Conv2d(6, 6, 5, groups=2, bias=False),
                                nn.Conv2d(6, 50, 1))
    model.eval()
    path = ckpt.save(model, tmp_path / "m.slim")
    spec = ckpt.read_manifest(path)["modules"]["fc1"]
    assert spec["type"] == "Sequential" and [c[1]["type"] for c in spec["children"]] == ["Linear", "Linear"]
    loaded = ckpt.load(path).eval()
    assert isinstance(loaded.fc1, nn.Sequential) and loaded.conv2[1].groups == 2
    _assert_same_state(model, loaded)
    assert torch.equal(model(_img()), loaded(_img()))


def test_sequential_with_ten_children_keeps_order(tmp_path):
    torch.manual_seed(0)
    model = LeNet300()
    model.fc3 = nn.Sequential(*[nn.Linear(100 if i == 0 else 10 + i - 1, 10 + i) for i in range(11)],
                              nn.Linear(20, 10))
    loaded = ckpt.load(ckpt.save(model, tmp_path / "m.slim"))
    assert [m.out_features for m in loaded.fc3] == [m.out_features for m in model.fc3]
    assert torch.equal(model(_img()), loaded(_img()))


@pytest.mark.parametrize("build", [LeNet300, LeNet5], ids=["lenet300", "lenet5"])
def test_pruned_90_percent_is_small_and_keeps_masks(tmp_path, build):
    torch.manual_seed(0)
    model = build().eval()
    dense = ckpt.save(model, tmp_path / "dense.slim")
    prune.global_unstructured(_weights(model), prune.L1Unstructured, amount=0.9)
    masks = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_mask")}
    path = ckpt.save(model, tmp_path / "pruned.slim")

    # save must not touch the user's model
    assert prune.is_pruned(model)
    assert {n for n, _ in model.named_buffers() if n.endswith("_mask")} == set(masks)

    dense_size, pruned_size = os.path.getsize(dense), os.path.getsize(path)
    print(f"{build.__name__}: dense {dense_size} B, 90%-pruned {pruned_size} B, {dense_size / pruned_size:.1f}x")
    assert dense_size >= 5 * pruned_size

    manifest = ckpt.read_manifest(path)
    names = sorted(n.removesuffix("_mask") for n in masks)
    assert manifest["masked"] == names
    assert all(manifest["tensors"][n]["encoding"] in ("bitmask", "relative") for n in names)
    fc1 = manifest["sparsity"]["fc1"]
    assert 0.8 < fc1 < 1.0

    loaded = ckpt.load(path).eval()
    assert torch.equal(model(_img()), loaded(_img()))
    loaded_masks = {n: b for n, b in loaded.named_buffers() if n.endswith("weight_mask")}
    assert set(loaded_masks) == set(masks)
    for n in masks:
        assert torch.equal(loaded_masks[n], masks[n]), n

    # zeros stay zero while training the loaded model further
    loaded.train()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded(_img(4)).square().mean().backward()
    opt.step()
    for n, mask in loaded_masks.items():
        module = loaded.get_submodule(n.rsplit(".", 1)[0])
        assert torch.all(module.weight[mask == 0] == 0)


def _encoding_model():
    """Three layers whose weights suit dense, bitmask and relative storage, plus edge cases."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 40), nn.Linear(40, 100), nn.Linear(100, 60), nn.Linear(60, 100))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(40, 100, generator=g))                                # dense
        w = torch.randn(100, 40, generator=g)
        model[1].weight.copy_(w * (torch.rand(100, 40, generator=g) < 0.5))                     # 50% -> bitmask
        w = torch.randn(60, 100, generator=g)
        w = w * (torch.rand(60, 100, generator=g) < 0.04)                                       # 96% -> relative
        w.view(-1)[[5, 300, 301, 4000]] = torch.tensor([float("nan"), -0.0, 2.5, float("-inf")])
        model[2].weight.copy_(w)
        w = torch.zeros(100, 60)
        w.view(-1)[[0, 255, 256, 511, 600, 1400, 5999]] = torch.arange(1.0, 8.0)                # gaps > 255
        model[3].weight.copy_(w)
    model[3].half()
    return model


def test_encoding_selection_and_exact_decoding(tmp_path):
    model = _encoding_model()
    path = ckpt.save(model, tmp_path / "m.slim", factory=f"{__name__}:_encoding_model", allow_nonfinite=True)
    manifest = ckpt.read_manifest(path)
    enc = {k: v["encoding"] for k, v in manifest["tensors"].items()}
    assert enc["0.weight"] == "dense"
    assert enc["1.weight"] == "bitmask"
    assert enc["2.weight"] == "relative"
    assert enc["3.weight"] == "relative"
    assert manifest["tensors"]["3.weight"]["dtype"] == "float16"
    loaded = ckpt.load(path, trusted=[__name__])
    for k, v in model.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(v, nan=7.0)), k

    # every built-in encoding decodes exactly, whichever wins
    for name, t in [("w", model[2].weight.detach()), ("h", model[3].weight.detach()), ("z", torch.zeros(3, 700))]:
        for enc_name in ("dense", "bitmask", "relative"):
            e = ckpt.ENCODINGS.get(enc_name)
            parts, _ = e.encode(t.contiguous())
            back = e.decode(parts, {"shape": list(t.shape), "dtype": str(t.dtype)[6:]})
            assert encodings.same(back, t), (name, enc_name)


def test_relative_encoding_inserts_fillers():
    t = torch.zeros(1000)
    t[[0, 255, 256, 766]] = 1.0
    parts, _ = ckpt.ENCODINGS.get("relative").encode(t)
    # gaps: 0 -> 1, 255 -> 255, 256 -> 1, 766 = 256 + 510 -> filler 255 + 255
    assert parts["gaps"].tolist() == [1, 255, 1, 255, 255]
    assert parts["values"].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert torch.equal(ckpt.ENCODINGS.get("relative").decode(parts, {"shape": [1000]}), t)


def test_registered_encoding_and_module(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.ENCODINGS, "_items", dict(ckpt.ENCODINGS.items()))
    monkeypatch.setattr(ckpt.MODULES, "_items", dict(ckpt.MODULES.items()))

    def encode(t):  # a constant tensor needs one value
        if t.numel() < 2 or not bool((t == t.reshape(-1)[0]).all()):
            return None
        return {"value": t.reshape(-1)[:1].clone()}, {"note": "constant"}

    def decode(parts, entry):
        return parts["value"].expand(entry["shape"]).clone()

    ckpt.register_encoding("constant", encode, decode)
    with pytest.raises(TorchslimError, match="already registered"):
        ckpt.register_encoding("constant", encode, decode)
    name = ckpt.register_module(Scaled, lambda m: {"features": m.weight.numel(), "scale": m.scale},
                                lambda a: Scaled(a["features"], a["scale"]))
    assert name == f"{__name__}.Scaled"

    model = LeNet300()
    model.relu1 = Scaled(300, 0.5)
    path = ckpt.save(model, tmp_path / "m.slim")
    manifest = ckpt.read_manifest(path)
    assert manifest["tensors"]["relu1.weight"]["encoding"] == "constant"
    assert manifest["tensors"]["relu1.weight"]["note"] == "constant"
    assert manifest["modules"]["relu1"] == {"type": name, "args": {"features": 300, "scale": 0.5}}
    loaded = ckpt.load(path)
    assert isinstance(loaded.relu1, Scaled) and loaded.relu1.scale == 0.5
    assert torch.equal(model(_img()), loaded(_img()))

    # a process that has not registered the type gets told which module, which type and what to do
    del ckpt.MODULES._items[name]
    with pytest.raises(CheckpointError, match=r"'relu1'.*Scaled.*register_module"):
        ckpt.load(path)
    with pytest.raises(TorchslimError, match=r"relu1.*register_module"):
        ckpt.save(model, tmp_path / "again.slim")


def test_register_codecs_takes_declared_codecs_once(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.ENCODINGS, "_items", dict(ckpt.ENCODINGS.items()))
    monkeypatch.setattr(ckpt.MODULES, "_items", dict(ckpt.MODULES.items()))
    codec = ckpt.ModuleCodec(Scaled, lambda m: {"features": m.weight.numel(), "scale": m.scale},
                             lambda a: Scaled(a["features"], a["scale"]))
    negated = ckpt.Encoding("negated", lambda t: ({"data": -t}, {}) if t.dtype == torch.int32 else None,
                            lambda parts, entry: -parts["data"])
    assert codec.name == f"{__name__}.Scaled"
    ckpt.register_codecs(codec, negated)
    assert ckpt.MODULES.get(codec.name) is codec and ckpt.ENCODINGS.get("negated") is negated
    with pytest.raises(TorchslimError, match="already registered"):
        ckpt.register_codecs(codec)
    with pytest.raises(TorchslimError, match="already registered"):
        ckpt.register_codecs(negated)
    with pytest.raises(TorchslimError, match="already registered as"):
        ckpt.register_codecs(ckpt.ModuleCodec(Scaled, codec.to_args, codec.from_args, name="Scaled"))
    with pytest.raises(TorchslimError, match="ModuleCodec and Encoding"):
        ckpt.register_codecs((Scaled, codec.to_args, codec.from_args))
    with pytest.raises(TorchslimError, match="nn.Module subclass"):
        ckpt.ModuleCodec(int, codec.to_args, codec.from_args)
    with pytest.raises(TorchslimError, match="without '::'"):
        ckpt.Encoding("a::b", negated.encode, negated.decode)

    model = LeNet300()
    model.relu1 = Scaled(300, 0.5)
    path = ckpt.save(model, tmp_path / "m.slim")
    assert isinstance(ckpt.load(path).relu1, Scaled)
    del ckpt.MODULES._items[codec.name]
    with pytest.raises(CheckpointError, match=rf"'relu1' has type '{re.escape(codec.name)}'.*register_codecs"):
        ckpt.load(path)


def test_quantization_codecs_are_registered_by_importing_torchslim():
    import torchslim.quantization

    for codec in torchslim.quantization.CODECS:
        registry = ckpt.MODULES if isinstance(codec, ckpt.ModuleCodec) else ckpt.ENCODINGS
        assert registry.get(codec.name) is codec


def test_lossy_encoding_is_caught_at_save(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.ENCODINGS, "_items", dict(ckpt.ENCODINGS.items()))
    ckpt.register_encoding("lossy", lambda t: ({"v": t.new_zeros(1)}, {}) if t.is_floating_point() else None,
                           lambda parts, entry: torch.zeros(entry["shape"]))
    with pytest.raises(TorchslimError, match="lossy.*exactly"):
        ckpt.save(LeNet300(), tmp_path / "m.slim")
    assert list(tmp_path.iterdir()) == []


# ---- errors -------------------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    return ckpt.save(LeNet300(), tmp_path / "m.slim", metrics={"note": "abcdef"})


def _data_start(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


def test_truncated_file(saved):
    raw = saved.read_bytes()
    for cut in (len(raw) - 10, _data_start(raw) - 5, 5):
        saved.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=r"m\.slim.*(truncated|only 5 bytes)"):
            ckpt.load(saved)


def test_flipped_byte_in_data(saved):
    raw = bytearray(saved.read_bytes())
    raw[(_data_start(raw) + len(raw)) // 2] ^= 0x10
    saved.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"m\.slim.*sha256.*tampered with or corrupted"):
        ckpt.load(saved)
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.read_manifest(saved)


def test_edited_manifest(saved):
    raw = bytearray(saved.read_bytes())
    assert ckpt.read_manifest(saved)["metrics"] == {"note": "abcdef"}
    raw[_data_start(raw) + 12] ^= 0x01  # inside the compressed manifest, which follows a 4-byte length
    saved.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="tampered"):
        ckpt.read_manifest(saved)


def test_random_bytes_and_foreign_safetensors(tmp_path):
    junk = tmp_path / "junk.slim"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"junk\.slim is not a safetensors file"):
        ckpt.load(junk)
    foreign = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(foreign))
    with pytest.raises(CheckpointError, match=r"plain\.safetensors.*no torchslim manifest.*load_file"):
        ckpt.load(foreign)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.slim does not exist"):
        ckpt.load(tmp_path / "nope.slim")
    with pytest.raises(CheckpointError, match="not a regular file"):
        ckpt.read_manifest(tmp_path)


def _rewrite(path, edit):
    """Re-emit a checkpoint with an edited manifest and a valid sha256 (a well-formed but odd file)."""
    manifest, tensors = fmt.split(path.read_bytes())
    edit(manifest)
    path.write_bytes(fmt.pack(manifest, tensors))


def test_newer_format_version(saved):
    raw = saved.read_bytes()
    header = raw[8:_data_start(raw)]
    newer = header.replace(b'\\"format_version\\":2', b'\\"format_version\\":9')
    assert newer != header
    saved.write_bytes(raw[:8] + newer + raw[len(header) + 8:])
    with pytest.raises(CheckpointError, match=r"format_version 9, newer.*upgrade torchslim"):
        ckpt.load(saved)


def test_unregistered_encoding(saved):
    _rewrite(saved, lambda m: m["tensors"]["fc1.weight"].update(encoding="zip"))
    with pytest.raises(CheckpointError, match=r"'fc1.weight' uses encoding 'zip'.*register_codecs"):
        ckpt.load(saved)


def test_factory_not_importable(saved):
    _rewrite(saved, lambda m: m["arch"].update(factory="no_such_pkg_xyz.models:Net"))
    ckpt.read_manifest(saved)  # the file itself is fine
    with pytest.raises(CheckpointError, match=r"refusing to call 'no_such_pkg_xyz.models:Net'.*trusted="):
        ckpt.load(saved)
    with pytest.raises(CheckpointError, match=r"factory 'no_such_pkg_xyz.models:Net' cannot be imported"):
        ckpt.load(saved, trusted=["no_such_pkg_xyz"])


def test_factory_module_gone_after_save(tmp_path):
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "ts_ckpt_tmpmod.py").write_text(
        "import torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(2, 2)\n")
    sys.path.insert(0, str(mod_dir))
    try:
        net = importlib.import_module("ts_ckpt_tmpmod").Net()
        path = ckpt.save(net, tmp_path / "m.slim")
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("ts_ckpt_tmpmod", None)
        importlib.invalidate_caches()
    with pytest.raises(CheckpointError, match=r"ts_ckpt_tmpmod:Net.*cannot be imported.*ModuleNotFoundError"):
        ckpt.load(path, trusted=["ts_ckpt_tmpmod:Net"])


# ---- writing ------------------------------------------------------------------------------------


def test_overwrite_refused_unless_asked(saved):
    before = saved.read_bytes()
    with pytest.raises(TorchslimError, match=r"m\.slim.*overwrite=True") as info:
        ckpt.save(LeNet5(), saved)
    assert isinstance(info.value, FileExistsError)
    assert saved.read_bytes() == before
    ckpt.save(LeNet5(), saved, overwrite=True)
    assert isinstance(ckpt.load(saved), LeNet5)


def test_bad_metrics_write_nothing(tmp_path):
    target = tmp_path / "out" / "m.slim"
    with pytest.raises(TorchslimError, match=r"metrics\['acc'\] is a Tensor.*\.item\(\)"):
        ckpt.save(LeNet300(), target, metrics={"acc": torch.tensor(0.5)})
    with pytest.raises(TorchslimError, match="history"):
        ckpt.save(LeNet300(), target, history=[{"when": object()}])
    assert not target.exists() and (not target.parent.exists() or list(target.parent.iterdir()) == [])


def test_failed_write_leaves_no_temp_and_keeps_old_file(saved, monkeypatch):
    before = saved.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(LeNet5(), saved, overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in saved.parent.iterdir()] == ["m.slim"]
    assert saved.read_bytes() == before


# ---- architecture recording ---------------------------------------------------------------------


def test_no_arg_class_without_init_kwargs(tmp_path):
    torch.manual_seed(0)
    model = NoArgNet()
    loaded = ckpt.load(ckpt.save(model, tmp_path / "m.slim"), trusted=[__name__])
    assert isinstance(loaded, NoArgNet)
    x = torch.randn(2, 6)
    assert torch.equal(model(x), loaded(x))


def test_class_needing_args_without_factory(tmp_path):
    with pytest.raises(TorchslimError, match=r"NeedsArgsNet.*\['hidden'\].*factory="):
        ckpt.save(NeedsArgsNet(4), tmp_path / "m.slim")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("factory", [f"{__name__}:make_net", make_net, f"{__name__}:NeedsArgsNet"])
def test_factory_with_kwargs(tmp_path, factory):
    torch.manual_seed(0)
    model = NeedsArgsNet(7)
    path = ckpt.save(model, tmp_path / "m.slim", factory=factory, factory_kwargs={"hidden": 7})
    assert ckpt.read_manifest(path)["arch"]["kwargs"] == {"hidden": 7}
    loaded = ckpt.load(path, trusted=[__name__])
    x = torch.randn(2, 6)
    assert torch.equal(model(x), loaded(x))


def test_local_class_and_deleted_module_are_refused(tmp_path):
    class Local(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

    with pytest.raises(TorchslimError, match="defined inside a function"):
        ckpt.save(Local(), tmp_path / "a.slim")
    model = LeNet300()
    del model.relu1
    with pytest.raises(TorchslimError, match=r"'relu1'.*nn.Identity"):
        ckpt.save(model, tmp_path / "b.slim")


@pytest.mark.parametrize("module", [
    nn.Linear(3, 4, bias=False), nn.Conv1d(2, 4, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(4, 4, (3, 1), padding="same", dilation=2, groups=2, padding_mode="reflect"),
    nn.BatchNorm1d(5, eps=1e-3, momentum=None), nn.BatchNorm2d(5, affine=False, track_running_stats=False),
    nn.LayerNorm((4, 5), elementwise_affine=False), nn.Embedding(10, 3, padding_idx=0, max_norm=2.0),
    nn.Identity(), nn.ReLU(inplace=True), nn.ReLU6(), nn.Flatten(0, 2), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
    nn.AvgPool2d(2, count_include_pad=False, divisor_override=3), nn.AdaptiveAvgPool2d((None, 3)),
    nn.Dropout(0.3), nn.PReLU(7),
], ids=lambda m: type(m).__name__)
def test_builtin_module_specs_rebuild_exactly(module):
    codec = codecs.codec_for(module)
    assert codec.name == type(module).__name__
    args = fmt.jsonable(codec.to_args(module), "args")
    json.dumps(args)
    rebuilt = codec.from_args(json.loads(json.dumps(args)))
    assert type(rebuilt) is type(module) and fmt.plain(codec.to_args(rebuilt)) == args
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}


def test_encodings_can_be_restricted(tmp_path):
    import pytest as _pytest
    from torch.nn.utils import prune as torch_prune

    import torchslim
    from torchslim.export.checkpoint import read_manifest, save
    from torchslim.models import LeNet300

    torch.manual_seed(0)
    model = LeNet300()
    layers = [(model.fc1, "weight"), (model.fc2, "weight"), (model.fc3, "weight")]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=0.9)
    save(model, tmp_path / "b.slim", encodings=("bitmask",))
    used = {e["encoding"] for e in read_manifest(tmp_path / "b.slim")["tensors"].values()}
    assert used == {"dense", "bitmask"}
    with _pytest.raises(torchslim.TorchslimError, match="unknown encoding"):
        save(model, tmp_path / "c.slim", encodings=("zip",))
    assert not (tmp_path / "c.slim").exists()
