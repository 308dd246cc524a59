"""Triton kernels against the PyTorch reference.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set here before Triton is
imported) on small shapes; with CUDA the ``gpu`` tests run compiled at real shapes.
Rules (STYLE.md): outputs within the flash-attention tolerance (kernel error against the fp32
reference ≤ 2× the error of the reference run in the low dtype), kept counts exact except for
scores within a few ulps of θ, outputs poisoned before every launch, fresh random inputs.
The CPU tests use fp16: Triton's interpreter (3.9) gets bf16 ``tl.dot`` wrong; bf16 is
tested compiled on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere below
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

triton = pytest.importorskip("triton")

from topθ_core import dispatch  # noqa: E402
from topθ_core.attention import causal_visible, dense_attention_ref, topθ_attention_ref  # noqa: E402
from topθ_core.config import DENSE, SDC, EmptyRowFloor, SparseConfig  # noqa: E402
from topθ_core.integration import RunState  # noqa: E402
from topθ_core.kernels import decode as decode_mod  # noqa: E402
from topθ_core.kernels import kernel_variant, row_samples, topθ_decode, topθ_prefill  # noqa: E402
from topθ_core.kernels.reference import row_samples_causal_ref, topθ_decode_ref, topθ_prefill_ref  # noqa: E402
from topθ_core.metrics import SparsityMetrics  # noqa: E402

decode_mod.POISON_OUTPUTS = True  # every launch fills its outputs with NaN / -1 first

_interpreted = type(decode_mod._decode_fused_kernel).__name__ == "InterpretedFunction"
cpu = pytest.mark.skipif(not (INTERPRET and _interpreted),
                         reason="CPU kernel tests need TRITON_INTERPRET=1 before topθ_core.kernels is imported")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                           reason="needs CUDA (compiled Triton)")]

FORMS, FORM_IDS = [True, False], ["fused", "two-launch"]  # decode: one launch, or split + combine

VARIANTS = [  # (sdc, vmc, floor): every SDC, VMC on and off, both floors
    (SDC.NONE, False, EmptyRowFloor.MAX),
    (SDC.EXACT, True, EmptyRowFloor.MAX),
    (SDC.EXP_THRESHOLD, True, EmptyRowFloor.NONE),
    (SDC.OFFLINE, True, EmptyRowFloor.MAX),
    (SDC.OFFLINE, False, EmptyRowFloor.NONE),
    (SDC.EXACT, False, EmptyRowFloor.NONE),
    (SDC.EXP_THRESHOLD, False, EmptyRowFloor.MAX),
    (SDC.NONE, False, EmptyRowFloor.NONE),
]


def _cfg(sdc, vmc, floor) -> SparseConfig:
    return SparseConfig(sdc=sdc, vmc=vmc, empty_row=floor)


def _qkv(B, Hq, Hkv, Sq, Sk, d, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(B, Hq, Sq, d), mk(B, Hkv, Sk, d), mk(B, Hkv, Sk, d)


def _logits(q, k, scale=None):
    """fp32 scaled scores (B, Hq, Sq, Sk) with −inf at invisible (causal) keys."""
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    s = (q.float() @ k.float().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * (scale or d ** -0.5)
    return s.masked_fill(~causal_visible(Sq, Sk, q.device, 1)[0], float("-inf"))


def _midpoint_theta(logits: torch.Tensor, p_empty: float = 0.15) -> torch.Tensor:
    """θ per row between two neighbouring visible scores (never within rounding of a score).

    Each row keeps a random number r ∈ [0, L] of elements; r = 0 (an empty row) with
    probability ``p_empty``.
    """
    srt = logits.sort(-1, descending=True).values  # (B, H, R, N), −inf last
    L = torch.isfinite(srt).sum(-1)  # (B, H, R)
    r = (torch.rand(L.shape, device=L.device) * (L + 1).float()).long().clamp(max=L)
    r = torch.where(torch.rand(L.shape, device=L.device) < p_empty, torch.zeros_like(r), r)
    hi = srt.gather(-1, (r - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lo = srt.gather(-1, r.clamp(max=srt.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    lo = torch.where(r >= L, hi - 0.5, lo)
    hi = torch.where(r == 0, srt[..., 0] + 0.5, hi)
    theta = (hi + lo) / 2
    return torch.where(L > 0, theta, torch.zeros_like(theta))


def _ambiguous(logits: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(B, H) visible scores within rounding of θ: the only ones a kernel may decide differently."""
    band = 1e-4 * (1 + logits.abs())
    return ((logits - theta.unsqueeze(-1)).abs() <= band).sum((2, 3))


