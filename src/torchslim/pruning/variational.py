"""Sparse variational dropout (Molchanov, Ashukha & Vetrov, ICML 2017): sparsity learned with the network.

Each weight ``theta`` gets a learned noise variance ``sigma^2`` (``log_sigma2``); the layer computes with
``w = theta + sigma * eps`` (additive noise reparameterisation), sampled on the pre-activations (the local
reparameterisation trick: mean ``x @ theta`` and variance ``x^2 @ sigma^2``). The loss adds the KL divergence
of the log-uniform prior, approximated with the paper's k1, k2, k3, divided by the training-set size and
ramped in (warm-up). Weights whose ``log alpha = log sigma^2 - log theta^2`` ends above ``threshold`` carry only
noise: they become real zeros under the ``torch.nn.utils.prune`` masks the rest of the pipeline expects, and
the returned model is the plain model (no ``log_sigma2`` left behind).
"""

from __future__ import annotations

import dataclasses
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..core.config import Config
from ..core.checks import check_finite, check_fraction, check_nonnegative, check_positive
from ..core.errors import ConfigError, UnsupportedModelError
from ..data import check_loader
from ..metrics.evaluate import Metric
from ..nn.masks import effective
from ..nn.modules import check_patterns, match
from ..training.losses import LossFn
from ..training.train import TrainConfig, train

__all__ = ["VariationalDropout", "variational_prune", "kl_approx", "log_alpha", "vd_layers"]

K1, K2, K3 = 0.63576, 1.87320, 1.48695
_LOG_ALPHA_CLAMP = 8.0  # as the paper's code: keeps the KL's gradient finite for theta -> 0
_VD = (nn.Linear, nn.Conv2d)


@dataclasses.dataclass(frozen=True)
class VariationalDropout(Config):
    """Learn which weights to drop with sparse variational dropout, then zero them for real.

    ``train``: the training run (Adam at 1e-3 for tens of epochs from a trained model is typical; weight
    decay stays off, the KL term is the regulariser). ``kl_weight`` scales the KL term (1: the ELBO);
    ``warmup``: fraction of the steps over which its weight ramps linearly from 0. ``threshold``: weights
    with ``log alpha`` above it are pruned (3: dropout rate above 0.95). ``log_sigma2_init``: initial noise.
    ``dataset_size``: training examples the KL is divided by (None: read from the loader).
    Linear and Conv2d layers are trained; ``exclude`` names layers (fnmatch patterns) to leave dense.
    """

    train: TrainConfig = TrainConfig(epochs=10, lr=1e-3, optimizer="adam")
    kl_weight: float = 1.0
    warmup: float = 0.3
    threshold: float = 3.0
    log_sigma2_init: float = -10.0
    dataset_size: int | None = None
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        check_nonnegative("kl_weight", self.kl_weight)
        check_fraction("warmup", self.warmup, allow_one=True)
        check_finite("threshold", self.threshold)
        check_finite("log_sigma2_init", self.log_sigma2_init)
        if self.dataset_size is not None:
            check_positive("dataset_size", self.dataset_size, integer=True)
        if isinstance(self.exclude, str):
            raise ConfigError(f"exclude must be a list of layer-name patterns, got the string {self.exclude!r}")


def vd_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Linear and Conv2d layers of ``model`` by name, minus those matching an ``exclude`` pattern."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _VD) and match(name, exclude) is None}


