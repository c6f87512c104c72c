"""The pruning techniques' descriptors: apply, family, order rules and search spaces."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..core.config import Config
from ..core.rates import int_choice, soften_field
from ..core.technique import FieldSpace, SearchSpace, Technique
from ..export.checkpoint import ModuleCodec
from ..nn.attention import PrunedMultiheadAttention
from . import prune
from . import nm
from .config import Schedule, SemiStructuredPruning, StructuredPruning, UnstructuredPruning
from .graph import build_groups
from .unstructured import prunable_layers
from .variational import VariationalDropout

SPARSITY_GRID = (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
RATIO_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_QUANTIZED = "pruning after quantization breaks the quantized weights; quantize last"


def _prunable(config: Config, model: nn.Module, example_inputs: Any) -> list[tuple[str, Any]]:
    return [(name, None) for name in prunable_layers(model, tuple(config.exclude))]


def _leaders(config: Config, model: nn.Module, example_inputs: Any) -> list[tuple[str, Any]]:
    return [(g.leader, None) for g in build_groups(model, example_inputs, tuple(config.exclude)) if g.prunable]


def _all_leaders(config: Config, model: nn.Module, example_inputs: Any) -> list[str]:
    return [g.leader for g in build_groups(model, example_inputs, tuple(config.exclude))]


def _no_schedule(config: Config) -> Config:
    changes: dict[str, Any] = {"schedule": Schedule()}
    if getattr(config, "bn_penalty", 0):
        changes["bn_penalty"] = 0.0
    return config.replace(**changes)


def _apply_unstructured(config: Config, values: dict[str, Any]) -> Config:
    v = values.get("sparsity", config.sparsity)
    return config.replace(sparsity=v) if v != {} else config


def _apply_structured(config: Config, values: dict[str, Any]) -> Config:
    v = values.get("ratio", config.ratio)
    if v == {}:
        return config
    return config.replace(ratio=v, scope="layer") if isinstance(v, dict) else config.replace(ratio=v)


UNSTRUCTURED = Technique(
    config=UnstructuredPruning, apply=prune, family="unstructured", codecs=nm.CODECS,
    cannot_follow={"quantize": _QUANTIZED},
    search=SearchSpace(
        fields=(FieldSpace("sparsity", low=0.0, high=0.99, mild=0.0, grid=SPARSITY_GRID, layers=_prunable),),
        apply=_apply_unstructured, oneshot=_no_schedule, soften=soften_field("sparsity")))

def _attention_args(m: PrunedMultiheadAttention) -> dict[str, Any]:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "head_dim": m.head_dim, "kdim": m.kdim,
            "vdim": m.vdim, "out_dim": m.out_dim, "bias": m.has_bias,
            "add_bias_kv": m.bias_k is not None, "add_zero_attn": m.add_zero_attn, "dropout": m.dropout,
            "batch_first": m.batch_first}


# Structured pruning swaps nn.MultiheadAttention layers that lose heads for this one.
ATTENTION_CODEC = ModuleCodec(PrunedMultiheadAttention, _attention_args, lambda a: PrunedMultiheadAttention(**a))

STRUCTURED = Technique(
    config=StructuredPruning, apply=prune, family="structured", codecs=(ATTENTION_CODEC,),
    cannot_follow={"unstructured": "structured pruning refuses layers that carry unstructured masks; put "
                                   "StructuredPruning before UnstructuredPruning",
                   "quantize": _QUANTIZED},
    search=SearchSpace(
        fields=(FieldSpace("ratio", low=0.0, high=0.9, mild=0.0, grid=RATIO_GRID, layers=_leaders,
                           valid=_all_leaders, reduces=frozenset({"size", "macs", "latency"})),),
        apply=_apply_structured, oneshot=_no_schedule, soften=soften_field("ratio")))

def _apply_nm(config: Config, values: dict[str, Any]) -> Config | None:
    n = int(values.get("n", config.n))
    return None if n >= config.m else config.replace(n=n)  # n = m keeps every weight: nothing to do


def _soften_nm(config: Config, factor: float) -> Config | None:
    n = min(config.m, math.ceil(config.n / factor))
    return None if n >= config.m or n == config.n else config.replace(n=n)


SEMI_STRUCTURED = Technique(
    config=SemiStructuredPruning, apply=prune, family="unstructured", codecs=nm.CODECS,
    cannot_follow={"quantize": _QUANTIZED},
    search=SearchSpace(
        # Weights kept per group of m (4 by default): 4 is dense, 2 is 2:4.
        fields=(FieldSpace("n", low=1, high=4, mild=4, grid=(3, 2, 1), encode=int_choice, choices=(4, 3, 2, 1)),),
        apply=_apply_nm, oneshot=_no_schedule, soften=_soften_nm))


# The KL weight sets how much accuracy sparse variational dropout trades for sparsity (0: none pruned). A
# one-shot scan trains one step, which prunes next to nothing: the scan sees the mild end.
KL_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
VARIATIONAL = Technique(
    config=VariationalDropout, apply=prune, family="unstructured",
    cannot_follow={"quantize": _QUANTIZED},
    search=SearchSpace(
        fields=(FieldSpace("kl_weight", low=0.0, high=4.0, mild=0.0, grid=KL_GRID),),
        apply=lambda config, values: config.replace(**values),
        oneshot=lambda config: config.replace(train=config.train.replace(max_steps=1)),
        soften=soften_field("kl_weight")))

TECHNIQUES = (UNSTRUCTURED, STRUCTURED, SEMI_STRUCTURED, VARIATIONAL)
