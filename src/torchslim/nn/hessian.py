"""Layer-wise second-order statistics for one-shot reconstruction (OBS / SparseGPT pruning, GPTQ quantization).

A Linear or Conv layer computing ``W x`` has the layer-wise squared error ``||W x - W' x||^2`` whose Hessian in
each row of ``W`` is ``H = 2 X X^T`` over the calibration inputs ``X`` (columns: input rows; Conv inputs are
unfolded into the patches the kernel sees). Layers are processed in the order the model runs them, each one
seeing the outputs of the already-compressed layers before it (the sequential scheme of SparseGPT and GPTQ).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SUPPORTED", "unsupported_reason", "layer_rows", "weight_matrix", "execution_order", "layer_hessian",
           "inverse_cholesky"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why second-order reconstruction cannot handle ``module`` (None: it can)."""
    if not isinstance(module, SUPPORTED):
        return f"{type(module).__name__} has no input unfolding (Linear, Conv1d and Conv2d have)"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}): its rows see different inputs"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding={module.padding!r}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
    return None


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows ``[samples, in]`` matching ``weight_matrix(module)``'s columns."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        kernel, stride, dilation = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
        padding = (0, 0) if isinstance(module.padding, str) else tuple(module.padding)
    else:  # Conv1d as a Conv2d of height 1
        x = x.unsqueeze(-2)
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        padding = (0, 0) if isinstance(module.padding, str) else (0, *module.padding)
    if x.dim() == 3:  # unbatched input
        x = x.unsqueeze(0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C*k, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def weight_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` (default the module's) as ``[out, in]``: Conv kernels flattened per output channel."""
    w = module.weight if weight is None else weight
    return w.reshape(w.shape[0], -1)


def execution_order(model: nn.Module, layers: dict[str, nn.Module], run: Callable[[int], None]) -> list[str]:
    """Names of ``layers`` in the order a forward pass first calls them (``run(1)`` runs one batch); layers the
    pass never reaches come last, in their given order."""
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen.append(name) if name not in seen
                                         else None) for name, m in layers.items()]
    try:
        run(1)
    finally:
        for h in hooks:
            h.remove()
    return seen + [n for n in layers if n not in seen]


_SAMPLES = 16


def _batched(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``x`` has a leading batch dimension that may be split."""
    if isinstance(module, nn.Linear):
        return x.dim() > 1
    return x.dim() == (4 if isinstance(module, nn.Conv2d) else 3)


def _real_tokens(mod: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A Linear's ``[batch, seq, ...]`` input without the padding positions of ``mask`` ([batch, seq], True for
    real tokens): padding is no input the layer serves, and its share would grow with the padded length."""
    if mask is None or not isinstance(mod, nn.Linear) or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(x.device)]


def layer_hessian(module: nn.Module, run: Callable[[int], None], batches: int) -> tuple[torch.Tensor, int]:
    """``2 X X^T / n`` of ``module``'s inputs over ``batches`` calibration batches (``run(batches)`` feeds them
    through the model), in float64 for a stable inverse, and the number of input rows ``n`` it saw.

    Where ``run.token_mask()`` gives the batch's attention mask (dict batches of a transformer), the padding
    tokens' rows of a Linear's ``[batch, seq, features]`` inputs are left out."""
    state: dict = {"H": None, "n": 0}
    token_mask = getattr(run, "token_mask", lambda: None)

    def hook(mod: nn.Module, inputs: tuple) -> None:
        x = _real_tokens(mod, inputs[0].detach(), token_mask())
        # A few samples at a time: unfolded Conv inputs (and their float64 copy) are large.
        for part in (x.split(_SAMPLES) if _batched(mod, x) else (x,)):
            rows = layer_rows(mod, part).double()
            h = rows.t() @ rows
            state["H"] = h if state["H"] is None else state["H"] + h
            state["n"] += rows.shape[0]

    handle = module.register_forward_pre_hook(hook)
    try:
        run(batches)
    finally:
        handle.remove()
    if state["H"] is None:
        return torch.zeros(0, 0, dtype=torch.float64), 0
    return 2.0 * state["H"] / state["n"], state["n"]


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` and the mask of dead inputs (always zero
    in the calibration data, whose diagonal is set to 1 so the factorisation exists).

    If the damped matrix is still not positive definite (collinear inputs), the dampening grows tenfold until it
    is."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean = torch.diag(H).mean().item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    lam = damp * mean
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return U, dead
        lam = max(lam * 10, 1e-8 * max(mean, 1e-12))
    raise torch.linalg.LinAlgError("the layer Hessian stays singular even with heavy dampening")
