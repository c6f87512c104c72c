"""The batch and verb contract: models with several or keyword inputs, dict batches, custom losses and metrics
go through every verb with the same keywords, and each verb records its config in the model's history."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import torchslim
from torchslim.core.errors import DataError
from torchslim.core.history import history
from torchslim.data.batches import as_example_inputs, batch_size, call_model, split_batch, to_device
from torchslim.pruning import layer_sparsity, masked_like, structured_prune
from torchslim.training.train import TrainConfig, train

FAST = TrainConfig(epochs=1, lr=1e-2, device="cpu", progress=False)
VOCAB, LENGTH, CLASSES = 20, 6, 3


class TwoInputs(nn.Module):
    """A regression model with two positional inputs: ``forward(tokens, mask)``."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, tokens, mask):
        return self.fc2(torch.relu(self.fc1(tokens * mask)))


class Keywords(nn.Module):
    """A classifier called with keyword inputs in the Hugging Face style; computes its own loss from
    ``labels`` and returns a dict."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc1 = nn.Linear(16, hidden)
        self.fc2 = nn.Linear(hidden, CLASSES)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True)
        logits = self.fc2(torch.relu(self.fc1(pooled)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class _PairData(Dataset):
    """Samples ``((tokens, mask), target)``: a DataLoader collates them into ``[[tokens, mask], target]``."""

    def __init__(self, n: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randn(n, 8, generator=g)
        self.mask = (torch.rand(n, 8, generator=g) > 0.2).float()
        w = torch.randn(8, generator=torch.Generator().manual_seed(123))  # one target function for every split
        self.y = ((self.tokens * self.mask) @ w).tanh()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return (self.tokens[i], self.mask[i]), self.y[i]


class _DictData(Dataset):
    """Samples ``{"input_ids", "attention_mask"[, "labels"]}``; the label is which third of the vocabulary
    most tokens come from, so it is learnable."""

    def __init__(self, n: int = 192, seed: int = 0, labels: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, CLASSES, (n,), generator=g)
        base = self.y[:, None] * (VOCAB // CLASSES)
        self.ids = (base + torch.randint(0, VOCAB // CLASSES, (n, LENGTH), generator=g)).clamp(max=VOCAB - 1)
        self.mask = torch.ones(n, LENGTH)
        self.mask[:, -2:] = (torch.rand(n, 2, generator=g) > 0.5).float()
        self.labels = labels

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i]}
        if self.labels:
            item["labels"] = self.y[i]
        return item


def _pairs(shuffle: bool = True, **kw) -> DataLoader:
    return DataLoader(_PairData(**kw), batch_size=32, shuffle=shuffle, generator=torch.Generator().manual_seed(1))


def _dicts(shuffle: bool = True, **kw) -> DataLoader:
    return DataLoader(_DictData(**kw), batch_size=32, shuffle=shuffle, generator=torch.Generator().manual_seed(1))


def regression_loss(outputs, batch):
    """A user loss in the contract's form: ``(outputs, batch) -> scalar``."""
    _, target = split_batch(batch)
    return F.mse_loss(outputs.squeeze(-1), target)


def neg_mse(model, loader) -> float:
    """A user metric in the contract's form: ``(model, loader) -> float``, higher is better."""
    with torch.no_grad():
        return -sum(float(regression_loss(call_model(model, split_batch(b)[0]), b)) for b in loader) / len(loader)


def _model_loss(model, loader) -> float:
    with torch.no_grad():
        return sum(float(call_model(model, split_batch(b, keep_labels=True)[0])["loss"]) for b in loader) / len(loader)


