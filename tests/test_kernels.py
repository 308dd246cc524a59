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

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere below
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

triton = pytest.importorskip("triton")

from topθ_core import dispatch  # noqa: E402
from topθ_core.attention import causal_visible, dense_attention_ref, topθ_attention_ref  # noqa: E402
from topθ_core.config import DENSE, SDC, EmptyRowFloor, KSchedule, SparseConfig  # noqa: E402
from topθ_core.integration import RunState  # noqa: E402
from topθ_core.kernels import decode as decode_mod  # noqa: E402
from topθ_core.kernels import kernel_variant, topθ_decode, topθ_prefill  # noqa: E402
from topθ_core.kernels.reference import topθ_decode_ref, topθ_prefill_ref  # noqa: E402
from topθ_core.metrics import SparsityMetrics  # noqa: E402

decode_mod.POISON_OUTPUTS = True  # every launch fills its outputs with NaN / -1 first

_interpreted = type(decode_mod._decode_fused_kernel).__name__ == "InterpretedFunction"
cpu = pytest.mark.skipif(not (INTERPRET and _interpreted),
                         reason="CPU kernel tests need TRITON_INTERPRET=1 before topθ_core.kernels is imported")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                           reason="needs CUDA (compiled Triton)")]

# decode launch forms: one launch or split + combine, and the key loop (K pass + gather, or V inside the K loop)
FORMS = {"fused-2pass": dict(fused=True, two_pass=True), "fused-1pass": dict(fused=True, two_pass=False),
         "split-2pass": dict(fused=False, two_pass=True), "split-1pass": dict(fused=False, two_pass=False)}

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


def _run_decode(B, Hq, Hkv, N, d, dtype, device, variant, k_keep, row_max=False, lengths=None, update_v_sum=False,
                **tuning):
    """One decode call against the reference: outputs and counts.  ``row_max``: θ relative to the
    row max (θ_rel = the midpoint θ minus the row max).  ``lengths`` (B,): a static buffer of N keys
    of which sequence b sees the first lengths[b].  ``update_v_sum``: the kernel gets the V sum
    without each sequence's last valid row and must add it in place (checked after the call)."""
    cfg = _cfg(*variant)
    if row_max:
        cfg = cfg.with_(theta_reference="row-max")
    q, k, v = _qkv(B, Hq, Hkv, 1, N, d, dtype, device)
    logits = _logits(q, k)  # (B, Hq, 1, N)
    L = torch.full((B,), N, device=device)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
        L = lengths.long()
        logits = logits.masked_fill(torch.arange(N, device=device).view(1, 1, 1, N) >= L.view(B, 1, 1, 1),
                                    float("-inf"))
    theta = _midpoint_theta(logits)  # (B, Hq, 1), absolute
    theta_in = theta - logits.amax(-1) if row_max else theta
    sdc_term = torch.rand(B, Hq, 1, device=device) * 3
    valid = (torch.arange(N, device=device).view(1, 1, N, 1) < L.view(B, 1, 1, 1))
    v_sum = (v.float() * valid).sum(2)
    v_in = v_sum
    if update_v_sum:
        last = torch.arange(N, device=device).view(1, 1, N, 1) == (L - 1).view(B, 1, 1, 1)
        v_in = v_sum - (v.float() * last).sum(2)
    out, c = topθ_decode(q, k, v, theta_in, config=cfg, k_keep=k_keep, sdc_term=sdc_term, v_sum=v_in,
                         update_v_sum=update_v_sum, lengths=lengths, **tuning)
    if update_v_sum and cfg.vmc:
        torch.testing.assert_close(v_in, v_sum, rtol=1e-5, atol=1e-4, msg="the kernel's in-place V-sum update")
    ref, rc = topθ_decode_ref(q, k, v, theta_in, config=cfg, k_keep=k_keep, sdc_term=sdc_term, lengths=lengths)
    low, _ = topθ_decode_ref(q, k, v, theta_in, config=cfg, k_keep=k_keep, sdc_term=sdc_term, lengths=lengths,
                             upcast=False)
    what = f"decode N={N} L={L.tolist()} Hq/Hkv={Hq}/{Hkv} {cfg.label()} {dtype} {tuning}"
    _check_out(out, ref, low, what)
    amb = _ambiguous(logits, theta) * (L > k_keep).view(B, 1)  # dense rows (L ≤ k) keep everything
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
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("N", [1, 17, 97, 130])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_decode_interpret(N, heads, form):
    Hq, Hkv = heads
    i = [1, 17, 97, 130].index(N) * 2 + (Hq != Hkv)
    _run_decode(2, Hq, Hkv, N, 64, torch.float16, "cpu", VARIANTS[i % len(VARIANTS)], k_keep=8, num_splits=3,
                block_n=16, block_v=16, chunk=32, **FORMS[form])


