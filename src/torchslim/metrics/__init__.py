"""Measurement: parameters, non-zeros, MACs, latency, accuracy (bytes on disk: ``torchslim.export.saved_size``)."""

from .evaluate import evaluate
from .profile import (
    Profile,
    compare_latency,
    count_macs,
    count_params,
    count_tables,
    measure_latency,
    profile,
)

__all__ = ["Profile", "profile", "evaluate", "count_params", "count_tables", "count_macs", "measure_latency", "compare_latency"]
