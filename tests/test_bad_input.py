"""Bad input is refused before any work, with a torchslim error naming the field, layer or path and the fix.

One row per case: ``(id, call, error type, regex the message must match)``."""

import math
import os
import time
import warnings

import pytest
import torch
from torch import nn

import torchslim
from torchslim import (CP, QAT, SVD, BinaryWeights, CheckpointError, ConfigError, Distillation, DynamicQuantization,
                       Float8, MixedPrecision, Schedule, StaticQuantization, StructuredPruning, TernaryWeights,
                       TrainConfig, Tucker, UnstructuredPruning, UnsupportedModelError, WeightOnly, WeightSharing)
from torchslim.core.errors import WriteError
from torchslim.core.files import atomic_write, writable_folder
from torchslim.lowrank import decompose
from torchslim.pipeline.recipe import (GuardSpec, RecipeError, SearchSpec, check_against_model, load_recipe,
                                      parse_recipe)
from torchslim.pruning import prune
from torchslim.pruning.structured import structured_prune
from torchslim.quantization.convert import apply_dynamic, apply_weight_only
from torchslim.quantization.qat import LayerQuant
from torchslim.quantization.sharing import apply_weight_sharing
from torchslim.quantization.spec import QuantSpec
from torchslim.search.options import SearchOptions

NAN, INF = math.nan, math.inf


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Recurrent(nn.Module):
    """An LSTM with projections (proj_size), whose hidden units structured pruning keeps."""

    def __init__(self, hidden: bool):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True, proj_size=4)
        self.fc = nn.Linear(4, 16) if hidden else None
        self.out = nn.Linear(16 if hidden else 4, 3)

    def forward(self, x):
        y = self.lstm(x)[0][:, -1]
        return self.out(torch.relu(self.fc(y))) if self.fc is not None else self.out(y)


def nan_weights() -> nn.Module:
    model = Named()
    with torch.no_grad():
        model.fc2.weight[0, 0] = NAN
    return model


# ---- configs: every numeric field refuses NaN/inf and out-of-range values -----------------------------------------
CONFIGS = [
    ("distill-temperature-nan", lambda: Distillation(temperature=NAN), "temperature.*finite"),
    ("distill-temperature-inf", lambda: Distillation(temperature=INF), "temperature.*finite"),
    ("distill-alpha-nan", lambda: Distillation(alpha=NAN), "alpha.*finite"),
    ("distill-feature-weight-inf", lambda: Distillation(feature_weight=INF), "feature_weight.*finite"),
    ("train-epochs-nan", lambda: TrainConfig(epochs=NAN), "epochs.*finite"),
    ("train-epochs-inf", lambda: TrainConfig(epochs=INF), "epochs.*finite"),
    ("train-lr-nan", lambda: TrainConfig(lr=NAN), "lr.*finite"),
    ("train-lr-inf", lambda: TrainConfig(lr=INF), "lr.*finite"),
    ("train-momentum-negative", lambda: TrainConfig(momentum=-0.5), "momentum must be a number >= 0"),
    ("train-momentum-nan", lambda: TrainConfig(momentum=NAN), "momentum.*finite"),
    ("train-weight-decay-negative", lambda: TrainConfig(weight_decay=-1e-4), "weight_decay must be a number >= 0"),
    ("train-weight-decay-inf", lambda: TrainConfig(weight_decay=INF), "weight_decay.*finite"),
    ("train-max-steps-float", lambda: TrainConfig(max_steps=1.5), "max_steps must be a positive integer"),
    ("schedule-steps-inf", lambda: Schedule(kind="iterative", steps=INF, finetune=TrainConfig()), "schedule.steps"),
    ("unstructured-sparsity-nan", lambda: UnstructuredPruning(sparsity=NAN), "sparsity.*finite"),
    ("unstructured-layer-sparsity-nan", lambda: UnstructuredPruning(sparsity={"fc1": NAN}), r"sparsity\['fc1'\]"),
    ("structured-max-ratio-inf", lambda: StructuredPruning(max_ratio=INF), "max_ratio.*finite"),
    ("structured-bn-penalty-nan", lambda: StructuredPruning(bn_penalty=NAN), "bn_penalty.*finite"),
    ("structured-bn-penalty-negative", lambda: StructuredPruning(bn_penalty=-1.0), "bn_penalty must be a number >= 0"),
    ("svd-energy-nan", lambda: SVD(energy=NAN), "energy.*finite"),
    ("tucker-ratio-inf", lambda: Tucker(ratio=INF), "ratio.*finite"),
    ("cp-tol-nan", lambda: CP(rank=2, tol=NAN), "tol.*finite"),
    ("layerquant-threshold-inf", lambda: LayerQuant(weight="ternary", threshold=INF), "threshold.*finite"),
    ("ternary-threshold-nan", lambda: TernaryWeights(threshold=NAN), "threshold.*finite"),
    ("mixed-budget-nan", lambda: MixedPrecision(budget=NAN), "budget.*finite"),
    ("static-percentile-nan", lambda: StaticQuantization(percentile=NAN), "percentile.*finite"),
    ("float8-min-speedup-inf", lambda: Float8(min_speedup=INF), "min_speedup.*finite"),
    ("quantspec-group-size-nan", lambda: QuantSpec(granularity="group", group_size=NAN), "group_size"),
    ("search-drop-nan", lambda: SearchOptions(max_accuracy_drop=NAN), "max_accuracy_drop.*finite"),
    ("sharing-bits-zero", lambda: WeightSharing(bits=0), "bits must be an integer in 1..14"),
    ("sharing-seed-too-big", lambda: WeightSharing(seed=2**64), "seed must be in"),
    ("cp-seed-negative", lambda: CP(rank=2, seed=-1), "seed must be in"),
    ("guard-retries-float", lambda: GuardSpec(retries=1.5), "retries must be an integer"),
    ("guard-milder-nan", lambda: GuardSpec(milder=NAN), "milder.*finite"),
    ("search-trials-inf", lambda: SearchSpec(trials=INF), "trials must be a positive integer"),
]


