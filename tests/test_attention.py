"""The reference attention against an independent float64 row-by-row computation of SPEC.md."""

from __future__ import annotations

import math

import pytest
import torch

from topθ_core.attention import causal_visible, dense_attention_ref, topθ_attention_ref
from topθ_core.config import SDC, EmptyRowFloor, Placement, Selection, SparseConfig


def naive_row(a, vis, v, *, selection, placement, sdc, scale_s, vmc, capk, floor, k, theta, offline,
              reference="absolute"):
    """One query row, straight from SPEC.md's formulas, in Python over a few elements.

    a: (N,) logits; vis: (N,) bool; v: (N, d); returns (d,) output and the kept list."""
    idx = [j for j in range(len(a)) if vis[j]]
    L = len(idx)
    if L == 0:
        return torch.zeros(v.shape[1], dtype=torch.float64), []
    m = max(float(a[j]) for j in idx)
    e = {j: math.exp(float(a[j]) - m) for j in idx}
    z = sum(e.values())
    p_dense = {j: e[j] / z for j in idx}
    if L <= k or selection == "dense":
        kept = list(idx)
    elif selection == "top-k":
        kept = sorted(idx, key=lambda j: (-float(a[j]), j))[:k]
    else:
        score = p_dense if placement == "post" else {j: float(a[j]) for j in idx}
        if reference == "row-max":  # θ relative to the row maximum: a_j − m > θ_rel
            score = {j: float(a[j]) - m for j in idx}
        kept = [j for j in idx if score[j] > theta]
        if capk and len(kept) > k:
            kept = sorted(kept)[-k:]
        if not kept and floor == "max":
            kept = [max(idx, key=lambda j: (float(a[j]), -j))]
    kept_set = set(kept)
    dropped = [j for j in idx if j not in kept_set]
    if placement == "post":
        p = {j: p_dense[j] for j in kept}
    else:
        d_s = sum(e[j] for j in kept)
        if not dropped or sdc == "none":
            d_u = 0.0
        elif sdc == "exact":
            d_u = sum(e[j] for j in dropped)
        elif sdc == "exp-threshold":
            d_u = len(dropped) * math.exp(theta if reference == "row-max" else theta - m)
        else:
            d_u = offline
        denom = d_s + scale_s * d_u
        p = {j: (e[j] / denom if denom > 0 else 0.0) for j in kept}
    out = torch.zeros(v.shape[1], dtype=torch.float64)
    for j, pj in p.items():
        out += pj * v[j]
    if vmc and selection != "dense":
        vbar = sum(v[j] for j in idx) / L
        out += (1 - sum(p.values())) * vbar
    return out, sorted(kept)


