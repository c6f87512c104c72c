"""Every technique x every zoo model: it works (output shape right, structured pruning equal to the original
with the removed channels zeroed, save/load exact, ONNX agreement for the pruned models) or is skipped with
the reason the combination is unsupported.

``python tests/test_zoo.py`` prints the matrix as the Markdown table the README shows.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.export.onnx import onnx_agreement
from torchslim.metrics.profile import count_macs
from torchslim.models.zoo import ZOO
from torchslim.pruning import layer_sparsity, masked_like, structured_prune

FAST = ts.TrainConfig(epochs=1, lr=1e-3, progress=False, device="cpu")
BATCH = 4


class Unsupported(Exception):
    """A combination the technique does not cover, with the reason."""


def _setup(name: str) -> tuple[nn.Module, torch.Tensor, list]:
    """The small zoo model with varied BatchNorm statistics (so masking is not trivially exact), a batch and
    one training batch."""
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.build(**entry.small)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            with torch.no_grad():
                m.bias.uniform_(-0.5, 0.5, generator=g)
    x = torch.randn(BATCH, *entry.sample, generator=g)
    classes = entry.small.get("num_classes", 2 if entry.kind == "dense" else 10)
    shape = (BATCH, *entry.sample[1:]) if entry.kind == "dense" else (BATCH,)
    y = torch.randint(0, classes, shape, generator=g)
    return model.eval(), x, [(x, y)]


def _roundtrip(model: nn.Module, x: torch.Tensor, tmp: Path) -> torch.Tensor:
    """The model's output, after checking a save/load round trip reproduces it exactly."""
    with torch.no_grad():
        out = model(x)
    loaded = ts.load(ts.save(model, tmp / "m.slim"))
    with torch.no_grad():
        assert torch.equal(loaded(x), out), "save/load changed the outputs"
    return out


def _structured(name: str, model: nn.Module, x: torch.Tensor, data: list, tmp: Path) -> str:
    pruned = ts.prune(model, ts.StructuredPruning(ratio=0.5), example_inputs=(x,))
    ratio = count_macs(model, (x,)) / count_macs(pruned, (x,))
    assert ratio > 1.2, f"only {ratio:.2f}x fewer MACs"
    # Masked equivalence: pruned == original with the removed channels zeroed. LayerNorm over the channels
    # changes the statistics, so there only the groups no LayerNorm normalises are checked.
    config = ts.StructuredPruning(ratio={"*pw1": 0.5} if name == "convnext" else 0.5)
    exact = model.__class__(**model.init_kwargs).eval()
    exact.load_state_dict(model.state_dict())
    summary = structured_prune(exact, config, (x,))
    with torch.no_grad():
        diff = (exact(x) - masked_like(model, summary)(x)).abs().max().item()
    assert diff < 1e-4, f"pruned model differs from the masked original by {diff}"
    out = _roundtrip(pruned, x, tmp)
    ts.export_onnx(pruned, (x,), tmp / "m.onnx")
    agreement = onnx_agreement(pruned, tmp / "m.onnx", [(x,)])
    assert agreement.max_abs_diff < 1e-3 * max(1.0, agreement.max_logit)
    assert out.shape == model(x).shape
    rnn = [m for m in pruned.modules() if isinstance(m, nn.RNNBase)]
    if rnn:  # torch's MAC counter does not see into recurrent layers
        return f"hidden {model.rnn.hidden_size}->{rnn[0].hidden_size}"
    return f"{ratio:.1f}x MACs"


def _unstructured(name: str, model: nn.Module, x: torch.Tensor, data: list, tmp: Path) -> str:
    pruned = ts.prune(model, ts.UnstructuredPruning(sparsity=0.5, scope="layer"), example_inputs=(x,))
    sparsity = layer_sparsity(pruned)
    assert sparsity and min(sparsity.values()) > 0.45, sparsity
    _roundtrip(pruned, x, tmp)
    return f"{len(sparsity)} layer{'s' if len(sparsity) > 1 else ''}"


def _linear_layers(model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,)) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


def _quantize(config: ts.Config, kinds: tuple[type, ...] = (nn.Linear,), what: str = "Linear"):
    def cell(name: str, model: nn.Module, x: torch.Tensor, data: list, tmp: Path) -> str:
        if not _linear_layers(model, kinds):
            raise Unsupported(f"{type(model).__name__} has no {what} layer")
        q = ts.quantize(model, config, example_inputs=(x,), data=data)
        _roundtrip(q, x, tmp)
        return ""

    return cell


def _svd(name: str, model: nn.Module, x: torch.Tensor, data: list, tmp: Path) -> str:
    if not _linear_layers(model):
        raise Unsupported(f"{type(model).__name__} has no Linear layer")
    d = ts.decompose(model, ts.SVD(ratio=0.5, require_saving=False, progress=False), example_inputs=(x,),
                     data=data)
    _roundtrip(d, x, tmp)
    return ""


def _distill(name: str, model: nn.Module, x: torch.Tensor, data: list, tmp: Path) -> str:
    student = ts.prune(model, ts.StructuredPruning(ratio=0.5), example_inputs=(x,))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    s = ts.distill(student, ts.Distillation(train=FAST), teacher=model, data=data)
    assert any(not torch.equal(before[k], v) for k, v in s.state_dict().items()), "one step changed nothing"
    _roundtrip(s.eval(), x, tmp)
    return ""


RNN = (nn.Linear, nn.LSTM, nn.GRU)
TECHNIQUES = {
    "structured": _structured,
    "unstructured": _unstructured,
    "dynamic int8": _quantize(ts.DynamicQuantization(), RNN, "Linear/LSTM/GRU"),
    "static int8": _quantize(ts.StaticQuantization(calibration_batches=1, backend="ort_qdq"), (nn.Conv1d, nn.Conv2d, nn.Linear), "Conv/Linear"),
    "weight-only int4": _quantize(ts.WeightOnly(bits=4, group_size=8)),
    "QAT": _quantize(ts.QAT(train=FAST, calibration_batches=1), (nn.Conv1d, nn.Conv2d, nn.Linear), "Conv/Linear"),
    "weight sharing": _quantize(ts.WeightSharing(bits=4), (nn.Conv1d, nn.Conv2d, nn.Linear), "Conv/Linear"),
    "SVD": _svd,
    "distillation": _distill,
}


def run_cell(model_name: str, technique: str) -> str:
    """Run one cell; returns a short note, raises :class:`Unsupported` for a named unsupported combination."""
    model, x, data = _setup(model_name)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers a technique leaves in float are named in warnings, by design
        return TECHNIQUES[technique](model_name, model, x, data, Path(d))


@pytest.mark.parametrize("technique", list(TECHNIQUES))
@pytest.mark.parametrize("model_name", list(ZOO))
def test_matrix(model_name, technique):
    try:
        run_cell(model_name, technique)
    except Unsupported as exc:
        pytest.skip(str(exc))


def markdown() -> str:
    """The matrix as a Markdown table: ``ok`` (with a note), or ``-`` and the reason."""
    rows = ["| model | " + " | ".join(TECHNIQUES) + " |", "|---" * (len(TECHNIQUES) + 1) + "|"]
    for model_name in ZOO:
        cells = []
        for technique in TECHNIQUES:
            try:
                note = run_cell(model_name, technique)
                cells.append(f"ok ({note})" if note else "ok")
            except Unsupported as exc:
                cells.append(f"- ({exc})")
            except Exception as exc:  # the table shows failures too, rather than hiding them
                cells.append(f"FAIL: {type(exc).__name__}")
        rows.append(f"| {model_name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.stdout.write(markdown() + "\n")
