"""Knowledge-distillation config."""

from __future__ import annotations

import dataclasses

from ..core.config import Config
from ..core.checks import check_choice, check_fraction, check_nonnegative, check_positive
from ..core.errors import ConfigError
from ..training.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class Distillation(Config):
    """Train a student to mimic a frozen teacher (Hinton et al. 2015; FitNets hints, Romero et al. 2015).

    ``mode="logits"``: loss = ``alpha`` * T^2 * KL(teacher_T || student_T) + (1 - ``alpha``) * cross-entropy
    on the labels, with T = ``temperature`` (``alpha=1`` needs no labels).
    ``mode="outputs"``: pure output matching, no labels at all (unlabelled data, embedding models);
    ``output_loss`` is ``mse``, ``cosine`` (1 - cosine similarity along dim 1) or ``similarity`` (the batch's
    pairwise cosine similarities matched, so student and teacher widths may differ: a hidden-size-pruned student).
    ``feature_layers`` maps student layer names to teacher layer names whose outputs are matched with MSE
    (weighted by ``feature_weight``); a learned 1x1 conv / linear projection maps student widths to teacher
    widths when they differ; a layer returning a tuple (``transformers`` blocks) is matched on its first element.
    ``pooling="mean"`` averages (N, L, C) outputs over the batch's ``attention_mask`` before matching (sentence
    embeddings: ``mode="outputs", output_loss="cosine", pooling="mean"``). ``attention_layers`` maps student
    attention modules to teacher attention modules (MiniLM / TinyBERT style): their attention probabilities,
    averaged over heads (head counts may differ), are matched with KL(teacher || student) over the keys, padded
    keys and queries left out by the batch's ``attention_mask``, weighted by ``attention_weight``. The modules must
    return ``(output, probabilities, ...)`` as ``transformers``' eager attention does (BERT-family
    ``...attention.self``, DistilBERT ``...attention``); ``transformers`` models are switched to eager attention
    while they distil and switched back afterwards, and the matched student modules run without attention
    dropout. ``cache_teacher`` memoises teacher
    outputs per input sample, which pays off when the same fixed (unaugmented) data set is seen for several
    epochs. ``train`` defaults to 10 epochs: a student starts untrained, and one epoch leaves a half-width LeNet-5
    on digits at about 30% accuracy.
    """

    temperature: float = 4.0
    alpha: float = 0.9
    mode: str = "logits"
    output_loss: str = "mse"
    feature_layers: dict[str, str] | None = None
    feature_weight: float = 1.0
    attention_layers: dict[str, str] | None = None
    attention_weight: float = 1.0
    cache_teacher: bool = False
    pooling: str | None = None
    train: TrainConfig = TrainConfig(epochs=10)

    def validate(self) -> None:
        check_positive("temperature", self.temperature)
        check_fraction("alpha", self.alpha, allow_one=True)
        check_choice("mode", self.mode, ("logits", "outputs"))
        check_choice("output_loss", self.output_loss, ("mse", "cosine", "similarity"))
        if self.pooling is not None:
            check_choice("pooling", self.pooling, ("mean",))
        check_nonnegative("feature_weight", self.feature_weight)
        check_nonnegative("attention_weight", self.attention_weight)
        _check_layer_map("feature_layers", self.feature_layers)
        _check_layer_map("attention_layers", self.attention_layers)
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}")


def _check_layer_map(name: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{name} must be a non-empty mapping {{student layer: teacher layer}} or None, got {value!r}")
    for s, t in value.items():
        if not isinstance(s, str) or not isinstance(t, str):
            raise ConfigError(f"{name} entries must map layer names to layer names, got {s!r}: {t!r}")
