"""Soft weight-sharing (Ullrich, Meeds & Welling, ICLR 2017): a Gaussian-mixture prior learned with the network.

Starting from a trained model, the network is retrained with an extra loss term: minus the log-likelihood of
its weights under a mixture of ``components`` Gaussians plus one fixed at zero with a large mixing proportion,
with Gamma hyper-priors on the components' precisions and (when it is learned) a Beta hyper-prior on the zero
component's proportion. Means, variances and proportions are learned with the weights, which gather around
the means. At the end, components closer than ``merge`` standard deviations are merged, each weight takes the
mean of its most responsible component (exactly 0 for the zero component; a short settling run with those
zeros masked lets the other weights adapt first), and the layers become the k-means
weight-sharing layers of :mod:`torchslim.quantization.sharing` (codes into a per-layer codebook), whose codes
the checkpoint's entropy coders store.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..core.config import Config
from ..core.checks import check_fraction, check_nonnegative, check_positive, check_range
from ..core.errors import ConfigError, UnsupportedModelError
from ..data import check_loader
from ..metrics.evaluate import Metric
from ..nn.masks import effective
from ..nn.modules import check_patterns, copy_model
from ..training.losses import LossFn
from ..training.train import TrainConfig, default_device, train
from .sharing import MAX_BITS, replace_with_shared, shareable_layers

__all__ = ["SoftWeightSharing", "apply_soft_sharing", "GaussianMixture"]

# The authors' learning rates relative to the weights' (5e-4): means 1e-4, log-variances and proportions 3e-3.
# Adam's steps scale with the learning rate and not with the gradient, so scaling a parameter scales its rate.
_MEAN_RATE, _VAR_RATE, _MIX_RATE = 0.2, 6.0, 6.0
_LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass(frozen=True)
class SoftWeightSharing(Config):
    """Retrain with a learned Gaussian-mixture prior on the weights, then share each component's mean.

    ``components``: non-zero mixture components (the zero component comes on top). ``zero_mixing``: mixing
    proportion of the zero component; fixed unless ``zero_prior`` > 0, which learns it under a Beta prior of
    that concentration centred on ``zero_mixing``. ``tau``: weight of the prior term against the data term
    (both per training example; ``dataset_size`` examples, None: read from the loader). ``gamma_zero`` and
    ``gamma``: (shape, rate) of the Gamma priors on the zero and the other components' precisions.
    ``merge``: components whose means are closer than this many standard deviations merge.
    ``train``: the retraining run (needs ``data``); ``settle``: a further run, still under the prior, with the
    weights the zero component claims masked to zero (the many near-zero weights add up, and zeroing them at
    once costs accuracy that a short run with the rest free recovers; None: assign at once); ``finetune``:
    optional fine-tuning of the shared values after the hard assignment. ``exclude``: fnmatch patterns of
    Linear/Conv layers to leave as they are.
    """

    components: int = 16
    zero_mixing: float = 0.999
    zero_prior: float = 0.0
    tau: float = 5e-3
    gamma_zero: tuple[float, float] = (5000.0, 2.0)
    gamma: tuple[float, float] = (250.0, 0.1)
    merge: float = 1.0
    train: TrainConfig = TrainConfig(epochs=10, lr=5e-4, optimizer="adam")
    settle: TrainConfig | None = TrainConfig(epochs=2, lr=5e-4, optimizer="adam")
    finetune: TrainConfig | None = None
    dataset_size: int | None = None
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        check_range("components", self.components, 1, (1 << MAX_BITS) - 1, integer=True)
        check_fraction("zero_mixing", self.zero_mixing, allow_zero=False)
        check_nonnegative("zero_prior", self.zero_prior)
        check_nonnegative("tau", self.tau)
        for name in ("gamma_zero", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)):
                raise ConfigError(f"{name} must be (shape, rate), two positive numbers, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        check_nonnegative("merge", self.merge)
        if self.dataset_size is not None:
            check_positive("dataset_size", self.dataset_size, integer=True)
        if isinstance(self.exclude, str):
            raise ConfigError(f"exclude must be a list of layer-name patterns, got the string {self.exclude!r}")


class _NearNLL(torch.autograd.Function):
    """``-sum_i log sum_j pi_j N(w_i | mu_j, var_j)`` over the zero component and the two components whose means
    bracket ``w_i`` (the two outermost beyond either end; exact with up to two non-zero components), with
    hand-written gradients. The other components' terms are negligible once they are a few standard deviations
    apart, and leaving them out makes a training step's prior term ~4x cheaper than the full
    ``n x components`` graph (which dominated LeNet-300-100's steps). Component gradients are summed with
    ``bincount``, serially, so runs repeat exactly."""

    @staticmethod
    def forward(ctx, w, means, log_var, log_mix):
        j, shape = means.numel(), w.shape
        w = w.reshape(-1)
        if j == 2:  # one non-zero component: it is every weight's only neighbour
            cols = torch.tensor([0, 1], device=w.device).expand(w.numel(), 2)
        else:
            order = torch.argsort(means[1:]) + 1
            # The two neighbours in mean order; beyond either end, the two outermost components.
            right = torch.searchsorted(means[order].contiguous(), w.detach()).clamp_(1, j - 2)
            cols = torch.stack([torch.zeros_like(right), order[right - 1], order[right]], 1)
        d = w.reshape(-1, 1) - means[cols]
        prec = torch.exp(-log_var)
        p = prec[cols]
        lj = d * d * p
        lj.mul_(-0.5).add_((log_mix - 0.5 * (_LOG_2PI + log_var))[cols])
        lse = torch.logsumexp(lj, 1, keepdim=True)
        r = lj.sub_(lse).exp_()  # responsibilities
        rd = r * d * p
        flat = cols.reshape(-1)

        def per_component(values: torch.Tensor) -> torch.Tensor:
            return torch.bincount(flat, weights=values.reshape(-1), minlength=j).to(means.dtype)

        ctx.save_for_backward(rd.sum(1).reshape(shape), -per_component(rd),
                              0.5 * per_component(r - rd * d), -per_component(r))
        return -lse.sum()

    @staticmethod
    def backward(ctx, g):
        return tuple(g * t for t in ctx.saved_tensors)


class GaussianMixture(nn.Module):
    """The prior: component 0 is fixed at mean 0; means, log-variances and proportions are learned."""

    table_params = ("_means", "_log_var", "_logits", "_zero_logit")  # the prior, not weights

    def __init__(self, weights: torch.Tensor, config: SoftWeightSharing):
        super().__init__()
        j = config.components
        lo, hi = float(weights.min()), float(weights.max())
        spread = max(hi - lo, 1e-3)
        means = torch.linspace(lo, hi, j + 2)[1:-1] if j > 1 else torch.tensor([hi if hi > -lo else lo])
        self._means = nn.Parameter(means / _MEAN_RATE)
        self._log_var = nn.Parameter(torch.full((j + 1,), 2 * math.log(spread / (4 * j))) / _VAR_RATE)
        self._logits = nn.Parameter(torch.zeros(j))
        zero = math.log(config.zero_mixing / max(1e-12, 1 - config.zero_mixing))
        self._zero_logit = nn.Parameter(torch.tensor(zero / _MIX_RATE), requires_grad=config.zero_prior > 0)
        self.config = config

    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(means incl. the zero component, log-variances, log mixing proportions)."""
        means = torch.cat([self._means.new_zeros(1), self._means * _MEAN_RATE])
        zero = self._zero_logit * _MIX_RATE
        log_mix = torch.cat([nn.functional.logsigmoid(zero).reshape(1),
                             nn.functional.logsigmoid(-zero) + torch.log_softmax(self._logits * _MIX_RATE, 0)])
        return means, self._log_var * _VAR_RATE, log_mix

    def complexity(self, w: torch.Tensor) -> torch.Tensor:
        """-log p(w, mu, sigma, pi): the weights' negative log-likelihood minus the hyper-priors' log densities."""
        means, log_var, log_mix = self.params()
        nll = _NearNLL.apply(w, means, log_var, log_mix)
        precision_log = -log_var
        (a0, b0), (a, b) = self.config.gamma_zero, self.config.gamma
        shape = torch.tensor([a0] + [a] * self.config.components, dtype=w.dtype, device=w.device)
        rate = torch.tensor([b0] + [b] * self.config.components, dtype=w.dtype, device=w.device)
        hyper = ((shape - 1) * precision_log - rate * torch.exp(precision_log)).sum()
        if self.config.zero_prior > 0:
            s, p = self.config.zero_prior, self.config.zero_mixing
            log_pi0 = log_mix[0]
            log_rest = torch.log1p(-torch.exp(log_pi0).clamp(max=1 - 1e-7))
            hyper = hyper + (s * p - 1) * log_pi0 + (s * (1 - p) - 1) * log_rest
        return nll - hyper

    @torch.no_grad()
    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Components after merging neighbours closer than ``merge`` standard deviations: (means, log-variances,
        log proportions), zero component first; merged means are proportion-weighted (the zero stays 0)."""
        means, log_var, log_mix = (t.detach().double() for t in self.params())
        groups: list[list[int]] = [[0]]
        order = [int(i) for i in torch.argsort(means[1:]) + 1]
        for i in order:
            last = groups[-1] if len(groups) > 1 else None
            j = last[-1] if last else None
            if j is not None and abs(float(means[i] - means[j])) < self.config.merge * math.exp(
                    0.5 * max(float(log_var[i]), float(log_var[j]))):
                last.append(i)
            else:
                groups.append([i])
        out_m, out_v, out_p = [], [], []
        for g in groups:
            idx = torch.tensor(g)
            p = torch.softmax(log_mix[idx], 0)
            out_m.append(0.0 if g == [0] else float((p * means[idx]).sum()))
            out_v.append(float(torch.log((p * torch.exp(log_var[idx])).sum())))
            out_p.append(float(torch.logsumexp(log_mix[idx], 0)))
        return torch.tensor(out_m), torch.tensor(out_v), torch.tensor(out_p)


def _dataset_size(loader, config: SoftWeightSharing) -> int:
    if config.dataset_size is not None:
        return config.dataset_size
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError) as e:
        raise ConfigError("SoftWeightSharing weighs its prior per training example, and this loader does not tell "
                          "how many there are (no len(loader.dataset)): set SoftWeightSharing.dataset_size") from e


def _free_weights(layers: dict[str, nn.Module]) -> torch.Tensor:
    """The weights the prior sees: every unmasked weight of ``layers``, flattened (pruned ones stay zero)."""
    parts = []
    for m in layers.values():
        w = effective(m)
        mask = getattr(m, "weight_mask", None)
        parts.append(w[mask.bool()] if mask is not None else w.reshape(-1))
    return torch.cat(parts)


def _assign(mixture: GaussianMixture, weight: torch.Tensor, mask: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codebook, codes)`` of one layer: each weight's most responsible merged component, 0 for the zero one."""
    means, log_var, log_mix = mixture.merged()
    w = weight.detach().to("cpu", torch.float64).reshape(-1)
    d = w.reshape(-1, 1) - means
    best = torch.argmax(log_mix - 0.5 * (log_var + d * d * torch.exp(-log_var)), dim=1)
    if mask is not None:
        best[~mask.to("cpu").bool().reshape(-1)] = 0
    best[w == 0] = 0
    used = torch.unique(best[best > 0])
    codebook = means[used].float()  # ascending: the merged means are sorted
    rank = torch.zeros(means.numel(), dtype=torch.int64)
    rank[used] = torch.arange(1, used.numel() + 1)
    codes = rank[best].to(torch.int16).reshape(weight.shape)
    return (codebook if codebook.numel() else torch.zeros(1)), codes


def apply_soft_sharing(model: nn.Module, config: SoftWeightSharing, *, data=None, val_data=None,
                       loss_fn: LossFn | str | None = None, metric: Metric | None = None,
                       inplace: bool = False) -> nn.Module:
    """Retrain ``model`` under a learned Gaussian-mixture prior and return it with shared-weight layers.

    ``data`` trains (with ``loss_fn``, default cross-entropy; ``metric`` on ``val_data`` after each epoch).
    Pruned weights (zeros under ``torch.nn.utils.prune`` masks) stay zero. Returns a copy unless ``inplace``.
    """
    if not isinstance(config, SoftWeightSharing):
        raise ConfigError(f"apply_soft_sharing takes a SoftWeightSharing config, got {type(config).__name__}")
    check_loader(data, "data (soft weight-sharing retrains the model under its mixture prior)")
    check_patterns("SoftWeightSharing.exclude", config.exclude, shareable_layers(model), "Linear/Conv")
    if not inplace:
        model = copy_model(model)
    layers = shareable_layers(model, tuple(config.exclude))
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no Linear/Conv layer to share "
                                    f"(after exclude={list(config.exclude)})")
    start = _free_weights(layers).detach()
    if not torch.isfinite(start).all():
        raise UnsupportedModelError("the model has NaN/inf weights; soft weight-sharing would be meaningless. Fix "
                                    "or retrain the model first.")
    device = torch.device(config.train.device) if config.train.device else default_device()
    mixture = GaussianMixture(start.cpu(), config).to(device)  # where train() moves the model
    scale = config.tau / _dataset_size(data, config)

    def penalty(_: nn.Module) -> torch.Tensor:
        return scale * mixture.complexity(_free_weights(layers))

    train(model, data, config.train, val_loader=val_data, loss_fn=loss_fn, metric=metric, penalty=penalty,
          extra_params=[p for p in mixture.parameters() if p.requires_grad])
    if config.settle is not None:
        for module in layers.values():
            _, codes = _assign(mixture, effective(module), getattr(module, "weight_mask", None))
            keep = (codes != 0).to(effective(module).device)
            if hasattr(module, "weight_mask"):
                module.weight_mask.mul_(keep.to(module.weight_mask.dtype))
            else:
                torch_prune.custom_from_mask(module, "weight", keep)
        train(model, data, config.settle, val_loader=val_data, loss_fn=loss_fn, metric=metric, penalty=penalty,
              extra_params=[p for p in mixture.parameters() if p.requires_grad])
    bits = max(1, math.ceil(math.log2(config.components + 1)))
    for name, module in layers.items():
        codebook, codes = _assign(mixture, effective(module), getattr(module, "weight_mask", None))
        replace_with_shared(model, name, codebook, codes, bits)
    if config.finetune is not None:
        train(model, data, config.finetune, val_loader=val_data, loss_fn=loss_fn, metric=metric)
    return model
