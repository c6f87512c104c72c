"""The distillation technique's descriptor."""

from ..core.technique import Technique
from .config import Distillation
from .distill import distill

TECHNIQUES = (Technique(config=Distillation, apply=distill, family="distill", needs_teacher=True),)
