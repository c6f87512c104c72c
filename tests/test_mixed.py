"""Mixed precision: sensitivity, exact bit allocation under a budget, end-to-end plans."""

import itertools
import random

import pytest
import torch

from torchslim import ConfigError, DataError, TrainConfig
from torchslim.metrics import evaluate
from torchslim.quantization.mixed import (MixedPrecision, allocate_bits, measure_sensitivity,
                                          mixed_precision_plan, quantize_mixed)


def _brute_force(sens, cost, capacity):
    names = list(sens)
    best = None
    for combo in itertools.product(*(list(sens[n]) for n in names)):
        c = sum(cost[n][b] for n, b in zip(names, combo))
        s = sum(sens[n][b] for n, b in zip(names, combo))
        if c <= capacity and (best is None or s < best):
            best = s
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_optimal_and_within_budget(seed):
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(5)]
    weights = {n: rng.randint(10, 5000) for n in names}
    sens = {n: {b: rng.random() * 2.0 ** -b * rng.randint(1, 20) for b in (2, 4, 8)} for n in names}
    cost = {n: {b: weights[n] * b for b in (2, 4, 8)} for n in names}
    capacity = rng.uniform(2.5, 6.0) * sum(weights.values())
    plan = allocate_bits(sens, cost, capacity)
    used = sum(cost[n][b] for n, b in plan.items())
    assert used <= capacity
    got = sum(sens[n][b] for n, b in plan.items())
    # Costs are rounded up to 1/4000 of the capacity, so the DP may only miss plans within that slack.
    assert got <= _brute_force(sens, cost, capacity * (1 - 5 * 1 / 4000)) + 1e-12
    assert got >= _brute_force(sens, cost, capacity) - 1e-12


def test_allocation_rejects_infeasible_budget():
    with pytest.raises(ConfigError, match="budget cannot be met"):
        allocate_bits({"a": {2: 0.1, 8: 0.0}}, {"a": {2: 200.0, 8: 800.0}}, 100.0)


def test_sensitivity_falls_with_bits(digits_data, trained_lenet5):
    sens, layers = measure_sensitivity(trained_lenet5, MixedPrecision(learned_step=False), digits_data.val)
    assert list(layers) == ["conv1", "conv2", "fc1", "fc2"]
    for name, s in sens.items():
        assert s[2] > s[4] > s[8] >= 0, name
    acc, _ = measure_sensitivity(trained_lenet5, MixedPrecision(metric="accuracy"), digits_data.val)
    assert all(-0.05 <= v <= 1 for s in acc.values() for v in s.values())


def test_plan_meets_size_budget_and_converts(digits_data, trained_lenet5):
    cfg = MixedPrecision(budget=0.1, candidate_bits=(2, 3, 4, 8),
                         finetune=TrainConfig(epochs=1, lr=1e-4, max_steps=20, progress=False))
    model, plan = quantize_mixed(trained_lenet5, cfg, data=digits_data.train, calibration_data=digits_data.val)
    assert plan.fraction <= 0.1
    total_bits = 32 * sum(p.numel() for p in trained_lenet5.parameters())
    weight_bits = sum(plan.weights[n] * b for n, b in plan.bits.items())
    fixed_bits = 32 * (sum(p.numel() for p in trained_lenet5.parameters()) - sum(plan.weights.values()))
    assert plan.fraction == pytest.approx((weight_bits + fixed_bits) / total_bits)
    assert plan.bits["fc1"] <= 3 < max(plan.bits.values())  # fc1 holds 93% of the weights: it must go low
    for name, bits in plan.bits.items():
        layer = model.get_submodule(name)
        assert layer.bits == bits
        half = 2 ** (bits - 1) - 1
        assert layer.weight_codes.abs().max() <= half
    assert evaluate(model, digits_data.test) >= evaluate(trained_lenet5, digits_data.test) - 0.05
    assert set(plan.to_dict()["sensitivity"]["fc1"]) == {"2", "3", "4", "8"}


def test_bops_objective_with_activations(digits_data, trained_lenet5):
    cfg = MixedPrecision(budget=0.05, objective="bops", activation_bits=8, finetune=None)
    plan = mixed_precision_plan(trained_lenet5, cfg, digits_data.val)
    assert plan.macs == {"conv1": 288_000, "conv2": 1_600_000, "fc1": 400_000, "fc2": 5_000}
    assert plan.fraction <= 0.05
    assert plan.bits["conv2"] < 8  # conv2 dominates the MACs
    model, _ = quantize_mixed(trained_lenet5, cfg, calibration_data=digits_data.val)
    assert model.conv2.input_range == (0, 255)


def test_mixed_config_and_data_errors(trained_lenet5):
    with pytest.raises(ConfigError, match=r"candidate_bits entry=1"):
        MixedPrecision(candidate_bits=(1, 4))
    with pytest.raises(ConfigError, match="budget"):
        MixedPrecision(budget=0)
    with pytest.raises(ConfigError, match="objective"):
        MixedPrecision(objective="latency_ms")
    with pytest.raises(DataError, match="pass data="):
        quantize_mixed(trained_lenet5, MixedPrecision(finetune=None))
    with pytest.raises(ConfigError, match="budget cannot be met"):
        mixed_precision_plan(trained_lenet5, MixedPrecision(budget=0.02, candidate_bits=(4, 8)),
                             [(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))])
