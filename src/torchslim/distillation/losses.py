"""Distillation losses: soft targets (Hinton et al. 2015), output matching and feature hints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) per sample, times T^2.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature * temperature


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None,
            temperature: float, alpha: float) -> torch.Tensor:
    """``alpha`` * soft-target loss + (1 - ``alpha``) * cross-entropy on ``targets``."""
    loss = student_logits.new_zeros(())
    if alpha > 0:
        loss = loss + alpha * soft_target_loss(student_logits, teacher_logits, temperature)
    if alpha < 1:
        if targets is None:
            raise ValueError("kd_loss with alpha < 1 needs labels")
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, targets)
    return loss


def output_matching_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Label-free output matching: mean squared error, 1 - cosine similarity along dim 1, or ``similarity``: the
    mean squared difference of the batch's pairwise cosine-similarity matrices (similarity-preserving distillation,
    Tung & Mori 2019), which lets the student's width differ from the teacher's."""
    if kind == "similarity":
        s, t = (F.normalize(x.flatten(1), dim=1) for x in (student_out, teacher_out))
        return F.mse_loss(s @ s.T, t @ t.T)
    if kind == "mse":
        return F.mse_loss(student_out, teacher_out)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student_out.flatten(2) if student_out.dim() > 2 else student_out,
                                        teacher_out.flatten(2) if teacher_out.dim() > 2 else teacher_out,
                                        dim=1)).mean()
    raise ValueError(f"unknown output loss {kind!r}; use 'mse', 'cosine' or 'similarity'")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (N, L, C) token states over the positions where ``mask`` (N, L) is non-zero (all without one);
    other shapes come back unchanged."""
    if hidden.dim() != 3:
        return hidden
    if mask is None:
        return hidden.mean(1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def make_projection(student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module | None:
    """A learned map from student features to the teacher's width (None when widths already agree).

    (N, C, H, W) features get a 1x1 convolution, (N, C) and (N, L, C) features a linear layer on the
    channel dimension. Spatial sizes are reconciled separately by pooling (see :func:`feature_loss`).
    """
    if len(student_shape) != len(teacher_shape):
        raise ValueError(f"feature ranks differ: student {tuple(student_shape)} vs teacher {tuple(teacher_shape)}")
    if len(student_shape) == 4:
        if student_shape[1] == teacher_shape[1]:
            return None
        return nn.Conv2d(student_shape[1], teacher_shape[1], 1)
    if len(student_shape) in (2, 3):
        if student_shape[-1] == teacher_shape[-1]:
            return None
        return nn.Linear(student_shape[-1], teacher_shape[-1])
    raise ValueError(f"feature matching supports 2-D, 3-D and 4-D features, got shape {tuple(student_shape)}")


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                 projection: nn.Module | None = None) -> torch.Tensor:
    """MSE between (projected) student features and teacher features (FitNets hint loss)."""
    if projection is not None:
        student_feat = projection(student_feat)
    if student_feat.dim() == 4 and student_feat.shape[-2:] != teacher_feat.shape[-2:]:
        student_feat = F.adaptive_avg_pool2d(student_feat, teacher_feat.shape[-2:])
    return F.mse_loss(student_feat, teacher_feat)


def head_mean(attention: torch.Tensor) -> torch.Tensor:
    """(N, H, Lq, Lk) attention probabilities averaged over heads, so that head counts may differ."""
    return attention.mean(1)


def attention_kl(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                 mask: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """KL(teacher || student) between head-averaged (N, Lq, Lk) attention distributions (MiniLM, Wang et al.
    2020), summed over keys and averaged over queries; ``mask`` (N, L) leaves padded keys and queries out."""
    kl = teacher_attn * (teacher_attn.clamp_min(eps).log() - student_attn.clamp_min(eps).log())
    if mask is None:
        return kl.sum(-1).mean()
    valid = mask.to(kl.dtype)
    per_query = (kl * valid[:, None, :]).sum(-1)  # padded keys carry no teacher mass; eps guards the logs
    return (per_query * valid).sum() / valid.sum().clamp_min(1.0)


__all__ = ["soft_target_loss", "kd_loss", "output_matching_loss", "masked_mean", "make_projection", "feature_loss",
           "head_mean", "attention_kl"]
