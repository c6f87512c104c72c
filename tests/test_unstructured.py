import pytest
import torch
from torch import nn

import torchslim
from torchslim import ConfigError, Schedule, TorchslimError, TrainConfig, UnstructuredPruning, prune
from torchslim.metrics import count_params, evaluate
from torchslim.models import LeNet5, LeNet300
from torchslim.pruning import layer_sparsity, make_permanent
from torchslim.pruning.schedule import cubic, step_targets

WEIGHTS = {"conv1": 500, "conv2": 25_000, "fc1": 400_000, "fc2": 5_000}


def _zeros(model):
    return sum(int(round(s * WEIGHTS[n])) for n, s in layer_sparsity(model).items())


def test_global_sparsity_is_exact_and_copy_leaves_original():
    torch.manual_seed(0)
    m = LeNet5()
    p = prune(m, UnstructuredPruning(sparsity=0.9))
    assert _zeros(p) == round(0.9 * sum(WEIGHTS.values()))
    assert count_params(m)[1] == count_params(m)[0]  # the user's model is untouched
    sp = layer_sparsity(p)
    assert sp["fc1"] > sp["conv1"]  # global ranking prunes the big layer harder


def test_global_keeps_the_largest_weights():
    torch.manual_seed(0)
    m = LeNet300()
    p = prune(m, UnstructuredPruning(sparsity=0.5))
    kept = torch.cat([(p.get_submodule(n).weight != 0).flatten() for n in ("fc1", "fc2", "fc3")])
    mags = torch.cat([m.get_submodule(n).weight.abs().flatten() for n in ("fc1", "fc2", "fc3")])
    assert mags[kept].min() >= mags[~kept].max()


def test_layer_scope_and_per_layer_dict():
    m = LeNet5()
    sp = layer_sparsity(prune(m, UnstructuredPruning(sparsity=0.75, scope="layer")))
    assert all(abs(v - 0.75) < 1e-3 for v in sp.values())
    sp = layer_sparsity(prune(m, UnstructuredPruning(sparsity={"fc1": 0.95, "conv2": 0.5})))
    assert abs(sp["fc1"] - 0.95) < 1e-6 and abs(sp["conv2"] - 0.5) < 1e-6 and sp["conv1"] == 0
    sp = layer_sparsity(prune(m, UnstructuredPruning(sparsity=0.9, exclude=("fc2", "conv*"))))
    assert sp["fc1"] == pytest.approx(0.9) and sp["fc2"] == 0


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="unknown or excluded layer"):
        prune(LeNet5(), UnstructuredPruning(sparsity={"fc9": 0.5}))
    bad = LeNet5()
    with torch.no_grad():
        bad.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(TorchslimError, match="conv2"):
        prune(bad, UnstructuredPruning(sparsity=0.5))
    with pytest.raises(torchslim.UnsupportedModelError):
        prune(nn.Sequential(nn.ReLU()), UnstructuredPruning())
    with pytest.raises(torchslim.DataError):
        prune(LeNet5(), UnstructuredPruning(schedule=Schedule("iterative", 2, TrainConfig())), data=None)


def test_masks_survive_fine_tuning(digits_data, trained_lenet5):
    cfg = UnstructuredPruning(sparsity=0.8, schedule=Schedule("oneshot", 1, TrainConfig(epochs=1, progress=False)))
    p = prune(trained_lenet5, cfg, data=digits_data.train)
    assert _zeros(p) >= round(0.8 * sum(WEIGHTS.values()))
    assert evaluate(p, digits_data.test) > 0.9
    make_permanent(p)
    assert not hasattr(p.fc1, "weight_mask")
    assert _zeros(p) >= round(0.8 * sum(WEIGHTS.values()))


@pytest.mark.parametrize("kind", ["iterative", "gradual"])
def test_schedules_reach_target_and_recover(kind, trained_lenet5):
    from torchslim.data import digits

    data = digits(seed=0)  # fresh loaders: results must not depend on which tests ran before
    torch.manual_seed(0)
    # Same training budget for both: 3 rounds of 1 epoch, or one 3-epoch run with 3 mask updates.
    epochs = 1 if kind == "iterative" else 3
    cfg = UnstructuredPruning(sparsity=0.9, schedule=Schedule(kind, 3, TrainConfig(epochs=epochs, progress=False)))
    p = prune(trained_lenet5, cfg, data=data.train)
    assert _zeros(p) == round(0.9 * sum(WEIGHTS.values()))
    assert evaluate(p, data.test) > 0.88


def test_gradual_follows_the_cubic_ramp(trained_lenet5, monkeypatch):
    """Sparsity seen at each training step follows 1-(1-t)^3 and is final by half of the run."""
    from torchslim.data import digits
    from torchslim.training.train import train as real_train

    data = digits(seed=0)
    seen = []

    def spy(model, loader, config, **kw):
        inner = kw.pop("on_step")

        def on_step(step, total):
            inner(step, total)
            seen.append((step / total, _zeros(model) / sum(WEIGHTS.values())))
        return real_train(model, loader, config, on_step=on_step, **kw)

    monkeypatch.setattr("torchslim.pruning.schedule.train", spy)
    cfg = UnstructuredPruning(sparsity=0.8, schedule=Schedule("gradual", 4, TrainConfig(epochs=2, progress=False)))
    prune(trained_lenet5, cfg, data=data.train)
    levels = sorted({round(s, 4) for _, s in seen})
    assert levels == pytest.approx([0.8 * cubic(k / 4) for k in (1, 2, 3, 4)], abs=1e-4)
    assert all(s == pytest.approx(0.8, abs=1e-4) for t, s in seen if t >= 0.5)
    assert all(b >= a for (_, a), (_, b) in zip(seen, seen[1:]))  # never un-prunes


def test_schedule_shapes():
    assert step_targets(Schedule()) == [1.0]
    assert step_targets(Schedule("iterative", 4, TrainConfig())) == [0.25, 0.5, 0.75, 1.0]
    g = step_targets(Schedule("gradual", 4, TrainConfig()))
    assert g[-1] == 1.0 and g[0] > 0.25 and all(a < b for a, b in zip(g, g[1:]))  # front-loaded ramp
    assert cubic(0) == 0 and cubic(1) == 1 and cubic(0.5) == pytest.approx(0.875)


def _topk_keep(scores, n):
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if n > 0:
        mask[torch.topk(scores.flatten(), n, largest=False, sorted=False).indices] = False
    return mask.view_as(scores)


@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros", "negative", "nan"])
def test_keep_top_threshold_search_picks_what_topk_picks(kind):
    from torchslim.pruning.unstructured import _keep_top

    g = torch.Generator().manual_seed(0)
    scores = {"distinct": torch.rand(3000, generator=g), "ties": torch.randint(0, 9, (3000,), generator=g).float(),
              "zeros": torch.rand(3000, generator=g) * (torch.rand(3000, generator=g) > 0.5),
              "negative": torch.randn(3000, generator=g),
              "nan": torch.rand(3000, generator=g).index_fill(0, torch.tensor([5, 77]), float("nan"))}[kind]
    for n in (0, 1, 1500, 2700, 2999, 3000):
        assert torch.equal(_keep_top(scores.view(60, 50), n), _topk_keep(scores.view(60, 50), n))
