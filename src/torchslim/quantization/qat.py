"""Quantization-aware training: prepare -> train with the shared trainer -> convert.

``prepare_qat`` swaps every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` for its fake-quant wrapper (see
:mod:`.modules`), ``train`` (or any loop: distillation, a user's own) fine-tunes it, and ``convert`` replaces
the wrappers by integer-code modules. ``apply_qat`` does all three. Pruning masks carry through: a pruned
weight is exactly zero, zero quantizes to code 0 with symmetric quantization (to the zero point otherwise)
and so dequantizes to exactly zero, and the mask keeps it there while training.

Norm layers (BatchNorm, LayerNorm, GroupNorm, ...) stay in float: they are per-channel affine maps a
deployment folds into the neighbouring layer. Other layers with parameters but no quantized kernel here
(Embedding, RNNs, attention, ConvTranspose, custom layers, ...) stay in float with a warning naming them,
or raise ``UnsupportedModelError`` with ``unsupported="raise"``.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from ..core.config import Config
from ..core.checks import check_choice, check_positive
from ..data import check_loader
from ..data.batches import call_model, split_batch, to_device
from ..core.errors import ConfigError, DataError, UnsupportedModelError
from ..metrics.evaluate import Metric
from ..training.losses import LossFn
from ..training.train import TrainConfig, train
from ..nn.masks import effective
from ..nn.modules import check_patterns, copy_model, match
from .fake import (
    BinaryQuantizer,
    LSQQuantizer,
    MinMaxQuantizer,
    Quantizer,
    TernaryQuantizer,
)
from .modules import (
    CONVERTED_MODULES,
    FLOAT_TO_QAT,
    QAT_MODULES,
    to_converted_module,
    to_qat_module,
)
from .spec import SUPPORTED_BITS, QuantSpec

__all__ = [
    "QAT", "LayerQuant", "apply_qat", "prepare_qat", "prepare", "convert", "calibrate",
    "quantizable_layers", "first_last", "copy_model", "WEIGHT_BITS", "ACTIVATION_BITS",
]

WEIGHT_BITS = tuple(b for b in SUPPORTED_BITS if b >= 2)
"""Bit widths of uniform weight quantization (1-bit weights are :class:`BinaryWeights`)."""
ACTIVATION_BITS = WEIGHT_BITS

_FLOAT_OK = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU)
_OPAQUE = (nn.MultiheadAttention, nn.RNNBase, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_UNSUPPORTED_CHOICES = ("warn", "raise")


def check_bits(name: str, value, allowed: tuple[int, ...], *, optional: bool = False, hint: str = "") -> None:
    """ConfigError unless ``value`` is one of ``allowed`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        extra = f" ({hint})" if hint else ""
        none = " or None" if optional else ""
        raise ConfigError(f"{name}={value!r} is not supported; choose one of {list(allowed)}{none}{extra}")


def _check_patterns(name: str, value) -> None:
    if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{name} must be a tuple of layer-name patterns (fnmatch), got {value!r}")


@dataclasses.dataclass(frozen=True)
class LayerQuant(Config):
    """How one layer is quantized during training.

    ``weight``: ``uniform`` (``bits``-bit, ``symmetric`` or affine, per output channel or per tensor, with a
    min/max range or a ``learned_step`` (LSQ)), ``binary`` or ``ternary`` (``threshold``, ``learned_scale``).
    ``activation_bits``: quantize the layer's input too (per tensor; min/max observed, or LSQ when
    ``learned_step``), or None to keep it in float.
    """

    weight: str = "uniform"
    bits: int = 8
    per_channel: bool = True
    symmetric: bool = True
    learned_step: bool = False
    activation_bits: int | None = None
    threshold: float = 0.7
    learned_scale: bool = False

    def validate(self) -> None:
        check_choice("weight", self.weight, ("uniform", "binary", "ternary"))
        if self.weight == "uniform":
            check_bits("bits", self.bits, WEIGHT_BITS, hint="use BinaryWeights() for 1-bit weights")
            if self.learned_step and not self.symmetric:
                raise ConfigError("learned_step=True (LSQ) learns a step without a zero point: set symmetric=True")
        check_bits("activation_bits", self.activation_bits, ACTIVATION_BITS, optional=True)
        check_positive("threshold", self.threshold)

    def weight_quantizer(self, module: nn.Module, where: str) -> Quantizer:
        out = module.weight.shape[0]
        if self.weight == "binary":
            return BinaryQuantizer(where=where)
        if self.weight == "ternary":
            return TernaryQuantizer(out, self.threshold, self.learned_scale, where=where)
        spec = QuantSpec(bits=self.bits, symmetric=self.symmetric,
                         granularity="channel" if self.per_channel else "tensor", axis=0, signed=True)
        if self.learned_step:
            q = LSQQuantizer(spec, out, where=where).to(module.weight.device)
            # Initialise the step from the trained weights now, before any optimizer exists.
            q(effective(module).detach())
            return q
        return MinMaxQuantizer(spec, where=where)

    def input_quantizer(self, where: str) -> Quantizer | None:
        if self.activation_bits is None:
            return None
        if self.learned_step:
            # Signedness is decided from the first batch (unsigned after a ReLU).
            return LSQQuantizer(QuantSpec(bits=self.activation_bits, symmetric=True), activation=True, where=where)
        return MinMaxQuantizer(QuantSpec(bits=self.activation_bits, symmetric=False, signed=False), observe=True,
                               where=where)


@dataclasses.dataclass(frozen=True)
class QAT(Config):
    """Quantization-aware training to ``bits``-bit weights and ``activation_bits``-bit layer inputs.

    Weights: symmetric (zero point 0, so zeros stay zero) or affine, ``per_channel`` (one scale per output
    channel) or per tensor, with min/max ranges or a ``learned_step`` (LSQ, Esser et al. 2020; also used for
    the activations). ``activation_bits=None`` quantizes weights only. ``keep_first_last`` puts the first
    and last quantizable layers (in module order) at ``first_last_bits`` (None: float). ``exclude`` names
    layers (fnmatch patterns) to keep in float. Layers with no quantized kernel are kept in float with a
    warning, or raise with ``unsupported="raise"``. ``calibration_batches`` batches of the calibration
    data initialise the activation ranges before ``train``.
    """

    bits: int = 8
    activation_bits: int | None = 8
    per_channel: bool = True
    symmetric: bool = True
    learned_step: bool = False
    keep_first_last: bool = False
    first_last_bits: int | None = 8
    exclude: tuple[str, ...] = ()
    unsupported: str = "warn"
    calibration_batches: int = 8
    train: TrainConfig = TrainConfig(epochs=1.0, lr=1e-4)

    def validate(self) -> None:
        check_bits("bits", self.bits, WEIGHT_BITS, hint="use BinaryWeights() for 1-bit weights")
        check_bits("activation_bits", self.activation_bits, ACTIVATION_BITS, optional=True)
        check_bits("first_last_bits", self.first_last_bits, WEIGHT_BITS, optional=True)
        if self.learned_step and not self.symmetric:
            raise ConfigError("learned_step=True (LSQ) learns a step without a zero point: set symmetric=True")
        _check_patterns("exclude", self.exclude)
        check_choice("unsupported", self.unsupported, _UNSUPPORTED_CHOICES)
        check_positive("calibration_batches", self.calibration_batches, integer=True)
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}")

    def layer_plan(self, model: nn.Module) -> dict[str, LayerQuant]:
        """{layer name: LayerQuant} for the layers of ``model`` this config quantizes."""
        layer = LayerQuant(bits=self.bits, per_channel=self.per_channel, symmetric=self.symmetric,
                           learned_step=self.learned_step, activation_bits=self.activation_bits)
        names = list(quantizable_layers(model, self.exclude, self.unsupported, f"{type(self).__name__}.exclude"))
        plan = {n: layer for n in names}
        if self.keep_first_last:
            for n in first_last(names):
                if self.first_last_bits is None:
                    plan.pop(n)
                else:
                    plan[n] = dataclasses.replace(layer, bits=self.first_last_bits)
        return plan


# ----------------------------------------------------------------------------------------------
# Layer discovery


def quantizable_layers(model: nn.Module, exclude: tuple[str, ...] = (), unsupported: str = "warn",
                       field: str = "exclude") -> dict[str, nn.Module]:
    """Layers of ``model`` that get quantized (Linear, Conv1d, Conv2d), in module order.

    Layers matching an ``exclude`` pattern are skipped (with everything inside them); a pattern matching no
    layer is a ConfigError naming ``field``. Parameters
    with no quantized kernel are reported -- ``warnings.warn`` naming their layers, or
    ``UnsupportedModelError`` when ``unsupported="raise"`` -- and kept in float.
    """
    check_patterns(field, exclude, [n for n, _ in model.named_modules() if n])
    found: dict[str, nn.Module] = {}
    skipped: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if match(path, exclude) is not None:
                continue
            if isinstance(child, QAT_MODULES) or isinstance(child, CONVERTED_MODULES):
                raise UnsupportedModelError(f"layer {path!r} is already quantized ({type(child).__name__}); "
                                            "prepare the float model instead")
            kind = type(child)
            if kind in FLOAT_TO_QAT:
                if kind is not nn.Linear and getattr(child, "padding_mode", "zeros") != "zeros":
                    skipped.append(f"{path} ({kind.__name__}, padding_mode={child.padding_mode!r})")
                else:
                    found[path] = child
            elif isinstance(child, _FLOAT_OK):
                continue
            elif isinstance(child, _OPAQUE):
                # These read their sub-layers' weights directly (fused kernels), so swapping the
                # sub-layers would be silently ignored: the whole module stays in float.
                skipped.append(f"{path} ({kind.__name__})")
            else:
                if any(True for _ in child.parameters(recurse=False)):
                    skipped.append(f"{path} ({kind.__name__})")
                visit(path, child)

    visit("", model)
    if skipped:
        if unsupported == "raise":
            raise UnsupportedModelError(f"no quantized kernel for layer(s) {skipped}; exclude them (exclude=(...)) "
                                        "or pass unsupported='warn' to keep them in float")
        warnings.warn(f"no quantized kernel for layer(s) {skipped}: kept in float (pass unsupported='raise' to "
                      "refuse instead)", stacklevel=3)
    return found


def first_last(names: list[str]) -> list[str]:
    """The first and last of ``names`` (one name if there is only one)."""
    return list(dict.fromkeys([names[0], names[-1]])) if names else []


# ----------------------------------------------------------------------------------------------
# Prepare / calibrate / convert


@torch.no_grad()
def prepare(model: nn.Module, plan: dict[str, LayerQuant], *, inplace: bool = False) -> nn.Module:
    """Return ``model`` (a deep copy unless ``inplace``) with the layers in ``plan`` swapped for their
    fake-quant wrappers, ready to train."""
    if not plan:
        raise UnsupportedModelError(f"{type(model).__name__}: no layer to quantize (no Linear/Conv1d/Conv2d left "
                                    "after exclude and keep_first_last)")
    if not inplace:
        model = copy_model(model)
    for name, lq in plan.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"layer {name!r} is not in {type(model).__name__}") from None
        if type(module) not in FLOAT_TO_QAT:
            raise UnsupportedModelError(f"layer {name!r} is a {type(module).__name__}; only "
                                        f"{[c.__name__ for c in FLOAT_TO_QAT]} can be quantized")
        new = to_qat_module(module, lq.weight_quantizer(module, f"{name} weight"), lq.input_quantizer(f"{name} input"))
        model.set_submodule(name, new)
    return model


def prepare_qat(model: nn.Module, config: Config, *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) ready for quantization-aware training as ``config`` (``QAT``,
    ``BinaryWeights``, ``TernaryWeights``) says. Train it with ``torchslim.train`` or any loop, then call
    :func:`convert`."""
    plan_fn = getattr(config, "layer_plan", None)
    if plan_fn is None:
        raise ConfigError(f"prepare_qat takes QAT, BinaryWeights or TernaryWeights, got {type(config).__name__}")
    return prepare(model, plan_fn(model), inplace=inplace)


def _quantizers(model: nn.Module) -> list[Quantizer]:
    """The model's quantizers, each named after its layer for error messages (names are not checkpointed)."""
    for name, module in model.named_modules():
        if isinstance(module, QAT_MODULES):
            for role, q in (("weight", module.weight_quant), ("input", module.input_quant)):
                if isinstance(q, Quantizer) and not q.where:
                    q.where = f"{name} {role}"
    return [m for m in model.modules() if isinstance(m, Quantizer)]


@torch.no_grad()
def calibrate(model: nn.Module, data, num_batches: int = 8) -> nn.Module:
    """Set the activation ranges of a prepared ``model`` from ``num_batches`` batches of ``data`` (in place;
    any batch form of :mod:`torchslim.data.batches`, targets unused).

    Raises DataError when ``data`` is empty or gives a layer a constant input (no range to quantize),
    and TorchslimError naming the layer when an activation holds NaN/inf.
    """
    check_loader(data, "calibration data")
    quantizers = _quantizers(model)
    observed = [q for q in quantizers if isinstance(q, MinMaxQuantizer) and q.observe]
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for q in quantizers:
        q.start_calibration()
    try:
        for i, batch in enumerate(data):
            if i >= num_batches:
                break
            call_model(model, to_device(split_batch(batch)[0], device))
    finally:
        for q in quantizers:
            q.stop_calibration()
        model.train(was_training)
    for q in observed:
        if float(q.hi) - float(q.lo) <= 0:
            raise DataError(f"{q.where or 'an activation'}: every calibration value is {float(q.lo):g}, so there is "
                            "no range to quantize; pass varied, representative calibration data (or exclude the "
                            "layer if its input really is constant)")
    return model


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace the fake-quant wrappers of a trained prepared ``model`` by integer-code modules
    (``QLinear``/``QConv1d``/``QConv2d``); returns the model in eval mode (a copy unless ``inplace``)."""
    if not inplace:
        model = copy_model(model)
    _quantizers(model)
    names = [n for n, m in model.named_modules() if isinstance(m, QAT_MODULES)]
    if not names:
        raise UnsupportedModelError(f"{type(model).__name__} has no fake-quant layer to convert; call prepare_qat "
                                    "first")
    for name in names:
        model.set_submodule(name, to_converted_module(model.get_submodule(name), name))
    return model.eval()


def run_qat(prepared: nn.Module, train_config: TrainConfig, data, val_data=None, calibration_data=None,
            calibration_batches: int = 8, *, loss_fn: LossFn | str | None = None,
            metric: Metric | None = None) -> nn.Module:
    """Calibrate (when ``calibration_data`` is given), train with ``loss_fn`` (``metric`` measured on
    ``val_data``) and convert a prepared model."""
    check_loader(data, "QAT training data (data=)")
    if calibration_data is not None:
        calibrate(prepared, calibration_data, calibration_batches)
    train(prepared, data, train_config, val_loader=val_data, loss_fn=loss_fn, metric=metric)
    return convert(prepared, inplace=True)


def apply_qat(model: nn.Module, config: QAT, *, data, val_data=None, calibration_data=None,
              loss_fn: LossFn | str | None = None, metric: Metric | None = None, inplace: bool = False) -> nn.Module:
    """Quantization-aware training of ``model`` (a copy unless ``inplace``): prepare, calibrate activation
    ranges on ``calibration_data`` (else they start from the first training batches), train on ``data`` with
    ``config.train`` and ``loss_fn`` (``metric`` measured on ``val_data`` each epoch) and return the
    CONVERTED model."""
    if not isinstance(config, QAT):
        raise ConfigError(f"apply_qat takes a QAT config, got {type(config).__name__}")
    check_loader(data, "QAT training data (data=)")
    return run_qat(prepare_qat(model, config, inplace=inplace), config.train, data, val_data, calibration_data,
                   config.calibration_batches, loss_fn=loss_fn, metric=metric)
