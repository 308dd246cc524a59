"""The per-row calibration sample: the score that keeps exactly k, and the mass below it.

Plain tensor code, shared by calibration and the kernels' references (it sits below both).
"""

from __future__ import annotations

import torch

from .config import Placement


def row_samples_ref(logits: torch.Tensor, kth: "int | torch.Tensor", placement: Placement = Placement.PRE
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row threshold sample and dropped mass, reference.

    ``logits`` (..., H, N) with ``-inf`` at invisible keys; rows must have at least ``kth``
    visible keys.  ``kth`` is one int or (H,) per head.  Returns ``t`` (..., H) the
    ``kth``-largest score (logit for pre, dense probability for post) and ``d_u`` (..., H)
    ``Σ_{a ≤ t} e^(a − m)`` over visible keys.
    """
    m = logits.amax(-1, keepdim=True)
    e = torch.exp(logits - m)
    if placement is Placement.POST:
        scores = e / e.sum(-1, keepdim=True)
        scores = torch.where(torch.isfinite(logits), scores, torch.full_like(scores, -1.0))
    else:
        scores = logits
    if torch.is_tensor(kth):
        width = min(int(kth.max()), scores.shape[-1])
        values = scores.topk(width, dim=-1).values  # (..., H, width), descending
        idx = (kth.to(values.device).clamp(max=width) - 1).view(-1, 1).expand(*values.shape[:-1], 1)
        t = values.gather(-1, idx).squeeze(-1)
    else:
        t = scores.topk(kth, dim=-1).values[..., -1]
    d_u = (e * (scores <= t.unsqueeze(-1))).sum(-1)
    return t, d_u
