"""k-means weight sharing (Deep Compression, Han et al. 2016).

Each shared layer keeps integer ``codes`` (one per weight) and a trainable ``codebook`` of at most
``2**bits`` centroids; the layer computes with ``weight = [0, *codebook][codes]``. Code 0 is the fixed
zero of pruned weights, so pruned weights stay exactly zero and are never trained. Because the weight
is an index into the codebook, autograd sums the gradients of all weights of a cluster into its
centroid: the paper's centroid fine-tuning falls out of ``loss.backward()``.

In a ``.slim`` checkpoint the codes are entropy-coded (:mod:`torchslim.export.coding`: Huffman or ANS,
whichever is smaller per layer, relative indices for the pruned positions) and the codebook is fp32.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Config
from ..core.checks import check_choice, check_range
from ..data import check_loader
from ..core.errors import ConfigError, TorchslimError, UnsupportedModelError
from ..export.checkpoint import ModuleCodec
from ..metrics.evaluate import Metric
from ..training.losses import LossFn
from ..training.train import TrainConfig, train
from ..nn.inference import float_layer
from ..nn.masks import effective
from ..nn.modules import check_patterns, copy_model, decoded_once, match

__all__ = ["WeightSharing", "apply_weight_sharing", "SharedLinear", "SharedConv1d", "SharedConv2d",
           "SharedConv3d", "SharedWeight", "kmeans_codebook", "sharing_summary", "MAX_BITS"]

MAX_BITS = 14  # codes are int16: 2**14 centroids plus the zero code fit
_SHAREABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class WeightSharing(Config):
    """Cluster each layer's weights into ``2**bits`` shared values (k-means), then fine-tune the centroids.

    ``bits``: one width for every Linear/Conv layer, or {layer name: bits} to share only those layers.
    ``init``: centroid initialisation, ``linear`` (evenly spaced between the smallest and largest weight;
    the paper's choice, it keeps the rare large weights), ``density`` (quantiles) or ``random`` (Forgy).
    ``exclude``: fnmatch patterns of layers to leave as they are. ``finetune``: centroid fine-tuning run
    (needs ``data``); None skips it. ``seed`` seeds ``random`` initialisation.
    """

    bits: int | dict[str, int] = 5
    init: str = "linear"
    exclude: tuple[str, ...] = ()
    finetune: TrainConfig | None = None
    seed: int = 0

    def validate(self) -> None:
        rates = self.bits.items() if isinstance(self.bits, dict) else [(None, self.bits)]
        if isinstance(self.bits, dict) and not self.bits:
            raise ConfigError("bits: per-layer mapping is empty; give {layer name: bits} or one int")
        for layer, b in rates:
            name = "bits" if layer is None else f"bits[{layer!r}]"
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BITS:
                raise ConfigError(f"{name} must be an integer in 1..{MAX_BITS}, got {b!r}")
        check_choice("init", self.init, ("linear", "density", "random"))
        check_range("seed", self.seed, 0, 2**32 - 1, integer=True)  # what scikit-learn's random_state takes
        if isinstance(self.exclude, str):
            raise ConfigError(f"exclude must be a list of layer-name patterns, got the string {self.exclude!r}")


# ----------------------------------------------------------------------------------------------
# Shared-weight layers


class _Decode(torch.autograd.Function):
    """``[0, *codebook][codes]`` whose codebook gradient is the same from run to run on CPU: indexing's own
    backward adds the weights' gradients in parallel there, in an order that depends on thread timing."""

    @staticmethod
    def forward(ctx, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes)
        ctx.size = codebook.numel() + 1
        return F.pad(codebook, (1, 0))[codes.long()]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (codes,) = ctx.saved_tensors
        index = codes.reshape(-1).long()
        if grad.device.type == "cpu":  # bincount adds serially, in index order (the one-thread result)
            full = torch.bincount(index, weights=grad.reshape(-1), minlength=ctx.size).to(grad.dtype)
        else:
            full = grad.new_zeros(ctx.size).index_put_((index,), grad.reshape(-1), accumulate=True)
        return full[1:], None


class SharedWeight(nn.Module):
    """Base of the shared-weight layers: ``codes`` (int16 buffer) index ``[0, *codebook]``."""

    codes: torch.Tensor
    table_params = ("codebook",)  # a lookup table, not weights: profiles count it apart

    def _init_sharing(self, weight_shape: tuple[int, ...], num_centroids: int, bits: int) -> None:
        self.bits = int(bits)
        self.codebook = nn.Parameter(torch.zeros(num_centroids))
        self.register_buffer("codes", torch.zeros(weight_shape, dtype=torch.int16))

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight the layer computes with (differentiable in the codebook)."""
        return decoded_once(self, lambda: _Decode.apply(self.codebook, self.codes), self.codebook, self.codes)

    @property
    def density(self) -> float:
        return int(torch.count_nonzero(self.codes)) / max(1, self.codes.numel())

    def set_sharing(self, codebook: torch.Tensor, codes: torch.Tensor) -> None:
        """Install a codebook and codes (0 = pruned zero, k = ``codebook[k - 1]``)."""
        if codes.shape != self.codes.shape:
            raise TorchslimError(f"codes of shape {tuple(codes.shape)} do not fit weight shape {tuple(self.codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > codebook.numel()):
            raise TorchslimError(f"codes must lie in 0..{codebook.numel()} (0 is the pruned zero)")
        with torch.no_grad():
            self.codebook = nn.Parameter(codebook.detach().to(torch.float32).clone().reshape(-1))
            self.codes.copy_(codes.to(torch.int16))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # Codes index the codebook: out-of-range codes (a damaged checkpoint) would fail only at the first forward.
        codes = self.codes
        if codes.device.type != "meta" and codes.numel() and (
                int(codes.min()) < 0 or int(codes.max()) > self.codebook.numel()):
            error_msgs.append(f"{prefix}codes lie in {int(codes.min())}..{int(codes.max())}, outside "
                              f"0..{self.codebook.numel()} (the codebook's size)")

    def extra_repr(self) -> str:
        return f"bits={self.bits}, centroids={self.codebook.numel()}"

    def inference_module(self) -> nn.Module:
        """The plain float layer computing exactly what this one does (:func:`torchslim.nn.inference.for_inference`)."""
        return float_layer(self, F.pad(self.codebook.detach(), (1, 0))[self.codes.long()], self.bias)


class SharedLinear(SharedWeight):
    """``nn.Linear`` whose weight is ``[0, *codebook][codes]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, num_centroids: int = 32,
                 bits: int = 5):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_sharing((self.out_features, self.in_features), num_centroids, bits)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, centroids={self.codebook.numel()}")


