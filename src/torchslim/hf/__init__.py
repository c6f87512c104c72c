"""Hugging Face ``transformers`` models: text data, sentence-embedding metrics, CPU serving, recipe factories."""

from __future__ import annotations

# Text data, the STS metric, ONNX Runtime serving and recipe factories.
from .data import check_tokenizer, read_columns, stsb, stsb_sentences, text_loader
from .metrics import embed, mean_pool, spearman, spearman_metric, spearman_unit
from .recipe import pretrained, stsb_splits, text_splits
from .serve import OrtModel, compile_cpu, export_transformer, fuse, quantize_int8

__all__ = ["text_loader", "read_columns", "stsb", "stsb_sentences", "check_tokenizer", "mean_pool", "embed",
           "spearman", "spearman_metric", "spearman_unit", "pretrained", "text_splits", "stsb_splits",
           "export_transformer", "fuse", "quantize_int8", "OrtModel", "compile_cpu"]
