"""Sentence-embedding quality: mean pooling over the attention mask and the STS Spearman metric."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import DataError
from ..data.batches import call_model, output_tensor, to_device
from ..metrics.evaluate import model_device

__all__ = ["mean_pool", "embed", "spearman", "spearman_metric", "spearman_unit", "rank"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the token states over the attention mask (sentence-transformers' pooling); 2-D inputs are
    already sentence embeddings and come back unchanged."""
    if hidden.dim() == 2:
        return hidden
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(model: nn.Module, inputs: dict[str, torch.Tensor], *, normalize: bool = True) -> torch.Tensor:
    """L2-normalised, mean-pooled sentence embeddings of one dict batch (float32, on the CPU)."""
    device = model_device(model)
    hidden = output_tensor(call_model(model, to_device(inputs, device))).float().cpu()
    pooled = mean_pool(hidden, inputs.get("attention_mask"))
    return F.normalize(pooled, dim=-1) if normalize else pooled


def rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given their average rank (as scipy.stats.rankdata)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique_consecutive(sorted_x, return_inverse=True)
    mean_rank = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks[order])
    mean_rank /= torch.bincount(inverse, minlength=len(uniq)).double()
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (Pearson correlation of their ranks)."""
    ra, rb = rank(a.flatten()), rank(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


def spearman_metric(model: nn.Module, loader: Any) -> float:
    """STS quality x100: Spearman correlation between the cosine similarity of the two sentences' embeddings
    and the gold score, over a loader of ``(inputs_a, inputs_b, scores)`` batches (:func:`torchslim.hf.stsb`).
    Usable as any verb's ``metric=``; the model's train/eval mode is restored."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    sims, gold = [], []
    try:
        for batch in loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[0], dict)):
                raise DataError("spearman_metric reads (inputs_a, inputs_b, scores) batches of sentence pairs; "
                                "build the loader with torchslim.hf.stsb(...) or yield that form")
            a, b, y = batch
            sims.append((embed(model, a) * embed(model, b)).sum(-1))
            gold.append(y.float())
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    if not sims:
        raise DataError("spearman_metric got an empty loader")
    return 100.0 * spearman(torch.cat(sims), torch.cat(gold))


def spearman_unit(model: nn.Module, loader: Any) -> float:
    """:func:`spearman_metric` / 100, on the 0-1 scale of recipe budgets (``max_accuracy_drop: 0.003`` is 0.3
    Spearman points)."""
    return spearman_metric(model, loader) / 100.0