def test_batch_forms():
    x, y = torch.randn(4, 3), torch.arange(4)
    assert split_batch(x) == (x, None)
    inputs, target = split_batch([[x, x], y])
    assert isinstance(inputs, tuple) and len(inputs) == 2 and target is y
    inputs, target = split_batch({"input_ids": x, "labels": y})
    assert list(inputs) == ["input_ids"] and target is y
    assert list(split_batch({"input_ids": x, "labels": y}, keep_labels=True)[0]) == ["input_ids", "labels"]
    assert split_batch(({"a": x}, y))[0] == {"a": x}
    # A plain tensor is one input: never split along its batch dimension.
    assert len(as_example_inputs(torch.randn(2, 3, 32, 32))) == 1
    assert as_example_inputs([x, x]) == (x, x) and list(as_example_inputs({"a": x})) == ["a"]
    assert call_model(lambda *a, **k: (a, k), {"a": 1}) == ((), {"a": 1})
    moved = to_device({"a": [x, (y,)], "b": 3}, "cpu")
    assert moved["a"][1][0] is y and moved["b"] == 3
    assert batch_size({"a": x}) == 4 and batch_size((3, x)) == 4
    for bad in ((), "text", 3):
        with pytest.raises(DataError):
            split_batch(bad)
    with pytest.raises(DataError, match="example_inputs"):
        as_example_inputs(())


def test_finetune_two_inputs_with_custom_loss_and_metric():
    torch.manual_seed(0)
    model, data, val = TwoInputs(), _pairs(), _pairs(shuffle=False, n=64, seed=1)
    before = neg_mse(model, val)
    calls = []

    def metric(m, loader):
        calls.append(1)
        return neg_mse(m, loader)

    cfg = torchslim.Finetune(FAST.replace(epochs=5))
    out = torchslim.finetune(model, cfg, data=data, val_data=val, loss_fn=regression_loss, metric=metric)
    assert out is not model and neg_mse(model, val) == before  # the original is untouched
    assert neg_mse(out, val) > before * 0.6  # the regression error fell by more than 40%
    assert len(calls) == 5 and history(out) == [cfg.to_dict(compact=True)]


def test_named_losses_and_the_old_loss_form():
    torch.manual_seed(0)
    model, data = TwoInputs(), _pairs()
    start = neg_mse(model, data)
    train(model, data, FAST.replace(epochs=3), loss_fn="mse")
    assert neg_mse(model, data) > start * 0.7  # the error fell by more than 30%
    keywords = Keywords()
    start = _model_loss(keywords, _dicts())
    train(keywords, _dicts(), FAST.replace(epochs=3), loss_fn="model_loss")
    assert _model_loss(keywords, _dicts()) < start * 0.7
    with pytest.raises(DataError, match="model_loss"):  # no labels, so the model returns no loss
        train(Keywords(), _dicts(labels=False), FAST, loss_fn="model_loss")
    with pytest.raises(DataError, match="target"):
        train(Keywords(), _dicts(labels=False), FAST)  # cross-entropy needs labels
    with pytest.warns(DeprecationWarning, match="loss_fn"):
        train(TwoInputs(), data, FAST, loss_fn=lambda out, target, inputs: F.mse_loss(out.squeeze(-1), target))


def test_unstructured_pruning_fine_tunes_with_the_users_loss():
    torch.manual_seed(0)
    model = TwoInputs()
    train(model, _pairs(), FAST.replace(epochs=3), loss_fn=regression_loss)
    cfg = torchslim.UnstructuredPruning(0.6, schedule=torchslim.Schedule("iterative", 2, FAST.replace(epochs=2)))
    seen = []
    val = _pairs(False, n=64, seed=1)
    pruned = torchslim.prune(model, cfg, data=_pairs(), val_data=val, loss_fn=regression_loss,
                             metric=lambda m, loader: seen.append(neg_mse(m, loader)) or seen[-1])
    assert sum(layer_sparsity(pruned).values()) > 0 and "weight_mask" not in dict(model.fc1.named_buffers())
    total = sum(m.weight.numel() for m in (pruned.fc1, pruned.fc2))
    zeros = sum(int((m.weight == 0).sum()) for m in (pruned.fc1, pruned.fc2))
    assert abs(zeros / total - 0.6) < 0.01
    assert len(seen) == 4  # after each fine-tuning epoch of each of the two steps
    untuned = torchslim.prune(model, torchslim.UnstructuredPruning(0.6))
    assert neg_mse(pruned, val) > neg_mse(untuned, val)  # fine-tuning on the user's loss recovered some error
    assert history(pruned) == [cfg.to_dict(compact=True)]


def _equal_outputs(a, b, inputs) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        out_a, out_b = call_model(a, inputs), call_model(b, inputs)
    out_a, out_b = (o["logits"] if isinstance(o, dict) else o for o in (out_a, out_b))
    assert out_a.shape == out_b.shape
    assert torch.allclose(out_a, out_b, atol=1e-5), (out_a - out_b).abs().max()


