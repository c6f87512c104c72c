"""Sensitivity analysis and the accuracy-constrained search (min size / latency / MACs s.t. a metric budget).

``search`` and the submodules: ``sensitivity`` (search spaces and one-shot scans; its ``sensitivity()`` function
is exported as ``torchslim.sensitivity``), ``constrained`` (the strategies) and ``pareto``.
"""

from .constrained import SearchResult, StorageError, open_storage, search
from .pareto import choose, pareto_front, plot_pareto
from .sensitivity import Knob, SensitivityResult, build_knobs, search_spaces

__all__ = ["search", "SearchResult", "StorageError", "open_storage", "SensitivityResult", "search_spaces",
           "build_knobs", "Knob", "pareto_front", "choose", "plot_pareto"]
