"""Triton GPU kernels for Top-θ attention (decode, prefill, calibration samples).

Public API: :func:`topθ_decode`, :func:`topθ_prefill`, :func:`row_samples`, their PyTorch
references in :mod:`topθ_core.kernels.reference`, :class:`KernelCounts` and
:func:`kernel_variant` (which configs the kernels implement).  Importing this package needs
Triton; the kernels run on CUDA (or on CPU under ``TRITON_INTERPRET=1``, for tests).
"""

from ._common import KernelCounts, kernel_variant
from .calib import row_samples
from .decode import topθ_decode
from .prefill import topθ_prefill

__all__ = ["KernelCounts", "kernel_variant", "row_samples", "topθ_decode", "topθ_prefill"]