def test_structured_pruning_with_tuple_example_inputs():
    torch.manual_seed(0)
    model = TwoInputs()
    example = split_batch(next(iter(_pairs())))[0]  # (tokens, mask)
    pruned = torchslim.prune(model, torchslim.StructuredPruning(0.5), example_inputs=example)
    assert pruned.fc1.out_features == 16 and pruned.fc2.in_features == 16 and model.fc1.out_features == 32
    work = copy.deepcopy(model)
    summary = structured_prune(work, torchslim.StructuredPruning(0.5), example)
    _equal_outputs(work, masked_like(model, summary), example)
    _equal_outputs(work, pruned, example)
    assert history(pruned)[-1]["type"] == "StructuredPruning"


def test_structured_pruning_with_dict_inputs_and_taylor_on_model_loss():
    torch.manual_seed(0)
    model = Keywords()
    batch = next(iter(_dicts()))
    example = split_batch(batch)[0]  # input_ids, attention_mask; labels stay out
    work = copy.deepcopy(model)
    summary = structured_prune(work, torchslim.StructuredPruning(0.5), example)
    assert work.fc1.out_features == 16 and summary["removed_channels"] == {"fc1": [32, 16]}
    _equal_outputs(work, masked_like(model, summary), example)
    # Taylor importance: gradients of the loss the model computes itself from the dict batches' labels.
    pruned = torchslim.prune(model, torchslim.StructuredPruning(0.25, importance="taylor"), data=_dicts(),
                             example_inputs=example, loss_fn="model_loss")
    assert pruned.fc1.out_features == 24 and call_model(pruned, example)["logits"].shape == (32, CLASSES)


def test_structured_pruning_of_a_cnn_with_a_plain_tensor_example():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned = torchslim.prune(cnn, torchslim.StructuredPruning(0.5), example_inputs=x)
    assert (pruned[0].out_channels, pruned[3].out_channels, pruned[7].in_features) == (4, 8, 8)
    work = copy.deepcopy(cnn)
    _equal_outputs(work, masked_like(cnn, structured_prune(work, torchslim.StructuredPruning(0.5), x)), (x,))
    _equal_outputs(pruned, work, (x,))
    assert torchslim.profile(pruned, x, latency=False, size=False).macs < torchslim.profile(
        cnn, x, latency=False, size=False).macs


def test_qat_with_dict_batches_and_the_models_own_loss(tmp_path):
    torch.manual_seed(0)
    model, data = Keywords(), _dicts()
    start = _model_loss(model, data)
    cfg = torchslim.QAT(bits=8, exclude=("emb",), train=FAST.replace(epochs=4))
    q = torchslim.quantize(model, cfg, data=data, val_data=_dicts(False, n=64, seed=1), loss_fn="model_loss",
                           metric=lambda m, loader: -_model_loss(m, loader))
    assert type(q.fc1).__name__ == "QLinear" and type(model.fc1) is nn.Linear
    assert _model_loss(q, data) < start * 0.7
    assert history(q) == [cfg.to_dict(compact=True)]
    torchslim.save(q, tmp_path / "q.slim")  # the history goes into the checkpoint by default
    assert torchslim.read_manifest(tmp_path / "q.slim")["history"] == history(q)
    with pytest.warns(DeprecationWarning, match="calibration_data"):
        torchslim.quantize(model, cfg.replace(train=FAST.replace(max_steps=2)), calibration_data=data,
                           loss_fn="model_loss")