def naive_attention(q, k, v, visible, cfg: SparseConfig, k_keep, theta=None, offline=None, scale=None):
    B, Hq, Sq, d = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hq, Sq, v.shape[-1], dtype=torch.float64)
    kept_all = torch.zeros(B, Hq, Sq, k.shape[2], dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            kh = h // g
            for i in range(Sq):
                a = (k[b, kh].double() @ q[b, h, i].double()) * scale
                o, kept = naive_row(a, visible[b, i], v[b, kh].double(), selection=cfg.selection.value,
                                    placement=cfg.placement.value, sdc=cfg.sdc.value, scale_s=cfg.sdc_scale,
                                    vmc=cfg.vmc, capk=cfg.capk, floor=cfg.empty_row.value,
                                    k=k_keep[h] if isinstance(k_keep, (list, tuple)) else k_keep,
                                    theta=None if theta is None else float(theta[b, h, i]),
                                    offline=None if offline is None else float(offline[b, h, i]),
                                    reference=cfg.theta_reference.value)
                out[b, h, i] = o
                kept_all[b, h, i, kept] = True
    return out, kept_all


def rand_inputs(B=2, Hq=4, Hkv=2, Sq=9, Sk=9, d=8, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    q = torch.randn(B, Hq, Sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Sk, d, generator=g, dtype=torch.float64)
    return q, k, v


def rand_thresholds(cfg: SparseConfig, B: int, Hq: int, Sq: int, seed: int):
    """θ per row (probability-space for post-softmax, logit-space for pre) and offline SDC terms."""
    gen = torch.Generator().manual_seed(seed)
    if cfg.placement is Placement.POST:
        theta = torch.rand(B, Hq, Sq, generator=gen, dtype=torch.float64) * 0.25
    else:
        theta = torch.randn(B, Hq, Sq, generator=gen, dtype=torch.float64) * 0.5 + 0.3
    return theta, torch.rand(B, Hq, Sq, generator=gen, dtype=torch.float64) * 2


VARIANTS = [
    SparseConfig(selection="top-theta", placement="pre", sdc="none", vmc=False),
    SparseConfig(selection="top-theta", placement="pre", sdc="exact", vmc=False),
    SparseConfig(selection="top-theta", placement="pre", sdc="exact", sdc_scale=0.5, vmc=True),
    SparseConfig(selection="top-theta", placement="pre", sdc="exp-threshold", vmc=True),
    SparseConfig(selection="top-theta", placement="pre", sdc="offline", vmc=True),
    SparseConfig(selection="top-theta", placement="pre", sdc="offline", vmc=True, capk=True),
    SparseConfig(selection="top-theta", placement="pre", sdc="exact", vmc=True, empty_row="none"),
    SparseConfig(selection="top-theta", placement="pre", sdc="none", vmc=False, empty_row="none"),
    SparseConfig(selection="top-theta", placement="post", sdc="none", vmc=True),
    SparseConfig(selection="top-theta", placement="post", sdc="none", vmc=False, capk=True),
    SparseConfig(selection="top-k", placement="pre", sdc="none", vmc=False),
    SparseConfig(selection="top-k", placement="pre", sdc="exact", vmc=True),
    SparseConfig(selection="top-k", placement="post", sdc="none", vmc=True),
]


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: c.label())
def test_variants_match_float64_hand_computation(cfg):
    q, k, v = rand_inputs(Sq=7, Sk=11)
    B, Hq, Sq, _ = q.shape
    visible = causal_visible(Sq, 11, batch=B)
    theta, offline = rand_thresholds(cfg, B, Hq, Sq, seed=1)
    out = topθ_attention_ref(q, k, v, config=cfg, k_keep=3, visible=visible, theta=theta, sdc_term=offline)
    ref, _ = naive_attention(q, k, v, visible, cfg, 3, theta, offline)
    print("max err", (out - ref).abs().max().item())
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: c.label())
def test_plain_causal_chunked_rows_match_float64_hand_computation(cfg):
    """``visible=None`` (plain causal: VMC's row means come from a prefix sum of V), query rows at
    an offset into the keys (chunked prefill) and split into chunks of 3 rows."""
    q, k, v = rand_inputs(Sq=7, Sk=11, seed=5)
    B, Hq, Sq, _ = q.shape
    theta, offline = rand_thresholds(cfg, B, Hq, Sq, seed=2)
    out = topθ_attention_ref(q, k, v, config=cfg, k_keep=3, theta=theta, sdc_term=offline,
                             block_elements=B * Hq * 11 * 3)
    ref, _ = naive_attention(q, k, v, causal_visible(Sq, 11, batch=B), cfg, 3, theta, offline)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_theta_minus_inf_without_compensation_is_dense_sdpa():
    q, k, v = rand_inputs(Sq=13, Sk=13)
    cfg = SparseConfig(selection="top-theta", sdc="none", vmc=False)
    theta = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)
    out = topθ_attention_ref(q, k, v, config=cfg, k_keep=2, theta=theta)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    torch.testing.assert_close(out, ref)


def test_top_k_with_k_at_least_length_equals_dense():
    q, k, v = rand_inputs(Sq=10, Sk=10)
    cfg = SparseConfig(selection="top-k", sdc="none", vmc=False)
    torch.testing.assert_close(topθ_attention_ref(q, k, v, config=cfg, k_keep=10), dense_attention_ref(q, k, v))


def test_top_k_keeps_exactly_min_k_L_per_row():
    q, k, v = rand_inputs(Sq=12, Sk=12)
    seen = {}
    cfg = SparseConfig(selection="top-k", sdc="none", vmc=False)
    topθ_attention_ref(q, k, v, config=cfg, k_keep=4, observer=lambda b: seen.setdefault("kept", b.kept))
    counts = seen["kept"].sum(-1)
    L = torch.arange(1, 13)
    assert torch.equal(counts, torch.minimum(L, torch.tensor(4)).expand_as(counts))


