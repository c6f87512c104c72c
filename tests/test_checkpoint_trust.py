"""What a checkpoint may make load do: trusted code only, bounded memory, optional signatures."""

import re
import zlib

import pytest
import torch
from torch import nn

import torchslim  # noqa: F401  (registers the techniques' encodings, intpack among them)
from torchslim.core.errors import CheckpointError, TorchslimError
from torchslim.export.checkpoint import load, read_manifest, register_factory, save
from torchslim.export.checkpoint.compact import manifest_text
from torchslim.export.checkpoint.format import pack, pack_text, split
from torchslim.models import LeNet300


class Custom(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(x)


def build_custom(width: int = 4) -> Custom:
    return Custom(width)


class Holder(nn.Module):
    """One integer buffer, as quantized layers hold their codes."""

    def __init__(self, n: int = 64, dtype: str = "int16"):
        super().__init__()
        self.register_buffer("codes", torch.zeros(n, n, dtype=getattr(torch, dtype)))
        self.init_kwargs = {"n": n, "dtype": dtype}


def _rewrite(path, edit_manifest=None, edit_stored=None):
    """Edit the manifest and/or stored tensors and recompute the sha256, as someone forging a file would."""
    manifest, stored = split(path.read_bytes())
    if edit_manifest:
        edit_manifest(manifest)
    if edit_stored:
        edit_stored(stored)
    path.write_bytes(pack(manifest, stored))
    return path


@pytest.fixture
def lenet_file(tmp_path):
    return save(LeNet300(), tmp_path / "m.slim")


# ---- trust -------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory, kwargs", [("os:system", {"command": "touch {marker}"}),
                                             ("subprocess:getoutput", {"cmd": "touch {marker}"}),
                                             ("builtins:eval", {"source": "open({marker!r}, 'w')"}),
                                             ("torchslim.core.files:atomic_write", {"path": "{marker}", "data": "x"})])
def test_foreign_factories_are_refused_before_anything_runs(lenet_file, tmp_path, factory, kwargs):
    marker = tmp_path / "ran"
    kwargs = {k: v.format(marker=str(marker)) for k, v in kwargs.items()}
    _rewrite(lenet_file, lambda m: m.update(arch={"factory": factory, "kwargs": kwargs}))
    with pytest.raises(CheckpointError, match=rf"refusing to call '{re.escape(factory)}'.*trusted="):
        load(lenet_file)
    assert not marker.exists()


def test_caller_trusts_a_module_a_callable_or_registers_a_factory(tmp_path):
    path = save(Custom(4), tmp_path / "c.slim")  # the class, recorded as this test module's Custom
    with pytest.raises(CheckpointError, match=r"refusing to call '\w+:Custom'"):
        load(path)
    assert isinstance(load(path, trusted=[__name__]), Custom)
    assert isinstance(load(path, trusted=f"{__name__}:Custom"), Custom)
    assert isinstance(load(path, trusted=[Custom]), Custom)
    path = save(build_custom(3), tmp_path / "f.slim", factory=build_custom, factory_kwargs={"width": 3})
    with pytest.raises(CheckpointError, match="build_custom"):
        load(path, trusted=[f"{__name__}:Custom"])
    register_factory(build_custom)
    assert load(path).fc.in_features == 3


def test_torchslim_functions_that_are_not_models_are_refused(lenet_file):
    _rewrite(lenet_file, lambda m: m.update(arch={"factory": "torchslim.core.files:atomic_write", "kwargs": {}}))
    with pytest.raises(CheckpointError, match="only nn.Module classes are trusted"):
        load(lenet_file)


# ---- bounded decoding --------------------------------------------------------------------------


def test_oversized_factory_kwargs_are_checked_on_the_meta_device(lenet_file):
    _rewrite(lenet_file, lambda m: m["arch"]["kwargs"].update(num_classes=1_000_000))
    with pytest.raises(CheckpointError, match="does not fit the stored tensors"):
        load(lenet_file)


def test_huge_shapes_are_refused_before_allocating(lenet_file):
    def edit(m):
        m["tensors"]["fc1.weight"]["shape"] = [46341, 46341]
    _rewrite(lenet_file, edit)
    with pytest.raises(CheckpointError, match="more than the limit.*max_bytes"):
        load(lenet_file)


def test_max_bytes_bounds_the_model(lenet_file):
    with pytest.raises(CheckpointError, match="max_bytes"):
        load(lenet_file, max_bytes=1000)
    assert isinstance(load(lenet_file, max_bytes=10**8), LeNet300)


def test_deep_json_is_a_checkpoint_error(lenet_file):
    manifest, stored = split(lenet_file.read_bytes())
    manifest.pop("sha256")
    text = manifest_text(manifest, stored)
    deep = text.replace('"h":[', '"h":[' + "[" * 100_000 + "]" * 100_000 + ",", 1)
    assert deep != text
    lenet_file.write_bytes(pack_text(deep, stored))
    with pytest.raises(CheckpointError, match=r"nests \d+ levels deep"):
        load(lenet_file)


def test_entropy_coder_counts_are_checked_against_the_payload(tmp_path):
    m = Holder()
    m.codes.copy_(torch.randint(-3, 4, (64, 64), dtype=torch.int16))
    path = save(m, tmp_path / "c.slim", encodings=["ans"])
    entry = read_manifest(path)["tensors"]["codes"]
    assert entry["encoding"] == "ans"
    _rewrite(path, lambda man: man["tensors"]["codes"].update(n=10**9))
    with pytest.raises(CheckpointError, match=r"tensor 'codes' \(ans\).*out of range"):
        load(path, trusted=[__name__])
    _rewrite(path, lambda man: man["tensors"]["codes"].update(n=entry["n"] - 10))
    with pytest.raises(CheckpointError, match=r"tensor 'codes' \(ans\).*holds more than"):
        load(path, trusted=[__name__])


