"""Text data for Hugging Face models: CSV/TSV columns -> dynamically padded dict batches of their tokenizer.

A sample is a tuple of strings (one per text column) plus an optional float/int label. Single-text loaders yield
``{"input_ids", "attention_mask", ..., "labels"?}`` dicts (the batch contract of :mod:`torchslim.data.batches`);
pair loaders (:func:`stsb`) yield ``(inputs_a, inputs_b, scores)`` for :func:`torchslim.hf.metrics.spearman`.
Every batch is padded to its own longest sequence, so batch size and length vary.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from ..core.errors import ConfigError, DataError

__all__ = ["read_columns", "TextCollator", "text_loader", "stsb", "stsb_sentences", "check_tokenizer"]


def _column(name: int | str, header: list[str] | None, path: Path) -> int:
    if isinstance(name, int):
        return name
    if header is None or name not in header:
        raise ConfigError(f"{path}: no column {name!r}" + (f"; its header is {header}" if header else
                          "; the file has no header, name columns by index (0, 1, ...)"))
    return header.index(name)


def read_columns(path: str | os.PathLike, columns: Sequence[int | str], *, label: int | str | None = None,
                 delimiter: str | None = None, header: bool | None = None, quoting: bool = False,
                 limit: int | None = None) -> list[tuple[tuple[str, ...], Any]]:
    """``[(texts, label), ...]`` from a CSV/TSV file: ``columns`` (names from the header, or 0-based indices)
    hold the texts, ``label`` the target (parsed as a float; None for unlabelled text).

    ``delimiter`` defaults to a tab for ``.tsv``/``.txt`` and ``.csv`` files whose first line has a tab (STS-B),
    else a comma. ``header`` defaults to True when ``columns`` are names. ``quoting=False`` splits on the
    delimiter alone (STS-B's sentences hold unbalanced quotes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text data file {path} does not exist")
    if not columns:
        raise ConfigError("columns must name at least one text column")
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
        f.seek(0)
        if delimiter is None:
            delimiter = "\t" if path.suffix in (".tsv", ".txt") or "\t" in first else ","
        if header is None:
            header = any(isinstance(c, str) for c in list(columns) + [label])
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
        names = next(reader, None) if header else None
        idx = [_column(c, names, path) for c in columns]
        lab = None if label is None else _column(label, names, path)
        rows = []
        for n, row in enumerate(reader, start=2 if header else 1):
            if not row:
                continue
            need = max(idx + ([lab] if lab is not None else []))
            if len(row) <= need:
                raise DataError(f"{path}, line {n}: {len(row)} fields, column {need} needed (delimiter "
                                f"{delimiter!r}; quoting={quoting})")
            try:
                y = None if lab is None else float(row[lab])
            except ValueError:
                raise DataError(f"{path}, line {n}: label {row[lab]!r} is not a number") from None
            rows.append((tuple(row[i] for i in idx), y))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def check_tokenizer(tokenizer: Any, model: Any = None, *, max_length: int | None = None) -> None:
    """Raise a DataError/ConfigError, before any work, when ``tokenizer`` cannot feed ``model``: token ids past
    the model's vocabulary (a tokenizer of another model) or ``max_length`` past its position embeddings."""
    config = getattr(model, "config", None)
    if config is None:
        return
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table only "
                        f"{vocab}: tokenizer and model do not belong together; load both from the same folder "
                        "(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path))")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length is not None and max_length > positions:
        raise ConfigError(f"max_length={max_length} exceeds the model's {positions} position embeddings; "
                          f"use max_length <= {positions}")