_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


class _SharedConv(SharedWeight):
    _dims: int = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", num_centroids: int = 32,
                 bits: int = 5):
        super().__init__()
        # A meta-device conv normalises the arguments (ints -> tuples, padding strings) exactly as torch does.
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self._dims - 1]
        ref = conv_cls(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False,
                       padding_mode=padding_mode, device="meta")
        for attr in _CONV_ARGS:
            setattr(self, attr, getattr(ref, attr))
        self._reversed_padding_repeated_twice = list(ref._reversed_padding_repeated_twice)
        self._init_sharing(tuple(ref.weight.shape), num_centroids, bits)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self._dims - 1]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bits={self.bits}, centroids={self.codebook.numel()}")


class SharedConv1d(_SharedConv):
    """``nn.Conv1d`` whose weight is ``[0, *codebook][codes]``."""

    _dims = 1


class SharedConv2d(_SharedConv):
    """``nn.Conv2d`` whose weight is ``[0, *codebook][codes]``."""

    _dims = 2


class SharedConv3d(_SharedConv):
    """``nn.Conv3d`` whose weight is ``[0, *codebook][codes]``."""

    _dims = 3


_SHARED_FOR = {nn.Linear: SharedLinear, nn.Conv1d: SharedConv1d, nn.Conv2d: SharedConv2d, nn.Conv3d: SharedConv3d}


