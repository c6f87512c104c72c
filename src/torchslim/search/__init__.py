"""The accuracy-constrained search (min size / latency / MACs s.t. a metric budget) and one-shot sensitivity.

``torchslim.search(recipe, out_dir, SearchOptions(...))`` runs the search (:func:`torchslim.search.api.search`).
Modules, bottom to top: ``knobs`` (what a search chooses, from each technique's search space), ``scan``
(one-shot sensitivity; its ``sensitivity()`` is ``torchslim.sensitivity``), ``problem`` (evaluating one
setting), ``allocation`` (the fast strategy's path and bisection), ``pareto``, ``storage`` (the Optuna storage
and study), ``strategies`` (fast and optuna), ``options``, ``workers``, ``api``.
"""

import sys
import types

from .api import SearchResult, search
from .knobs import Knob, build_knobs
from .options import SearchOptions
from .pareto import choose, pareto_front, plot_pareto
from .scan import SensitivityResult
from .storage import StorageError, open_storage

__all__ = ["search", "SearchOptions", "SearchResult", "StorageError", "open_storage", "SensitivityResult",
           "build_knobs", "Knob", "pareto_front", "choose", "plot_pareto"]


class _CallablePackage(types.ModuleType):
    # ``torchslim.search`` is both this package and the search function: binding the function over the package
    # name would break ``import torchslim.search.api``, so the package itself is callable instead.
    def __call__(self, *args, **kwargs) -> SearchResult:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
