"""Recipes: one YAML file names the model, the data, the metric and the ordered compression stages.

.. code-block:: yaml

    model: {builtin: lenet5, train: {epochs: 12, lr: 2.0e-3}}   # or {factory: "pkg.module:build", weights: w.pt}
    data: {builtin: digits}                                       # or {factory: "pkg.module:loaders"}
    metric: accuracy                                              # or "pkg.module:fn", fn(model, loader) -> float
    budget: {max_accuracy_drop: 0.01}
    stages:
      - {name: prune, type: UnstructuredPruning, sparsity: 0.9}
      - {name: finetune, type: Finetune, train: {epochs: 2}}

Each stage maps one-to-one onto a config of the Python API: ``type`` is the config class name (a technique in
the registry, :data:`torchslim.techniques.BUILTIN` unless another is passed) and the other keys are its fields
(nested configs such as ``schedule`` or ``train`` are nested mappings). Everything is validated before any work
starts, and errors point at the line: ``recipe.yaml:12: stages[1].sparsity: must satisfy 0 <= sparsity < 1, got
1.2``.

:mod:`.schema` holds the dataclasses, :mod:`.yaml_source` the YAML with line numbers, :mod:`.parse` the
validation and :mod:`.build` what turns a recipe into a model, data and a metric.
"""

from .build import (
    build_data,
    build_model,
    check_against_model,
    import_callable,
    load_checkpoint,
    metric_function,
    reseed,
    save_kwargs,
    trusted_code,
)
from .parse import load_recipe, parse_recipe, recipe_from_dict
from .schema import (OBJECTIVES, STAGE_KEYS, BudgetSpec, DataSpec, GuardSpec, ModelSpec, Recipe, SearchSpec,
                     StageSpec)
from .yaml_source import RecipeError

__all__ = ["Recipe", "ModelSpec", "DataSpec", "StageSpec", "BudgetSpec", "GuardSpec", "SearchSpec", "RecipeError",
           "load_recipe", "parse_recipe", "recipe_from_dict", "check_against_model", "import_callable",
           "build_model", "build_data", "metric_function", "save_kwargs", "reseed", "load_checkpoint", "trusted_code", "OBJECTIVES", "STAGE_KEYS"]