@cpu
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0].value}-vmc{int(v[1])}-{v[2].value}")
def test_decode_interpret_variants(variant, form):
    _run_decode(1, 6, 2, 61, 64, torch.float16, "cpu", variant, k_keep=4, num_splits=2, block_n=16, block_v=16,
                **FORMS[form])


@cpu
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0].value}-vmc{int(v[1])}-{v[2].value}")
def test_decode_row_max_interpret(variant):
    """θ relative to the row max (two launches: candidates, then the exact keep), every variant;
    the midpoint θ leaves some rows empty, so the floor acts."""
    _run_decode(2, 6, 2, 61, 64, torch.float16, "cpu", variant, k_keep=4, row_max=True, num_splits=3, block_n=16,
                block_v=16)


@cpu
@pytest.mark.parametrize("update_v_sum", [False, True], ids=["vsum", "vsum-updated"])
@pytest.mark.parametrize("form", list(FORMS) + ["row-max"])
def test_decode_lengths_interpret(form, update_v_sum):
    """A static buffer of 100 keys, each sequence a different valid prefix: 1 key and 3 keys (dense
    rows, L ≤ k), 37 and 100; splits past a sequence's length do nothing.  ``vsum-updated``: the
    merge adds each sequence's row L − 1 to the V sum in place (a static decode step)."""
    tuning = dict(row_max=True) if form == "row-max" else FORMS[form]
    for variant in (VARIANTS[1], VARIANTS[6]):
        _run_decode(4, 4, 2, 100, 64, torch.float16, "cpu", variant, k_keep=4, lengths=[1, 37, 3, 100],
                    num_splits=5, block_n=16, block_v=16, chunk=16, update_v_sum=update_v_sum, **tuning)


@cpu
@pytest.mark.parametrize("form", ["fused-2pass", "split-2pass"])
def test_decode_chunks_interpret(form):
    """Two-pass: splits longer than the scratch chunk (several K passes per split, the accumulator
    rescaled between chunks), gathers of 16 rows."""
    for variant in (VARIANTS[1], VARIANTS[3]):
        _run_decode(2, 4, 2, 130, 64, torch.float16, "cpu", variant, k_keep=4, num_splits=1, block_n=16,
                    block_v=16, chunk=32, **FORMS[form])


@cpu
@pytest.mark.parametrize("form", list(FORMS) + ["row-max"])
@pytest.mark.parametrize("N", [1, 17, 97, 130])
@pytest.mark.parametrize("splits", [1, 2, 9])
def test_decode_interpret_splits(N, splits, form, monkeypatch):
    """Any split count, merged two splits at a time (by the last split to finish, or by the
    combine kernel)."""
    monkeypatch.setattr(decode_mod, "_chunk_s", lambda *a: 2)  # several merge steps, a ragged last one
    i = [1, 17, 97, 130].index(N) + splits
    tuning = dict(row_max=True) if form == "row-max" else FORMS[form]
    _run_decode(2, 4, 2, N, 64, torch.float16, "cpu", VARIANTS[i % len(VARIANTS)], k_keep=4, num_splits=splits,
                block_n=16, block_v=16, **tuning)


@cpu
def test_decode_tickets_reset_interpret():
    """The per-(batch, KV head) counters are back at zero after every fused launch: calls in a
    row (different split counts and batch shapes, both key loops, row-max θ) all merge correctly."""
    for B, N, splits, two_pass, row_max in ((2, 130, 9, True, False), (2, 130, 9, False, False),
                                            (3, 61, 4, True, True), (1, 97, 7, False, True)):
        _run_decode(B, 4, 2, N, 64, torch.float16, "cpu", VARIANTS[3], k_keep=4, num_splits=splits, block_n=16,
                    block_v=16, fused=True, two_pass=two_pass, row_max=row_max)
        assert all(int(t.abs().sum()) == 0 for t in decode_mod._TICKETS.values())


