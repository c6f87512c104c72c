"""Per-channel importance of channel-dependency groups, and the BN L1 penalty of network slimming.

Every score is a tensor of ``group.size`` values (higher = keep), aggregated over all coupled tensors of
the group (Torch-Pruning style) and divided by its mean so that groups are comparable in global ranking.
Criteria are :class:`Importance` objects looked up by name in a registry; :func:`register_importance`
adds one.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..core.errors import ConfigError, DataError, UnsupportedModelError
from ..core.registry import Registry
from ..data.batches import batch_size, call_model, select, split_batch, to_device
from ..metrics.evaluate import model_device
from ..training.losses import LossFn, resolve_loss
from .graph import Group, Member

__all__ = ["Importance", "register_importance", "importance_names", "group_importance", "bn_l1_penalty",
           "fisher_diagonal", "obd_saliency", "METHODS"]

METHODS = ("l1", "l2", "taylor", "bn_scale", "hessian")

_BN = nn.modules.batchnorm._BatchNorm


def _tensor(model: nn.Module, member: Member) -> torch.Tensor | None:
    if not member.param:
        return None
    t = getattr(model.get_submodule(member.module), member.param, None)
    return t if isinstance(t, torch.Tensor) else None


def _slots(t: torch.Tensor, member: Member, n: int) -> torch.Tensor:
    """``t`` restricted to the member's slice, as (n slots, everything belonging to each slot)."""
    part = t.narrow(member.dim, member.offset, n * member.rep).movedim(member.dim, 0)
    return part.reshape(n, -1)


def _magnitude(model: nn.Module, group: Group, power: int) -> torch.Tensor:
    score = torch.zeros(group.size)
    for m in group.members:
        # Weights carry the importance; biases and running stats would mix in unrelated scales.
        if "weight" not in m.param:  # recurrent layers: weight_ih_l0, ...; attention: in_proj_weight
            continue
        t = _tensor(model, m)
        if t is not None:
            score += _slots(t.detach().float().abs().pow(power), m, group.size).sum(1).cpu()
    return score


def _bn_scale(model: nn.Module, group: Group) -> torch.Tensor:
    members = [m for m in group.members
               if m.param == "weight" and isinstance(model.get_submodule(m.module), _BN)]
    if not members:
        raise UnsupportedModelError(
            f"importance='bn_scale' needs a BatchNorm layer with affine weights in every pruned group, but "
            f"this one has none:\n{group.details()}\nUse importance='l1' or add the group's leader "
            f"{group.leader!r} to exclude=.")
    score = torch.zeros(group.size)
    for m in members:
        score += _slots(_tensor(model, m).detach().float().abs(), m, group.size).sum(1).cpu()
    return score


