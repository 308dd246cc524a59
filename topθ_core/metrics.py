"""What was kept: metrics collected in memory during a forward pass.

:class:`SparsityMetrics` is an observer of the reference attention (and of the kernels,
which report the same counts).  Per (layer, query head, phase) it counts kept and
visible attention elements, what top-k would keep (``Σ min(L, k)``), rows, dense rows,
empty rows and rows whose length was extrapolated; per (layer, KV head, phase) the kept
V rows as the union over the group's query heads (and, in prefill, over all rows of
the call) against the KV length.  Optionally V-row popularity per layer.

Phase: a call with more than one query row is prefill (chunked prefill included), a
call with one query row is decode.  :meth:`SparsityMetrics.to_frame` exports a tidy
DataFrame; :func:`summarize` pools it.
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd
import torch

from .attention import RowBlock

PHASES = ("prefill", "decode")
_HEAD_FIELDS = ("kept", "visible", "topk_equiv", "rows", "dense_rows", "empty_rows", "extrapolated_rows")
_KV_FIELDS = ("kept_v_rows", "kv_rows", "calls")


def _pad_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """Zero/False-pad the last dimension of ``x`` to ``n`` (causal row chunks see growing key prefixes)."""
    return x if x.shape[-1] >= n else torch.nn.functional.pad(x, (0, n - x.shape[-1]))


class SparsityMetrics:
    """Accumulates kept counts.  Call as an observer: ``metrics(layer, block)``.

    Row chunks of one call may cover key prefixes of growing width (causal attention hands
    each chunk only the keys it can see); per-key tallies are padded to the widest chunk.
    """

    accepts_key_prefix = True

    def __init__(self, track_popularity: bool = False):
        self.track_popularity = track_popularity
        self._head: dict[tuple[int, str], torch.Tensor] = {}  # (layer, phase) → (n_fields, H) int64
        self._kv: dict[tuple[int, str], torch.Tensor] = {}  # (layer, phase) → (n_fields, Hkv) int64
        self._union: dict[int, torch.Tensor] = {}  # layer → (B, Hkv, N) bool for the call in progress
        self.popularity: dict[int, torch.Tensor] = {}  # layer → (N,) int64, last prefill call (summed over batch)
        self.decode_steps: dict[int, list[tuple[int, int]]] = defaultdict(list)  # layer → [(kept V rows, kv rows)]

    def reset(self) -> None:
        self.__init__(self.track_popularity)

    def add_extrapolated(self, layer: int, phase: str, extrap_rows: torch.Tensor) -> None:
        """``extrap_rows`` (B, H, R) bool: thresholded rows whose length was outside the calibrated range."""
        acc = self._head_acc(layer, phase, extrap_rows.shape[1], extrap_rows.device)
        acc[_HEAD_FIELDS.index("extrapolated_rows")] += extrap_rows.sum((0, 2))

    def _head_acc(self, layer, phase, H, device):
        key = (layer, phase)
        if key not in self._head:
            self._head[key] = torch.zeros(len(_HEAD_FIELDS), H, dtype=torch.long, device=device)
        return self._head[key]

    def __call__(self, layer: int, block: RowBlock) -> None:
        phase = "prefill" if block.q_len > 1 else "decode"
        B, H, R, N = block.kept.shape
        Hkv = block.n_kv_heads
        acc = self._head_acc(layer, phase, H, block.kept.device)
        vis = block.visible  # (B, 1, R, N)
        L = block.row_len  # (B, 1, R)
        has = (L > 0).expand(B, H, R)
        acc[0] += block.kept.sum((0, 2, 3))
        acc[1] += (L.sum() * torch.ones(H, dtype=torch.long, device=acc.device))
        k = block.k_per_head().to(L.device).view(1, H, 1)  # (1, H, 1)
        acc[2] += torch.minimum(L, k).sum((0, 2))  # what top-k with each head's k keeps
        acc[3] += has.sum((0, 2))
        acc[4] += (block.dense_rows & (L > 0)).expand(B, H, R).sum((0, 2))
        acc[5] += block.empty_rows.sum((0, 2))

        g = H // Hkv
        union = block.kept.view(B, Hkv, g * R, N).any(2)  # (B, Hkv, N)
        if block.row_start == 0 or layer not in self._union:
            self._union[layer] = union
        else:
            self._union[layer] = _pad_to(self._union[layer], N) | union
        if self.track_popularity and phase == "prefill":
            pop = block.kept.sum((0, 1, 2))
            self.popularity[layer] = pop if block.row_start == 0 else _pad_to(self.popularity[layer], N) + pop
        if block.row_start + R == block.q_len:  # last chunk of the call
            kv_seen = vis.any(2).squeeze(1)  # (B, N): keys visible to any row
            u = self._union.pop(layer) & kv_seen.unsqueeze(1)
            key = (layer, phase)
            if key not in self._kv:
                self._kv[key] = torch.zeros(len(_KV_FIELDS), Hkv, dtype=torch.long, device=acc.device)
            kv = self._kv[key]
            kv[0] += u.sum((0, 2))
            kv[1] += kv_seen.sum() * torch.ones(Hkv, dtype=torch.long, device=acc.device)
            kv[2] += 1
            if phase == "decode":
                self.decode_steps[layer].append((int(u.sum()), int(kv_seen.sum()) * Hkv))

    def add_counts(self, layer: int, phase: str, *, kept: torch.Tensor, visible: torch.Tensor,
                   topk_equiv: torch.Tensor, rows: torch.Tensor, dense_rows: torch.Tensor, empty_rows: torch.Tensor,
                   kept_v_rows: torch.Tensor, kv_rows: torch.Tensor) -> None:
        """Add counts a kernel computed itself (no kept mask materialised).

        Per query head (H,): ``kept``, ``visible``, ``topk_equiv``, ``rows``, ``dense_rows``,
        ``empty_rows``; per KV head (Hkv,): ``kept_v_rows`` (union over the group and the call's
        rows) and ``kv_rows`` (keys visible to any row).  All int64 tensors on any device.
        """
        acc = self._head_acc(layer, phase, kept.shape[0], kept.device)
        for i, val in enumerate((kept, visible, topk_equiv, rows, dense_rows, empty_rows)):
            acc[i] += val.to(acc.device, torch.long)
        key = (layer, phase)
        if key not in self._kv:
            self._kv[key] = torch.zeros(len(_KV_FIELDS), kept_v_rows.shape[0], dtype=torch.long, device=acc.device)
        kv = self._kv[key]
        kv[0] += kept_v_rows.to(acc.device, torch.long)
        kv[1] += kv_rows.to(acc.device, torch.long)
        kv[2] += 1
        if phase == "decode":
            self.decode_steps[layer].append((int(kept_v_rows.sum()), int(kv_rows.sum())))

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: (layer, phase, head, kv_head, kept, visible, …, kept_v_rows, kv_rows)."""
        rows = []
        for (layer, phase), acc in sorted(self._head.items()):
            a = acc.cpu()
            H = a.shape[1]
            kv = self._kv.get((layer, phase))
            kvc = kv.cpu() if kv is not None else None
            Hkv = kvc.shape[1] if kvc is not None else H
            g = max(1, H // Hkv)
            for h in range(H):
                row = {"layer": layer, "phase": phase, "head": h, "kv_head": h // g}
                row.update({f: int(a[i, h]) for i, f in enumerate(_HEAD_FIELDS)})
                if kvc is not None:
                    # each KV head's union is reported once, on the first query head of its group
                    first = h % g == 0
                    row["kept_v_rows"] = int(kvc[0, h // g]) if first else 0
                    row["kv_rows"] = int(kvc[1, h // g]) if first else 0
                else:
                    row["kept_v_rows"] = row["kv_rows"] = 0
                rows.append(row)
        df = pd.DataFrame(rows, columns=["layer", "phase", "head", "kv_head", *_HEAD_FIELDS, "kept_v_rows", "kv_rows"])
        df["kept_frac"] = df["kept"] / df["visible"].where(df["visible"] > 0)
        df["size_factor"] = df["kept"] / df["topk_equiv"].where(df["topk_equiv"] > 0)
        return df


def summarize(df: pd.DataFrame, phase: str = "prefill", layers: list[int] | None = None) -> dict[str, float]:
    """Pooled fractions over the given layers (all when ``None``) of one phase."""
    d = df[df["phase"] == phase]
    if layers is not None:
        d = d[d["layer"].isin(layers)]
    visible, kv_rows = d["visible"].sum(), d["kv_rows"].sum()
    nan = float("nan")
    return {
        "kept_attention": float(d["kept"].sum() / visible) if visible else nan,
        "kept_v_rows": float(d["kept_v_rows"].sum() / kv_rows) if kv_rows else nan,
        "size_factor": float(d["kept"].sum() / d["topk_equiv"].sum()) if d["topk_equiv"].sum() else nan,
        "empty_rows": int(d["empty_rows"].sum()),
        "extrapolated_rows": int(d["extrapolated_rows"].sum()),
        "rows": int(d["rows"].sum()),
    }
