"""The base of the reference models: constructor arguments recorded for checkpoints."""

from __future__ import annotations

from typing import Any

from torch import nn


class _Recorded(nn.Module):
    init_kwargs: dict[str, Any]

    def _record(self, **kwargs: Any) -> None:
        self.init_kwargs = dict(kwargs)
