"""Selection variants: which visible attention elements a row keeps.

Each variant is a small pure function of a :class:`RowScores` returning ``(kept, kth_next)``,
keyed by :class:`~topθ_core.config.Selection` in :data:`SELECTIONS`.  ``scores`` are in the
placement's space: logits ``a_ij`` for pre-softmax, dense probabilities ``p_ij`` for post-softmax.
``kth_next`` is the (k+1)-th largest score per row when the variant computed it (top-k), which
calibration reuses as its sample.

Shapes: ``scores`` (B, H, R, N) with ``-inf`` (pre) or 0 (post) at invisible keys,
``visible`` (B, 1, R, N) bool, ``theta`` and ``row_max`` (B, H, R), ``kept`` (B, H, R, N) bool.
Top-θ's row rules (capk, the empty-row floor, always-kept positions) follow in
:func:`theta_row_rules`; dense short rows are the attention's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import EmptyRowFloor, Selection, ThetaReference

@dataclass(frozen=True)
class RowScores:
    """What a selection variant reads for one chunk of rows."""

    scores: torch.Tensor  # (B, H, R, N)
    visible: torch.Tensor  # (B, 1, R, N) bool
    theta: "torch.Tensor | None"  # (B, H, R), in the space ``reference`` says
    k: "int | torch.Tensor"  # one k, or (H,) per head
    row_max: torch.Tensor  # (B, H, R) the largest visible logit (0 for rows without keys)
    reference: ThetaReference = ThetaReference.ABSOLUTE


Kept = tuple[torch.Tensor, "torch.Tensor | None"]
SelectFn = Callable[[RowScores], Kept]


def select_dense(s: RowScores) -> Kept:
    """Keep every visible element."""
    return s.visible.expand(s.scores.shape).clone(), None


def select_top_k(s: RowScores) -> Kept:
    """Keep the ``k`` largest visible elements of each row (exactly ``min(k, L)``), and the (k+1)-th score."""
    return top_k_with_next(s.scores, s.visible, s.k)


def select_top_theta(s: RowScores) -> Kept:
    """Keep element j of row i iff its score beats θ_i (one compare, no row-wide dependency);
    :data:`THETA_REFERENCES` says what θ is compared with."""
    if s.theta is None:
        raise ValueError("top-theta selection needs thresholds (theta is None)")
    return THETA_REFERENCES[s.reference](s.scores, s.visible, s.theta, s.row_max), None


def top_k_with_next(scores: torch.Tensor, visible: torch.Tensor, k: "int | torch.Tensor"
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-k kept mask plus the ``(k+1)``-th largest score per row (B, H, R), from one ``topk``.

    ``scores`` must already rank invisible keys lowest (``-inf`` logits, 0 probabilities), as
    the attention hands them over.  The second value is ``None`` when rows are too short to
    have a (k+1)-th element.  ``k`` may be one int or a (H,) long tensor of per-head k; then
    the second value is always a tensor, ``-inf`` for heads whose rows have no (k+1)-th element.
    """
    if torch.is_tensor(k):
        return _top_k_per_head(scores, visible, k)
    n = scores.shape[-1]
    if k >= n:
        return visible.expand(scores.shape).clone(), None
    # Unsorted top-(k+1) (a quarter cheaper on CPU than sorted); its minimum is the (k+1)-th
    # largest, and every other index is kept.
    values, idx = scores.topk(k + 1, dim=-1, sorted=False)
    nxt, last = values.min(-1, keepdim=True)
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    kept.scatter_(-1, idx, True)
    kept.scatter_(-1, idx.gather(-1, last), False)
    return kept & visible, nxt.squeeze(-1)


