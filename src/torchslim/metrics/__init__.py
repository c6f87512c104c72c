"""Measurement: parameters, non-zeros, MACs, latency, bytes on disk, accuracy."""

from .evaluate import evaluate
from .profile import (
    Profile,
    compare_latency,
    count_macs,
    count_params,
    measure_latency,
    profile,
    saved_size,
)

__all__ = ["Profile", "profile", "evaluate", "count_params", "count_macs", "measure_latency", "compare_latency", "saved_size"]
