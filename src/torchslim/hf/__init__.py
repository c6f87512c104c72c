"""Hugging Face ``transformers`` models: architecture adapters, structured pruning (heads, FFN neurons, hidden size),
layer-dropping students, text data, sentence-embedding metrics, CPU serving and recipe factories."""

from __future__ import annotations

from .api import prune, prune_transformer
from .arch import ARCHS, arch_of, build_model, hidden_size, is_transformers_model, layer_shapes, supported
from .data import check_tokenizer, read_columns, stsb, stsb_sentences, text_loader
from .metrics import embed, mean_pool, spearman, spearman_metric, spearman_unit
from .recipe import pretrained, stsb_splits, text_splits
from .saving import factory_kwargs, from_pretrained, save
from .serve import OrtModel, compile_cpu, export_transformer, fuse, quantize_int8
from .structure import leaders, prune_heads, prune_structure, sync_config
from .students import drop_layers

__all__ = ["prune", "prune_transformer", "prune_structure", "prune_heads", "drop_layers", "save", "from_pretrained",
           "factory_kwargs", "leaders", "layer_shapes", "hidden_size", "sync_config", "arch_of", "build_model",
           "supported", "is_transformers_model", "ARCHS",
           "text_loader", "read_columns", "stsb", "stsb_sentences", "check_tokenizer", "mean_pool", "embed",
           "spearman", "spearman_metric", "spearman_unit", "pretrained", "text_splits", "stsb_splits",
           "export_transformer", "fuse", "quantize_int8", "OrtModel", "compile_cpu"]