def test_distill_keyword_models_with_and_without_labels():
    torch.manual_seed(0)
    teacher = Keywords(hidden=64)
    train(teacher, _dicts(), FAST.replace(epochs=4), loss_fn="model_loss")
    teacher.eval()
    student = Keywords(hidden=8)
    probe = split_batch(next(iter(_dicts(seed=2))))[0]

    def gap(m) -> float:  # KL(teacher || student) of the class probabilities
        with torch.no_grad():
            s, t = (F.log_softmax(x(**probe)["logits"], 1) for x in (m, teacher))
            return float(F.kl_div(s, t, log_target=True, reduction="batchmean"))

    # Labelled dict batches: the hard-label term is the model's own loss (the student gets the labels).
    cfg = torchslim.Distillation(alpha=0.5, train=FAST.replace(epochs=3))
    out = torchslim.distill(student, cfg, teacher=teacher, data=_dicts(), loss_fn="model_loss")
    assert gap(out) < gap(student) * 0.8 and history(out) == [cfg.to_dict(compact=True)]
    # Unlabelled batches: soft targets alone (alpha=1) or output matching need no labels.
    unlabelled = _dicts(labels=False)
    for cfg in (torchslim.Distillation(alpha=1.0, train=FAST.replace(epochs=3)),
                torchslim.Distillation(mode="outputs", train=FAST.replace(epochs=3))):
        assert gap(torchslim.distill(student, cfg, teacher=teacher, data=unlabelled)) < gap(student) * 0.8
    with pytest.raises(DataError, match="no labels"):
        torchslim.distill(student, torchslim.Distillation(alpha=0.5, train=FAST), teacher=teacher, data=unlabelled)


def test_two_input_model_distills_with_the_users_loss():
    torch.manual_seed(0)
    teacher = TwoInputs(hidden=64)
    train(teacher, _pairs(), FAST.replace(epochs=4), loss_fn=regression_loss)
    student = TwoInputs(hidden=8)
    cfg = torchslim.Distillation(mode="outputs", train=FAST.replace(epochs=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new form does not warn
        out = torchslim.distill(student, cfg, teacher=teacher, data=_pairs(), val_data=_pairs(False, n=64, seed=1),
                                metric=neg_mse)
    tokens, mask = split_batch(next(iter(_pairs(False, seed=2))))[0]
    with torch.no_grad():
        gaps = [float(F.mse_loss(m(tokens, mask), teacher(tokens, mask))) for m in (student, out)]
    assert gaps[1] < gaps[0] * 0.7


def test_recipe_runner_takes_a_two_input_model_with_the_users_loss_and_metric(tmp_path):
    """compress() with Python objects: structured pruning traced on tuple inputs, unstructured pruning and a
    fine-tuning stage, all trained on the user's regression loss and judged by the user's metric."""
    torch.manual_seed(0)
    model = TwoInputs(hidden=32)
    train(model, _pairs(), FAST.replace(epochs=3), loss_fn=regression_loss)
    data = torchslim.data.Splits("pairs", train=_pairs(), val=_pairs(shuffle=False, seed=1),
                                 test=_pairs(shuffle=False, seed=2), num_classes=0)
    ft = TrainConfig(epochs=8, lr=1e-2, device="cpu", progress=False)
    recipe = torchslim.Recipe(stages=[
        ("channels", torchslim.StructuredPruning(ratio=0.5, exclude=("fc2",))),
        ("weights", torchslim.UnstructuredPruning(sparsity=0.5)),
        ("finetune", torchslim.Finetune(ft))])
    seen = []

    def loss(outputs, batch):
        seen.append(1)
        return regression_loss(outputs, batch)

    report = torchslim.compress(recipe, tmp_path / "out", model=model, data=data, loss_fn=loss, metric=neg_mse,
                                log=lambda s: None)
    assert seen, "the fine-tuning stage did not train with the user's loss"
    slim = torchslim.load(tmp_path / "out" / "model.slim", trusted=[__name__])
    assert slim.fc1.out_features == 16  # half the hidden units removed for real
    assert [h["type"] for h in torchslim.read_manifest(tmp_path / "out" / "model.slim")["history"]] == [
        "StructuredPruning", "UnstructuredPruning", "Finetune"]
    # The report's metric is the user's (negative MSE), measured on the test split, before and after.
    assert report["compressed"]["accuracy"] == pytest.approx(neg_mse(slim, data.test), rel=1e-4)
    assert report["baseline"]["accuracy"] == pytest.approx(neg_mse(model, data.test), rel=1e-4)
    # Still a working regressor: its error stays well below that of predicting zero (the targets' mean square).
    zero = -float(sum(float((y ** 2).sum()) for _, y in data.test) / len(data.test.dataset))
    assert report["compressed"]["accuracy"] > 0.7 * zero