def test_decode_rows_equal_prefill_rows_and_sdc_applies_in_decode():
    """Each prefill row, recomputed as a decode step (q_len 1 with the cache so far), is identical."""
    q, k, v = rand_inputs(B=1, Sq=15, Sk=15)
    cfg = SparseConfig(selection="top-theta", sdc="exact", vmc=True)
    theta = torch.randn(1, 4, 15, dtype=torch.float64) * 0.3
    full = topθ_attention_ref(q, k, v, config=cfg, k_keep=3, theta=theta)
    for i in range(15):
        step = topθ_attention_ref(q[:, :, i:i + 1], k[:, :, : i + 1], v[:, :, : i + 1], config=cfg, k_keep=3,
                                  theta=theta[:, :, i:i + 1])
        torch.testing.assert_close(step[:, :, 0], full[:, :, i], rtol=1e-12, atol=1e-12)
    # SDC acts in decode: with exact SDC and no VMC, a thresholded decode row sums to < 1
    probs = {}
    cfg2 = SparseConfig(selection="top-theta", sdc="exact", vmc=False)
    topθ_attention_ref(q[:, :, -1:], k, v, config=cfg2, k_keep=3, theta=theta[:, :, -1:] + 10,
                       observer=lambda b: probs.setdefault("p", b.probs))
    assert (probs["p"].sum(-1) < 1 - 1e-6).all()