def _check_out(out, ref32, ref_low, what=""):
    assert not torch.isnan(out).any(), f"{what}: NaN in the kernel output (unwritten or bad math)"
    err = (out.float() - ref32.float()).abs()
    err_low = (ref_low.float() - ref32.float()).abs()
    print(f"{what}: max err {err.max().item():.3e} (low-dtype ref {err_low.max().item():.3e}), "
          f"mean {err.mean().item():.3e} ({err_low.mean().item():.3e})")
    assert err.max() <= 2 * err_low.max() + 1e-5, what


def _check_counts(c, rc, amb, Hkv, what=""):
    slack_h = amb  # (B, Hq)
    assert ((c.kept.long() - rc.kept.long()).abs() <= slack_h).all(), f"{what}: kept {c.kept} vs {rc.kept}"
    assert ((c.empty.long() - rc.empty.long()).abs() <= slack_h).all(), f"{what}: empty {c.empty} vs {rc.empty}"
    B, Hq = amb.shape
    slack_kv = amb.view(B, Hkv, Hq // Hkv).sum(-1)
    assert ((c.kept_v_rows.long() - rc.kept_v_rows.long()).abs() <= slack_kv).all(), \
        f"{what}: kept V rows {c.kept_v_rows} vs {rc.kept_v_rows}"


def _run_decode(B, Hq, Hkv, N, d, dtype, device, variant, k_keep, **tuning):
    cfg = _cfg(*variant)
    q, k, v = _qkv(B, Hq, Hkv, 1, N, d, dtype, device)
    logits = _logits(q, k)
    theta = _midpoint_theta(logits)  # (B, Hq, 1)
    sdc_term = torch.rand(B, Hq, 1, device=device) * 3
    out, c = topθ_decode(q, k, v, theta, config=cfg, k_keep=k_keep, sdc_term=sdc_term, v_sum=v.float().sum(2),
                         **tuning)
    ref, rc = topθ_decode_ref(q, k, v, theta, config=cfg, k_keep=k_keep, sdc_term=sdc_term)
    low, _ = topθ_decode_ref(q, k, v, theta, config=cfg, k_keep=k_keep, sdc_term=sdc_term, upcast=False)
    what = f"decode N={N} Hq/Hkv={Hq}/{Hkv} {cfg.label()} {dtype}"
    _check_out(out, ref, low, what)
    amb = _ambiguous(logits, theta) if N > k_keep else torch.zeros(B, Hq, dtype=torch.long, device=device)
    _check_counts(c, rc, amb, Hkv, what)
    return c, rc


def _run_prefill(B, Hq, Hkv, Sq, Sk, d, dtype, device, variant, k_keep, **tuning):
    cfg = _cfg(*variant) if variant is not None else DENSE
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, d, dtype, device)
    logits = _logits(q, k)
    theta = _midpoint_theta(logits)
    sdc_term = torch.rand(B, Hq, Sq, device=device) * 3
    out, c = topθ_prefill(q, k, v, theta, config=cfg, k_keep=k_keep, sdc_term=sdc_term, **tuning)
    ref, rc = topθ_prefill_ref(q, k, v, theta, config=cfg, k_keep=k_keep, sdc_term=sdc_term)
    low, _ = topθ_prefill_ref(q, k, v, theta, config=cfg, k_keep=k_keep, sdc_term=sdc_term, upcast=False)
    what = f"prefill Sq={Sq} Sk={Sk} Hq/Hkv={Hq}/{Hkv} {cfg.label()} {dtype} {tuning}"
    _check_out(out, ref, low, what)
    # without counts the kernel takes another launch (no kept-V-row stores)
    out_nc, none = topθ_prefill(q, k, v, theta, config=cfg, k_keep=k_keep, sdc_term=sdc_term, counts=False, **tuning)
    assert none is None
    _check_out(out_nc, ref, low, what + " counts=False")
    L = torch.arange(Sk - Sq + 1, Sk + 1, device=device)
    amb = _ambiguous(logits[:, :, L > k_keep], theta[:, :, L > k_keep])
    _check_counts(c, rc, amb, Hkv, what)
    return c, rc