@pytest.mark.parametrize("make, pattern", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_config_refuses(make, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make()


# ---- layer patterns that match nothing, and layers a technique cannot take ---------------------------------------
def _example():
    return torch.randn(2, 6)


MODELS = [
    ("unstructured-exclude", lambda: prune(Named(), UnstructuredPruning(exclude=("no_such_layer",))), ConfigError,
     r"UnstructuredPruning.exclude: pattern 'no_such_layer' matches no Linear/Conv layer; layers are: fc1, fc2, head"),
    ("unstructured-exclude-close", lambda: prune(Named(), UnstructuredPruning(exclude=("fc3",))), ConfigError,
     r"pattern 'fc3' matches no Linear/Conv layer \(did you mean 'fc2', 'fc1'\?\)"),
    ("unstructured-exclude-one-of-two", lambda: prune(Named(), UnstructuredPruning(exclude=("fc1", "fc_9"))),
     ConfigError, "pattern 'fc_9'"),
    ("structured-exclude", lambda: structured_prune(Named(), StructuredPruning(exclude=("nope*",)), _example()),
     ConfigError, "StructuredPruning.exclude: pattern 'nope\\*' matches no layer"),
    ("sharing-exclude", lambda: apply_weight_sharing(mlp(), WeightSharing(bits=1, exclude=("fc",))), ConfigError,
     "WeightSharing.exclude: pattern 'fc' matches no Linear/Conv layer; layers are: 0, 2"),
    ("qat-exclude", lambda: QAT(exclude=("fc9",)).layer_plan(Named()), ConfigError,
     "QAT.exclude: pattern 'fc9' matches no layer"),
    ("binary-exclude", lambda: BinaryWeights(exclude=("head2",)).layer_plan(Named()), ConfigError,
     "BinaryWeights.exclude: pattern 'head2' .*did you mean 'head'"),
    ("dynamic-exclude", lambda: apply_dynamic(Named(), DynamicQuantization(exclude=("fc1", "missing"))), ConfigError,
     "DynamicQuantization.exclude: pattern 'missing' matches no layer"),
    ("weight-only-exclude", lambda: apply_weight_only(Named(), WeightOnly(exclude=("x",))), ConfigError,
     "WeightOnly.exclude: pattern 'x' matches no layer"),
    ("svd-layers", lambda: decompose(Named(), SVD(rank=2, layers=("fc_1",))), ConfigError,
     "SVD.layers: pattern 'fc_1' matches no Linear layer.*did you mean 'fc1'"),
    ("svd-exclude", lambda: decompose(Named(), SVD(rank=2, exclude=("classifier",))), ConfigError,
     "SVD.exclude: pattern 'classifier' matches no Linear layer"),
    ("tucker-layers", lambda: decompose(Named(), Tucker(ranks=2, layers=("fc1",))), ConfigError,
     "Tucker.layers: pattern 'fc1' matches no Conv2d layer; layers are: none"),
    ("svd-nan-weights", lambda: decompose(nan_weights(), SVD(rank=2)), UnsupportedModelError,
     "Linear layer 'fc2' has NaN/inf weights.*exclude=\\('fc2',\\)"),
    ("unstructured-nan-weights", lambda: prune(nan_weights(), UnstructuredPruning()), UnsupportedModelError,
     "layer 'fc2' has NaN/inf weights"),
    ("structured-nan-weights", lambda: structured_prune(nan_weights(), StructuredPruning(), _example()),
     UnsupportedModelError, "layer 'fc2' has NaN/inf values in 'weight'"),
    ("sharing-nan-weights", lambda: apply_weight_sharing(nan_weights(), WeightSharing()), UnsupportedModelError,
     "layer 'fc2' has NaN/inf weights"),
    ("structured-lstm-nothing-prunable",
     lambda: structured_prune(Recurrent(hidden=False), StructuredPruning(), torch.randn(2, 5, 6)),
     UnsupportedModelError, r"no channel of Recurrent can be removed.*lstm \(LSTM\)"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in MODELS], ids=[c[0] for c in MODELS])
def test_model_input_refused(call, error, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(error, match=pattern):
            call()


def test_structured_pruning_names_the_layers_it_leaves():
    model = Recurrent(hidden=True)
    with pytest.warns(UserWarning, match=r"leaves 1 layer\(s\) as they are: lstm \(LSTM\).*register_op_rule"):
        summary = structured_prune(model, StructuredPruning(ratio=0.5), torch.randn(2, 5, 6))
    assert summary["removed_channels"] == {"fc": [16, 8]}


def test_sharing_with_one_bit_is_two_centroids():
    shared = apply_weight_sharing(mlp(), WeightSharing(bits=1))
    assert shared[0].codebook.numel() == 2


def test_save_refuses_nonfinite_weights(tmp_path):
    with pytest.raises(CheckpointError, match="tensor 'fc2.weight' has NaN/inf values.*allow_nonfinite=True"):
        torchslim.save(nan_weights(), tmp_path / "m.slim", factory=f"{__name__}:Named")
    assert not list(tmp_path.iterdir())


def test_save_nonfinite_on_request(tmp_path):
    path = torchslim.save(nan_weights(), tmp_path / "m.slim", factory=f"{__name__}:Named", allow_nonfinite=True)
    assert torch.isnan(torchslim.load(path, trusted=(__name__,)).fc2.weight[0, 0])


# ---- files and folders that cannot be written ---------------------------------------------------------------------
def test_save_into_unwritable_folder(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    target = tmp_path / "ro" / "m.slim"
    (tmp_path / "ro").mkdir()
    with pytest.raises(CheckpointError, match=f"cannot write {target}: Permission denied; choose an output folder"):
        torchslim.save(Named(), target, factory=f"{__name__}:Named")


@pytest.mark.parametrize("write", [
    lambda p: atomic_write(p / "report.json", b"{}"),
    lambda p: writable_folder(p / "out"),
], ids=["atomic-write", "output-folder"])
def test_folder_under_a_file(tmp_path, write):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WriteError, match=f"cannot write {blocker}"):
        write(blocker)


def test_compress_refuses_unwritable_out_before_work(tmp_path):
    (tmp_path / "file").write_text("")
    recipe = parse_recipe("model: {builtin: lenet300}\ndata: {builtin: digits}\nstages:\n"
                          "  - {type: UnstructuredPruning}\n", "r.yaml")
    t0 = time.perf_counter()
    with pytest.raises(WriteError, match="cannot write .*file"):
        torchslim.compress(recipe, tmp_path / "file" / "out")
    assert time.perf_counter() - t0 < 5


# ---- recipes -----------------------------------------------------------------------------------------------------
HEAD = "model: {builtin: lenet5}\ndata: {builtin: digits}\n"
STAGE = "stages:\n  - {type: UnstructuredPruning, schedule: {kind: iterative, steps: 2, finetune: {%s}}}\n"
BOMB = (HEAD + "stages:\n  - {type: UnstructuredPruning}\nname: &a0 [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)))
CHAIN = HEAD + "k0: &c0 [1]\n" + "".join(f"k{i}: &c{i} [*c{i - 1}]\n" for i in range(1, 200))
RECIPES = [
    ("nan-lr", HEAD + STAGE % "lr: .nan", r"r.yaml:4: stages\[0\].schedule.finetune.lr: must be a finite number"),
    ("nan-epochs", HEAD + STAGE % "epochs: .nan", r"r.yaml:4: stages\[0\].schedule.finetune.epochs: .*finite"),
    ("inf-epochs", HEAD + STAGE % "epochs: .inf", r"r.yaml:4: .*finetune.epochs: .*got inf"),
    ("negative-momentum", HEAD + STAGE % "momentum: -0.5", r"r.yaml:4: .*finetune.momentum: must be a number >= 0"),
    ("nan-temperature", HEAD + "stages:\n  - {type: Distillation, temperature: .nan}\n",
     r"r.yaml:4: stages\[0\].temperature: must be a finite number"),
    ("nan-model-lr", "model: {builtin: lenet5, train: {lr: .nan}}\ndata: {builtin: digits}\nstages: "
                     "[{type: UnstructuredPruning}]\n", r"r.yaml:1: model.train.lr: must be a finite number"),
    ("nan-budget", HEAD + "budget: {max_accuracy_drop: .nan}\nstages: [{type: UnstructuredPruning}]\n",
     r"r.yaml:3: budget.max_accuracy_drop: must be a finite number"),
    ("seed-too-big", HEAD + f"seed: {2**64}\nstages: [{{type: UnstructuredPruning}}]\n",
     r"r.yaml:3: seed: must be in \[0, 2147483647\]"),
    ("seed-negative", HEAD + "seed: -1\nstages: [{type: UnstructuredPruning}]\n", r"r.yaml:3: seed: must be in"),
    ("type-mapping", HEAD + "stages:\n  - type: {a: 1}\n",
     r"r.yaml:4: stages\[0\].type: expected a stage type name \(a string\), got dict"),
    ("type-list", HEAD + "stages:\n  - {type: [UnstructuredPruning]}\n", r"r.yaml:4: stages\[0\].type: .*got list"),
    ("deep-flow", HEAD + "stages: " + "[" * 5000 + "]" * 5000 + "\n", r"r.yaml:3: nesting deeper than 32 levels"),
    ("deep-mapping", HEAD + "stages:\n  - {type: SVD, rank: " + "{a: " * 3000 + "1" + "}" * 3001 + "\n",
     r"r.yaml:4: nesting deeper than 32 levels"),
    ("alias-bomb", BOMB, r"r.yaml:10: aliases \(\*name\) here expand to more than 100000 values"),
    ("alias-chain", CHAIN, r"r.yaml:\d+: aliases \(\*name\) nest deeper than 32 levels"),
]


@pytest.mark.parametrize("text, pattern", [c[1:] for c in RECIPES], ids=[c[0] for c in RECIPES])
def test_recipe_refused(text, pattern):
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=pattern):
        parse_recipe(text, "r.yaml", resolve=False)
    assert time.perf_counter() - t0 < 5


def test_recipe_must_be_utf8(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(HEAD.encode() + b"# caf\xe9\nstages: [{type: UnstructuredPruning}]\n")
    with pytest.raises(RecipeError, match=r"latin.yaml:3: byte 0xe9 is not UTF-8; a recipe file must be UTF-8"):
        load_recipe(path, resolve=False)


def test_recipe_aliases_within_bounds_still_work():
    text = (HEAD + "stages:\n  - {type: UnstructuredPruning, schedule: {kind: iterative, steps: 2, "
            "finetune: &t {lr: 0.01}}}\n  - {type: Finetune, train: *t}\n")
    recipe = parse_recipe(text, "r.yaml", resolve=False)
    assert recipe.stages[1].config.train.lr == 0.01


def test_validate_reports_exclude_with_its_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + "stages:\n  - name: p\n    type: UnstructuredPruning\n    exclude: [fc1, fc9]\n")
    recipe = load_recipe(path)
    model = torchslim.models.build_model("lenet5")
    with pytest.raises(RecipeError, match=r"r.yaml:6: stages\[0\].exclude\[1\]: pattern 'fc9' matches no layer "
                                          r"of the model \(did you mean 'fc\d'\?\)"):
        check_against_model(recipe, model, (torch.randn(1, 1, 28, 28),))


# ---- data -------------------------------------------------------------------------------------------------------
DATA = [
    ("train-not-iterable", lambda: torchslim.train(Named(), 3, TrainConfig(progress=False)),
     torchslim.DataError, "training loader must be an iterable of batches .*got int"),
    ("train-empty", lambda: torchslim.train(Named(), [], TrainConfig(progress=False)), torchslim.DataError,
     "training loader is empty"),
    ("evaluate-none", lambda: torchslim.evaluate(Named(), None), torchslim.DataError, "required but None"),
    ("distill-not-iterable", lambda: torchslim.distill(Named(), Distillation(), teacher=Named(), data=1.5),
     torchslim.DataError, "distillation data must be an iterable of batches"),
    ("distill-old-form-config-third", lambda: torchslim.distill(Named(), Named(), Distillation()), ConfigError,
     r"the old form takes the data third"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in DATA], ids=[c[0] for c in DATA])
def test_data_refused(call, error, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(error, match=pattern):
            call()
