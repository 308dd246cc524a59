"""Dispatch from the transformers attention function to the Triton GPU kernels.

:func:`try_kernels` is the one place that decides between a kernel and the PyTorch reference:
it returns the attention output (B, Hq, Sq, d) when a kernel computes exactly this call, and
``None`` otherwise, in which case the caller runs the reference with identical semantics.

Supported: dense and top-θ pre-softmax selection with any SDC, VMC and empty-row floor, one k
per layer; θ relative to the row max in decode; decode (one query row) against a cache whose
visible keys are a prefix (every key, or a static cache's first L_b keys) and causal prefill
(``Sq ≤ Sk``, bottom-right aligned: chunked prefill included).  Not supported, so the
reference runs: top-k, post-softmax placement, capk, always-kept sink/recent positions, per-head
k, row-max θ in prefill, soft-capping, other masks (padding, sliding windows), observers (they
need the reference's row blocks), V-row popularity tracking; and any tensor the kernels do not
take (CPU unless ``TRITON_INTERPRET=1``, fp32, head dims other than 64/128).

VMC in decode reads ``v̄`` from a float32 running sum of the cache's V rows kept in the run's
scratch: ``(rows summed, (B, Hkv, d) sum)`` under ``("topθ.vsum", layer)``.  A prefill through the
kernel seeds it, each decode step adds the rows appended since (O(d) per step), and it is
rebuilt from the cache when it cannot belong to it.  Kept counts go to
``state.metrics.add_counts`` without a kept mask.

Static caches (:mod:`topθ_core.graph_decode`): a decode call given ``lengths`` (B,) int32 on the
device (the run's scratch holds them under ``STATIC_LENGTHS``; the caller guarantees that every
decode mask is then the key prefix [0, L_b)) hands them to the kernel, with no host
synchronisation, so the call can be captured in a CUDA graph.  The VMC sum then lives under
``("topθ.vsum_static", layer)``: seeded by one eager step with the rows before ``L − 1``; the kernel adds row ``L − 1``
in place at every call (``update_v_sum``), so the step launches nothing else for it.  Each call's
:class:`~topθ_core.kernels.KernelCounts` are left under ``(COUNTS, layer)`` for the caller,
which reports them after the graph ran.
"""

from __future__ import annotations

import os

import torch

from .attention import causal_visible

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once at import: CPU tensors allowed (tests)
_VSUM_KEY = "topθ.vsum"
_VSUM_STATIC_KEY = "topθ.vsum_static"
STATIC_LENGTHS = "topθ.static_lengths"  # scratch: (B,) int32 valid keys of a static-cache decode step, kept by
# the caller on the device (graph_decode); its decode masks are those key prefixes
COUNTS = "topθ.counts"  # scratch key prefix: (COUNTS, layer) → the layer's last KernelCounts (static prefix runs)

_KERNELS = None  # the kernels package once imported, False when Triton is missing


def _kernels():
    """The Triton kernels package, imported on first use (``None`` when Triton is not installed)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from . import kernels

            _KERNELS = kernels
        except ImportError:  # pragma: no cover - depends on the install
            _KERNELS = False
    return _KERNELS or None


def _supported_tensors(query, key, value) -> bool:
    from .kernels._common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    if query.dtype not in SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        return False
    B, Hq, Sq, d = query.shape
    Bk, Hkv, Sk, dk = key.shape
    return d in SUPPORTED_HEAD_DIMS and dk == d and Bk == B and Hkv > 0 and Hq % Hkv == 0 and 1 <= Sq <= Sk


def _running_v_sum(state, layer: int, value: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(v_sum, update)``: the (B, Hkv, d) float32 sum of the N cached V rows, kept incrementally.

    ``update``: the sum lacks the last row (N − 1), which the decode kernel adds in place (the
    usual decode step: one new row, no launch of its own); else the sum is complete.
    """
    B, Hkv, N, d = value.shape
    entry = state.scratch.get((_VSUM_KEY, layer))
    if entry is not None:
        n, vsum = entry
        if vsum.shape == (B, Hkv, d) and vsum.device == value.device and n <= N:
            state.scratch[(_VSUM_KEY, layer)] = (N, vsum)
            if n == N - 1:
                return vsum, True  # the kernel adds row N − 1 (the sum is only held here; launches are stream-ordered)
            if n < N:
                vsum.add_(value[:, :, n:N].sum(2, dtype=torch.float32))
            return vsum, False
    vsum = value.sum(2, dtype=torch.float32)
    state.scratch[(_VSUM_KEY, layer)] = (N, vsum)
    return vsum, False


