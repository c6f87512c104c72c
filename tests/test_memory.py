"""Memory-lean unstructured pruning: the chunked threshold search gives the masks a global top-k gives, ties
at the threshold are settled first come first, masks are bool and the pruned layer keeps no autograd graph.
(Peak memory itself is measured by benchmarks/memory.py.)"""

import pytest
import torch
from torch import nn

import torchslim
from torchslim.nn.masks import effective, effective_chunks
from torchslim.pruning import unstructured as U


def _mlp(seed: int = 0) -> nn.Sequential:
    """Magnitudes all distinct (so a top-k has one answer), signs and order random."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 300), nn.ReLU(), nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    layers = [m for m in model if isinstance(m, nn.Linear)]
    n = sum(m.weight.numel() for m in layers)
    values = (torch.randperm(n) + 1).float() / n * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    offset = 0
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(values[offset:offset + m.weight.numel()].view_as(m.weight))
            offset += m.weight.numel()
    return model


def _topk_masks(layers: dict, n_prune: int) -> dict:
    scores = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.topk(scores, n_prune, largest=False).indices] = False
    out, offset = {}, 0
    for name, m in layers.items():
        out[name] = keep[offset:offset + m.weight.numel()].view_as(m.weight)
        offset += m.weight.numel()
    return out


@pytest.mark.parametrize("sparsity", [0.3, 0.9, 0.97])
def test_chunked_global_masks_equal_a_global_topk(sparsity, monkeypatch):
    monkeypatch.setattr(U, "_CHUNK", 1000)  # many chunks, some straddling layers' ends
    layers = U.prunable_layers(_mlp())
    n = round(sparsity * sum(m.weight.numel() for m in layers.values()))
    scores = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
    assert scores.unique().numel() == scores.numel()  # no ties: the choice is unique
    masks = U.magnitude_masks(layers, sparsity, "global")
    want = _topk_masks(layers, n)
    assert all(masks[k].dtype == torch.bool and torch.equal(masks[k], want[k]) for k in want)


def test_per_layer_and_dict_sparsity_masks_equal_topk_per_layer():
    layers = U.prunable_layers(_mlp(1))
    for masks, rates in ((U.magnitude_masks(layers, 0.6, "layer"), {k: 0.6 for k in layers}),
                         (U.magnitude_masks(layers, {"2": 0.8}, "global"), {"2": 0.8})):
        for name, rate in rates.items():
            want = _topk_masks({name: layers[name]}, round(rate * layers[name].weight.numel()))[name]
            assert torch.equal(masks[name], want)


def test_ties_at_the_threshold_are_pruned_first_come_first(monkeypatch):
    monkeypatch.setattr(U, "_CHUNK", 7)
    a, b = nn.Linear(10, 3, bias=False), nn.Linear(5, 2, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[0.1, 0.5, 0.5, 0.9, 0.5, 0.2, 0.8, 0.5, 0.7, 0.6]] * 3))
        b.weight.copy_(torch.tensor([[0.5, -0.5, 0.05, 0.95, 0.5]] * 2))
    layers = {"a": a, "b": b}
    n = 20  # 8 below 0.5 (0.1 and 0.2 x3, 0.05 x2), 18 equal to 0.5: the first 12 of them go
    masks = U.magnitude_masks(layers, n / 40, "global")
    assert sum(int((~m).sum()) for m in masks.values()) == n
    w = torch.cat([a.weight.flatten(), b.weight.flatten()]).abs()
    keep = torch.cat([masks["a"].flatten(), masks["b"].flatten()])
    assert not keep[w < 0.5].any() and keep[w > 0.5].all()
    equal = (w == 0.5).nonzero().flatten()
    assert (~keep[equal[:12]]).all() and keep[equal[12:]].all()


def test_pruned_layers_carry_bool_masks_and_no_graph_and_compute_as_before():
    model = _mlp()
    x = torch.randn(8, 40)
    pruned = torchslim.prune(model, torchslim.UnstructuredPruning(0.8))
    for m in U.prunable_layers(pruned).values():
        assert m.weight_mask.dtype == torch.bool and m.weight.grad_fn is None
        assert torch.equal(m.weight, m.weight_orig.detach() * m.weight_mask)
        assert torch.equal(torch.cat(list(effective_chunks(m, 1000))), effective(m).detach().flatten())
    ref = _mlp()
    for (name, m), r in zip(U.prunable_layers(pruned).items(), U.prunable_layers(ref).values()):
        with torch.no_grad():
            r.weight.mul_(m.weight_mask)
    assert torch.equal(pruned(x), ref(x))
    # Training through the mask still works, and the zeros stay zero.
    pruned.train()
    pruned(x).sum().backward()
    layer = pruned[0]
    assert layer.weight_orig.grad is not None and (layer.weight_orig.grad[~layer.weight_mask] == 0).all()
    # Tightening an existing bool mask, then folding it in.
    again = torchslim.prune(pruned, torchslim.UnstructuredPruning(0.9))
    assert U.layer_sparsity(again) == pytest.approx(U.layer_sparsity(U.make_permanent(again)))
    total = sum(m.weight.numel() for m in U.prunable_layers(again).values())
    zeros = sum(int((m.weight == 0).sum()) for m in U.prunable_layers(again).values())
    assert zeros == round(0.9 * total)
