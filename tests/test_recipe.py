"""Recipes: line-precise validation before any work, the guarded pipeline, the report and the compress command."""

import argparse
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from torchslim import Config, ConfigError, Schedule, TorchslimError, TrainConfig, UnstructuredPruning
from torchslim.cli.commands import EXIT_BUDGET_MISSED, add_commands
from torchslim.core.technique import Technique
from torchslim.nn.modules import copy_model
from torchslim.pipeline.commands import BudgetMissedWarning, run_recipe
from torchslim.pipeline.guard import BudgetError, segments
from torchslim.pipeline.recipe import RecipeError, build_data, build_model, load_recipe, parse_recipe, recipe_from_dict
from torchslim.training.finetune import Finetune
from torchslim.techniques import BUILTIN

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# A LeNet-300-100 on the 8x8 digits trains in about a second: small enough for end-to-end runs.
TINY = """\
name: tiny
model: {builtin: lenet300, kwargs: {in_features: 64}, train: {epochs: 6, lr: 3.0e-3, progress: false}}
data: {builtin: digits, kwargs: {image_size: 8, val_fraction: 0.25}}
budget: {max_accuracy_drop: 0.02}
guard: {policy: POLICY}
stages:
  - name: prune
    type: UnstructuredPruning
    sparsity: SPARSITY
    check: false
  - {name: finetune, type: Finetune, train: {epochs: 1, lr: 1.0e-3, progress: false}}
"""


def tiny(tmp_path: Path, sparsity: float = 0.5, policy: str = "retry") -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("SPARSITY", str(sparsity)).replace("POLICY", policy))
    return path


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="torchslim")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_recipe_maps_one_to_one_onto_the_python_api():
    text = """\
model: {builtin: lenet5}
data: {builtin: digits}
stages:
  - name: prune
    type: UnstructuredPruning
    sparsity: {conv1: 0.5, fc1: 0.95}
    schedule: {kind: gradual, steps: 3, finetune: {epochs: 2, lr: 1e-3}}
  - {name: ft, type: Finetune, train: {epochs: 1}}
"""
    r = parse_recipe(text, source="r.yaml")
    want = UnstructuredPruning(sparsity={"conv1": 0.5, "fc1": 0.95},
                               schedule=Schedule("gradual", 3, TrainConfig(epochs=2, lr=1e-3)))
    assert r.stages[0].config == want
    assert r.stages[1].config == Finetune(TrainConfig(epochs=1))
    assert isinstance(r.stages[0].config.schedule.finetune.lr, float)  # "1e-3" is a number, not YAML 1.1's string
    assert r.line(("stages", 0, "sparsity", "fc1")) == 6
    again = recipe_from_dict(r.to_dict())
    assert again == r and again.key() == r.key()
    assert {"UnstructuredPruning", "StructuredPruning", "Finetune"} <= set(BUILTIN.names())


@pytest.mark.parametrize("body, expected", [
    ("  - {type: UnstructuredPruning, sparsity: 1.2}",
     "r.yaml:4: stages[0].sparsity: must satisfy 0 <= sparsity < 1, got 1.2"),
    ("  - {type: UnstructuredPruning, sparsty: 0.5}",
     "r.yaml:4: stages[0].sparsty: unknown key 'sparsty' for UnstructuredPruning (did you mean 'sparsity'?)"),
    ("  - type: Finetune\n    train: {epochs: two}",
     "r.yaml:5: stages[0].train.epochs: expected a number, got str 'two'"),
    ("  - type: UnstructuredPruning\n    schedule:\n      kind: weekly",
     "r.yaml:6: stages[0].schedule.kind: must be one of ['oneshot', 'iterative', 'gradual'], got 'weekly'"),
    ("  - {type: Pruning}", "r.yaml:4: stages[0].type: 'Pruning' is not a known stage type"),
    ("  - {type: TrainConfig}", "r.yaml:4: stages[0].type: 'TrainConfig' is a config but not a pipeline stage"),
    ("  - {sparsity: 0.5}", "r.yaml:4: stages[0]: missing 'type'"),
    ("  - {type: UnstructuredPruning, exclude: fc1}",
     "r.yaml:4: stages[0].exclude: expected a list of a string, got str 'fc1'"),
    ("  - {type: UnstructuredPruning, sparsity: {fc1: 2}}",
     "r.yaml:4: stages[0].sparsity['fc1']: must satisfy 0 <= sparsity['fc1'] < 1, got 2"),
    ("  - {type: UnstructuredPruning, check: maybe}", "r.yaml:4: stages[0].check: expected true/false"),
])
def test_validation_errors_name_the_line_and_the_field(body, expected):
    text = "model: {builtin: lenet5}\ndata: {builtin: digits}\nstages:\n" + body + "\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, source="r.yaml")
    assert str(err.value).startswith(expected), str(err.value)


