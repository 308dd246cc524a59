"""Triton GPU kernels for Top-θ attention (decode, prefill).

Public API: :func:`topθ_decode`, :func:`topθ_prefill`, their PyTorch references in
:mod:`topθ_core.kernels.reference`, :class:`KernelCounts`, :func:`kernel_variant` (which configs
the kernels implement) and its Enums :class:`KernelSdc`, :class:`KernelTheta`.  Importing this
package needs Triton; the kernels run on CUDA (or on CPU under ``TRITON_INTERPRET=1``, for tests).
"""

from ._common import KernelCounts, KernelSdc, KernelTheta, kernel_variant
from .decode import topθ_decode
from .prefill import topθ_prefill

__all__ = ["KernelCounts", "KernelSdc", "KernelTheta", "kernel_variant", "topθ_decode", "topθ_prefill"]