def _shared_from(module: nn.Module, num_centroids: int, bits: int) -> SharedWeight:
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        shared: SharedWeight = SharedLinear(module.in_features, module.out_features, has_bias, num_centroids, bits)
    else:
        cls = next(shared for dense, shared in _SHARED_FOR.items() if isinstance(module, dense))
        shared = cls(*(getattr(module, a) for a in _CONV_ARGS[:7]), bias=has_bias, padding_mode=module.padding_mode,
                     num_centroids=num_centroids, bits=bits)
    if has_bias:
        with torch.no_grad():
            shared.bias.copy_(module.bias.detach())
    return shared.to(effective(module).device)


def replace_with_shared(model: nn.Module, name: str, codebook: torch.Tensor, codes: torch.Tensor, bits: int) -> None:
    """Swap layer ``name`` of ``model`` for its shared-weight form holding ``codebook`` and ``codes``."""
    module = model.get_submodule(name)
    device = effective(module).device
    shared = _shared_from(module, codebook.numel(), bits)
    shared.set_sharing(codebook.to(device), codes.to(device))
    shared.train(module.training)
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent).add_module(child, shared)


# ----------------------------------------------------------------------------------------------
# k-means


def kmeans_codebook(weight: torch.Tensor, bits: int, init: str = "linear", seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the non-zero entries of ``weight`` into at most ``2**bits`` centroids (scikit-learn k-means).

    Returns ``(codebook, codes)``: fp32 centroids and int16 codes of ``weight``'s shape, where 0 marks a
    zero (pruned) weight and ``k >= 1`` means ``codebook[k - 1]``.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    w = weight.detach().to("cpu", torch.float64).reshape(-1).numpy()
    nz = np.flatnonzero(w)
    codes = np.zeros(w.size, dtype=np.int64)
    if nz.size == 0:
        return torch.zeros(1), torch.zeros(weight.shape, dtype=torch.int16)
    values = w[nz]
    k = 1 << bits
    distinct = np.unique(values)
    if distinct.size <= k:  # already few values: share them exactly
        centroids = distinct
        codes[nz] = np.searchsorted(distinct, values) + 1
    else:
        if init == "linear":
            start = np.linspace(values.min(), values.max(), k)
        elif init == "density":
            start = np.quantile(values, (np.arange(k) + 0.5) / k)
        else:
            start = np.random.default_rng(seed).choice(distinct, size=k, replace=False)
        start = np.unique(start)  # quantiles of heavily tied weights can coincide
        km = KMeans(n_clusters=start.size, init=start.reshape(-1, 1), n_init=1, max_iter=100, tol=1e-6,
                    random_state=seed)
        # One OpenMP thread: scikit-learn adds the threads' partial centroid sums in whatever order they finish,
        # which changes the low bits of the codebook from run to run.
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="openmp"):
            warnings.simplefilter("ignore")  # "fewer distinct points than clusters" cannot happen here
            labels = km.fit_predict(values.reshape(-1, 1))
        centroids = km.cluster_centers_.reshape(-1)
        # Keep only used centroids, in ascending order (a stable codebook is easier to inspect).
        used = np.unique(labels)
        order = used[np.argsort(centroids[used])]
        rank = np.empty(centroids.size, dtype=np.int64)
        rank[order] = np.arange(order.size)
        centroids = centroids[order]
        codes[nz] = rank[labels] + 1
    return (torch.from_numpy(centroids.astype(np.float32)),
            torch.from_numpy(codes).to(torch.int16).reshape(weight.shape))


# ----------------------------------------------------------------------------------------------
# Applying it