def test_decode_plan_forms():
    """The plan takes the fused launch up to FUSED_MAX_KV_ROWS = B·Hkv·N and two launches above
    (bench_kernels' decode shapes, 32/8 heads, at d 64 and d 128), except at d 128 with 8-16 (batch, KV
    head) programs (one or two sequences of an 8-KV-head model), which take two launches throughout;
    row-max θ, and fewer than 8 programs, keep the fused plan."""
    cpu_dev = torch.device("cpu")
    for d, fused_shapes in ((64, {(1, 4096), (1, 16384), (1, 32768), (8, 4096)}), (128, {(8, 4096)})):
        fused = {(B, N): decode_mod.decode_plan(B, 8, N, cpu_dev, d).fused
                 for B in (1, 8, 32) for N in (4096, 16384, 32768)}
        assert {s for s, f in fused.items() if f} == fused_shapes, d
    assert decode_mod.decode_plan(1, 1, decode_mod.FUSED_MAX_KV_ROWS, cpu_dev, 64).fused
    assert not decode_mod.decode_plan(1, 1, decode_mod.FUSED_MAX_KV_ROWS + 1, cpu_dev, 64).fused
    assert decode_mod.decode_plan(3, 8, 4096, cpu_dev, 128).fused  # B·Hkv = 24 > 16
    assert decode_mod.decode_plan(1, 4, 4096, cpu_dev, 128).fused  # B·Hkv = 4 < 8
    assert decode_mod.decode_plan(1, 8, 4096, cpu_dev, 128, row_max=True).fused


def test_decode_plan_splits(monkeypatch):
    """Split counts on an H200's 132 SMs: latency-bound, two programs of 4 warps per SM (d 128 with
    8-16 (batch, KV head) programs: four programs of 2 warps, two launches) and splits of at least one
    64-key block; at most 64 splits per (batch, KV head) in two launches, bandwidth-bound with 8 programs
    per SM."""
    monkeypatch.setattr(decode_mod, "_sm_count", lambda device: 132)
    dev = torch.device("cpu")
    plan = lambda B, Hkv, N, d=128: decode_mod.decode_plan(B, Hkv, N, dev, d)  # noqa: E731
    assert plan(1, 8, 16384).splits == 64 and plan(2, 8, 16384).splits == 33  # ⌈4·132 / 8⌉ = 66, capped
    assert plan(1, 8, 2048).splits == 32  # ⌈2048 / 64⌉
    assert plan(1, 8, 16384).combine_warps == decode_mod.BW_COMBINE_WARPS == 8
    assert plan(1, 8, 16384, 64).splits == 33  # fused: ⌈2·132 / 8⌉
    assert plan(1, 3, 2048, 64).splits == 32  # SmolLM2: ⌈2048 / 64⌉ < ⌈2·132 / 3⌉ = 88
    assert plan(8, 8, 16384).splits == 17  # ⌈8·132 / 64⌉
    assert plan(1, 8, 131072).splits == decode_mod.BW_MAX_SPLITS == 64  # ⌈8·132 / 8⌉ = 132, capped


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
        S = decode_mod.decode_plan(2, 2, N, torch.device("cpu"), 64).splits
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