def _top_k_per_head(scores: torch.Tensor, visible: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_k_with_next` with one k per head (dim 1): one sorted ``topk`` of the largest k + 1."""
    B, H, R, n = scores.shape
    width = min(int(k.max()) + 1, n)
    values, idx = scores.topk(width, dim=-1, sorted=True)  # (B, H, R, width), descending
    kh = k.to(scores.device).view(1, H, 1, 1)
    keep = (torch.arange(width, device=scores.device).view(1, 1, 1, -1) < kh).expand(B, H, R, width)
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    kept.scatter_(-1, idx, keep)
    nxt = values.gather(-1, kh.clamp(max=width - 1).expand(B, H, R, 1)).squeeze(-1)
    nxt = torch.where(kh.view(1, H, 1) < width, nxt, torch.full_like(nxt, float("-inf")))
    return kept & visible, nxt


def theta_absolute(scores: torch.Tensor, visible: torch.Tensor, theta, row_max: torch.Tensor) -> torch.Tensor:
    """θ in score space: keep j iff ``a_ij > θ_i`` (``row_max`` unused)."""
    return (scores > theta.unsqueeze(-1)) & visible


def theta_row_max(scores: torch.Tensor, visible: torch.Tensor, theta, row_max: torch.Tensor) -> torch.Tensor:
    """θ relative to the row maximum: keep j iff ``a_ij − m_i > θ_rel,i``, ``m_i = max_{visible j} a_ij``.

    ``row_max`` (B, H, R) is ``m`` (0 for rows with no visible key).  The row's maximum always
    passes a negative θ_rel, so no row is empty unless θ_rel ≥ 0.
    """
    return ((scores - row_max.unsqueeze(-1)) > theta.unsqueeze(-1)) & visible


ThetaFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]
THETA_REFERENCES: dict[ThetaReference, ThetaFn] = {
    ThetaReference.ABSOLUTE: theta_absolute,
    ThetaReference.ROW_MAX: theta_row_max,
}


def cap_k_recent(kept: torch.Tensor, k: int) -> torch.Tensor:
    """capk: keep at most ``k`` survivors per row, preferring the most recent positions."""
    from_right = kept.flip(-1).to(torch.int32).cumsum(-1).flip(-1)  # survivors at or after j
    return kept & (from_right <= k)


def floor_empty_rows(kept: torch.Tensor, scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty-row floor 'max': a row with visible keys but no survivor keeps its maximum element.

    Returns ``(kept, empty)`` where ``empty`` (B, H, R) flags the rows that were empty.
    """
    empty = ~kept.any(-1) & visible.any(-1)
    if empty.any():
        arg = scores.masked_fill(~visible, float("-inf")).argmax(-1, keepdim=True)
        top = torch.zeros_like(kept).scatter_(-1, arg, True)
        kept = kept | (top & empty.unsqueeze(-1))
    return kept, empty


def always_kept(visible: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Position rule: the first ``sink`` and the last ``recent`` visible keys of each row, (B, 1, R, N) bool.

    Ranks count visible keys only (padding and masked keys are skipped), so in a causal row
    ``recent=1`` is the diagonal and ``sink=1`` the first token.  Both depend only on
    positions, never on scores: a tiled kernel can apply them tile by tile.
    """
    out = torch.zeros_like(visible)
    if sink > 0:
        out |= visible & (visible.to(torch.int32).cumsum(-1) <= sink)
    if recent > 0:
        out |= visible & (visible.flip(-1).to(torch.int32).cumsum(-1).flip(-1) <= recent)
    return out


SELECTIONS: dict[Selection, SelectFn] = {
    Selection.DENSE: select_dense,
    Selection.TOP_K: select_top_k,
    Selection.TOP_THETA: select_top_theta,
}


def theta_row_rules(kept: torch.Tensor, s: RowScores, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-θ's rules after the compare, in order: capk, the empty-row floor, always-kept positions.

    Returns ``(kept, empty)``, ``empty`` (B, H, R) flagging rows where nothing passed θ (before the floor).
    """
    if config.capk:
        kept = cap_k_recent(kept, s.k.view(1, -1, 1, 1) if torch.is_tensor(s.k) else s.k)
    if config.empty_row is EmptyRowFloor.MAX:
        kept, empty = floor_empty_rows(kept, s.scores, s.visible)
    else:
        empty = ~kept.any(-1) & s.visible.any(-1)
    if config.sink_tokens or config.recent_tokens:
        kept = kept | always_kept(s.visible, config.sink_tokens, config.recent_tokens)  # position rule, after the floor
    return kept, empty