def test_every_problem_is_reported_at_once_and_yaml_errors_have_lines():
    text = "modle: {builtin: lenet5}\ndata: {builtin: imagenet}\nbudget: {max_accuracy_drop: 2}\nstages: []\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, source="r.yaml")
    msg = str(err.value)
    assert "r.yaml:1: modle: unknown key 'modle' (did you mean 'model'?)" in msg
    assert "r.yaml:2: data.builtin: must be one of ['digits', 'mnist'], got 'imagenet'" in msg
    assert "r.yaml:3: budget.max_accuracy_drop: must satisfy 0 <= max_accuracy_drop < 1, got 2" in msg
    assert "r.yaml:4: stages: expected a non-empty list" in msg
    # A recipe file may leave out the model (Python passes it); building it then says what is missing.
    with pytest.raises(ConfigError, match=r"r.yaml names no model: add a model: section"):
        build_model(parse_recipe("data: {builtin: digits}\nstages: [{type: Finetune}]\n", source="r.yaml"))
    with pytest.raises(RecipeError, match=r"^r.yaml:4: invalid YAML: .*flow sequence that starts at line 3"):
        parse_recipe("model: {builtin: lenet5}\nstages:\n  - [unclosed\n", source="r.yaml")
    with pytest.raises(RecipeError, match=r"^r.yaml:4: invalid YAML: .*mapping values"):
        parse_recipe("model: {builtin: lenet5}\nstages:\n  - type: Finetune\n    train: epochs: 2\n", source="r.yaml")
    with pytest.raises(RecipeError, match=r"r.yaml:2: data: duplicate key 'data' \(first at line 1\)"):
        parse_recipe("data: {builtin: digits}\ndata: {builtin: mnist}\n", source="r.yaml")
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        parse_recipe("- just\n- a list\n", source="r.yaml")


def test_several_invalid_values_in_one_section_and_across_sections_come_in_one_error():
    # Before, a section stopped at its first invalid value and later checks waited for the next run.
    text = """\
model: {builtin: lenet55, train: {epochs: -3, lr: .nan}}
data: {builtin: digitz}
metric: acuracy
seed: -1
stages:
  - {name: prune, type: UnstructuredPruning, sparsity: 1.5, scope: everywhere}
  - {name: q, type: WeightSharing, bits: 99, finetune: {epochs: 1, lr: -1}}
  - {name: prune, type: StructuredPruning, ratio: 0.5}
"""
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, source="r.yaml")
    lines = str(err.value).splitlines()
    for expected in ("r.yaml:1: model.builtin: must be one of", "r.yaml:1: model.train.epochs: must be a positive",
                     "r.yaml:1: model.train.lr: must be a finite number", "r.yaml:2: data.builtin: must be one of",
                     "r.yaml:3: metric: must be 'accuracy' or a 'pkg.module:function'", "r.yaml:4: seed: must be",
                     "r.yaml:6: stages[0].sparsity: must satisfy", "r.yaml:6: stages[0].scope: must be one of",
                     "r.yaml:7: stages[1].bits: must be an integer", "r.yaml:7: stages[1].finetune.lr: must be",
                     "r.yaml:8: stages[2].name: duplicate stage name 'prune'"):
        assert sum(line.startswith(expected) for line in lines) == 1, (expected, lines)
    assert len(lines) == 11, lines