def shareable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Linear and Conv layers of ``model`` by name, minus those matching an ``exclude`` pattern."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _SHAREABLE) and match(name, exclude) is None}


def _targets(model: nn.Module, config: WeightSharing) -> dict[str, int]:
    check_patterns("WeightSharing.exclude", config.exclude, shareable_layers(model), "Linear/Conv")
    layers = shareable_layers(model, tuple(config.exclude))
    if isinstance(config.bits, dict):
        unknown = sorted(set(config.bits) - set(layers))
        if unknown:
            raise ConfigError(f"bits names unknown or excluded layer(s) {unknown}; shareable layers: {sorted(layers)}")
        return dict(config.bits)
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no Linear/Conv layer to share "
                                    f"(after exclude={list(config.exclude)})")
    return {name: config.bits for name in layers}


def apply_weight_sharing(model: nn.Module, config: WeightSharing, *, data=None, val_data=None,
                         loss_fn: LossFn | str | None = None, metric: Metric | None = None,
                         inplace: bool = False) -> nn.Module:
    """Replace ``model``'s Linear/Conv layers by k-means shared-weight layers and fine-tune the centroids.

    Pruned weights (zeros, or ``torch.nn.utils.prune`` masks) become the fixed zero code and stay zero.
    ``data`` is needed when ``config.finetune`` is set (trained with ``loss_fn``, default cross-entropy);
    ``metric`` is measured on ``val_data`` after each fine-tuning epoch. Returns a copy unless ``inplace``.
    """
    if not isinstance(config, WeightSharing):
        raise ConfigError(f"apply_weight_sharing takes a WeightSharing config, got {type(config).__name__}")
    if config.finetune is not None:
        check_loader(data, "data (needed for centroid fine-tuning: WeightSharing.finetune is set)")
    if not inplace:
        model = copy_model(model)
    targets = _targets(model, config)
    for name, bits in targets.items():
        module = model.get_submodule(name)
        weight = effective(module).detach()
        if not torch.isfinite(weight).all():
            raise UnsupportedModelError(f"layer {name!r} has NaN/inf weights; k-means would be meaningless. Fix or "
                                        "retrain the model first.")
        codebook, codes = kmeans_codebook(weight, bits, config.init, config.seed)
        replace_with_shared(model, name, codebook, codes, bits)
    if config.finetune is not None:
        train(model, data, config.finetune, val_loader=val_data, loss_fn=loss_fn, metric=metric)
    return model


def sharing_summary(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per shared layer: ``bits``, number of ``centroids``, ``density`` (non-zero share) and ``weights``."""
    return {name: {"bits": m.bits, "centroids": m.codebook.numel(), "density": m.density,
                   "weights": m.codes.numel()}
            for name, m in model.named_modules() if isinstance(m, SharedWeight)}


# ----------------------------------------------------------------------------------------------
# Checkpoint codecs


def _linear_args(m: SharedLinear) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
            "num_centroids": m.codebook.numel(), "bits": m.bits}


def _conv_args(m: _SharedConv) -> dict[str, Any]:
    args = {a: getattr(m, a) for a in _CONV_ARGS}
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    return {**args, "bias": m.bias is not None, "num_centroids": m.codebook.numel(), "bits": m.bits}


def _conv_builder(cls: type[_SharedConv]):
    def build(a: dict[str, Any]) -> _SharedConv:
        a = {k: tuple(v) if isinstance(v, list) else v for k, v in a.items()}
        return cls(**a)
    return build


CODECS = (
    ModuleCodec(SharedLinear, _linear_args, lambda a: SharedLinear(**a)),
    *(ModuleCodec(cls, _conv_args, _conv_builder(cls)) for cls in (SharedConv1d, SharedConv2d, SharedConv3d)),
)
"""Checkpoint codecs of the shared layers (their codes are stored by the checkpoint's "huffman"/"ans" encodings)."""
