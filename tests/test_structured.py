import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim import ConfigError, StructuredPruning, TorchslimError, UnsupportedModelError
from torchslim.metrics import count_macs, count_params
from torchslim.models import LeNet5, LeNet300, SmallMobileNet, SmallResNet
from torchslim.pruning import prune
from torchslim.pruning.graph import build_groups
from torchslim.pruning.importance import bn_l1_penalty
from torchslim.pruning.structured import masked_like, structured_prune


class CatNet(nn.Module):
    """Two branches concatenated, a depthwise conv (multiplier 2) over the cat, a grouped conv, an MLP head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 6, 1)  # no BN: its removed channels are masked through weight rows and bias
        self.dw = nn.Conv2d(14, 28, 3, padding=1, groups=14, bias=False)
        self.bn_dw = nn.BatchNorm2d(28)
        self.c = nn.Conv2d(28, 12, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(12)
        self.g = nn.Conv2d(12, 12, 3, padding=1, groups=3)  # grouped: the same positions go in every group
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(12 * 4, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.bn_a(self.a(x))), F.relu(self.b(x))], dim=1)
        y = F.relu(self.bn_dw(self.dw(y)))
        y = F.relu(self.g(F.relu(self.bn_c(self.c(y)))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.pool(y), 1))))


class ViewNet(nn.Module):
    """A conv whose output goes through a view that is not a flatten (or a permute to channels-last, whose
    flatten interleaves the channels with the pixels)."""

    def __init__(self, permute: bool = False):
        super().__init__()
        self.permute = permute
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = y.permute(0, 2, 3, 1) if self.permute else y.view(y.size(0), -1, 2)
        return self.fc(y.flatten(1))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            x = -x
        return self.conv(x)


def _prepare(model, x):
    """Random BN affine parameters and running statistics so that masking/slicing mistakes show."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn_like(x))
    return model.eval()


CASES = [
    ("lenet300", lambda: LeNet300(), (2, 1, 28, 28)),
    ("lenet5", lambda: LeNet5(), (2, 1, 28, 28)),
    ("resnet", lambda: SmallResNet(widths=(8, 16, 32)), (2, 1, 16, 16)),
    ("mobilenet", lambda: SmallMobileNet(width=8), (2, 1, 16, 16)),
    ("catnet", lambda: CatNet(), (2, 3, 8, 8)),
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_prune_matches_masked_original(name, make, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = _prepare(make(), x)
    pruned = copy.deepcopy(model)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        summary = structured_prune(pruned, StructuredPruning(ratio=0.5), (x,))
    assert summary["pruned_groups"] > 0 and summary["pruned_groups"] == len(summary["kept"])
    assert json.loads(json.dumps(summary)) == summary  # plain data, fit for reports and manifests
    for leader, (before, after) in summary["removed_channels"].items():
        assert after == before - before // 2 and len(summary["kept"][leader]) == after
    assert count_params(pruned)[0] < count_params(model)[0]
    assert count_macs(pruned, (x,)) < count_macs(model, (x,))
    masked = masked_like(model, summary)  # removed channels zeroed where produced
    with torch.no_grad():
        out, ref = pruned.eval()(x), masked(x)
    assert out.shape == model(x).shape  # the classifier never shrinks
    assert (out - ref).abs().max().item() < 1e-5
    assert type(pruned) is type(model)


def test_catnet_couplings_and_grouped_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = _prepare(CatNet(), x)
    summary = structured_prune(model, StructuredPruning(ratio=0.5), (x,))
    # Grouped conv groups count positions within a group: 4 of c's 12 channels, 3 groups.
    assert summary["removed_channels"] == {"a": [8, 4], "b": [6, 3], "c": [4, 2], "g": [4, 2], "fc1": [20, 10]}
    assert (model.dw.in_channels, model.dw.out_channels, model.dw.groups) == (7, 14, 7)
    assert model.bn_dw.num_features == 14 and model.c.in_channels == 14 and model.c.out_channels == 6
    assert (model.g.in_channels, model.g.out_channels, model.g.groups) == (6, 6, 3)
    assert model.fc1.in_features == 24 and model.fc2.out_features == 5
    skipped = {s["group"]: s["reason"] for s in summary["skipped"]}
    assert list(skipped) == ["fc2"] and "model output" in skipped["fc2"]


@pytest.mark.parametrize("permute", [False, True])
def test_unknown_op_leaves_group_whole(permute):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    model = _prepare(ViewNet(permute), x)
    pruned = copy.deepcopy(model)
    # Nothing else is prunable, so the refusal names the op that blocks the only group.
    with pytest.raises(UnsupportedModelError, match="'conv'.*(flattens the channel dim into a preceding|not a flatten)"):
        structured_prune(pruned, StructuredPruning(ratio=0.5), (x,))
    assert pruned.conv.out_channels == 8
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


def test_importances_differ_but_are_valid():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 12, 12)
    data = [(torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))) for _ in range(2)]
    model = _prepare(SmallResNet(widths=(8, 16, 32)), x)
    state = copy.deepcopy(model.state_dict())
    kept = {}
    for imp in ("l1", "l2", "taylor", "bn_scale"):
        pruned = copy.deepcopy(model)
        s = structured_prune(pruned, StructuredPruning(ratio=0.5, importance=imp, importance_batches=2),
                             (x,), data=data)
        kept[imp] = s["kept"]
        with torch.no_grad():
            out, ref = pruned.eval()(x), masked_like(model, s)(x)
        assert (out - ref).abs().max().item() < 1e-5
    assert len({str(sorted(k.items())) for k in kept.values()}) == 4
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # taylor left no trace
    assert all(p.grad is None for p in model.parameters())


