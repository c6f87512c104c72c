"""Every technique has one descriptor, and every descriptor's config round-trips through a recipe, a checkpoint
and (where it has one) its search space."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import torchslim
from torchslim.core.config import Config, config_from_dict
from torchslim.core.errors import ConfigError
from torchslim.core.technique import Technique, Techniques
from torchslim.models import LeNet5
from torchslim.pipeline.recipe import recipe_from_dict
from torchslim.search.knobs import build_knobs, stage_configs
from torchslim.techniques import BUILTIN

# One non-default example per technique: a new technique must add one here.
EXAMPLES = {
    "UnstructuredPruning": torchslim.UnstructuredPruning(sparsity={"fc1": 0.9, "conv2": 0.5}, method="obs"),
    "StructuredPruning": torchslim.StructuredPruning(ratio=0.3, importance="hessian"),
    "SemiStructuredPruning": torchslim.SemiStructuredPruning(n=1, m=4, method="obs"),
    "VariationalDropout": torchslim.VariationalDropout(kl_weight=0.5, exclude=("fc3",)),
    "QAT": torchslim.QAT(bits=4, learned_step=True),
    "BinaryWeights": torchslim.BinaryWeights(),
    "TernaryWeights": torchslim.TernaryWeights(),
    "MixedPrecision": torchslim.MixedPrecision(),
    "StaticQuantization": torchslim.StaticQuantization(observer="entropy"),
    "DynamicQuantization": torchslim.DynamicQuantization(),
    "WeightOnly": torchslim.WeightOnly(bits=4, method="gptq", group_size=0),
    "Float8": torchslim.Float8(),
    "WeightSharing": torchslim.WeightSharing(bits={"fc1": 3}),
    "SoftWeightSharing": torchslim.SoftWeightSharing(components=8, tau=0.01),
    "SVD": torchslim.SVD(rank=8),
    "Tucker": torchslim.Tucker(ranks=(4, 4)),
    "CP": torchslim.CP(rank=6),
    "Distillation": torchslim.Distillation(temperature=3.0, attention_weight=0.5,
                                           attention_layers={"layer.0.attention": "layer.1.attention"}),
    "Finetune": torchslim.Finetune(torchslim.TrainConfig(epochs=2, lr=1e-3)),
}


def _public_configs() -> set[type]:
    helpers = {torchslim.TrainConfig, torchslim.Schedule}  # parts of other configs, not techniques
    return {obj for name in torchslim.__all__ for obj in [getattr(torchslim, name)]
            if isinstance(obj, type) and issubclass(obj, Config) and obj is not Config and obj not in helpers}


def test_every_public_config_has_exactly_one_descriptor():
    registered = set(BUILTIN)
    assert _public_configs() <= registered, f"configs without a technique: {_public_configs() - registered}"
    assert sorted(BUILTIN.names()) == sorted(EXAMPLES), "EXAMPLES must cover every built-in technique"
    for t in BUILTIN.values():
        assert callable(t.apply) and t.family


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_config_round_trips_through_a_recipe(name):
    config = EXAMPLES[name]
    recipe = torchslim.Recipe(stages=[("s", config)])
    again = recipe_from_dict(recipe.to_dict(), resolve=False)
    assert again.stages[0].config == config
    assert BUILTIN.of(again.stages[0].config).name == name


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_config_round_trips_through_a_checkpoint(name, tmp_path):
    config = EXAMPLES[name]
    path = tmp_path / "m.slim"
    torchslim.save(LeNet5(), path, history=[config])
    (entry,) = torchslim.read_manifest(path)["history"]
    assert config_from_dict(entry) == config


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_compact_history_entries_round_trip(name):
    config = EXAMPLES[name]
    compact = config.to_dict(compact=True)
    assert config_from_dict(compact) == config
    assert len(json.dumps(compact)) <= len(json.dumps(config.to_dict()))
    try:
        default = type(config)()
    except (TypeError, ConfigError):  # a config with required fields
        return
    assert set(default.to_dict(compact=True)) == {"type", "version"}  # defaults are stored as the type alone


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if BUILTIN.named(n).search is not None))
def test_search_space_turns_knobs_into_valid_configs(name):
    config = EXAMPLES[name]
    # Start from a config whose searched field is a single value, so the search fills in per-layer values.
    space = BUILTIN.of(config).search
    field = space.fields[0].field
    defaults = {"sparsity": 0.5, "ratio": 0.3, "bits": 4, "rank": 4, "ranks": (4, 4), "n": 2, "kl_weight": 1.0,
                "components": 16}
    config = config.replace(**{field: defaults[field]})
    stage = torchslim.pipeline.recipe.StageSpec(name="s", config=config)
    model = LeNet5()
    knobs = build_knobs([stage], model, (torch.randn(1, 1, 28, 28),))
    assert knobs, f"{name}: no knob on LeNet-5"
    for pick in ("mild", "aggressive"):
        values = {k.name: (k.mild if pick == "mild" else k.aggressive()) for k in knobs}
        (out,) = stage_configs([stage], knobs, values)
        assert out is None or type(out) is type(config)
    softened = BUILTIN.soften(config, 0.5)
    assert softened is None or type(softened) is type(config)
    assert space.oneshot(config) is not None


def test_registry_rejects_duplicates_and_unknown_configs():
    technique = BUILTIN.named("SVD")
    with pytest.raises(ConfigError, match="already registered"):
        BUILTIN.copy().register(technique)

    @dataclasses.dataclass(frozen=True)
    class Unknown(Config):
        x: int = 1

    with pytest.raises(ConfigError, match="no technique is registered for Unknown"):
        BUILTIN.of(Unknown())
    with pytest.raises(ConfigError, match="unknown stage type 'Nope'"):
        BUILTIN.named("Nope")


def test_order_rules_come_from_the_descriptors():
    problems = BUILTIN.order_problems([torchslim.WeightSharing(bits=4), torchslim.UnstructuredPruning(0.5)])
    assert problems and problems[0][0] == 1 and "quantize last" in problems[0][1]
    assert not BUILTIN.order_problems([torchslim.StructuredPruning(0.3), torchslim.UnstructuredPruning(0.5)])


@dataclasses.dataclass(frozen=True)
class HalveWeights(Config):
    """A user's technique: scales every Linear weight (to prove a technique plugs in from outside)."""

    factor: float = 0.5


def _halve(model, config, *, data=None, val_data=None, example_inputs=None, loss_fn=None, metric=None):
    model = torchslim.nn.modules.copy_model(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.mul_(config.factor)
    return model


def test_a_user_technique_runs_in_the_stage_runner():
    from torchslim.data import digits
    from torchslim.pipeline.runner import StageInputs, run_stages

    registry = BUILTIN.copy()
    registry.register(Technique(config=HalveWeights, apply=_halve, family="other"))
    assert isinstance(registry, Techniques) and HalveWeights not in BUILTIN
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    data = digits(batch_size=32)
    inputs = StageInputs(data=data, example_inputs=data.example_inputs(), techniques=registry)
    out, records = run_stages(model, [("halve", HalveWeights(0.25))], inputs, measure=lambda m: {})
    assert torch.allclose(out[1].weight, model[1].weight * 0.25)
    assert records[0]["config"]["type"] == "HalveWeights"
