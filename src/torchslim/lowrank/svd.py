"""Truncated SVD of Linear layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init


def linear_svd(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of the layer's effective weight, in float64 on the CPU for accuracy."""
    w = layer.weight.detach().to("cpu", torch.float64)
    return torch.linalg.svd(w, full_matrices=False)


def svd_max_rank(layer: nn.Linear) -> int:
    return min(layer.in_features, layer.out_features)


def svd_params(layer: nn.Linear, rank: int) -> int:
    return rank * (layer.in_features + layer.out_features) + (layer.out_features if layer.bias is not None else 0)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of the sum of squared singular values."""
    sq = singular_values.double() ** 2
    total = sq.sum()
    if total <= 0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    # The tolerance stops rounding error from demanding one more rank at energy=1.0.
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1


def svd_linear(layer: nn.Linear, rank: int, usv: tuple | None = None) -> tuple[nn.Sequential, float]:
    """``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``; returns it and the relative weight error.

    The singular values are split evenly (sqrt) between the two factors so that both train at similar scales.
    """
    u, s, vh = usv if usv is not None else linear_svd(layer)
    root = s[:rank].sqrt()
    first = skip_init(nn.Linear, layer.in_features, rank, bias=False, dtype=torch.float64)
    second = skip_init(nn.Linear, rank, layer.out_features, bias=layer.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        first.weight.copy_(root[:, None] * vh[:rank])
        second.weight.copy_(u[:, :rank] * root[None, :])
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach().double())
    total = (s ** 2).sum()
    error = float(((s[rank:] ** 2).sum() / total).sqrt()) if total > 0 else 0.0
    ref = layer.weight
    return nn.Sequential(first, second).to(device=ref.device, dtype=ref.dtype), error


__all__ = ["linear_svd", "svd_max_rank", "svd_params", "energy_rank", "svd_linear"]