class TextCollator:
    """Tokenises a list of ``(texts, label)`` samples into one dynamically padded dict batch (or a
    ``(inputs_a, inputs_b, labels)`` tuple when ``pairs``)."""

    def __init__(self, tokenizer: Any, *, max_length: int = 128, pairs: bool = False):
        self.tokenizer, self.max_length, self.pairs = tokenizer, max_length, pairs

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        enc = dict(enc)
        # [UNK] is content (a word the vocabulary lacks); [CLS], [SEP], [PAD] alone mean empty text
        special = set(getattr(self.tokenizer, "all_special_ids", ())) - {getattr(self.tokenizer, "unk_token_id", None)}
        ids, mask = enc["input_ids"], enc["attention_mask"]
        content = (mask.bool() & ~torch.isin(ids, torch.tensor(sorted(special), dtype=ids.dtype))).any(1)
        if not content.all():
            bad = [texts[i] for i in range(len(texts)) if not content[i]][:3]
            raise DataError(f"text that tokenizes to nothing but special tokens: {bad!r}; drop empty or "
                            "whitespace-only rows from the data")
        return enc

    def __call__(self, samples: list[tuple[tuple[str, ...], Any]]):
        labels = [y for _, y in samples]
        target = None if labels[0] is None else torch.tensor(labels, dtype=torch.float32)
        if self.pairs:
            return (self.encode([t[0] for t, _ in samples]), self.encode([t[1] for t, _ in samples]), target)
        texts = [t[0] if len(t) == 1 else t for t, _ in samples]
        if len(samples[0][0]) == 1:
            batch = self.encode(texts)
        else:  # a sentence pair in one sequence (cross-encoders, NLI classifiers)
            batch = dict(self.tokenizer([t[0] for t in texts], [t[1] for t in texts], padding=True,
                                        truncation=True, max_length=self.max_length, return_tensors="pt"))
        if target is not None:
            batch["labels"] = target
        return batch


def text_loader(tokenizer: Any, path: str | os.PathLike, columns: Sequence[int | str], *,
                label: int | str | None = None, batch_size: int = 32, max_length: int = 128, shuffle: bool = False,
                seed: int = 0, model: Any = None, limit: int | None = None, **read: Any) -> DataLoader:
    """A DataLoader of dict batches (``input_ids``, ``attention_mask``, ... and ``labels`` when ``label`` is
    given) from the ``columns`` of a CSV/TSV file; two columns make one pair-encoded sequence. ``model``
    (optional) is checked against the tokenizer first (:func:`check_tokenizer`)."""
    check_tokenizer(tokenizer, model, max_length=max_length)
    rows = read_columns(path, columns, label=label, limit=limit, **read)
    return _loader(rows, TextCollator(tokenizer, max_length=max_length), batch_size, shuffle, seed)


def _loader(rows: list, collate: TextCollator, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate)


def _stsb_path(data_dir: str | os.PathLike, split: str) -> Path:
    if split not in ("train", "dev", "test"):
        raise ConfigError(f"STS-B split must be 'train', 'dev' or 'test', got {split!r}")
    return Path(data_dir) / f"sts-{split}.csv"


def stsb(tokenizer: Any, data_dir: str | os.PathLike, split: str = "dev", *, batch_size: int = 64,
         max_length: int = 128, model: Any = None, limit: int | None = None) -> DataLoader:
    """STS Benchmark sentence pairs as ``(inputs_a, inputs_b, gold_scores)`` batches (the original tab-separated
    files, no header, no quoting: fields 4, 5, 6 are score, sentence1, sentence2)."""
    check_tokenizer(tokenizer, model, max_length=max_length)
    rows = read_columns(_stsb_path(data_dir, split), (5, 6), label=4, delimiter="\t", header=False, limit=limit)
    return _loader(rows, TextCollator(tokenizer, max_length=max_length, pairs=True), batch_size, False, 0)


def stsb_sentences(tokenizer: Any, data_dir: str | os.PathLike, split: str = "train", *, batch_size: int = 32,
                   max_length: int = 128, shuffle: bool = False, seed: int = 0, model: Any = None,
                   limit: int | None = None) -> DataLoader:
    """The distinct sentences of an STS-B split (unlabelled) as dict batches: calibration and distillation data."""
    check_tokenizer(tokenizer, model, max_length=max_length)
    pairs = read_columns(_stsb_path(data_dir, split), (5, 6), delimiter="\t", header=False)
    sentences = list(dict.fromkeys(s for texts, _ in pairs for s in texts))[:limit]
    return _loader([((s,), None) for s in sentences], TextCollator(tokenizer, max_length=max_length),
                   batch_size, shuffle, seed)
