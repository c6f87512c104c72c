"""Deprecated: knobs moved to :mod:`torchslim.search.knobs`, the scans to :mod:`torchslim.search.scan`."""

import warnings

from .knobs import Knob, build_knobs, soften, stage_configs
from .scan import SensitivityResult, knob_sensitivity, output_error, sensitivity

__all__ = ["Knob", "build_knobs", "stage_configs", "soften", "knob_sensitivity", "sensitivity", "SensitivityResult",
           "output_error"]

warnings.warn("torchslim.search.sensitivity is deprecated: import from torchslim.search.knobs (Knob, build_knobs, "
              "stage_configs, soften) or torchslim.search.scan (sensitivity, SensitivityResult, knob_sensitivity)",
              DeprecationWarning, stacklevel=2)