def test_chunked_rows_equal_one_block():
    q, k, v = rand_inputs(Sq=33, Sk=40)
    cfg = SparseConfig(selection="top-theta", sdc="offline", vmc=True)
    theta = torch.randn(2, 4, 33, dtype=torch.float64) * 0.3
    off = torch.rand(2, 4, 33, dtype=torch.float64)
    a = topθ_attention_ref(q, k, v, config=cfg, k_keep=5, theta=theta, sdc_term=off)
    b = topθ_attention_ref(q, k, v, config=cfg, k_keep=5, theta=theta, sdc_term=off, block_elements=2 * 4 * 40 * 3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_left_padded_batch_equals_rows_one_by_one():
    """Row lengths count visible keys only: padding changes nothing for the real tokens."""
    torch.manual_seed(0)
    lengths = [12, 7, 3]
    S = max(lengths)
    cfg = SparseConfig(selection="top-theta", sdc="exp-threshold", vmc=True, capk=True)
    qs, ks, vs, ths = [], [], [], []
    for n in lengths:
        q, k, v = rand_inputs(B=1, Sq=n, Sk=n)
        th = torch.randn(1, 4, n, dtype=torch.float64) * 0.3
        qs.append(q), ks.append(k), vs.append(v), ths.append(th)
    pad = lambda x, n: torch.nn.functional.pad(x, (0, 0, S - n, 0)) if x.dim() == 4 else torch.nn.functional.pad(x, (S - n, 0))  # noqa: E731
    Q = torch.cat([pad(q, n) for q, n in zip(qs, lengths)])
    K = torch.cat([pad(k, n) for k, n in zip(ks, lengths)])
    V = torch.cat([pad(v, n) for v, n in zip(vs, lengths)])
    TH = torch.cat([pad(t, n) for t, n in zip(ths, lengths)])
    vis = causal_visible(S, S, batch=3).clone()
    for b, n in enumerate(lengths):
        vis[b, :, : S - n] = False
    out = topθ_attention_ref(Q, K, V, config=cfg, k_keep=3, visible=vis, theta=TH)
    for b, n in enumerate(lengths):
        alone = topθ_attention_ref(qs[b], ks[b], vs[b], config=cfg, k_keep=3, theta=ths[b])
        torch.testing.assert_close(out[b:b + 1, :, S - n:], alone, rtol=1e-12, atol=1e-12)
        assert (out[b, :, : S - n] == 0).all()  # rows that see nothing output zeros


def test_exp_threshold_counts_visible_dropped_only():
    """Masked (future or padded) positions are not in |U|: adding invisible keys changes nothing."""
    q, k, v = rand_inputs(B=1, Sq=1, Sk=8)
    cfg = SparseConfig(selection="top-theta", sdc="exp-threshold", vmc=False)
    theta = torch.zeros(1, 4, 1, dtype=torch.float64)
    vis = torch.ones(1, 1, 8, dtype=torch.bool)
    a = topθ_attention_ref(q, k, v, config=cfg, k_keep=2, visible=vis, theta=theta)
    k2 = torch.cat([k, torch.randn(1, 2, 5, 8, dtype=torch.float64)], 2)
    v2 = torch.cat([v, torch.randn(1, 2, 5, 8, dtype=torch.float64)], 2)
    vis2 = torch.cat([vis, torch.zeros(1, 1, 5, dtype=torch.bool)], -1)
    b = topθ_attention_ref(q, k2, v2, config=cfg, k_keep=2, visible=vis2, theta=theta)
    torch.testing.assert_close(a, b)


def test_empty_row_floor_keeps_the_row_max():
    q, k, v = rand_inputs(B=1, Sq=6, Sk=6)
    theta = torch.full((1, 4, 6), 1e9, dtype=torch.float64)  # nothing passes
    seen = {}
    cfg = SparseConfig(selection="top-theta", sdc="none", vmc=False, empty_row="max")
    out = topθ_attention_ref(q, k, v, config=cfg, k_keep=2, theta=theta, observer=lambda b: seen.setdefault("b", b))
    blk = seen["b"]
    assert blk.empty_rows[0, :, 2:].all() and not blk.empty_rows[0, :, :2].any()  # rows 0-1 are dense (L ≤ k)
    assert torch.equal(blk.kept[0, :, 2:].sum(-1), torch.ones(4, 4, dtype=torch.long))
    # the kept element is each row's maximum logit, so the output is that V row
    arg = blk.logits[0, :, 5].argmax(-1)
    torch.testing.assert_close(out[0, :, 5], v[0].repeat_interleave(2, 0)[torch.arange(4), arg])
    cfg_none = cfg.with_(empty_row=EmptyRowFloor.NONE)
    out2 = topθ_attention_ref(q, k, v, config=cfg_none, k_keep=2, theta=theta)
    assert out2[0, :, 2:].abs().max() == 0 and torch.isfinite(out2).all()


def test_gqa_head_mapping_matches_repeat_kv():
    q, k, v = rand_inputs(Hq=6, Hkv=2, Sq=5, Sk=5)
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    torch.testing.assert_close(dense_attention_ref(q, k, v), dense_attention_ref(q, kk, vv))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_stay_within_reference_error(dtype):
    """Upcast compute: on the same (rounded) inputs, the error vs float64 is within output rounding."""
    q, k, v = (x.to(dtype) for x in rand_inputs(Sq=17, Sk=17))
    cfg = SparseConfig(selection="top-k", sdc="exact", vmc=True)
    ref = topθ_attention_ref(q.double(), k.double(), v.double(), config=cfg, k_keep=4)
    low = topθ_attention_ref(q, k, v, config=cfg, k_keep=4)
    assert low.dtype == dtype
    rounding = (ref.to(dtype).double() - ref).abs().max()
    err = (low.double() - ref).abs().max()
    print("err", err.item(), "rounding", rounding.item())
    assert err <= 2 * rounding + 1e-6


def test_shape_errors_are_clear():
    q, k, v = rand_inputs(Hq=4, Hkv=3)
    with pytest.raises(ValueError, match="incompatible shapes"):
        topθ_attention_ref(q, k, v, config=SparseConfig(selection="dense"), k_keep=2)
    q, k, v = rand_inputs()
    with pytest.raises(ValueError, match="needs thresholds"):
        topθ_attention_ref(q, k, v, config=SparseConfig(sdc="none", vmc=False), k_keep=2)


# ---- θ relative to the row max, per-head k (issue 7) ---------------------------------------------------

ROW_MAX_VARIANTS = [
    SparseConfig(selection="top-theta", sdc="exact", vmc=True, theta_reference="row-max"),
    SparseConfig(selection="top-theta", sdc="exp-threshold", vmc=True, theta_reference="row-max"),
    SparseConfig(selection="top-theta", sdc="offline", vmc=True, capk=True, theta_reference="row-max"),
    SparseConfig(selection="top-theta", sdc="none", vmc=False, empty_row="none", theta_reference="row-max"),
]


@pytest.mark.parametrize("cfg", ROW_MAX_VARIANTS, ids=lambda c: c.label())
def test_row_max_theta_matches_a_per_row_loop(cfg):
    """keep a − max(a) > θ_rel, checked against a Python loop over each row (float64, padding included)."""
    q, k, v = rand_inputs(B=2, Hq=4, Hkv=2, Sq=11, Sk=11, seed=7)
    vis = causal_visible(11, 11, batch=2).clone()
    vis[1, :, :2] = False  # left padding in the second sequence
    gen = torch.Generator().manual_seed(3)
    theta = -torch.rand(2, 4, 11, generator=gen, dtype=torch.float64) * 2.5  # relative: below the max
    theta[0, 1, 5] = 0.5  # a non-negative θ_rel leaves the row empty: the floor (or nothing) decides
    offline = torch.rand(2, 4, 11, generator=gen, dtype=torch.float64)
    kept_seen = []
    out = topθ_attention_ref(q, k, v, config=cfg, k_keep=3, visible=vis, theta=theta, sdc_term=offline,
                             observer=lambda blk: kept_seen.append(blk.kept.clone()))
    ref, ref_kept = naive_attention(q, k, v, vis, cfg, 3, theta=theta, offline=offline)
    got_kept = torch.cat(kept_seen, 2)
    print("max |err|", (out - ref).abs().max().item())
    assert torch.equal(got_kept & vis.unsqueeze(1), ref_kept)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_row_max_theta_equals_absolute_theta_shifted_by_each_row_max():
    """θ_rel + m_i used as an absolute θ keeps the same elements (away from ties)."""
    q, k, v = rand_inputs(B=1, Hq=4, Hkv=2, Sq=13, Sk=13, seed=11)
    theta_rel = -torch.rand(1, 4, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
    logits = logits.masked_fill(~causal_visible(13, 13, batch=1).unsqueeze(1), float("-inf"))
    theta_abs = theta_rel + logits.amax(-1)
    rel = SparseConfig(theta_reference="row-max")
    out_rel = topθ_attention_ref(q, k, v, config=rel, k_keep=2, theta=theta_rel)
    out_abs = topθ_attention_ref(q, k, v, config=rel.with_(theta_reference="absolute"), k_keep=2, theta=theta_abs)
    torch.testing.assert_close(out_rel, out_abs, rtol=1e-12, atol=1e-12)


def test_row_max_and_per_head_k_are_not_kernel_compatible():
    from topθ_core.config import ConfigError, KSchedule

    assert SparseConfig().kernel_compatible
    assert not SparseConfig(theta_reference="row-max").kernel_compatible
    assert not SparseConfig(k=KSchedule(64, {}, {(2, 1): 32})).kernel_compatible
    assert SparseConfig(theta_reference="row_max").theta_reference.value == "row-max"
    with pytest.raises(ConfigError, match="row-max"):
        SparseConfig(selection="top-k", sdc="exact", theta_reference="row-max")
    with pytest.raises(ConfigError, match="placement=pre"):
        SparseConfig(placement="post", sdc="none", theta_reference="row-max")
    with pytest.raises(ConfigError, match="theta_reference"):
        SparseConfig(theta_reference="relative")


def test_per_head_top_k_matches_torch_topk_per_head():
    """Each head keeps its own k largest (torch.topk on that head's row); rows with L ≤ k_h stay dense."""
    q, k, v = rand_inputs(B=2, Hq=4, Hkv=2, Sq=12, Sk=12, seed=5)
    ks = [2, 5, 3, 12]
    kept_seen = []
    cfg = SparseConfig(selection="top-k", sdc="exact", vmc=True)
    topθ_attention_ref(q, k, v, config=cfg, k_keep=ks, observer=lambda blk: kept_seen.append(blk.kept.clone()))
    kept = torch.cat(kept_seen, 2)
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
    for b in range(2):
        for h, kh in enumerate(ks):
            for i in range(12):
                L = i + 1
                want = torch.zeros(12, dtype=torch.bool)
                if L <= kh:
                    want[:L] = True
                else:
                    want[logits[b, h, i, :L].topk(kh).indices] = True
                assert torch.equal(kept[b, h, i], want), (b, h, i)


@pytest.mark.parametrize("cfg", [SparseConfig(selection="top-k", sdc="exact", vmc=True),
                                 SparseConfig(selection="top-k", sdc="none", vmc=False),
                                 SparseConfig(sdc="exact", vmc=True, capk=True),
                                 SparseConfig(sdc="offline", vmc=True)], ids=lambda c: c.label())
def test_per_head_k_equals_each_head_run_with_its_own_k(cfg):
    """Head h of a per-head-k call equals head h of a uniform call with k = k_h (GQA, decode offset, float64)."""
    q, k, v = rand_inputs(B=2, Hq=6, Hkv=2, Sq=7, Sk=15, seed=2)  # chunk of 7 rows after 8 cached keys
    theta, offline = rand_thresholds(cfg, 2, 6, 7, seed=4)
    ks = [1, 4, 9, 4, 15, 2]
    out = topθ_attention_ref(q, k, v, config=cfg, k_keep=ks, theta=theta, sdc_term=offline)
    for h, kh in enumerate(ks):
        one = topθ_attention_ref(q, k, v, config=cfg, k_keep=kh, theta=theta, sdc_term=offline)
        torch.testing.assert_close(out[:, h], one[:, h], rtol=1e-12, atol=1e-12)
    ref, _ = naive_attention(q, k, v, causal_visible(7, 15, batch=2), cfg, ks, theta=theta, offline=offline)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="6 query heads"):
        topθ_attention_ref(q, k, v, config=cfg, k_keep=ks[:5], theta=theta, sdc_term=offline)
    with pytest.raises(ValueError, match="at least 1"):
        topθ_attention_ref(q, k, v, config=cfg, k_keep=[0, *ks[1:]], theta=theta, sdc_term=offline)