def _dispatch_vs_reference(device, dtype, cfg, steps=2, Hq=4, Hkv=2, S=37, d=64, k_keep=6, mask="causal"):
    """Prefill + decode steps through ``dispatch.try_kernels`` vs the reference, outputs and metrics.

    ``mask``: how the decode steps' keys are given: ``causal`` (no mask, the cache as it grows),
    ``prefix`` (a static buffer longer than the cache and a (B, 1, N) prefix mask: eager, the
    dispatch finds the length on the host) or ``static`` (the same with the lengths given on the
    device, as a static-cache step does: the V sum is kept on the device).
    """
    from topθ_core.fingerprint import ModelFingerprint
    from topθ_core.statistics import ThresholdStats

    stats = ThresholdStats(1, Hq, bin_width=8, device="cpu")
    lengths = torch.arange(1, S + steps + 1)
    t = torch.randn(lengths.numel(), Hq) * 0.3 + 1.2
    stats.add(0, lengths, t, torch.rand(lengths.numel(), Hq))
    fp = ModelFingerprint("t", "0", 1, Hq, Hkv, d)
    th = stats.finalize(0.0, fingerprint=fp, k=cfg.k, placement=cfg.placement)
    n_buf = S + steps + 5  # static buffer: garbage past the valid keys
    q, k, v = _qkv(1, Hq, Hkv, S + steps, n_buf, d, dtype, device)
    q = q[:, :, :S + steps]
    m_kernel, m_ref = SparsityMetrics(), SparsityMetrics()
    st_kernel = RunState(config=cfg, thresholds=th, metrics=m_kernel)
    for n_q, n_k in [(S, S)] + [(1, S + i + 1) for i in range(steps)]:
        qq = q[:, :, n_k - n_q:n_k]
        vis = causal_visible(n_q, n_k, device, 1)
        theta, sdc, _ = th.lookup(0, vis.sum(-1), cfg.lookup)
        kk, vv, given = k[:, :, :n_k], v[:, :, :n_k], None
        if n_q == 1 and mask != "causal":
            kk, vv = k, v
            given = (torch.arange(n_buf, device=device) < n_k).view(1, 1, n_buf)
        lengths = torch.tensor([n_k], dtype=torch.int32, device=device) if n_q == 1 and mask == "static" else None
        out = dispatch.try_kernels(qq, kk, vv, visible=given, theta=theta, sdc_term=sdc, k_keep=k_keep, scaling=None,
                                   softcap=None, state=st_kernel, layer=0, lengths=lengths)
        assert out is not None, "dispatch declined a supported call"
        obs = lambda block: m_ref(0, block)  # noqa: E731
        kr, vr = k[:, :, :n_k], v[:, :, :n_k]
        ref = topθ_attention_ref(qq, kr, vr, config=cfg, k_keep=k_keep, visible=vis, theta=theta, sdc_term=sdc,
                                 observer=obs)
        low = topθ_attention_ref(qq, kr, vr, config=cfg, k_keep=k_keep, visible=vis, theta=theta, sdc_term=sdc,
                                 upcast=False)
        _check_out(out, ref, low, f"dispatch {mask} Sq={n_q} Sk={n_k} {cfg.label()}")
    if cfg.vmc and mask != "static":  # the running V sum followed the cache (rows counted, and their sum)
        n, vsum = st_kernel.scratch[("topθ.vsum", 0)]
        assert n == S + steps
        torch.testing.assert_close(vsum, v[:, :, :S + steps].float().sum(2))
    if cfg.vmc and mask == "static":
        torch.testing.assert_close(st_kernel.scratch[("topθ.vsum_static", 0)], v[:, :, :S + steps].float().sum(2))
    if mask == "static":
        assert st_kernel.scratch[(dispatch.COUNTS, 0)].kept.shape == (1, Hq)
    fk = m_kernel.to_frame().drop(columns=["extrapolated_rows"])
    fr = m_ref.to_frame().drop(columns=["extrapolated_rows"])
    cols = ["kept", "visible", "topk_equiv", "rows", "dense_rows", "empty_rows", "kept_v_rows", "kv_rows"]
    diff = (fk[cols] - fr[cols]).abs()
    print(fk[cols].sum(), fr[cols].sum())
    assert (diff[["visible", "topk_equiv", "rows", "dense_rows", "kv_rows"]] == 0).all().all()
    assert diff[["kept", "empty_rows", "kept_v_rows"]].to_numpy().max() <= 1  # ulp-level ties only
    assert m_kernel.decode_steps[0] and len(m_kernel.decode_steps[0]) == steps


@cpu
@pytest.mark.parametrize("mask", ["causal", "prefix", "static"])
def test_dispatch_interpret(mask):
    cfg = SparseConfig(sdc=SDC.OFFLINE, vmc=True)
    _dispatch_vs_reference("cpu", torch.float16, cfg, mask=mask)


@cpu
def test_dispatch_row_max_decode_interpret():
    """θ relative to the row max: the decode kernel (prefill stays on the reference)."""
    cfg = SparseConfig(sdc=SDC.EXACT, vmc=True, theta_reference="row-max")
    q, k, v = _qkv(1, 4, 2, 1, 40, 64, torch.float16, "cpu")
    st = RunState(config=cfg)
    theta = -torch.rand(1, 4, 1) * 2
    out = dispatch.try_kernels(q, k, v, visible=None, theta=theta, sdc_term=None, k_keep=6, scaling=None,
                               softcap=None, state=st, layer=0)
    assert out is not None
    ref = topθ_attention_ref(q, k, v, config=cfg, k_keep=6, theta=theta)
    low = topθ_attention_ref(q, k, v, config=cfg, k_keep=6, theta=theta, upcast=False)
    _check_out(out, ref, low, "dispatch row-max decode")
    qp = _qkv(1, 4, 2, 40, 40, 64, torch.float16, "cpu")[0]
    assert dispatch.try_kernels(qp, k, v, visible=None, theta=theta.expand(1, 4, 40), sdc_term=None, k_keep=6,
                                scaling=None, softcap=None, state=st, layer=0) is None


