"""Low-rank decomposition: truncated SVD of Linear layers, Tucker-2 and CP of Conv2d layers."""

from .config import CP, SVD, Tucker
from .cp import cp_conv, cp_to_sequence
from .decompose import decompose, summarize
from .svd import svd_linear
from .tucker import tucker_conv

__all__ = ["SVD", "Tucker", "CP", "decompose", "summarize", "svd_linear", "tucker_conv", "cp_conv",
           "cp_to_sequence"]