def test_contradicting_stages_and_unimportable_factories_fail_before_work(tmp_path):
    text = """\
model: {factory: "no_such_module:build"}
data: {builtin: digits}
metric: "also_missing:metric"
stages:
  - {name: a, type: UnstructuredPruning, sparsity: 0.5}
  - {name: a, type: StructuredPruning, ratio: 0.5}
"""
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, source="r.yaml", base_dir=tmp_path)
    msg = str(err.value)
    assert "r.yaml:1: model.factory: cannot import module 'no_such_module'" in msg
    assert "r.yaml:3: metric: cannot import module 'also_missing'" in msg
    assert "r.yaml:6: stages[1].name: duplicate stage name 'a'" in msg
    assert ("r.yaml:6: stages[1].type: StructuredPruning cannot follow UnstructuredPruning (stages[0]): structured "
            "pruning refuses layers that carry unstructured masks") in msg
    (tmp_path / "fact.py").write_text("def other():\n    pass\n")
    with pytest.raises(RecipeError, match="model.factory: module 'fact' has no attribute 'build'"):
        parse_recipe("model: {factory: 'fact:build'}\ndata: {builtin: digits}\nstages: [{type: Finetune}]\n",
                     source="r.yaml", base_dir=tmp_path)
    with pytest.raises(RecipeError, match=r"model.weights: file not found: .*missing.pt"):
        parse_recipe("model: {builtin: lenet5, weights: missing.pt}\ndata: {builtin: digits}\n"
                     "stages: [{type: Finetune}]\n", source="r.yaml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_per_layer_names_are_checked_against_the_model_before_training():
    text = """\
model: {builtin: lenet5, train: {epochs: 1000}}
data: {builtin: digits}
stages:
  - type: UnstructuredPruning
    sparsity:
      conv1: 0.5
      fc9: 0.9
"""
    recipe = parse_recipe(text, source="r.yaml")
    data = build_data(recipe)
    # 1000 epochs would take an hour: the error must come first.
    with pytest.raises(RecipeError, match=r"r.yaml:7: stages\[0\].sparsity\['fc9'\]: no layer 'fc9' in the model "
                                          r"for sparsity \(did you mean 'fc\d'\?\); "
                                          r"layers: \['conv1', 'conv2', 'fc1', 'fc2'\]"):
        build_model(recipe, data, check=True)


def test_guard_retries_a_stage_that_breaks_the_budget_and_the_report_says_so(tmp_path):
    out = tmp_path / "out"
    report = run_recipe(tiny(tmp_path, sparsity=0.995), out, log=lambda s: None)
    assert report["budget"]["met_val"] is True
    assert report["budget"]["final_val"] >= report["budget"]["baseline_val"] - 0.02
    events = report["guard"]["events"]
    assert events and events[0]["action"] == "retried" and events[0]["stages"] == ["prune", "finetune"]
    assert events[0]["attempts"][0]["val_accuracy"] < report["budget"]["baseline_val"] - 0.02
    used = report["stages"][0]["config"]["sparsity"]
    assert used < 0.995 and report["stages"][0]["guard"] == "retried"
    for name in ("report.json", "report.md", "model.slim", "accuracy_vs_size.png"):
        assert (out / name).is_file()
    assert json.loads((out / "report.json").read_text())["budget"] == report["budget"]
    md = (out / "report.md").read_text()
    assert "## Guard rails" in md and "**retried**" in md and "Budget met" in md
    from torchslim import evaluate
    from torchslim.export.checkpoint import load

    data = build_data(load_recipe(tmp_path / "tiny.yaml"))
    assert evaluate(load(out / "model.slim"), data.test) == pytest.approx(report["compressed"]["accuracy"])
    with pytest.raises(TorchslimError, match="exists; pass --overwrite"):
        run_recipe(tmp_path / "tiny.yaml", out, log=lambda s: None)


def test_rollback_warn_and_fail_policies(tmp_path):
    rolled = run_recipe(tiny(tmp_path, 0.995, "rollback"), tmp_path / "rb", log=lambda s: None)
    assert rolled["guard"]["events"][0]["action"] == "rolled_back"
    assert rolled["compressed"]["nonzero_params"] == rolled["baseline"]["nonzero_params"]
    assert rolled["budget"]["met_val"] is True

    with pytest.warns(BudgetMissedWarning, match="BUDGET MISSED"):
        warned = run_recipe(tiny(tmp_path, 0.995, "warn"), tmp_path / "warn", log=lambda s: None)
    assert warned["budget"]["met"] is False and warned["guard"]["events"][0]["action"] == "violated"
    assert "**BUDGET MISSED**" in (tmp_path / "warn" / "report.md").read_text()

    with pytest.raises(BudgetError, match="policy 'fail'"):
        run_recipe(tiny(tmp_path, 0.995, "fail"), tmp_path / "fail", log=lambda s: None)
    assert not (tmp_path / "fail" / "report.json").exists()  # no partial outputs presented as results


def test_compress_command_exit_codes(tmp_path, capsys):
    tiny(tmp_path, 0.995, "warn")
    assert cli(["compress", str(tmp_path / "tiny.yaml"), "--validate-only"]) == 0
    assert "layer names checked" in capsys.readouterr().out
    # --validate-only builds the (untrained) model, so a layer name it lacks is caught without any training.
    typo = (tmp_path / "tiny.yaml").read_text().replace("sparsity: 0.995", "sparsity: {fc9: 0.5}")
    (tmp_path / "typo.yaml").write_text(typo)
    with pytest.raises(RecipeError, match=r"typo.yaml:\d+: stages\[0\].sparsity\['fc9'\]: no layer 'fc9'"):
        cli(["search", str(tmp_path / "typo.yaml"), "--validate-only"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli(["compress", "--recipe", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "o")])
    assert code == EXIT_BUDGET_MISSED
    assert "BUDGET MISSED" in capsys.readouterr().err
    assert cli(["compress", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "o2"), "--overwrite",
                "--max-accuracy-drop", "0.99"]) == 0
    (tmp_path / "bad.yaml").write_text("model: {builtin: lenet5}\ndata: {builtin: digits}\nstages:\n"
                                       "  - {type: Finetune, train: {epochs: -1}}\n")
    with pytest.raises(RecipeError, match="bad.yaml:4: stages\\[0\\].train.epochs: must be a positive number"):
        cli(["compress", str(tmp_path / "bad.yaml")])


def test_custom_factories_next_to_the_recipe_run_end_to_end(tmp_path):
    report = run_recipe(RECIPES / "custom_model.yaml", tmp_path / "custom", log=lambda s: None)
    assert report["model"] == "my_model:build"
    sparsity = report["stages"][0]["config"]["sparsity"]
    assert sparsity == {"1": 0.8, "3": 0.8, "5": 0.3}
    assert report["ratios"]["nonzero_params"] > 2 and report["budget"]["met_val"]
    from torchslim.export.checkpoint import load

    model = load(tmp_path / "custom" / "model.slim", trusted=["my_model"])  # the recipe's own factory
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_segments_group_unchecked_stages_with_the_next_checked_one():
    from torchslim.pipeline.recipe import StageSpec

    s = [StageSpec("a", Finetune(), check=False), StageSpec("b", Finetune()), StageSpec("c", Finetune(), check=False)]
    assert segments(s) == [(0, 2), (2, 3)]


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_are_valid(path):
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        if "is a config but not a pipeline stage" in str(exc):
            pytest.skip(f"stage handler not registered yet: {exc}")
        raise
    assert recipe.stages
    if path.name.startswith("lenet5_") or path.name == "custom_model.yaml":  # ours: each states its budget
        assert recipe.budget.max_accuracy_drop is not None


@dataclasses.dataclass(frozen=True)
class ScaleWeights(Config):
    """A user's technique, known only to the registry passed in."""

    factor: float = 1.0


def _scale(model, config, *, data=None, val_data=None, example_inputs=None, loss_fn=None, metric=None):
    model = copy_model(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data.mul_(config.factor)
    return model


def test_a_recipe_names_a_technique_of_the_registry_it_is_given(tmp_path):
    registry = BUILTIN.copy()
    registry.register(Technique(config=ScaleWeights, apply=_scale, family="scale",
                                cannot_follow={"quantize": "scaling breaks quantized weights"}))
    text = TINY.replace("POLICY", "warn").replace(
        "  - name: prune\n    type: UnstructuredPruning\n    sparsity: SPARSITY\n    check: false\n",
        "  - {name: scale, type: ScaleWeights, factor: 1.0}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:7: stages\[0\].type: 'ScaleWeights' is a config but not a "
                                          r"pipeline stage"):
        parse_recipe(text, source="r.yaml")
    assert parse_recipe(text, techniques=registry).stages[0].config == ScaleWeights(1.0)
    with pytest.raises(RecipeError, match=r"r.yaml:4: stages\[1\].type: ScaleWeights cannot follow WeightSharing "
                                          r"\(stages\[0\]\): scaling breaks quantized weights"):
        parse_recipe("data: {builtin: digits}\nstages:\n  - {type: WeightSharing, bits: 4}\n"
                     "  - {type: ScaleWeights}\n", source="r.yaml", techniques=registry)
    (tmp_path / "r.yaml").write_text(text)
    report = run_recipe(tmp_path / "r.yaml", tmp_path / "out", techniques=registry, log=lambda s: None)
    assert [s["config"]["type"] for s in report["stages"]] == ["ScaleWeights", "Finetune"]