def _gradient_passes(model: nn.Module, params: dict, data: Iterable, loss_fn: LossFn | str | None, batches: int,
                     visit: Callable[[dict], None], what: str, splits: int = 1) -> None:
    """Backward passes of ``loss_fn`` (default cross-entropy) over ``batches`` batches of ``data``, each cut into
    up to ``splits`` micro-batches, calling ``visit({key: parameter})`` after each pass while the gradients are
    fresh. Runs in eval mode so BN statistics and dropout stay untouched; gradients and ``requires_grad`` flags
    are restored afterwards."""
    if data is None:
        raise ConfigError(f"{what} needs data= (a loader of training batches)")
    loss = resolve_loss(loss_fn)
    saved = {p: (p.grad, p.requires_grad) for p in model.parameters()}
    modes = {mod: mod.training for mod in model.modules()}
    device = model_device(model)
    seen = 0
    try:
        model.eval()
        for p in params.values():
            p.requires_grad_(True)
        for batch in data:
            if seen >= batches:
                break
            batch = to_device(batch, device)
            inputs, _ = split_batch(batch, keep_labels=loss.keep_labels)
            n = batch_size(inputs) if splits > 1 else 1
            step = -(-n // splits)
            for start in range(0, n, step):
                part = batch if splits == 1 else select(batch, slice(start, start + step))
                inputs, _ = split_batch(part, keep_labels=loss.keep_labels)
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss(call_model(model, inputs), part).backward()
                visit(params)
            seen += 1
    finally:
        for p, (grad, requires_grad) in saved.items():
            p.grad = grad
            p.requires_grad_(requires_grad)
        for mod, training in modes.items():
            mod.training = training
    if seen == 0:
        raise DataError(f"{what}: data= yielded no batches")


def _group_params(model: nn.Module, groups: list[Group]) -> dict:
    params = {(m.module, m.param): _tensor(model, m) for g in groups for m in g.members}
    return {k: p for k, p in params.items() if isinstance(p, nn.Parameter)}


def _taylor(model: nn.Module, groups: list[Group], data: Iterable, loss_fn: LossFn | str | None,
            batches: int) -> list[torch.Tensor]:
    """|sum over each channel's weights of grad * weight| per batch, summed over batches and members
    (Molchanov et al. 2019), the gradient being that of ``loss_fn`` (default cross-entropy)."""
    scores = [torch.zeros(g.size) for g in groups]

    def visit(params: dict) -> None:
        for g, score in zip(groups, scores):
            for m in g.members:
                p = params.get((m.module, m.param))
                if p is not None and p.grad is not None:
                    prod = (p.detach() * p.grad).float()
                    score += _slots(prod, m, g.size).sum(1).abs().cpu()

    _gradient_passes(model, _group_params(model, groups), data, loss_fn, batches, visit, "importance='taylor'")
    return scores


FISHER_SPLITS = 16


def fisher_diagonal(model: nn.Module, params: dict, data: Iterable, loss_fn: LossFn | str | None = None,
                    batches: int = 4, what: str = "importance='hessian'", splits: int = FISHER_SPLITS) -> dict:
    """The empirical Fisher diagonal ``mean of grad^2`` of each of ``params`` ({key: Parameter}), the
    Hessian-diagonal estimate of Optimal Brain Damage (LeCun et al. 1990) at a trained minimum, over
    ``batches`` batches of ``data`` each cut into ``splits`` micro-batches: at a minimum the gradient of a whole
    batch averages out to almost nothing, while micro-batch gradients keep the per-sample signal."""
    sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    count = [0]

    def visit(ps: dict) -> None:
        for k, p in ps.items():
            if p.grad is not None:
                sums[k] += p.grad.detach().float() ** 2
        count[0] += 1

    _gradient_passes(model, params, data, loss_fn, batches, visit, what, splits)
    return {k: v / count[0] for k, v in sums.items()}


def obd_saliency(weight: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """OBD saliency ``w^2 * H_jj / 2``: the loss increase of zeroing each weight under a diagonal Hessian."""
    return weight.detach().float() ** 2 * fisher / 2


def _hessian(model: nn.Module, groups: list[Group], data: Iterable, loss_fn: LossFn | str | None,
             batches: int) -> list[torch.Tensor]:
    """OBD saliency summed over every coupled parameter slice of each channel."""
    params = _group_params(model, groups)
    fisher = fisher_diagonal(model, params, data, loss_fn, batches)
    scores = []
    for g in groups:
        score = torch.zeros(g.size)
        for m in g.members:
            p = params.get((m.module, m.param))
            if p is not None:
                score += _slots(obd_saliency(p, fisher[(m.module, m.param)]), m, g.size).sum(1).cpu()
        scores.append(score)
    return scores


def _normalise(score: torch.Tensor) -> torch.Tensor:
    mean = score.mean()
    return score / mean if mean > 0 else score


class Importance:
    """A channel importance criterion: scores the channels of channel-dependency groups (higher = keep).

    Subclasses implement :meth:`score` for one group, or override ``__call__`` when one pass serves all
    groups (Taylor's backward passes). ``needs_data`` marks a criterion that reads ``data=``.
    """

    needs_data = False

    def score(self, model: nn.Module, group: Group) -> torch.Tensor:
        """``group.size`` scores for the channels of ``group`` in ``model``."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(model, group) or __call__")

    def __call__(self, model: nn.Module, groups: list[Group], *, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, batches: int = 4) -> list[torch.Tensor]:
        return [self.score(model, g) for g in groups]


class Magnitude(Importance):
    """Sum of ``|w| ** power`` over every coupled weight slice of a channel (``l1``: 1, ``l2``: 2)."""

    def __init__(self, power: int):
        self.power = power

    def score(self, model: nn.Module, group: Group) -> torch.Tensor:
        return _magnitude(model, group, self.power)


class BNScale(Importance):
    """|gamma| of the group's BatchNorm layers (network slimming)."""

    def score(self, model: nn.Module, group: Group) -> torch.Tensor:
        return _bn_scale(model, group)


class Taylor(Importance):
    """|gradient x weight| per channel, summed over ``batches`` batches of ``data`` (Molchanov et al. 2019)."""

    needs_data = True

    def __call__(self, model: nn.Module, groups: list[Group], *, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, batches: int = 4) -> list[torch.Tensor]:
        return _taylor(model, groups, data, loss_fn, batches)


class Hessian(Importance):
    """Optimal Brain Damage: ``w^2 * H_jj / 2`` summed per channel, ``H_jj`` the empirical Fisher diagonal
    (squared gradients of ``loss_fn`` over ``batches`` batches of ``data``)."""

    needs_data = True

    def __call__(self, model: nn.Module, groups: list[Group], *, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, batches: int = 4) -> list[torch.Tensor]:
        return _hessian(model, groups, data, loss_fn, batches)


class _PerGroup(Importance):
    """A plain function ``fn(model, group) -> scores`` as a criterion."""

    def __init__(self, fn: Callable[[nn.Module, Group], torch.Tensor]):
        self.fn = fn

    def score(self, model: nn.Module, group: Group) -> torch.Tensor:
        return self.fn(model, group)


BUILTIN_IMPORTANCES: tuple[tuple[str, Importance], ...] = (
    ("l1", Magnitude(1)), ("l2", Magnitude(2)), ("taylor", Taylor()), ("bn_scale", BNScale()),
    ("hessian", Hessian()),
)
IMPORTANCES: Registry[str, Importance] = Registry("importance criterion", dict(BUILTIN_IMPORTANCES))


def register_importance(name: str, importance: Importance | Callable[[nn.Module, Group], torch.Tensor], *,
                        replace: bool = False) -> Importance:
    """Make ``importance`` selectable as ``StructuredPruning(importance=name)``.

    ``importance`` is an :class:`Importance` instance or a function ``fn(model, group)`` returning one
    score per channel of ``group`` (``group.size`` values, higher = keep; ``group.members`` lists the
    coupled tensor slices). Registering a name twice raises ConfigError unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_importance: name must be a non-empty string, got {name!r}")
    if isinstance(importance, type):
        raise ConfigError(f"register_importance({name!r}, ...): pass an instance, e.g. {importance.__name__}(), "
                          "not the class")
    if not isinstance(importance, Importance):
        if not callable(importance):
            raise ConfigError(f"register_importance({name!r}, ...): expected an Importance or a function "
                              f"fn(model, group) -> scores, got {importance!r}")
        importance = _PerGroup(importance)
    return IMPORTANCES.add(name, importance, replace=replace)


def importance_names() -> list[str]:
    """Names ``StructuredPruning(importance=...)`` accepts: the built-ins, then registered ones."""
    return list(IMPORTANCES)


def _checked(name: str, group: Group, score) -> torch.Tensor:
    if not torch.is_tensor(score) or tuple(score.shape) != (group.size,):
        got = tuple(score.shape) if torch.is_tensor(score) else type(score).__name__
        raise ConfigError(f"importance {name!r} returned {got} for the group led by {group.leader!r}; it must "
                          f"return a tensor of {group.size} scores, one per channel")
    return score.detach().float().cpu()


def group_importance(model: nn.Module, groups: list[Group], method: str, *, data: Iterable | None = None,
                     loss_fn: LossFn | str | None = None, batches: int = 4) -> list[torch.Tensor]:
    """One mean-normalised score per channel for each group (higher = more important).

    ``method`` names a registered criterion: ``l1``/``l2`` (sum of |w| / w^2 over every coupled weight),
    ``taylor`` (needs ``data``; ``loss_fn(outputs, batch)`` or a named task, cross-entropy by default),
    ``bn_scale`` (|gamma| of the group's BatchNorm layers) or one added with :func:`register_importance`.
    """
    if method not in IMPORTANCES:
        raise ConfigError(f"importance must be one of {importance_names()} (or a name registered with "
                          f"torchslim.pruning.register_importance), got {method!r}")
    importance = IMPORTANCES.get(method)
    if importance.needs_data and data is None:
        raise ConfigError(f"importance={method!r} needs data= (a loader of (inputs, targets) batches)")
    scores = importance(model, groups, data=data, loss_fn=loss_fn, batches=batches)
    if len(scores) != len(groups):
        raise ConfigError(f"importance {method!r} returned {len(scores)} score tensors for {len(groups)} groups")
    return [_normalise(_checked(method, g, s)) for g, s in zip(groups, scores)]


def bn_l1_penalty(model: nn.Module, strength: float) -> Callable[[nn.Module], torch.Tensor]:
    """``penalty(model) = strength * sum |gamma|`` over BatchNorm layers, for ``train(penalty=...)``
    (network slimming, Liu et al. 2017): it drives unimportant channels' scales towards zero."""
    if strength < 0:
        raise ConfigError(f"bn_penalty strength must be >= 0, got {strength}")
    if not any(isinstance(m, _BN) and m.weight is not None for m in model.modules()):
        raise UnsupportedModelError(f"bn_penalty needs BatchNorm layers with affine weights, but "
                                    f"{type(model).__name__} has none; set bn_penalty=0")

    def penalty(m: nn.Module) -> torch.Tensor:
        gammas = [mod.weight.abs().sum() for mod in m.modules() if isinstance(mod, _BN) and mod.weight is not None]
        return strength * torch.stack(gammas).sum()

    return penalty