def log_alpha(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """``log sigma^2 - log theta^2``, clamped to [-8, 8]."""
    return torch.clamp(log_sigma2 - torch.log(theta * theta + 1e-8), -_LOG_ALPHA_CLAMP, _LOG_ALPHA_CLAMP)


def kl_approx(log_alpha_: torch.Tensor) -> torch.Tensor:
    """Summed approximation of KL(q(w) || log-uniform prior) (Molchanov et al. 2017, eq. 14), >= 0 up to rounding."""
    neg_kl = K1 * torch.sigmoid(K2 + K3 * log_alpha_) - 0.5 * F.softplus(-log_alpha_) - K1
    return -neg_kl.sum()


class _VDLayer(nn.Module):
    """Wraps a Linear/Conv2d during training: ``theta`` is the layer's weight, plus ``log_sigma2``."""

    def __init__(self, layer: nn.Module, keep: torch.Tensor | None, log_sigma2_init: float, threshold: float):
        super().__init__()
        self.layer = layer
        self.log_sigma2 = nn.Parameter(torch.full_like(layer.weight, log_sigma2_init))
        self.register_buffer("keep", keep if keep is not None else torch.ones_like(layer.weight, dtype=torch.bool))
        self.threshold = threshold

    def log_alpha(self) -> torch.Tensor:
        return log_alpha(self.layer.weight, self.log_sigma2)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            return F.conv2d(x, weight, bias, layer.stride, 0, layer.dilation, layer.groups)
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.layer.weight * self.keep
        if not self.training:  # the deterministic network the thresholding will produce
            return self._op(x, theta * (self.log_alpha() < self.threshold), self.layer.bias)
        mean = self._op(x, theta, self.layer.bias)
        var = self._op(x * x, torch.exp(self.log_sigma2) * self.keep, None)
        return mean + torch.sqrt(var + 1e-8) * torch.randn_like(mean)


def _dataset_size(loader, config: VariationalDropout) -> int:
    if config.dataset_size is not None:
        return config.dataset_size
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        pass
    try:
        return len(loader) * int(loader.batch_size)
    except (AttributeError, TypeError) as e:
        raise ConfigError("VariationalDropout divides the KL by the training-set size, which this loader does not "
                          "tell (no len(loader.dataset)): set VariationalDropout.dataset_size") from e


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent).add_module(child, module)


def variational_prune(model: nn.Module, config: VariationalDropout, data, val_data=None, *,
                      loss_fn: LossFn | str | None = None, metric: Metric | None = None) -> dict[str, float]:
    """Train ``model`` in place with sparse variational dropout, then mask the weights whose log alpha exceeds
    ``config.threshold``; returns the per-layer sparsity. Weights already masked stay zero."""
    check_loader(data, "data (VariationalDropout learns which weights to drop by training)")
    check_patterns("VariationalDropout.exclude", config.exclude, vd_layers(model), "Linear/Conv2d")
    layers = vd_layers(model, tuple(config.exclude))
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no Linear/Conv2d layer for variational dropout "
                                    f"(after exclude={list(config.exclude)})")
    size = _dataset_size(data, config)
    wrappers: dict[str, _VDLayer] = {}
    for name, layer in layers.items():
        if not torch.isfinite(effective(layer).detach()).all():
            raise UnsupportedModelError(f"layer {name!r} has NaN/inf weights; fix or retrain the model first")
        keep = None
        if hasattr(layer, "weight_mask"):  # an earlier pruning's mask: fold it in, keep it as a constraint
            keep = layer.weight_mask.detach().bool()
            torch_prune.remove(layer, "weight")
        wrappers[name] = _VDLayer(layer, keep, config.log_sigma2_init, config.threshold).train(layer.training)
        _swap(model, name, wrappers[name])
    ramp = {"factor": 0.0}

    def on_step(step: int, total: int) -> None:
        ramp["factor"] = config.kl_weight * min(1.0, (step + 1) / max(1.0, config.warmup * total))

    def penalty(_: nn.Module) -> torch.Tensor:
        kl = sum(kl_approx(w.log_alpha()[w.keep]) for w in wrappers.values())
        return ramp["factor"] * kl / size

    try:
        train(model, data, config.train, val_loader=val_data, loss_fn=loss_fn, metric=metric, penalty=penalty,
              on_step=on_step)
    finally:
        masks = {}
        for name, w in wrappers.items():
            with torch.no_grad():
                masks[name] = w.keep & (w.log_alpha() < config.threshold)
            _swap(model, name, w.layer)
    for name, mask in masks.items():
        torch_prune.custom_from_mask(layers[name], "weight", mask)
    return {name: 1.0 - int(mask.count_nonzero()) / mask.numel() for name, mask in masks.items()}

