"""Small helpers shared across techniques."""

from __future__ import annotations

import contextlib
import copy
import os
import uuid
from pathlib import Path

import torch
from torch import nn


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies pruned models, without touching the original.

    ``torch.nn.utils.prune`` caches ``weight = weight_orig * weight_mask`` as a plain attribute, which is a
    non-leaf tensor after a forward pass with autograd, and deepcopy refuses those; a detached copy goes in
    its place (the next forward recomputes it anyway).
    """
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def decoded_once(module: nn.Module, decode, *sources: torch.Tensor) -> torch.Tensor:
    """``decode()`` (e.g. integer codes -> float weight), computed once and reused while ``module`` runs inference
    (eval mode, no autograd), as a deployed model decodes at load time; training always decodes afresh.

    The cached result is dropped when any of ``sources`` changes: integer tensors are tracked by identity and
    version counter (every PyTorch op that writes them bumps it), floating ones also by value, since edits
    through ``.data`` bypass the counter and those tensors (scales, codebooks) are small."""
    if module.training or torch.is_grad_enabled():
        return decode()
    key = [(t, t._version) for t in sources]
    hit = module.__dict__.get("_decoded")
    if hit is not None and len(hit[0]) == len(key) and all(
            a is b and v == w for (a, v), (b, w) in zip(hit[0], key)) and all(
            torch.equal(old, t) for old, t in zip(hit[1], sources) if t.is_floating_point()):
        return hit[2]
    value = decode()
    module.__dict__["_decoded"] = (key, [t.detach().clone() if t.is_floating_point() else None for t in sources], value)
    return value


def atomic_write(path: str | os.PathLike, data: bytes, *, overwrite: bool = True,
                 exists_error: type[Exception] = FileExistsError) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename, so that readers never see
    a half-written file. With ``overwrite`` False an existing file (even one created meanwhile) is left alone
    and ``exists_error`` is raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    refuse = f"refusing to overwrite existing file {path}; pass overwrite=True to replace it"
    # 0o666 lets the umask decide the permissions, as for a normal open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # unlike os.replace, refuses to clobber a file created meanwhile
            except FileExistsError:
                raise exists_error(refuse) from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise exists_error(refuse) from None
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path)
