"""Knowledge distillation: loss maths, teacher safety, features, label-free mode, caching, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.core.config import config_from_dict
from torchslim.core.history import history
from torchslim.data import digits
from torchslim.distillation import Distillation, distill, kd_loss, soft_target_loss
from torchslim.core.errors import ConfigError, DataError, UnsupportedModelError
from torchslim.metrics import evaluate
from torchslim.models import LeNet5
from torchslim.training.train import TrainConfig

FAST = TrainConfig(epochs=1, lr=2e-3, max_steps=6, device="cpu", progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: extra intra-op threads only spin against other processes' work.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return digits(batch_size=64)


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    from torchslim.training.train import train
    model = LeNet5()
    train(model, data.train, TrainConfig(epochs=1, lr=2e-3, device="cpu", progress=False))
    model.zero_grad(set_to_none=True)
    return model.eval()


def _small_loader(n=64, batch=16, labels=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    ds = TensorDataset(x, y) if labels else TensorDataset(x)
    return DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1))


def test_soft_target_loss_is_kl_times_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    T = 3.0
    p_t = F.softmax(t / T, 1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert torch.allclose(soft_target_loss(s, t, T), manual, atol=1e-6)
    y = torch.randint(0, 10, (8,), generator=g)
    assert torch.allclose(kd_loss(s, t, y, T, alpha=0.0), F.cross_entropy(s, y))
    mixed = kd_loss(s, t, y, T, alpha=0.7)
    assert torch.allclose(mixed, 0.7 * manual + 0.3 * F.cross_entropy(s, y), atol=1e-6)
    assert soft_target_loss(t, t, T).abs() < 1e-6


def test_config_validation_and_round_trip():
    cfg = Distillation(temperature=2.0, alpha=0.5, feature_layers={"conv2": "conv2"}, train=FAST)
    assert config_from_dict(cfg.to_dict()) == cfg
    for bad in (dict(temperature=0), dict(alpha=1.5), dict(mode="bogus"), dict(feature_layers={}),
                dict(feature_weight=-1), dict(output_loss="l1")):
        with pytest.raises(ConfigError):
            Distillation(**bad)


def test_teacher_unchanged_no_grads_student_learns(data, teacher):
    teacher.train()  # distill must put it in eval for the run and restore this afterwards
    before = copy.deepcopy(teacher.state_dict())
    torch.manual_seed(1)
    student = LeNet5(width=0.5)  # stands in for a structurally pruned copy of the teacher
    acc0 = evaluate(student, data.val)
    cfg = Distillation(train=FAST.replace(max_steps=30))
    out = distill(student, cfg, teacher=teacher, data=data.train)
    assert out is not student and evaluate(student, data.val) == acc0  # a trained copy
    assert evaluate(out, data.val) > acc0 + 0.2
    assert history(out) == [cfg.to_dict(compact=True)]
    assert teacher.training and all(m.training for m in teacher.modules())
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not student._forward_hooks and not teacher._forward_hooks
    teacher.eval()


def test_feature_matching_trains_projection(teacher, monkeypatch):
    torch.manual_seed(0)
    student = LeNet5(width=0.5)
    cfg = Distillation(feature_layers={"conv2": "conv2", "fc1": "fc1"}, feature_weight=0.5, train=FAST)
    seen = {}
    orig = torch.optim.Adam.__init__

    def spy(self, params, *a, **k):  # record the parameters handed to the optimizer
        seen["params"] = list(params)
        orig(self, seen["params"], *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "__init__", spy)
    distill(student, cfg, teacher=teacher, data=_small_loader(), inplace=True)
    extra = [p for p in seen["params"] if all(p is not q for q in student.parameters())]
    # 1x1 conv 25 -> 50 channels and linear 250 -> 500: weights and biases.
    assert sorted(tuple(p.shape) for p in extra) == [(50,), (50, 25, 1, 1), (500,), (500, 250)]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra)
    assert not student.conv2._forward_hooks and not teacher.conv2._forward_hooks


def test_output_matching_needs_no_labels(teacher):
    torch.manual_seed(0)
    student = LeNet5(width=0.5)
    loader = _small_loader(labels=False)
    x = next(iter(loader))[0]
    with torch.no_grad():
        gap0 = F.mse_loss(student(x), teacher(x)).item()
    cfg = Distillation(mode="outputs", train=FAST.replace(max_steps=20, lr=3e-3))
    student = distill(student, cfg, teacher=teacher, data=loader)
    with torch.no_grad():
        assert F.mse_loss(student(x), teacher(x)).item() < gap0
    distill(student, Distillation(mode="outputs", output_loss="cosine", train=FAST), teacher=teacher, data=loader)
    # Soft targets alone need no labels either; mixing in hard labels does.
    distill(student, Distillation(alpha=1.0, train=FAST), teacher=teacher, data=loader)
    with pytest.raises(DataError, match="no labels"):
        distill(student, Distillation(alpha=0.5, train=FAST), teacher=teacher, data=loader)


def test_teacher_cache_runs_teacher_once_per_sample(teacher):
    calls = []
    handle = teacher.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        torch.manual_seed(0)
        distill(LeNet5(width=0.25), Distillation(cache_teacher=True, train=FAST.replace(epochs=3, max_steps=None)),
                teacher=teacher, data=_small_loader(n=64))
    finally:
        handle.remove()
    # One probe batch, then each of the 64 samples once, although 3 shuffled epochs were trained.
    assert sum(calls[1:]) == 64 and len(calls) > 1


def test_bad_inputs(teacher):
    cfg = Distillation(train=FAST)
    with pytest.raises(UnsupportedModelError, match="differ in shape"):
        distill(LeNet5(num_classes=5), cfg, teacher=teacher, data=_small_loader())
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match="empty"):
        distill(LeNet5(), cfg, teacher=teacher, data=empty)
    with pytest.raises(ConfigError, match="same module"):
        distill(teacher, cfg, teacher=teacher, data=_small_loader(), inplace=True)
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        distill(LeNet5(), Distillation(feature_layers={"nope": "conv1"}, train=FAST), teacher=teacher,
                data=_small_loader())
    with pytest.raises(ConfigError, match="teacher="):
        distill(LeNet5(), cfg, data=_small_loader())
    assert not teacher._forward_hooks


def test_old_positional_form_warns_and_trains_in_place(teacher, data):
    torch.manual_seed(0)
    student = LeNet5(width=0.25)
    with pytest.warns(DeprecationWarning, match="teacher=teacher"):
        out = distill(student, teacher, data, Distillation(train=FAST))  # a Splits: train, and val for validation
    assert out is student and history(student)[-1]["type"] == "Distillation"


def test_qat_like_student_learns_from_its_original(teacher, data):
    """A compressed copy of the teacher (here: fake-quantised weights via a parametrization, as a QAT
    or pruned copy would carry) fine-tunes against the untouched original."""
    import torch.nn.utils.parametrize as P

    class FakeQuant(nn.Module):
        def forward(self, w):
            scale = w.detach().abs().max() / 7
            return w + (torch.round(w / scale) * scale - w).detach()  # straight-through 4-bit weights

    student = copy.deepcopy(teacher)
    for layer in (student.conv1, student.conv2, student.fc1, student.fc2):
        P.register_parametrization(layer, "weight", FakeQuant())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill(student, Distillation(train=FAST.replace(max_steps=10, lr=5e-4)), teacher=teacher, data=data.train,
            inplace=True)
    assert evaluate(student, data.val) > 0.5
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