@cpu
def test_dispatch_declines_unsupported():
    q, k, v = _qkv(1, 2, 2, 5, 5, 64, torch.float16, "cpu")
    theta = torch.zeros(1, 2, 5)

    def call(cfg, q=q, k=k, v=v, visible=None, softcap=None, k_keep=2, **state):
        st = RunState(config=cfg, **state)
        return dispatch.try_kernels(q, k, v, visible=visible, theta=theta[:, :, -q.shape[2]:], sdc_term=theta,
                                    k_keep=k_keep, scaling=None, softcap=softcap, state=st, layer=0)

    for cfg in (SparseConfig(selection="top-k", sdc="exact"), SparseConfig(placement="post", sdc="none"),
                SparseConfig(capk=True), SparseConfig(sink_tokens=1), SparseConfig(recent_tokens=2),
                SparseConfig(k=KSchedule(4, head_overrides={(0, 1): 8}))):
        assert kernel_variant(cfg) is None and kernel_variant(cfg, decode=True) is None
        assert call(cfg) is None
    assert kernel_variant(SparseConfig(theta_reference="row-max")) is None  # prefill: reference
    assert kernel_variant(SparseConfig(theta_reference="row-max"), decode=True) is not None
    assert call(SparseConfig()) is not None  # the supported call, for contrast
    assert call(SparseConfig(), softcap=30.0) is None
    assert call(SparseConfig(), k_keep=[2, 3]) is None
    assert call(SparseConfig(), use_kernels=False) is None
    assert call(SparseConfig(), observers=(lambda layer, block: None,)) is None
    assert call(SparseConfig(), metrics=SparsityMetrics(track_popularity=True)) is None
    assert call(SparseConfig(), q=q.float(), k=k.float(), v=v.float()) is None
    padded = causal_visible(5, 5, "cpu", 1).clone()
    padded[:, :, 0] = False
    assert call(SparseConfig(), visible=padded) is None
    hole = torch.ones(1, 1, 5, dtype=torch.bool)
    hole[..., 2] = False  # decode: visible keys are not a prefix
    assert call(SparseConfig(), q=q[:, :, -1:], visible=hole) is None


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
@pytest.mark.parametrize("form", list(FORMS) + ["row-max"])
def test_decode_forms_gpu(form):
    """Each form, forced (and row-max θ), at real shapes on both sides of FUSED_MAX_KV_ROWS with the
    plan's other settings: every SDC / VMC / floor variant, bf16 and fp16, d 128 (32/8 heads) and
    d 64 (9/3)."""
    tuning = dict(row_max=True) if form == "row-max" else FORMS[form]
    for B, N in ((1, 4096), (8, 16384)):
        for i, variant in enumerate(VARIANTS):
            dtype = (torch.bfloat16, torch.float16)[i % 2]
            _run_decode(B, 32, 8, N, 128, dtype, "cuda", variant, k_keep=64, **tuning)
    _run_decode(3, 9, 3, 20000, 64, torch.bfloat16, "cuda", VARIANTS[3], k_keep=64, **tuning)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("form", list(FORMS) + ["row-max"])
def test_decode_lengths_gpu(form):
    """A static buffer of 16k keys, sequences of 1, 3000, 17 and 16384 valid keys (the first and the
    third dense: L ≤ k); with VMC also the merge's in-place V-sum update of a static decode step."""
    tuning = dict(row_max=True) if form == "row-max" else FORMS[form]
    for variant, update in ((VARIANTS[1], False), (VARIANTS[1], True), (VARIANTS[3], True), (VARIANTS[6], False)):
        _run_decode(4, 32, 8, 16384, 128, torch.bfloat16, "cuda", variant, k_keep=64,
                    lengths=[1, 3000, 17, 16384], update_v_sum=update, **tuning)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("form", list(FORMS) + ["row-max"])
@pytest.mark.parametrize("splits", [1, 37, 128])
def test_decode_splits_gpu(splits, form):
    """Any form at any split count; 128 splits need 16 merge steps."""
    tuning = dict(row_max=True) if form == "row-max" else FORMS[form]
    for variant in (VARIANTS[1], VARIANTS[3]):
        _run_decode(1, 32, 8, 8192, 128, torch.bfloat16, "cuda", variant, k_keep=64, num_splits=splits, **tuning)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