def test_zlib_output_is_capped_at_the_declared_size(tmp_path):
    m = Holder(64, "int8")
    m.codes.copy_(torch.randint(-8, 8, (64, 64), dtype=torch.int8))
    path = save(m, tmp_path / "q.slim")
    assert read_manifest(path)["tensors"]["codes"]["encoding"] == "intpack"
    # A deflated payload that inflates to 64 MiB, far more than the 2 KiB the shape needs.
    bomb = torch.frombuffer(bytearray(zlib.compress(b"\0" * (64 << 20), 9)), dtype=torch.uint8)

    def stored(st):
        st["codes"] = bomb.clone()
    _rewrite(path, lambda man: man["tensors"]["codes"].update(zlib=True), stored)
    with pytest.raises(CheckpointError, match=r"tensor 'codes'.*inflate to the 2048 bytes"):
        load(path, trusted=[__name__])


# ---- signatures --------------------------------------------------------------------------------


def test_signed_files_verify_and_tampering_is_caught(tmp_path):
    path = save(LeNet300(), tmp_path / "s.slim", sign_key=b"secret")
    assert isinstance(load(path, verify_key=b"secret"), LeNet300)
    assert isinstance(load(path), LeNet300)  # without verify_key the signature is not needed
    with pytest.raises(CheckpointError, match="does not match verify_key"):
        load(path, verify_key=b"other")
    _rewrite(path, lambda m: m["metrics"].update(accuracy=1.0))  # a valid sha256, but the signature is gone
    with pytest.raises(CheckpointError, match="not signed"):
        load(path, verify_key=b"secret")
    unsigned = save(LeNet300(), tmp_path / "u.slim")
    with pytest.raises(CheckpointError, match="not signed"):
        load(unsigned, verify_key="secret")


def test_a_forged_signature_field_is_caught(tmp_path):
    path = save(LeNet300(), tmp_path / "s.slim", sign_key="k")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # tensor bytes changed: the sha256 fails, and the signature too
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load(path, verify_key="k")


def test_bad_keys_are_named(tmp_path):
    with pytest.raises(TorchslimError, match="key must be non-empty"):
        save(LeNet300(), tmp_path / "s.slim", sign_key=b"")


# ---- other places that load checkpoints --------------------------------------------------------


def test_recipe_checkpoints_trust_only_what_the_recipe_names(tmp_path):
    import importlib
    import sys

    from torchslim.pipeline.recipe import load_checkpoint, recipe_from_dict

    (tmp_path / "ts_trust_recipe_mod.py").write_text(
        "import torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(3, 2)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        save(importlib.import_module("ts_trust_recipe_mod").Net(), tmp_path / "m.slim")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ts_trust_recipe_mod", None)
    stages = [{"type": "UnstructuredPruning", "sparsity": 0.5}]
    plain = recipe_from_dict({"model": {"checkpoint": "m.slim"}, "stages": stages}, base_dir=tmp_path)
    with pytest.raises(CheckpointError, match="refusing to call 'ts_trust_recipe_mod:Net'"):
        load_checkpoint(plain, tmp_path / "m.slim")
    trusting = recipe_from_dict({"model": {"checkpoint": "m.slim", "trusted": ["ts_trust_recipe_mod"]},
                                 "stages": stages}, base_dir=tmp_path)
    assert load_checkpoint(trusting, tmp_path / "m.slim").fc.in_features == 3
    sys.modules.pop("ts_trust_recipe_mod", None)


def test_stored_int8_graphs_may_use_standard_operators_only():
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from torchslim.quantization.backends.onnxrt import check_stored_graph

    def graph_with(node, domains):
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid(d, 1 if d else 17) for d in domains])

    check_stored_graph(graph_with(helper.make_node("Relu", ["x"], ["y"]), [""]).SerializeToString())
    evil = graph_with(helper.make_node("Shell", ["x"], ["y"], domain="evil.ops"), ["", "evil.ops"])
    with pytest.raises(CheckpointError, match="evil.ops"):
        check_stored_graph(evil.SerializeToString())
    unknown = graph_with(helper.make_node("NotAnOnnxOp", ["x"], ["y"]), [""])
    with pytest.raises(CheckpointError, match="NotAnOnnxOp"):
        check_stored_graph(unknown.SerializeToString())
    assert onnx is not None


def test_builtin_main_modules_are_never_imported(lenet_file):
    _rewrite(lenet_file, lambda m: m.update(arch={"factory": "torchslim.cli.__main__:main", "kwargs": {}}))
    with pytest.raises(CheckpointError, match="refusing to call 'torchslim.cli.__main__:main'"):
        load(lenet_file)


@pytest.mark.parametrize("factory", ["torchslim.models:torch.load", "torchslim.models:build_model.__call__",
                                     "torchslim.models:Callable", "torch.nn.modules.module:torch.load"])
def test_names_reaching_outside_a_trusted_module_are_refused(lenet_file, factory):
    _rewrite(lenet_file, lambda m: m.update(arch={"factory": factory, "kwargs": {"f": "x"}}))
    with pytest.raises(CheckpointError, match="refusing to call|cannot be imported"):
        load(lenet_file)
    with pytest.raises(CheckpointError, match="refusing to call|cannot be imported"):
        load(lenet_file, trusted=["torchslim.models"])
