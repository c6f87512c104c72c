"""Knowledge distillation: soft targets, output matching and feature hints from a frozen teacher."""

from .config import Distillation
from .distill import distill
from .losses import (
           feature_loss,
           kd_loss,
           make_projection,
           output_matching_loss,
           soft_target_loss,
)

__all__ = ["Distillation", "distill", "kd_loss", "soft_target_loss", "output_matching_loss", "feature_loss",
           "make_projection"]