def test_decode_plan_gpu():
    """The plan's defaults on each side of the threshold: fused (B·Hkv·N ≤ 2^18, B·Hkv > 16 at d 128), two
    launches (above it, or a single sequence at d 128)."""
    for B, N, fused in ((8, 4096, True), (1, 32768, False), (32, 2048, False), (4, 20000, False)):
        assert decode_mod.decode_plan(B, 8, N, torch.device("cuda"), 128).fused == fused
        _run_decode(B, 32, 8, N, 128, torch.bfloat16, "cuda", VARIANTS[3], k_keep=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("form", list(FORMS) + ["row-max"])
def test_decode_repeatable_and_graph_gpu(form):
    """The merge order is fixed, so repeated launches are bit-identical (fused: whichever split
    finishes last; a missing acquire/release would show as a changing result); a CUDA graph of
    the launch(es) replays correctly with new inputs and new valid lengths (the fused counters
    reset themselves), equal to an eager call and to the reference."""
    row_max = form == "row-max"
    cfg = _cfg(*VARIANTS[3]).with_(theta_reference="row-max" if row_max else "absolute")
    B, Hq, Hkv, N, d = 2, 32, 8, 16384, 128

    def inputs(lengths):
        q, k, v = _qkv(B, Hq, Hkv, 1, N, d, torch.bfloat16, "cuda")
        lengths = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        lg = _logits(q, k).masked_fill(torch.arange(N, device="cuda").view(1, 1, 1, N) >= lengths.view(B, 1, 1, 1),
                                       float("-inf"))
        theta = _midpoint_theta(lg)
        valid = torch.arange(N, device="cuda").view(1, 1, N, 1) < lengths.view(B, 1, 1, 1)
        th_in = theta - lg.amax(-1) if row_max else theta
        return [q, k, v, th_in, torch.rand(B, Hq, 1, device="cuda") * 3, (v.float() * valid).sum(2), lengths], lg, theta

    (q, k, v, theta, sdc, vsum, lengths), _, _ = inputs([9000, N])
    kw = dict(config=cfg, k_keep=64, num_splits=96, **({} if row_max else FORMS[form]))
    first, c0 = topθ_decode(q, k, v, theta, sdc_term=sdc, v_sum=vsum, lengths=lengths, **kw)
    for _ in range(30):
        out, c = topθ_decode(q, k, v, theta, sdc_term=sdc, v_sum=vsum, lengths=lengths, **kw)
        assert torch.equal(out, first) and torch.equal(c.kept, c0.kept) and torch.equal(c.kept_v_rows, c0.kept_v_rows)
    static = [t.clone() for t in (q, k, v, theta, sdc, vsum, lengths)]

    def call(t):
        return topθ_decode(*t[:4], sdc_term=t[4], v_sum=t[5], lengths=t[6], **kw)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call(static)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    graphs = []
    for stream in (s, torch.cuda.Stream()):  # counters made before the capture / during it (a fresh stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            g_out, g_counts = call(static)
        graphs.append((g, g_out, g_counts))
    for i, lens in enumerate(([N, 77], [4096, 5000], [1, N], [12000, 13000])):
        g, g_out, g_counts = graphs[i % 2]
        new, lg, theta_abs = inputs(lens)
        for dst, src in zip(static, new):
            dst.copy_(src)
        g.replay()
        ref, rc = topθ_decode_ref(*new[:4], config=cfg, k_keep=64, sdc_term=new[4], lengths=new[6])
        low, _ = topθ_decode_ref(*new[:4], config=cfg, k_keep=64, sdc_term=new[4], lengths=new[6], upcast=False)
        _check_out(g_out, ref, low, f"graph {i % 2} replay, lengths {lens}")
        amb = _ambiguous(lg, theta_abs) * (new[6] > 64).view(B, 1)
        _check_counts(g_counts, rc, amb, Hkv, "graph replay")
        eager, _ = call(new)
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
@pytest.mark.parametrize("mask", ["causal", "prefix", "static"])
@pytest.mark.parametrize("cfg", [SparseConfig(sdc=SDC.OFFLINE, vmc=True), SparseConfig(sdc=SDC.EXACT, vmc=False)],
                         ids=lambda c: c.label())
def test_dispatch_gpu(cfg, mask):
    _dispatch_vs_reference("cuda", torch.bfloat16, cfg, steps=3, Hq=32, Hkv=8, S=700, d=128, k_keep=64, mask=mask)


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


# ----------------------------------------------------------------------------------------------
# Decode steps on a static cache (topθ_core.graph_decode): the kernels inside a model
# ----------------------------------------------------------------------------------------------

def _graph_model(device, dtype, d=64, layers=2, heads=2, kv_heads=1, row_max=False):
    """A random Llama whose attention the kernels take (head dim 64/128), prepared for Top-θ, with
    thresholds that keep part of every row: θ = 0.05 at every length (``row_max``: θ_rel = −0.05, what
    lies within 0.05 of the row max), offline SDC term 0.5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from topθ_core.fingerprint import model_fingerprint
    from topθ_core.integration import prepare_model
    from topθ_core.statistics import ThresholdStats

    torch.manual_seed(0)
    mc = LlamaConfig(vocab_size=256, hidden_size=heads * d, intermediate_size=4 * d, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=d, max_position_embeddings=4096)
    model = prepare_model(LlamaForCausalLM(mc).to(device, dtype).eval())
    stats = ThresholdStats(layers, heads, bin_width=16, device="cpu")
    value = -0.05 if row_max else 0.05
    for layer in range(layers):
        stats.add(layer, torch.arange(1, 2049), torch.full((2048, heads), value), torch.full((2048, heads), 0.5))
    ref = "row-max" if row_max else "absolute"
    cfg = SparseConfig(sdc=SDC.OFFLINE, vmc=True, k=KSchedule(4), theta_reference=ref)
    th = stats.finalize(0.0, fingerprint=model_fingerprint(model), k=cfg.k, placement=cfg.placement,
                        theta_reference=ref)
    return model, cfg, th


def _dynamic_greedy(model, run, ids, steps):
    """The eager reference: the model's dynamic cache, one forward per token (scratch carried, like
    generation's streams); greedy tokens, logits, and kept V rows per step from the metrics."""
    from topθ_core.models import cache_kwarg, output_cache

    kw, cache, tok, toks, logits, kept_v = cache_kwarg(model), None, ids, [], [], []
    scratch = {}
    for i in range(steps + 1):
        m = SparsityMetrics()
        with contextlib.ExitStack() as stack:
            state = stack.enter_context(run(m)) if run is not None else None
            if state is not None:
                state.scratch.update(scratch)
            out = model(input_ids=tok, use_cache=True, **{kw: cache})
            if state is not None:
                scratch = state.scratch
        cache = output_cache(out)
        lg = out.logits[:, -1].float()
        tok = lg.argmax(-1, keepdim=True)
        toks.append(int(tok))
        logits.append(lg)
        if i and run is not None:
            kept_v.append(sum(m.decode_steps[layer][-1][0] for layer in m.decode_steps)
                          / sum(m.decode_steps[layer][-1][1] for layer in m.decode_steps))
    return toks, logits, kept_v


def _graph_greedy(model, run, ids, steps, cuda_graph):
    from topθ_core.graph_decode import GraphDecoder

    dec = GraphDecoder(model, run, max_len=ids.shape[1] + steps + 3, cuda_graph=cuda_graph)
    lg = dec.prefill(ids).float()
    toks, logits, kept_v = [int(dec.next_tokens)], [lg], []
    for _ in range(steps):
        lg = dec.step().float()
        toks.append(int(dec.next_tokens))
        logits.append(lg.clone())
        kept_v.append(dec.kept_v_fraction())
    return toks, logits, kept_v, dec


@cpu
def test_graph_decoder_static_kernels_interpret():
    """A static-cache decode step with the decode kernel inside (lengths read on the device, the V
    sum kept on the device, counts left for the decoder) gives the greedy tokens and kept V rows of
    the model's ordinary dynamic-cache path; dense likewise through transformers' sdpa."""
    from topθ_core.integration import sparse_run

    model, cfg, th = _graph_model("cpu", torch.float16)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    run = lambda m=None: sparse_run(cfg, th, model=model, metrics=m)  # noqa: E731
    with torch.inference_mode():
        for r in (run, None):
            toks_d, lg_d, kv_d = _dynamic_greedy(model, r, ids, 4)
            toks_g, lg_g, kv_g, dec = _graph_greedy(model, r, ids, 4, cuda_graph=False)
            assert toks_g == toks_d
            for a, b in zip(lg_g, lg_d):
                torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
            if r is not None:
                assert all(0 < x < 1 for x in kv_g), kv_g  # every layer ran the kernel, which kept part of V
                assert max(abs(a - b) for a, b in zip(kv_g, kv_d)) < 1e-2, (kv_g, kv_d)
                for layer, lay in enumerate(dec.cache.layers):  # the kernels kept each V sum up to date
                    vsum = dec._scratch[(dispatch._VSUM_STATIC_KEY, layer)]
                    torch.testing.assert_close(vsum, lay.values[:, :, :dec.length].float().sum(2), rtol=1e-4,
                                               atol=1e-3)
            assert not dec.graphed


@cpu
def test_graph_decoder_step_reduces_nothing(monkeypatch):
    """A static-cache decode step (what a CUDA graph replays) launches no reduction: each layer takes its
    row lengths from the decoder instead of summing the mask, and the kept-V total is summed only when
    :meth:`kept_v_fraction` is read.  (Each was a small kernel per layer in every replay.)  θ is looked
    up once per step for all layers, and anew at every step."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from topθ_core.graph_decode import GraphDecoder
    from topθ_core.integration import sparse_run

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    model, cfg, th = _graph_model("cpu", torch.float16)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        dec = GraphDecoder(model, lambda: sparse_run(cfg, th, model=model), max_len=48, cuda_graph=False)
        dec.prefill(ids)
        dec.step()
        calls = []
        real = type(th).lookup
        monkeypatch.setattr(type(th), "lookup",
                            lambda self, layer, *a, **kw: calls.append(layer) or real(self, layer, *a, **kw))
        with Ops() as ops:
            dec.step()
        dec.step()
        assert ops.n["sum"] == 0 and ops.n["stack"] == 0, dict(ops.n)
        assert calls == [None, None]  # θ looked up anew at each step, once for all layers
        assert 0 < dec.kept_v_fraction() < 1  # the kernels ran in every layer and their counts are read


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("row_max", [False, True], ids=["absolute", "row-max"])
def test_graph_decoder_gpu(row_max):
    """Decode steps captured as a CUDA graph: replays equal the same static steps run eagerly (bit
    for bit), and greedy tokens equal the dynamic-cache path's, for Top-θ (d 128) and dense."""
    from topθ_core.integration import sparse_run

    model, cfg, th = _graph_model("cuda", torch.bfloat16, d=128, layers=4, heads=8, kv_heads=2, row_max=row_max)
    ids = torch.randint(0, 256, (1, 600), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    run = lambda m=None: sparse_run(cfg, th, model=model, metrics=m)  # noqa: E731
    with torch.inference_mode():
        for r in (run, None):
            toks_e, lg_e, kv_e, _ = _graph_greedy(model, r, ids, 12, cuda_graph=False)
            toks_g, lg_g, kv_g, dec = _graph_greedy(model, r, ids, 12, cuda_graph=True)
            assert dec.graphed
            assert toks_g == toks_e
            for a, b in zip(lg_g, lg_e):
                assert torch.equal(a, b)  # the same kernels on the same inputs: replay = eager
            if r is not None:
                assert kv_g == kv_e and all(0 < x < 1 for x in kv_g), kv_g
                for layer, lay in enumerate(dec.cache.layers):  # the replayed kernels kept each V sum up to date
                    vsum = dec._scratch[(dispatch._VSUM_STATIC_KEY, layer)]
                    torch.testing.assert_close(vsum, lay.values[:, :, :dec.length].float().sum(2), rtol=1e-4,
                                               atol=1e-2)
            toks_d, lg_d, _ = _dynamic_greedy(model, r, ids, 12)
            assert toks_g == toks_d
            for a, b in zip(lg_g, lg_d):
                torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")
def test_compare_generate_graphs_gpu():
    """generation.compare_generate on CUDA: with CUDA graphs (the default) both streams give the
    tokens they give without, and report finite tokens/s and kept V rows."""
    from topθ_core.tiny import tiny_tokenizer

    from topθ_core.generation import compare_generate
    from topθ_core.models import wrap_model

    model, cfg, th = _graph_model("cuda", torch.bfloat16, d=128, layers=2, heads=4, kv_heads=2)
    model.config.vocab_size = 256
    lm = wrap_model(model, tiny_tokenizer(256), name="graph-tiny")
    prompt = "Attention keeps what matters and drops the rest. " * 12
    runs = {g: list(compare_generate(lm, prompt, cfg, th, max_new_tokens=10, stop_at_eos=False, cuda_graphs=g))
            for g in (True, False)}
    for field in ("dense_token", "sparse_token"):
        assert [getattr(s, field) for s in runs[True]] == [getattr(s, field) for s in runs[False]]
    last = runs[True][-1]
    assert last.dense_tok_s > 0 and last.sparse_tok_s > 0
    assert all(0 < s.kept_v_rows < 1 for s in runs[True][1:])