# ----------------------------------------------------------------------------------------------
# CPU, TRITON_INTERPRET=1, small shapes
# ----------------------------------------------------------------------------------------------

@cpu
@pytest.mark.parametrize("fused", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("N", [1, 17, 97, 130])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_decode_interpret(N, heads, fused):
    Hq, Hkv = heads
    i = [1, 17, 97, 130].index(N) * 2 + (Hq != Hkv)
    _run_decode(2, Hq, Hkv, N, 64, torch.float16, "cpu", VARIANTS[i % len(VARIANTS)], k_keep=8, num_splits=3,
                block_n=16, fused=fused)


@cpu
@pytest.mark.parametrize("fused", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0].value}-vmc{int(v[1])}-{v[2].value}")
def test_decode_interpret_variants(variant, fused):
    _run_decode(1, 6, 2, 61, 64, torch.float16, "cpu", variant, k_keep=4, num_splits=2, block_n=16, fused=fused)


@cpu
@pytest.mark.parametrize("fused", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("N", [1, 17, 97, 130])
@pytest.mark.parametrize("splits", [1, 2, 9])
def test_decode_interpret_splits(N, splits, fused, monkeypatch):
    """Any split count, merged two splits at a time (by the last split to finish, or by the
    combine kernel)."""
    monkeypatch.setattr(decode_mod, "_chunk_s", lambda *a: 2)  # several merge steps, a ragged last one
    i = [1, 17, 97, 130].index(N) + splits
    _run_decode(2, 4, 2, N, 64, torch.float16, "cpu", VARIANTS[i % len(VARIANTS)], k_keep=4, num_splits=splits,
                block_n=16, fused=fused)


@cpu
def test_decode_tickets_reset_interpret():
    """The per-(batch, KV head) counters are back at zero after every fused launch: calls in a
    row (different split counts and batch shapes) all merge correctly."""
    for B, N, splits in ((2, 130, 9), (2, 130, 9), (3, 61, 4), (1, 97, 7)):
        _run_decode(B, 4, 2, N, 64, torch.float16, "cpu", VARIANTS[3], k_keep=4, num_splits=splits, block_n=16,
                    fused=True)
        assert all(int(t.abs().sum()) == 0 for t in decode_mod._TICKETS.values())


def test_decode_plan_forms():
    """The plan takes the fused launch up to FUSED_MAX_KV_ROWS = B·Hkv·N and two launches above
    (bench_kernels' decode shapes: 32/8 heads)."""
    cpu_dev = torch.device("cpu")
    fused = {(B, N): decode_mod.decode_plan(B, 8, N, cpu_dev).fused
             for B in (1, 8, 32) for N in (4096, 16384, 32768)}
    assert {s for s, f in fused.items() if f} == {(1, 4096), (1, 16384), (1, 32768), (8, 4096)}
    assert decode_mod.decode_plan(1, 1, decode_mod.FUSED_MAX_KV_ROWS, cpu_dev).fused
    assert not decode_mod.decode_plan(1, 1, decode_mod.FUSED_MAX_KV_ROWS + 1, cpu_dev).fused


class _LaunchSpy:
    """Wraps a Triton kernel; records each launch's grid."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@cpu
def test_decode_plan_dispatch_interpret(monkeypatch):
    """With the default launch configuration, shapes on each side of the threshold (lowered to
    small shapes here) run the form the plan picks, and both match the reference."""
    monkeypatch.setattr(decode_mod, "FUSED_MAX_KV_ROWS", 2 * 2 * 64)  # B·Hkv·N
    spies = {name: _LaunchSpy(getattr(decode_mod, name))
             for name in ("_decode_fused_kernel", "_decode_split_kernel", "_decode_combine_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(decode_mod, name, spy)
    for N, fused in ((64, True), (65, False), (130, False)):
        for spy in spies.values():
            spy.grids.clear()
        _run_decode(2, 4, 2, N, 64, torch.float16, "cpu", VARIANTS[1], k_keep=4)
        S = decode_mod.decode_plan(2, 2, N, torch.device("cpu")).splits
        assert spies["_decode_fused_kernel"].grids == ([(4, S)] if fused else [])
        assert spies["_decode_split_kernel"].grids == ([] if fused else [(4, S)])
        assert spies["_decode_combine_kernel"].grids == ([] if fused else [(4,)])


PREFILL_FORMS = {"straight": {}, "skip": dict(skip_tiles=True)}  # the loop forms: every tile, or tile skipping


@cpu
@pytest.mark.parametrize("form", PREFILL_FORMS)
@pytest.mark.parametrize("S", [(17, 17), (97, 97), (130, 130), (23, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_prefill_interpret(S, form):
    Sq, Sk = S
    i = [17, 97, 130, 23].index(Sq)
    heads = (4, 2) if i % 2 else (2, 2)
    _run_prefill(1, *heads, Sq, Sk, 64, torch.float16, "cpu", VARIANTS[(3 * i + 1) % len(VARIANTS)], k_keep=8,
                 **PREFILL_FORMS[form])


@cpu
@pytest.mark.parametrize("form", PREFILL_FORMS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0].value}-vmc{int(v[1])}-{v[2].value}")
def test_prefill_interpret_variants(variant, form):
    """Every SDC / VMC / floor variant in every loop form against the reference."""
    _run_prefill(1, 4, 2, 40, 48, 64, torch.float16, "cpu", variant, k_keep=5, **PREFILL_FORMS[form])


@cpu
def test_prefill_interpret_blocks():
    """Tiles wider than tall and taller than wide (the diagonal spans several key tiles or one)."""
    for bm, bn in ((16, 32), (32, 16)):
        for form in PREFILL_FORMS:
            _run_prefill(1, 4, 2, 50, 77, 64, torch.float16, "cpu", VARIANTS[1], k_keep=5, block_m=bm, block_n=bn,
                         **PREFILL_FORMS[form])


@cpu
@pytest.mark.parametrize("Sk", [1, 17, 300, 1025])
def test_v_prefix_sum_interpret(Sk):
    """VMC's causal prefix sum of V (segment sums, then a scan within each segment) and its total."""
    from topθ_core.kernels.prefill import v_prefix_sum

    v = torch.randn(2, 3, Sk, 64).to(torch.float16).transpose(0, 1).contiguous().transpose(0, 1)  # strided batch
    cum, tot = v_prefix_sum(v)
    ref = v.double().cumsum(2)
    torch.testing.assert_close(cum.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tot.double(), ref[:, :, -1], rtol=1e-5, atol=1e-4)


@cpu
def test_dense_equals_sdpa_semantics_interpret():
    """Degenerate setting: dense selection reproduces plain softmax attention."""
    q, k, v = _qkv(1, 4, 2, 33, 33, 64, torch.float16, "cpu")
    out, c = topθ_prefill(q, k, v, None, config=DENSE, k_keep=4)
    ref = dense_attention_ref(q, k, v)
    low = dense_attention_ref(q, k, v, upcast=False)
    _check_out(out, ref, low, "dense prefill")
    assert (c.kept == 33 * 34 // 2).all() and (c.kept_v_rows == 33).all() and (c.empty == 0).all()
    qd = q[:, :, -1:]
    outd, cd = topθ_decode(qd, k, v, None, config=DENSE, k_keep=4, num_splits=2, block_n=16)
    _check_out(outd, out[:, :, -1:], low[:, :, -1:], "dense decode")
    assert (cd.kept == 33).all()


@cpu
def test_row_samples_interpret():
    q, k, _ = _qkv(1, 2, 1, 20, 37, 64, torch.float16, "cpu")
    for kth in (9,):
        t, d_u = row_samples(q, k, kth, block_m=16)
        tr, dr = row_samples_causal_ref(q, k, kth)
        assert torch.equal(torch.isnan(t), torch.isnan(tr))
        ok = ~torch.isnan(tr)
        torch.testing.assert_close(t[ok], tr[ok], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d_u[ok], dr[ok], rtol=1e-4, atol=1e-5)


def _dispatch_vs_reference(device, dtype, cfg, steps=2, Hq=4, Hkv=2, S=37, d=64, k_keep=6):
    """Prefill + decode steps through ``dispatch.try_kernels`` vs the reference, outputs and metrics."""
    from topθ_core.fingerprint import ModelFingerprint
    from topθ_core.statistics import ThresholdStats

    stats = ThresholdStats(1, Hq, bin_width=8, device="cpu")
    lengths = torch.arange(1, S + steps + 1)
    t = torch.randn(lengths.numel(), Hq) * 0.3 + 1.2
    stats.add(0, lengths, t, torch.rand(lengths.numel(), Hq))
    fp = ModelFingerprint("t", "0", 1, Hq, Hkv, d)
    th = stats.finalize(0.0, fingerprint=fp, k=cfg.k, placement=cfg.placement)
    q, k, v = _qkv(1, Hq, Hkv, S + steps, S + steps, d, dtype, device)
    m_kernel, m_ref = SparsityMetrics(), SparsityMetrics()
    st_kernel = RunState(config=cfg, thresholds=th, metrics=m_kernel)
    outs = []
    for n_q, n_k in [(S, S)] + [(1, S + i + 1) for i in range(steps)]:
        qq, kk, vv = q[:, :, n_k - n_q:n_k], k[:, :, :n_k], v[:, :, :n_k]
        vis = causal_visible(n_q, n_k, device, 1)
        theta, sdc, _ = th.lookup(0, vis.sum(-1), cfg.lookup)
        out = dispatch.try_kernels(qq, kk, vv, vis, True, theta, sdc, cfg, k_keep, None, None, st_kernel, 0, None)
        assert out is not None, "dispatch declined a supported call"
        obs = lambda block: m_ref(0, block)  # noqa: E731
        ref = topθ_attention_ref(qq, kk, vv, config=cfg, k_keep=k_keep, visible=vis, theta=theta, sdc_term=sdc,
                                 observer=obs)
        low = topθ_attention_ref(qq, kk, vv, config=cfg, k_keep=k_keep, visible=vis, theta=theta, sdc_term=sdc,
                                 upcast=False)
        _check_out(out, ref, low, f"dispatch Sq={n_q} Sk={n_k} {cfg.label()}")
        outs.append(out)
    if cfg.vmc:
        assert st_kernel.scratch[("topθ.vsum", 0)][0] == S + steps  # running V sum followed the cache
    fk = m_kernel.to_frame().drop(columns=["extrapolated_rows"])
    fr = m_ref.to_frame().drop(columns=["extrapolated_rows"])
    cols = ["kept", "visible", "topk_equiv", "rows", "dense_rows", "empty_rows", "kept_v_rows", "kv_rows"]
    diff = (fk[cols] - fr[cols]).abs()
    print(fk[cols].sum(), fr[cols].sum())
    assert (diff[["visible", "topk_equiv", "rows", "dense_rows", "kv_rows"]] == 0).all().all()
    assert diff[["kept", "empty_rows", "kept_v_rows"]].to_numpy().max() <= 1  # ulp-level ties only
    assert m_kernel.decode_steps[0] and len(m_kernel.decode_steps[0]) == steps


@cpu
def test_dispatch_interpret():
    cfg = SparseConfig(sdc=SDC.OFFLINE, vmc=True)
    _dispatch_vs_reference("cpu", torch.float16, cfg)


@cpu
def test_dispatch_declines_unsupported():
    q, k, v = _qkv(1, 2, 2, 5, 5, 64, torch.float16, "cpu")
    vis = causal_visible(5, 5, "cpu", 1)
    st = RunState(config=SparseConfig())
    theta = torch.zeros(1, 2, 5)
    for cfg in (SparseConfig(selection="top-k", sdc="exact"), SparseConfig(placement="post", sdc="none"),
                SparseConfig(capk=True)):
        assert kernel_variant(cfg) is None
        assert dispatch.try_kernels(q, k, v, vis, True, theta, theta, cfg, 2, None, None, st, 0, None) is None
    assert dispatch.try_kernels(q, k, v, vis, True, theta, theta, SparseConfig(), 2, None, 30.0, st, 0, None) is None
    assert dispatch.try_kernels(q.float(), k.float(), v.float(), vis, True, theta, theta, SparseConfig(), 2, None,
                                None, st, 0, None) is None
    padded = vis.clone()
    padded[:, :, 0] = False
    assert dispatch.try_kernels(q, k, v, padded, False, theta, theta, SparseConfig(), 2, None, None, st, 0, None) is None


# ----------------------------------------------------------------------------------------------
# GPU, compiled, real shapes
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("N", [1, 97, 4096, 32768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_gpu(N, dtype):
    """The plan's form and configuration (B=2, 8 KV heads: fused up to N=16k, two launches at 32k)."""
    for i, variant in enumerate(VARIANTS[:4]):
        _run_decode(2, 32, 8, N, 128, dtype, "cuda", variant, k_keep=64)
    _run_decode(3, 9, 3, N, 64, dtype, "cuda", VARIANTS[1], k_keep=64)
    _run_decode(2, 32, 8, N, 128, dtype, "cuda", VARIANTS[1], k_keep=64, block_n=128, num_warps=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("fused", FORMS, ids=FORM_IDS)
def test_decode_forms_gpu(fused):
    """Each form, forced, at real shapes on both sides of FUSED_MAX_KV_ROWS with the plan's other
    settings: every SDC / VMC / floor variant, bf16 and fp16, d 128 (32/8 heads) and d 64 (9/3)."""
    for B, N in ((1, 4096), (8, 16384)):
        for i, variant in enumerate(VARIANTS):
            dtype = (torch.bfloat16, torch.float16)[i % 2]
            _run_decode(B, 32, 8, N, 128, dtype, "cuda", variant, k_keep=64, fused=fused)
    _run_decode(3, 9, 3, 20000, 64, torch.bfloat16, "cuda", VARIANTS[3], k_keep=64, fused=fused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("fused", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("splits", [1, 37, 128])
def test_decode_splits_gpu(splits, fused):
    """Either form at any split count; 128 splits need 16 merge steps."""
    for variant in (VARIANTS[1], VARIANTS[3]):
        _run_decode(1, 32, 8, 8192, 128, torch.bfloat16, "cuda", variant, k_keep=64, num_splits=splits, fused=fused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
def test_decode_plan_gpu():
    """The plan's defaults on each side of the threshold: fused (B·Hkv·N ≤ 2^18), two launches."""
    for B, N, fused in ((8, 4096, True), (1, 32768, True), (32, 2048, False), (4, 20000, False)):
        assert decode_mod.decode_plan(B, 8, N, torch.device("cuda")).fused == fused
        _run_decode(B, 32, 8, N, 128, torch.bfloat16, "cuda", VARIANTS[3], k_keep=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("fused", FORMS, ids=FORM_IDS)
def test_decode_repeatable_and_graph_gpu(fused):
    """The merge order is fixed, so repeated launches are bit-identical (fused: whichever split
    finishes last; a missing acquire/release would show as a changing result); a CUDA graph of
    the launch(es) replays correctly with new inputs (the fused counters reset themselves)."""
    cfg = _cfg(*VARIANTS[3])
    B, Hq, Hkv, N, d = 1, 32, 8, 16384, 128

    def inputs():
        q, k, v = _qkv(B, Hq, Hkv, 1, N, d, torch.bfloat16, "cuda")
        return q, k, v, _midpoint_theta(_logits(q, k)), torch.rand(B, Hq, 1, device="cuda") * 3, v.float().sum(2)

    q, k, v, theta, sdc, vsum = inputs()
    kw = dict(config=cfg, k_keep=64, num_splits=96, fused=fused)
    first, c0 = topθ_decode(q, k, v, theta, sdc_term=sdc, v_sum=vsum, **kw)
    for _ in range(30):
        out, c = topθ_decode(q, k, v, theta, sdc_term=sdc, v_sum=vsum, **kw)
        assert torch.equal(out, first) and torch.equal(c.kept, c0.kept) and torch.equal(c.kept_v_rows, c0.kept_v_rows)
    static = [t.clone() for t in (q, k, v, theta, sdc, vsum)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        topθ_decode(*static[:4], sdc_term=static[4], v_sum=static[5], **kw)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    graphs = []
    for stream in (s, torch.cuda.Stream()):  # counters made before the capture / during it (a fresh stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            g_out, g_counts = topθ_decode(*static[:4], sdc_term=static[4], v_sum=static[5], **kw)
        graphs.append((g, g_out, g_counts))
    for i in range(4):
        g, g_out, g_counts = graphs[i % 2]
        new = inputs()
        for dst, src in zip(static, new):
            dst.copy_(src)
        g.replay()
        ref, rc = topθ_decode_ref(*new[:4], config=cfg, k_keep=64, sdc_term=new[4])
        low, _ = topθ_decode_ref(*new[:4], config=cfg, k_keep=64, sdc_term=new[4], upcast=False)
        _check_out(g_out, ref, low, f"graph {i % 2} replay")
        _check_counts(g_counts, rc, _ambiguous(_logits(new[0], new[1]), new[3]), Hkv, "graph replay")
        eager, _ = topθ_decode(*new[:4], sdc_term=new[4], v_sum=new[5], **kw)
        assert torch.equal(eager, g_out)
    torch.cuda.synchronize()
    assert all(int(t.abs().sum()) == 0 for t in decode_mod._TICKETS.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("S", [(1, 1), (217, 217), (1025, 1025), (4096, 4096), (1000, 5000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_prefill_gpu(S, dtype):
    """The default launches (with and without counts), and tile skipping, with every SDC / VMC / floor
    variant."""
    Sq, Sk = S
    for i, variant in enumerate(VARIANTS):
        _run_prefill(1, 32, 8, Sq, Sk, 128, dtype, "cuda", variant, k_keep=64)
        if i < 4:
            _run_prefill(1, 32, 8, Sq, Sk, 128, dtype, "cuda", variant, k_keep=64, **PREFILL_FORMS["skip"])
    for variant in (VARIANTS[1], VARIANTS[2], VARIANTS[3]):
        _run_prefill(2, 9, 3, Sq, Sk, 64, dtype, "cuda", variant, k_keep=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("kth", [65, 513])
def test_row_samples_gpu(kth):
    q, k, _ = _qkv(1, 8, 2, 2048, 2048, 128, torch.bfloat16, "cuda")
    t, d_u = row_samples(q, k, kth)
    tr, dr = row_samples_causal_ref(q, k, kth)
    assert torch.equal(torch.isnan(t), torch.isnan(tr))
    ok = ~torch.isnan(tr)
    torch.testing.assert_close(t[ok], tr[ok], rtol=1e-4, atol=1e-4)
    # D_U can differ by one element's mass where a score lies within rounding of t (bf16 inputs,
    # different summation order): allow that on a tiny fraction of rows only
    bad = ((d_u[ok] - dr[ok]).abs() > 1e-3 * dr[ok].abs() + 1e-4).float().mean().item()
    print(f"rows with D_U off by more than 1e-3: {bad:.2e}")
    assert bad <= 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("cfg", [SparseConfig(sdc=SDC.OFFLINE, vmc=True), SparseConfig(sdc=SDC.EXACT, vmc=False)],
                         ids=lambda c: c.label())
def test_dispatch_gpu(cfg):
    _dispatch_vs_reference("cuda", torch.bfloat16, cfg, steps=3, Hq=32, Hkv=8, S=700, d=128, k_keep=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
def test_model_generation_gpu():
    """A tiny random Llama through transformers: kernels and reference give the same greedy tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from topθ_core.integration import prepare_model, sparse_run
    from topθ_core.fingerprint import ModelFingerprint
    from topθ_core.statistics import ThresholdStats
    from topθ_core.fingerprint import model_fingerprint

    torch.manual_seed(0)
    mc = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
    model = prepare_model(LlamaForCausalLM(mc).to("cuda", torch.bfloat16).eval())
    fp = model_fingerprint(model)
    stats = ThresholdStats(2, 8, bin_width=16, device="cpu")
    for layer in range(2):
        lengths = torch.arange(1, 1025)
        stats.add(layer, lengths, torch.full((1024, 8), 0.05), torch.full((1024, 8), 0.5))
    cfg = SparseConfig(sdc=SDC.OFFLINE, vmc=True)
    th = stats.finalize(0.0, fingerprint=fp, k=cfg.k, placement=cfg.placement)
    ids = torch.randint(0, 256, (1, 600), device="cuda")
    res = {}
    for use_kernels in (True, False):
        m = SparsityMetrics()
        with torch.inference_mode(), sparse_run(cfg, th, model=model, metrics=m, use_kernels=use_kernels):
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        res[use_kernels] = (out, m.to_frame())
    assert torch.equal(res[True][0], res[False][0])
    for col in ("kept", "visible", "kept_v_rows", "kv_rows"):
        a, b = res[True][1][col].sum(), res[False][1][col].sum()
        assert abs(a - b) <= max(2, 1e-3 * b), (col, a, b)  # scores within rounding of θ only
