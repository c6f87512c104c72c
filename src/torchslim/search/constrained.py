"""Deprecated: the search moved to :mod:`torchslim.search.api` (``search``, ``SearchResult``, ``Problem``,
``Evaluation``), :mod:`.allocation` (``lagrangian_path``) and :mod:`.storage` (``open_storage``,
``StorageError``)."""

import warnings

from .allocation import lagrangian_path
from .api import Evaluation, Problem, SearchResult, search
from .storage import StorageError, open_storage

__all__ = ["search", "SearchResult", "Problem", "Evaluation", "open_storage", "lagrangian_path", "StorageError"]

warnings.warn("torchslim.search.constrained is deprecated: import from torchslim.search (search, SearchOptions, "
              "SearchResult), torchslim.search.allocation or torchslim.search.storage", DeprecationWarning,
              stacklevel=2)
