"""Sensitivity analysis and the accuracy-constrained search (min size / latency / MACs s.t. a metric budget).

``torchslim.search(recipe, out_dir, ...)`` runs the search (see :func:`torchslim.search.constrained.search`);
the submodules are ``sensitivity`` (search spaces and one-shot scans; its ``sensitivity()`` function is exported
as ``torchslim.sensitivity``), ``constrained`` (the strategies) and ``pareto``.
"""

import sys
import types

from .constrained import SearchResult, StorageError, open_storage, search
from .pareto import choose, pareto_front, plot_pareto
from .sensitivity import Knob, SensitivityResult, build_knobs

__all__ = ["search", "SearchResult", "StorageError", "open_storage", "SensitivityResult",
           "build_knobs", "Knob", "pareto_front", "choose", "plot_pareto"]


class _CallablePackage(types.ModuleType):
    # ``torchslim.search`` is both this package and the search function: binding the function over the package
    # name would break ``import torchslim.search.constrained``, so the package itself is callable instead.
    def __call__(self, *args, **kwargs) -> SearchResult:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