def test_taylor_needs_data_and_bn_scale_needs_bn():
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ConfigError, match="data="):
        structured_prune(LeNet5(), StructuredPruning(importance="taylor"), (x,))
    with pytest.raises(UnsupportedModelError, match="'conv1'"):
        structured_prune(LeNet5(), StructuredPruning(importance="bn_scale"), (x,))


def test_global_scope_respects_max_ratio():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 12, 12)
    model = _prepare(SmallResNet(widths=(8, 16, 32)), x)
    with torch.no_grad():
        model.stem[0].weight.mul_(100.0)  # one group far more important than the rest
    s = structured_prune(model, StructuredPruning(ratio=0.5, scope="global", max_ratio=0.6), (x,))
    removed = {k: b - a for k, (b, a) in s["removed_channels"].items()}
    sizes = {k: b for k, (b, _) in s["removed_channels"].items()}
    assert all(removed[k] <= int(0.6 * sizes[k]) for k in removed)
    assert len(set(removed[k] / sizes[k] for k in removed)) > 1  # not a uniform per-layer cut
    total = sum(g.size for g in build_groups(SmallResNet(widths=(8, 16, 32)), (x,)) if g.prunable)
    assert sum(removed.values()) == total // 2


def test_round_to_exclude_and_per_layer_ratio():
    x = torch.randn(2, 1, 28, 28)
    torch.manual_seed(0)
    m = LeNet5()
    s = structured_prune(m, StructuredPruning(ratio=0.3, round_to=4), (x,))
    assert s["removed_channels"] == {"conv1": [20, 16], "conv2": [50, 36], "fc1": [500, 352]}
    m = LeNet5()
    s = structured_prune(m, StructuredPruning(ratio=0.5, exclude=("conv2",)), (x,))
    assert "conv2" not in s["removed_channels"] and m.conv2.out_channels == 50 and m.conv2.in_channels == 10
    assert any(k["group"] == "conv2" and "exclude" in k["reason"] for k in s["skipped"])
    m = LeNet5()
    s = structured_prune(m, StructuredPruning(ratio={"conv2": 0.5, "fc2": 0.5}), (x,))
    assert s["removed_channels"] == {"conv2": [50, 25]} and m.fc2.out_features == 10
    with pytest.raises(ConfigError, match="fc9"):
        structured_prune(LeNet5(), StructuredPruning(ratio={"fc9": 0.5}), (x,))


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 3, 1)
        self.inner = Untraceable()

    def forward(self, x):
        return self.inner(self.c2(F.relu(self.c1(x))))


def test_exclude_makes_an_untraceable_submodule_opaque():
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an excluded module is skipped on purpose: no warning
        s = structured_prune(Wrapped(), StructuredPruning(ratio=0.5, exclude=("inner",)), (x,))
    assert s["removed_channels"] == {"c1": [8, 4]}
    assert "excluded module 'inner'" in {k["group"]: k["reason"] for k in s["skipped"]}["c2"]


def test_bad_inputs_are_named():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UnsupportedModelError, match="control flow"):
        structured_prune(Untraceable(), StructuredPruning(), (x,))
    with pytest.raises(ConfigError, match="ratio"):
        StructuredPruning(ratio=1.5)
    with pytest.raises(ConfigError, match="ratio"):
        structured_prune(LeNet5(), StructuredPruning(), (torch.randn(1, 1, 28, 28),), ratio=1.0)
    m = LeNet5()
    torch.nn.utils.prune.l1_unstructured(m.conv2, "weight", 0.5)
    with pytest.raises(UnsupportedModelError, match="'conv2'.*before unstructured"):
        structured_prune(m, StructuredPruning(), (torch.randn(1, 1, 28, 28),))
    m = LeNet5()
    with torch.no_grad():
        m.fc1.weight[0, 0] = float("nan")
    with pytest.raises(TorchslimError, match="'fc1'"):
        structured_prune(m, StructuredPruning(), (torch.randn(1, 1, 28, 28),))


def test_bn_penalty_and_prune_entry_point():
    model = SmallResNet(widths=(8, 16, 32))
    penalty = bn_l1_penalty(model, 1e-3)
    value = penalty(model)
    gammas = sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.isclose(value, 1e-3 * gammas) and value.requires_grad
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        bn_l1_penalty(LeNet5(), 1e-3)
    x = torch.randn(1, 1, 28, 28)
    original = LeNet5()
    pruned = prune(original, StructuredPruning(ratio=0.5), example_inputs=(x,))
    assert pruned.conv1.out_channels == 10 and original.conv1.out_channels == 20
    assert pruned(x).shape == (1, 10)