def _static_v_sum(state, layer: int, value: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, d) float32 sum of each sequence's first L_b − 1 V rows of a static cache, on the device;
    the decode kernel adds row ``L_b − 1`` (the one the step just wrote) in place.

    The first call (eager) sums the rows before it; later calls only return the sum, which the
    previous call's kernel advanced (one decode step per call, which a captured step guarantees).
    """
    B, Hkv, N, d = value.shape
    vsum = state.scratch.get((_VSUM_STATIC_KEY, layer))
    if vsum is None or vsum.shape != (B, Hkv, d) or vsum.device != value.device:
        if value.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the static-cache V sum (VMC) is seeded by one eager decode step before capture")
        before = torch.arange(N, device=value.device).view(1, N) < (lengths.view(B, 1) - 1)  # (B, N)
        vsum = (value.float() * before.view(B, 1, N, 1)).sum(2)
        state.scratch[(_VSUM_STATIC_KEY, layer)] = vsum
    return vsum


def _report(state, layer: int, phase: str, counts, B: int, Hq: int, Hkv: int, Sq: int, Sk: int, k_keep: int,
            device) -> None:
    """Kernel counts → ``SparsityMetrics.add_counts`` (same numbers the reference observer adds)."""
    offset = Sk - Sq
    L = torch.arange(offset + 1, Sk + 1, dtype=torch.long)  # row lengths, causal
    full = lambda n, val: torch.full((n,), int(val), dtype=torch.long, device=device)  # noqa: E731
    state.metrics.add_counts(
        layer, phase,
        kept=counts.kept.sum(0, dtype=torch.long), visible=full(Hq, B * int(L.sum())),
        topk_equiv=full(Hq, B * int(L.clamp(max=k_keep).sum())), rows=full(Hq, B * Sq),
        dense_rows=full(Hq, B * int((L <= k_keep).sum())), empty_rows=counts.empty.sum(0, dtype=torch.long),
        kept_v_rows=counts.kept_v_rows.sum(0, dtype=torch.long), kv_rows=full(Hkv, B * Sk),
    )


def report_decode_counts(metrics, layer: int, counts, lengths: torch.Tensor, k_keep: int) -> None:
    """A decode call's kernel counts with per-sequence lengths ``lengths`` (B,) → ``metrics``.

    What the reference observer adds for one decode row per sequence of length L_b.
    """
    B, Hq = counts.kept.shape
    Hkv = counts.kept_v_rows.shape[1]
    L = lengths.to(torch.long)
    per_head = lambda x: x.expand(Hq)  # noqa: E731
    metrics.add_counts(
        layer, "decode",
        kept=counts.kept.sum(0, dtype=torch.long), visible=per_head(L.sum()),
        topk_equiv=per_head(L.clamp(max=k_keep).sum()), rows=per_head(torch.tensor(B, device=L.device)),
        dense_rows=per_head((L <= k_keep).sum()), empty_rows=counts.empty.sum(0, dtype=torch.long),
        kept_v_rows=counts.kept_v_rows.sum(0, dtype=torch.long), kv_rows=L.sum().expand(Hkv),
    )


def decode_kernel_takes(model: torch.nn.Module, config) -> bool:
    """Whether :func:`try_kernels` would run the decode kernel for this model's attention under
    ``config`` (device, dtype, head dim, variant, soft-capping); used to choose a decode path up front."""
    p = next(model.parameters())
    if not (p.is_cuda or (_INTERPRET and p.device.type == "cpu")):
        return False
    kernels = _kernels()
    if kernels is None or kernels.kernel_variant(config, decode=True) is None:
        return False
    from .kernels._common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    return p.dtype in SUPPORTED_DTYPES and head_dim in SUPPORTED_HEAD_DIMS and not softcap


def _prefix_length(visible: torch.Tensor) -> int | None:
    """Eager decode: the common key count L when every sequence sees exactly keys [0, L), else ``None``
    (one host synchronisation)."""
    B, _, N = visible.shape
    vis = visible.reshape(B, N)
    lengths = vis.sum(-1)
    L0 = lengths[0]
    prefix = torch.arange(N, device=visible.device) < L0
    ok = (L0 > 0) & (lengths == L0).all() & (vis == prefix).all()
    L, ok = torch.stack([L0, ok.to(L0.dtype)]).tolist()
    return int(L) if ok else None


def try_kernels(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, visible: torch.Tensor | None,
                theta: torch.Tensor | None, sdc_term: torch.Tensor | None, k_keep, scaling: float | None,
                softcap: float | None, state, layer: int, lengths: torch.Tensor | None = None
                ) -> torch.Tensor | None:
    """Run the Triton kernel for this attention call, or return ``None`` (the reference runs).

    ``query`` (B, Hq, Sq, d), ``key``/``value`` (B, Hkv, Sk, d); ``visible`` (B, Sq, Sk) bool, or
    ``None`` for plain causal attention (no mask); ``lengths`` (B,) int32 on the device: a
    static-cache decode step (Sq = 1) whose mask is the key prefix [0, L_b) of each sequence; ``theta``/``sdc_term`` (B, Hq, Sq) float32 or
    ``None``; ``k_keep`` this layer's k (a list when heads differ); ``state`` the active
    :class:`~topθ_core.integration.RunState` (config, metrics, observers, scratch).  Returns
    (B, Hq, Sq, d) in ``query``'s dtype.
    """
    cfg = state.config
    if not state.use_kernels or softcap is not None or state.observers or not isinstance(k_keep, int):
        return None
    if not (query.is_cuda or (_INTERPRET and query.device.type == "cpu")):
        return None
    metrics = state.metrics
    if metrics is not None and getattr(metrics, "track_popularity", False):
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    B, Hq, Sq, d = query.shape
    var = kernels.kernel_variant(cfg, decode=Sq == 1)
    if var is None or not _supported_tensors(query, key, value):
        return None
    if not var.dense and (theta is None or (var.sdc is kernels.KernelSdc.OFFLINE and sdc_term is None)):
        return None
    Hkv, Sk = key.shape[1], key.shape[2]
    scale = float(d ** -0.5 if scaling is None else scaling)
    if Sq == 1:
        return _decode(kernels, query, key, value, visible, lengths, theta, sdc_term, cfg, var, k_keep, scale, state,
                       layer)
    if visible is not None and not torch.equal(visible, causal_visible(Sq, Sk, visible.device, B)):
        return None
    out, counts, v_total = kernels.topθ_prefill(query, key, value, theta, config=cfg, k_keep=k_keep,
                                                sdc_term=sdc_term, scale=scale, counts=metrics is not None,
                                                return_v_sum=True)
    if v_total is not None:
        state.scratch[(_VSUM_KEY, layer)] = (Sk, v_total)
    if metrics is not None:
        _report(state, layer, "prefill", counts, B, Hq, Hkv, Sq, Sk, k_keep, query.device)
    return out


def _decode(kernels, query, key, value, visible, lengths, theta, sdc_term, cfg, var, k_keep, scale, state, layer):
    B, Hq, _, _ = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]
    if lengths is None and visible is not None:
        L = _prefix_length(visible)
        if L is None:
            return None  # padding or another mask: the reference handles arbitrary visibility
        key, value, Sk = key[:, :, :L], value[:, :, :L], L
    v_sum, update = None, False
    if var.vmc:
        v_sum, update = (_running_v_sum(state, layer, value) if lengths is None
                         else (_static_v_sum(state, layer, value, lengths), True))
    out, counts = kernels.topθ_decode(query, key, value, theta, config=cfg, k_keep=k_keep, sdc_term=sdc_term,
                                      v_sum=v_sum, update_v_sum=update, lengths=lengths, scale=scale)
    if lengths is not None:
        state.scratch[(COUNTS, layer)] = counts
    if state.metrics is not None:
        if lengths is None:
            _report(state, layer, "decode", counts, B, Hq, Hkv, 1, Sk, k_keep, query.device)
        else:
            report_decode_counts(state.metrics, layer, counts, lengths, k_keep)
    return out
