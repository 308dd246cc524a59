"""Top-θ Triton kernels vs torch SDPA on one GPU: correctness first, then timings.

Sections (``--only decode,host,prefill,real,e2e``):

* **decode**: Llama-3-8B attention shapes (32/8 heads, d 128, bf16), (B, N) ∈ {(32, 32k), (8, 32k),
  (32, 8k)} (bandwidth-bound) and {(1, 4k), (1, 16k), (1, 32k)} (latency-bound), kept V-row fraction
  f ∈ {1, 1/3, 0.15, 0.05} (θ per row from the scores' quantile so that each head keeps
  1 − (1 − f)^(1/4) of the keys: the union over the 4 heads of a group is then ≈ f).  Default
  config (exact SDC, VMC, floor max).  Eager medians (``do_bench``) and CUDA-graph medians
  (``do_bench_cudagraph``) for both sides, interleaved.  Rows ``decode row-max θ``: the same kept
  sets given as θ relative to the row max (θ_rel = θ − row max), through the row-max kernel.
* **host**: CPU time per eager decode call at latency-bound shapes (B = 1 and 8, N = 4k): SDPA,
  ``topθ_decode``, the θ lookup and ``dispatch.try_kernels`` (what one layer's attention call
  costs before the GPU does anything), and a cProfile of ``topθ_decode``.
* **prefill**: (B, N) ∈ {(1, 4k), (1, 16k), (1, 32k), (8, 4k)}, random Q/K/V, kept element fraction
  {1, 0.25, 0.1} (θ per head interpolated over row length from sampled rows' quantiles, as
  calibration does): the project default config (exact SDC, VMC, floor), offline SDC, the plain
  path (dense, θ = −∞) and, with ``--tutorial-launch``, the tutorial-form kernel of tune_prefill.py.
* **real**: SmolLM2-135M Q/K/V captured at 4k tokens (``capture_smollm2_qkv.py``; 9/3 heads,
  d 64), same fractions plus θ calibrated for k = 64 from the dense scores.
* **e2e**: decode tokens/s of random-weight models (Llama-3-8B shape; SmolLM2-135M's config), both
  sides one CUDA-graph replay per step on a static cache (:class:`topθ_core.graph_decode.GraphDecoder`):
  dense through transformers' sdpa (its best backend) and through SDPA with each GQA group's heads
  as query rows (no K/V copies; the faster of the two is the baseline), Top-θ through the kernels at
  f ≈ 0.15; with the step's byte model (weights + K + f·V against weights + K + V).

Each row: card, kernel, data, B, N, heads, d, dtype, f_kept_v, f_kept_elems, baseline_ms,
ours_ms, speedup, max_err (+ GB/s or TFLOP/s, the byte/FLOP floor, graph timings; for decode the
launch form, fused or two-launch, that ``decode_plan`` picked).
Writes ``kernels_<card>.csv`` and ``kernels_<card>.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from topθ_core.config import DENSE, SDC, SparseConfig  # noqa: E402
from topθ_core.kernels import topθ_decode, topθ_prefill  # noqa: E402
from topθ_core.kernels import decode as decode_mod  # noqa: E402
from topθ_core.kernels.reference import topθ_decode_ref, topθ_prefill_ref  # noqa: E402

CFG = SparseConfig(sdc=SDC.OFFLINE)  # prefill / real sections: top-θ, pre-softmax, offline SDC, VMC, floor max
DECODE_CFG = SparseConfig()  # decode / host / e2e: the default (exact SDC, VMC, floor max), as issue 16 measured
CFG_ROW_MAX = DECODE_CFG.with_(theta_reference="row-max")
DECODE_SHAPES = [(32, 32768), (8, 32768), (32, 8192), (1, 4096), (1, 16384), (1, 32768)]  # (B, N)
ROW_MAX_SHAPES = {(32, 32768), (1, 16384)}
ROWS: list[dict] = []
NOTES: list[str] = []


def log(*a):
    print(*a, flush=True)


def card() -> str:
    return torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-")


def ceilings() -> tuple[float, float]:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    x = torch.empty(2 * 2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    bw = 2 * x.numel() * 2 / ms / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms2 = do_bench(lambda: a @ a, warmup=50, rep=200, return_mode="median")
    del x, y
    return bw, 2 * 8192**3 / ms2 / 1e9


def bench(fn, graph: bool = False) -> float:
    if graph:  # 25 ms of back-to-back calls per replay (thousands at small shapes), median of 10 replays
        return do_bench_cudagraph(fn, rep=25, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


# SDPA backends by the names sdpa_ms reports ("default": torch's own choice)
SDPA_BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def sdpa_ms(q, k, v, causal: bool, graph=False) -> tuple[float, str]:
    """Fastest of the SDPA backends that accept the call (default choice reported too)."""
    from torch.nn.attention import sdpa_kernel

    best, name = float("inf"), ""
    for label, be in SDPA_BACKENDS.items():
        def run(be=be):
            if be is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        try:
            run()
            torch.cuda.synchronize()
            t = bench(run, graph)
        except Exception:  # backend refuses this shape/dtype
            continue
        if t < best:
            best, name = t, label
    return best, name


def row_quantile_theta(scores: torch.Tensor, keep_frac: float) -> torch.Tensor:
    """θ per row keeping ``keep_frac`` of its finite scores (scores (..., N), −inf = invisible)."""
    n = scores.shape[-1]
    kth = max(1, min(n, int(round(n * (1 - keep_frac)))))
    return scores.float().kthvalue(kth, dim=-1).values


# ------------------------------------------------------------------------------------------------
# The decode launch form and configuration are the kernel's default (decode_plan), chosen by
# benchmarks/tune_decode.py.


def paired(base_fn, ours_fn, graph: bool = False, rounds: int = 3) -> tuple[float, float]:
    """Medians of ``rounds`` interleaved timings of baseline and ours (shared-machine noise hits both)."""
    tb, to = [], []
    for _ in range(rounds):
        tb.append(bench(base_fn, graph))
        to.append(bench(ours_fn, graph))
    return sorted(tb)[rounds // 2], sorted(to)[rounds // 2]


def sdpa_best(q, k, v, causal: bool):
    """The fastest SDPA backend for this call, as a callable, and its name."""
    from torch.nn.attention import sdpa_kernel

    _, name = sdpa_ms(q, k, v, causal)
    be = SDPA_BACKENDS[name]

    def run():
        if be is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return run, name


def run_decode(args, bw):
    Hq, Hkv, d, dt = 32, 8, 128, torch.bfloat16
    g = Hq // Hkv
    shapes = [(B, N) for B, N in DECODE_SHAPES if (not args.decode_b or B in args.decode_b)
              and (not args.decode_n or N in args.decode_n)]
    for B, N in shapes:
        q = torch.randn(B, Hq, 1, d, device="cuda", dtype=dt)
        k = torch.randn(B, Hkv, N, d, device="cuda", dtype=dt)
        v = torch.randn(B, Hkv, N, d, device="cuda", dtype=dt)
        v_sum = v.float().sum(2)
        scores = (q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2)) * d ** -0.5  # (B,Hq,1,N)
        row_max = scores.amax(-1)
        base_fn, be = sdpa_best(q, k, v, False)
        kv_bytes = 2 * B * Hkv * N * d * 2
        plan = decode_mod.decode_plan(B, Hkv, N, q.device, d)  # the module's: --plan-json replaces it
        form = ("fused" if plan.fused else "two-launch") + (" two-pass" if plan.two_pass else " one-pass")
        for f in (1.0, 1 / 3, 0.15, 0.05):
            p = 1 - (1 - f) ** (1 / g)
            theta = torch.full((B, Hq, 1), float("-inf"), device="cuda") if f >= 1 else row_quantile_theta(scores, p)
            variants = [("decode", DECODE_CFG, theta)]
            if (B, N) in ROW_MAX_SHAPES and f in (1 / 3, 0.15):
                variants.append(("decode row-max θ", CFG_ROW_MAX, theta - row_max))
            for kernel, cfg, th in variants:
                kw = dict(config=cfg, k_keep=64, v_sum=v_sum)
                out, c = topθ_decode(q, k, v, th, **kw)
                rs = slice(0, min(B, 4))  # the reference on up to 4 sequences
                ref, _ = topθ_decode_ref(q[rs], k[rs], v[rs], th[rs], config=cfg, k_keep=64)
                err = (out[rs].float() - ref.float()).abs().max().item()
                assert not torch.isnan(out).any()
                fv = c.kept_v_rows.sum().item() / (B * Hkv * N)
                fe = c.kept.sum().item() / (B * Hq * N)
                ours_fn = lambda: topθ_decode(q, k, v, th, **kw)  # noqa: E731
                base, ours = paired(base_fn, ours_fn)
                base_g, ours_g = paired(base_fn, ours_fn, graph=True)
                moved = kv_bytes / 2 * (1 + fv)
                row = dict(kernel=kernel, data="random", B=B, N=N, heads=f"{Hq}/{Hkv}", d=d, dtype="bf16",
                           form=form if kernel == "decode" else "two launches (candidates, keep + merge)",
                           f_target=round(f, 3), f_kept_v=round(fv, 4), f_kept_elems=round(fe, 4),
                           baseline_ms=base, ours_ms=ours, speedup=base / ours, max_err=err,
                           baseline_graph_ms=base_g, ours_graph_ms=ours_g, speedup_graph=base_g / ours_g,
                           baseline_backend=be, baseline_GBps=kv_bytes / base / 1e6, ours_GBps=moved / ours / 1e6,
                           floor_ms=moved / bw / 1e6, limit_speedup=2 / (1 + fv))
                ROWS.append(row)
                log(f"{kernel} {form} B={B:2d} N={N:5d} f={f:.3f} fv={fv:.3f} sdpa {base*1e3:7.1f}us ({be}, "
                    f"{row['baseline_GBps']:.0f} GB/s) ours {ours*1e3:7.1f}us ({row['ours_GBps']:.0f} GB/s) "
                    f"x{base/ours:.2f} | graph sdpa {base_g*1e3:.1f}us ours {ours_g*1e3:.1f}us x{base_g/ours_g:.2f} "
                    f"(limit {2/(1+fv):.2f}) err {err:.2e}")
        del q, k, v, scores
        torch.cuda.empty_cache()


def _host_us(fn, n: int = 2000) -> float:
    """CPU µs per call: calls issued back to back, no sync (the GPU keeps up at these shapes)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def run_host(args):
    """Where an eager decode call spends its CPU time (the latency-bound shapes are host-bound)."""
    import cProfile
    import io
    import pstats

    from topθ_core import dispatch
    from topθ_core.integration import RunState
    from topθ_core.fingerprint import ModelFingerprint
    from topθ_core.statistics import ThresholdStats

    Hq, Hkv, d, dt = 32, 8, 128, torch.bfloat16
    for B, N in ((1, 4096), (8, 4096)):
        q = torch.randn(B, Hq, 1, d, device="cuda", dtype=dt)
        k = torch.randn(B, Hkv, N, d, device="cuda", dtype=dt)
        v = torch.randn(B, Hkv, N, d, device="cuda", dtype=dt)
        stats = ThresholdStats(1, Hq, bin_width=1024, device="cpu")
        lengths = torch.arange(1024, N + 2048, 1024)
        stats.add(0, lengths, torch.full((len(lengths), Hq), 2.0), torch.full((len(lengths), Hq), 1.0))
        th = stats.finalize(0.0, fingerprint=ModelFingerprint("bench", "0", 1, Hq, Hkv, d), k=DECODE_CFG.k,
                            placement=DECODE_CFG.placement)
        row_len = torch.full((B, 1), N, device="cuda")
        theta, sdc, _ = th.lookup(0, row_len, DECODE_CFG.lookup)
        v_sum = v.float().sum(2)
        state = RunState(config=DECODE_CFG, thresholds=th)
        state.scratch[("topθ.vsum", 0)] = (N, v_sum)
        kw = dict(config=DECODE_CFG, k_keep=64, sdc_term=sdc, v_sum=v_sum)
        fns = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            "topθ_decode": lambda: topθ_decode(q, k, v, theta, **kw),
            "θ lookup": lambda: th.lookup(0, row_len, DECODE_CFG.lookup),
            "dispatch.try_kernels": lambda: dispatch.try_kernels(q, k, v, visible=None, theta=theta, sdc_term=sdc,
                                                                  k_keep=64, scaling=None, softcap=None, state=state,
                                                                  layer=0),
        }
        res = {name: _host_us(fn) for name, fn in fns.items()}
        for name, us in res.items():
            ROWS.append(dict(kernel="decode host", data=name, B=B, N=N, heads=f"{Hq}/{Hkv}", d=d, dtype="bf16",
                             host_us=us))
        log(f"host B={B} N={N}: " + ", ".join(f"{n} {us:.1f} us" for n, us in res.items()))
        if B == 1:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(500):
                topθ_decode(q, k, v, theta, **kw)
            pr.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(14)
            log("cProfile of 500 topθ_decode calls (B=1, N=4k), by own time:\n" + buf.getvalue()[-3500:])


def _length_theta(q, k, keep_frac, rows=48, scale=None):
    """θ (B, Hq, Sq) per head, linear in row length between sampled rows' quantiles."""
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = scale or d ** -0.5
    off = Sk - Sq
    idx = torch.linspace(min(Sq - 1, 16), Sq - 1, rows, device=q.device).long().unique()
    kk = k.float().repeat_interleave(Hq // Hkv, 1)
    L = idx + off + 1
    th = torch.empty(B, Hq, len(idx), device=q.device)
    for j, (i, n) in enumerate(zip(idx.tolist(), L.tolist())):  # one sampled row at a time, every (b, h) at once
        s = (q[:, :, i].float().unsqueeze(2) @ kk[:, :, :n].transpose(-1, -2)).squeeze(2) * scale  # (B, Hq, n)
        kth = max(1, min(n - 1, int(round(n * (1 - keep_frac)))))
        lo, hi = s.kthvalue(kth, dim=-1).values, s.kthvalue(kth + 1, dim=-1).values
        th[:, :, j] = (lo + hi) / 2  # between two scores: no score of a sampled row sits on θ
    # linear in L between the samples, flat beyond
    allL = torch.arange(off + 1, Sk + 1, device=q.device).float()
    x = L.float()
    pos = torch.searchsorted(x, allL).clamp(1, len(x) - 1)
    x0, x1 = x[pos - 1], x[pos]
    w = ((allL - x0) / (x1 - x0)).clamp(0, 1)
    return th[..., pos - 1] * (1 - w) + th[..., pos] * w


PREFILL_CFG = SparseConfig()  # the project default: exact SDC, VMC, floor max
PREFILL_CONFIGS = {"prefill": PREFILL_CFG, "prefill offline-sdc": SparseConfig(sdc=SDC.OFFLINE)}


def _form(d: int, device) -> str:
    from topθ_core.kernels.prefill import prefill_config

    bm, bn, nw, ns = prefill_config(d, device)
    return f"{bm}x{bn} w{nw} s{ns}"


def _timed(base_fn, fn, rounds: int) -> dict:
    """CUDA-graph medians of interleaved rounds (both sides replayed: no host time) and one eager pair."""
    base_g, ours_g = paired(base_fn, fn, graph=True, rounds=rounds)
    base, ours = paired(base_fn, fn, rounds=1)
    return dict(baseline_ms=base, ours_ms=ours, speedup=base / ours, baseline_graph_ms=base_g, ours_graph_ms=ours_g,
                speedup_graph=base_g / ours_g)


def _prefill_rows(q, k, v, data, thetas, args, scale=None, check_rows=1024, k_keep=64, sdc_term=None):
    """Rows for the default config and offline SDC at each θ, and the plain path (θ = −∞, dense) once;
    every timed call is checked against the fp32 reference on the last rows first.  TFLOP/s are
    from the CUDA-graph times."""
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dt = "bf16" if q.dtype == torch.bfloat16 else "fp16"
    base_fn, be = sdpa_best(q, k, v, True)
    flops = 4 * B * Hq * d * (Sq * (Sk - Sq) + Sq * (Sq + 1) / 2)
    sdc_term = sdc_term if sdc_term is not None else torch.rand(B, Hq, Sq, device="cuda")
    form = _form(d, q.device)
    r0 = Sq - min(Sq, check_rows)
    vis_total = B * Hq * (Sq * (Sk - Sq) + Sq * (Sq + 1) / 2)
    common = dict(B=B, N=Sk, heads=f"{Hq}/{Hkv}", d=d, dtype=dt, baseline_backend=be, form=form)
    jobs = [("prefill plain", DENSE, "1.0", None)]
    jobs += [(name, cfg, label, theta) for label, theta in thetas for name, cfg in PREFILL_CONFIGS.items()]
    for name, cfg, label, theta in jobs:
        kw = dict(config=cfg, k_keep=k_keep, sdc_term=sdc_term, scale=scale)
        out_c, c = topθ_prefill(q, k, v, theta, **kw)  # the counting launch
        fn = lambda: topθ_prefill(q, k, v, theta, counts=False, **kw)[0]  # noqa: E731
        out = fn()
        assert not torch.isnan(out).any()
        ref, _ = topθ_prefill_ref(q[:, :, r0:], k, v, None if theta is None else theta[:, :, r0:], config=cfg,
                                  k_keep=k_keep, sdc_term=sdc_term[:, :, r0:], scale=scale)
        err = max((o[:, :, r0:].float() - ref.float()).abs().max().item() for o in (out, out_c))
        fe = c.kept.sum().item() / vis_total
        fv = c.kept_v_rows.sum().item() / (B * Hkv * Sk)
        t = _timed(base_fn, fn, args.prefill_rounds)
        ROWS.append(dict(kernel=name, data=data, f_target=label, f_kept_v=round(fv, 4), f_kept_elems=round(fe, 4),
                         max_err=err, baseline_TFLOPs=flops / t["baseline_graph_ms"] / 1e9,
                         ours_TFLOPs=flops / t["ours_graph_ms"] / 1e9, **t, **common))
        log(f"{name} {data} B={B} N={Sk} {label} fe={fe:.3f}: graph sdpa {t['baseline_graph_ms']:.3f}ms ({be}, "
            f"{flops / t['baseline_graph_ms'] / 1e9:.0f} TF/s) ours {t['ours_graph_ms']:.3f}ms "
            f"({flops / t['ours_graph_ms'] / 1e9:.0f} TF/s) x{t['speedup_graph']:.3f}; eager x{t['speedup']:.3f} "
            f"({t['baseline_ms']:.3f} / {t['ours_ms']:.3f} ms); {form}; err {err:.2e}")
    if args.tutorial_launch and Sq == Sk and Sq % 128 == 0 and d == 128:
        from tune_prefill import tutorial_fa

        bm, bn, nw, ns = (int(x) for x in args.tutorial_launch.split(","))
        fn = lambda: tutorial_fa(q, k, v, bm, bn, nw, ns)  # noqa: E731
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, r0:].float(), k.float(), v.float(),
                                                               attn_mask=_causal_tail(Sq, r0, q.device),
                                                               enable_gqa=True)
        err = (fn()[:, :, r0:].float() - ref).abs().max().item()
        t = _timed(base_fn, fn, args.prefill_rounds)
        ROWS.append(dict(kernel="prefill tutorial-form (dense)", data=data, f_target="1.0", max_err=err,
                         baseline_TFLOPs=flops / t["baseline_graph_ms"] / 1e9,
                         ours_TFLOPs=flops / t["ours_graph_ms"] / 1e9, **t,
                         **{**common, "form": f"{bm}x{bn} w{nw} s{ns}"}))
        log(f"tutorial-form {data} B={B} N={Sk}: graph {t['ours_graph_ms']:.3f}ms "
            f"({flops / t['ours_graph_ms'] / 1e9:.0f} TF/s) x{t['speedup_graph']:.3f}; eager x{t['speedup']:.3f}; "
            f"err {err:.2e}")
    if d == 128 or data.endswith("L2"):  # what VMC's prefix sum of V costs by itself
        from topθ_core.kernels.prefill import v_prefix_sum

        log(f"  v_prefix_sum {tuple(v.shape)}: {bench(lambda: v_prefix_sum(v), graph=True) * 1e3:.1f} us (graph)")


def _causal_tail(N, r0, device):
    """Bool mask of the last N − r0 rows of an N×N causal attention."""
    return torch.arange(N, device=device)[None, :] <= torch.arange(r0, N, device=device)[:, None]


def run_prefill(args):
    Hq, Hkv, d, dt = 32, 8, 128, torch.bfloat16
    for shape in args.prefill_shapes:
        B, N = (int(x) for x in shape.split("x"))
        q = torch.randn(B, Hq, N, d, device="cuda", dtype=dt)
        k = torch.randn(B, Hkv, N, d, device="cuda", dtype=dt)
        v = torch.randn(B, Hkv, N, d, device="cuda", dtype=dt)
        thetas = [("1.0", torch.full((B, Hq, N), float("-inf"), device="cuda"))]
        for f in args.prefill_fracs:
            thetas.append((str(f), _length_theta(q, k, f)))
        _prefill_rows(q, k, v, "random", thetas, args)
        del q, k, v, thetas
        torch.cuda.empty_cache()


def run_real(args):
    path = ROOT / "benchmarks" / "fixtures" / "smollm2_qkv_4k.pt"
    if not path.is_file():
        NOTES.append(f"real-data rows skipped: {path} missing (run capture_smollm2_qkv.py)")
        return
    fx = torch.load(path)
    for layer, t in sorted(fx["layers"].items()):
        q, k, v = (t[x].cuda() for x in ("q", "k", "v"))
        B, Hq, N, d = q.shape
        thetas = [("1.0", torch.full((B, Hq, N), float("-inf"), device="cuda"))]
        for f in args.prefill_fracs:
            thetas.append((str(f), _length_theta(q, k, f)))
        # calibrated for k = 64: θ = mean + 0.1·std of t per 64-token bin (t, D_U from the dense scores)
        tt, du = _row_samples_dense(q, k, 65)
        th, C = torch.full_like(tt, float("-inf")), torch.zeros_like(tt)
        for b0 in range(0, N, 64):
            seg, segd = tt[..., b0:b0 + 64], du[..., b0:b0 + 64]
            ok = ~torch.isnan(seg[0, 0])
            if ok.any():
                s = seg[..., ok]
                th[..., b0:b0 + 64] = (s.mean(-1) + 0.1 * s.std(-1, unbiased=False)).unsqueeze(-1)
                C[..., b0:b0 + 64] = segd[..., ok].mean(-1).unsqueeze(-1)
        thetas.append(("calib k=64", th))
        _prefill_rows(q, k, v, f"smollm2-L{layer}", thetas, args, sdc_term=C)
        # decode on the real cache: the last query row against the full cache
        for label, theta in thetas if args.real_decode else ():
            qd, thd = q[:, :, -1:], theta[:, :, -1:]
            kw = dict(config=CFG, k_keep=64, sdc_term=C[:, :, -1:], v_sum=v.float().sum(2))
            out, c = topθ_decode(qd, k, v, thd, **kw)
            ref, _ = topθ_decode_ref(qd, k, v, thd, config=CFG, k_keep=64, sdc_term=C[:, :, -1:])
            base, be = sdpa_ms(qd, k, v, False)
            ours = bench(lambda: topθ_decode(qd, k, v, thd, **kw))
            fv = c.kept_v_rows.sum().item() / (B * k.shape[1] * N)
            ROWS.append(dict(kernel="decode", data=f"smollm2-L{layer}", B=B, N=N, heads=f"{Hq}/{k.shape[1]}", d=d,
                             dtype="fp16", f_target=label, f_kept_v=round(fv, 4),
                             f_kept_elems=round(c.kept.sum().item() / (B * Hq * N), 4), baseline_ms=base,
                             ours_ms=ours, speedup=base / ours, max_err=(out.float() - ref.float()).abs().max().item(),
                             baseline_backend=be))
            log(f"decode smollm2-L{layer} {label} fv={fv:.3f} x{base/ours:.2f} (latency-bound shape)")


def _row_samples_dense(q, k, kth):
    """Per causal row the kth-largest logit t and D_U = Σ_{a ≤ t} e^(a − m), (B, Hq, Sq); NaN where L < kth."""
    B, Hq, Sq, d = q.shape
    Hkv = k.shape[1]
    t = torch.full((B, Hq, Sq), float("nan"), device=q.device)
    du = torch.full_like(t, float("nan"))
    vis = torch.ones(Sq, Sq, dtype=torch.bool, device=q.device).tril()
    for h in range(Hq):
        s = (q[:, h:h + 1].float() @ k[:, h // (Hq // Hkv):h // (Hq // Hkv) + 1].float().transpose(-1, -2)) * d ** -0.5
        s = s.masked_fill(~vis, float("-inf"))[:, 0]  # (B, Sq, Sk)
        top = s.topk(kth, dim=-1).values
        tt = top[..., -1]
        m = top[..., 0]
        e = torch.exp(s - m.unsqueeze(-1))
        d_u = (e * (s <= tt.unsqueeze(-1))).sum(-1)
        ok = vis.sum(-1) >= kth
        t[:, h] = torch.where(ok, tt, float("nan"))
        du[:, h] = torch.where(ok, d_u, float("nan"))
    return t, du


E2E_MODELS = {  # random weights; head dim 128 (Llama-3-8B) and 64 (SmolLM2-135M's config)
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                      rope_theta=500000.0),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
}
E2E_SHAPES = {"llama3-8b": [(1, 16384), (8, 16384), (32, 16384), (1, 131072)],
              "smollm2-135m": [(1, 8000), (8, 8000)]}
E2E_GQA_ROWS = "bench_sdpa_gqa_rows"


def _sdpa_gqa_rows(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense decode through SDPA with each GQA group's query heads as rows of one KV head: the static
    mask (B, 1, 1, N) broadcasts, and K/V are read once (transformers' sdpa repeats them per query
    head when a mask is given)."""
    import torch.nn.functional as F

    B, Hq, Sq, d = query.shape
    Hkv = key.shape[1]
    if Sq != 1 or attention_mask is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.reshape(B, Hkv, Hq // Hkv, d)
    o = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask[..., :key.shape[2]], scale=scaling)
    return o.reshape(B, Hq, 1, d).transpose(1, 2), None


E2E_NO_MASK = {"dense": "bench_sdpa_no_mask", "topθ": "bench_top_theta_no_mask"}


def _register_no_mask() -> None:
    """Attention implementations with no mask function: transformers then hands the attention no mask at
    all (it builds one while a CUDA graph is being captured otherwise, run 13), so a fixed-length step
    attends over exactly the keys it is given: SDPA takes its unmasked GQA decode kernels, Top-θ its
    plain causal path."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from topθ_core.integration import top_theta_attention_forward

    AttentionInterface.register(E2E_NO_MASK["dense"], sdpa_attention_forward)
    AttentionInterface.register(E2E_NO_MASK["topθ"], top_theta_attention_forward)


def _fixed_length_decoder(model, ks, vs, N, B, kw, impl):
    """A captured step over exactly keys [0, N] of the buffers, without a mask (the attention gets
    views of N + 1 keys through attention implementation ``impl``, which has no mask function); every
    replay rewrites key N.  For timing at one length: the dense side at its best."""
    from transformers.cache_utils import Cache

    from topθ_core.graph_decode import _StaticLayer

    class Fixed(_StaticLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            super().update(key_states, value_states)
            return self.keys[:, :, :N + 1], self.values[:, :, :N + 1]

        def get_mask_sizes(self, query_length):
            return N + 1, 0

    pos = torch.full((1,), N, dtype=torch.long, device="cuda")
    cache = Cache(layers=[Fixed(k, v, pos) for k, v in zip(ks, vs)])
    ids = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    position_ids = torch.full((B, 1), N, dtype=torch.long, device="cuda")

    def forward():
        model.set_attn_implementation(impl)
        try:
            out = model(input_ids=ids, position_ids=position_ids, use_cache=True, **{kw: cache})
        finally:
            from topθ_core.integration import ATTN_NAME

            model.set_attn_implementation(ATTN_NAME)
        ids.copy_(out.logits[:, -1:].argmax(-1))

    return forward


class _Replay:
    """Eager step, capture, then ``step()`` replays (the timing interface of GraphDecoder).

    Keeps ``forward`` (its closure holds the input ids, positions and cache the graph reads and
    writes) and the run's state (its scratch: the V sums the graph reads) for as long as the graph:
    run 14 dropped both after capture, the allocator handed their memory to the next side's
    tensors, and the replays read token ids from it (an out-of-range embedding index).
    """

    def __init__(self, forward, ctx_factory):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with ctx_factory() as state, torch.cuda.stream(side):
            forward()
            side.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        self._forward, self._state = forward, state

    def step(self):
        self.graph.replay()

    def close(self):
        self.graph = self._forward = self._state = None


def run_e2e(args):
    """Decode tokens/s, both sides one CUDA-graph replay per step on a static cache (random weights)."""
    import contextlib

    from torch.nn.attention import sdpa_kernel
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from topθ_core.fingerprint import model_fingerprint
    from topθ_core.graph_decode import GraphDecoder
    from topθ_core.integration import ATTN_NAME, prepare_model, sparse_run
    from topθ_core.statistics import ThresholdStats

    AttentionInterface.register(E2E_GQA_ROWS, _sdpa_gqa_rows)
    AttentionMaskInterface.register(E2E_GQA_ROWS, sdpa_mask)
    _register_no_mask()
    steps, rounds = args.e2e_steps, 3
    for name in args.e2e_models:
        mc = LlamaConfig(**E2E_MODELS[name])
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(mc).to(torch.bfloat16).eval()
        prepare_model(model)
        fp = model_fingerprint(model)
        L, Hq, Hkv, d = mc.num_hidden_layers, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
        w_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        shapes = [s for s in E2E_SHAPES[name] if not args.e2e_b or s[0] in args.e2e_b]
        n_max = max(N for _, N in shapes) + 64 + steps * (rounds + 1)

        def thresholds(val):
            stats = ThresholdStats(L, Hq, bin_width=1024, device="cpu")
            lengths = torch.arange(1024, n_max + 1024, 1024)
            for layer in range(L):
                stats.add(layer, lengths, torch.full((len(lengths), Hq), val), torch.full((len(lengths), Hq), 1.0))
            return stats.finalize(0.0, fingerprint=fp, k=DECODE_CFG.k, placement=DECODE_CFG.placement)

        def buffers(B, max_len):
            g = torch.Generator(device="cuda").manual_seed(1)
            mk = lambda: torch.randn(B, Hkv, max_len, d, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
            return [mk() for _ in range(L)], [mk() for _ in range(L)]

        # θ for f ≈ 0.15 (bisection on one eager static step at the first shape; random scores: the
        # kept fraction of a constant θ barely depends on B and N, and each row reports its own f)
        B0, N0 = shapes[0]
        ks, vs = buffers(B0, N0 + 64)
        lo, hi = -8.0, 40.0
        with torch.inference_mode():
            for _ in range(10):
                mid = (lo + hi) / 2
                th = thresholds(mid)
                dec = GraphDecoder(model, lambda th=th: sparse_run(DECODE_CFG, th, model=model), max_len=N0 + 64,
                                   cuda_graph=False)
                dec.load_cache(ks, vs, length=N0)
                dec.step()
                fv = dec.kept_v_fraction()
                lo, hi = (mid, hi) if fv > 0.15 else (lo, mid)
        th = thresholds((lo + hi) / 2)
        del ks, vs, dec
        torch.cuda.empty_cache()
        for B, N in shapes:
            max_len = N + 64 + steps * (rounds + 1)
            ks, vs = buffers(B, max_len)

            def decoder(run, backend=None, impl=ATTN_NAME):
                model.set_attn_implementation(impl)
                dec = GraphDecoder(model, run, max_len=max_len)
                dec.load_cache(ks, vs, length=N)
                ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
                with torch.inference_mode(), ctx:
                    dec.step()  # eager, then capture
                    dec.step()  # first replay
                model.set_attn_implementation(ATTN_NAME)
                return dec

            def timed(dec) -> float:
                with torch.inference_mode():
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        dec.step()
                    torch.cuda.synchronize()
                return (time.perf_counter() - t0) / steps

            sides = {"Top-θ": decoder(lambda: sparse_run(DECODE_CFG, th, model=model))}
            from topθ_core.models import cache_kwarg

            with torch.inference_mode():
                kw = cache_kwarg(model)
                sides["sdpa, one length (unmasked)"] = _Replay(
                    _fixed_length_decoder(model, ks, vs, N, B, kw, E2E_NO_MASK["dense"]), contextlib.nullcontext)
                sides["Top-θ, one length (unmasked)"] = _Replay(
                    _fixed_length_decoder(model, ks, vs, N, B, kw, E2E_NO_MASK["topθ"]),
                    lambda: sparse_run(DECODE_CFG, th, model=model))
            for label, backend, impl in (("sdpa, static mask (transformers)", None, ATTN_NAME),
                                         ("sdpa, static mask, GQA rows", None, E2E_GQA_ROWS)):
                try:
                    sides[label] = decoder(None, backend, impl)
                except Exception as e:  # a backend that refuses the masked decode call
                    log(f"e2e {name} B={B} N={N} dense {label}: {type(e).__name__}: {str(e)[:120]}")
            times = {k: [] for k in sides}
            for _ in range(rounds):  # interleaved: machine drift hits every side
                for label, dec in sides.items():
                    times[label].append(timed(dec))
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            fv = sides["Top-θ"].kept_v_fraction()
            dense_label = min((k for k in med if not k.startswith("Top-θ")), key=med.get)
            kv = 2 * L * B * Hkv * N * d * 2  # K + V bytes of the cache
            limit = (w_bytes + kv) / (w_bytes + kv / 2 * (1 + fv))
            for label, t in med.items():
                log(f"e2e {name} B={B} N={N}: {label} {1e3 * t:.3f} ms/step, {B / t:.1f} tok/s")
            tok_d, tok_s = B / med[dense_label], B / med["Top-θ"]
            ROWS.append(dict(kernel=f"e2e decode, CUDA graph ({name}, random weights)", data="random-weights", B=B,
                             N=N, heads=f"{Hq}/{Hkv}", d=d, dtype="bf16", f_kept_v=round(fv, 4),
                             baseline_ms=1e3 * med[dense_label], ours_ms=1e3 * med["Top-θ"], speedup=tok_s / tok_d,
                             baseline_backend=dense_label, tokens_per_s_sdpa=tok_d, tokens_per_s_topθ=tok_s,
                             limit_speedup=limit, weight_GB=w_bytes / 1e9, kv_GB=kv / 1e9,
                             sides_ms="; ".join(f"{k} {1e3 * v:.3f}" for k, v in med.items())))
            log(f"e2e {name} B={B} N={N}: dense ({dense_label}) {tok_d:.1f} tok/s, Top-θ {tok_s:.1f} tok/s "
                f"(f_v {fv:.3f}) x{tok_s / tok_d:.2f} (byte limit {limit:.2f})")
            if args.e2e_profile:
                try:
                    _profile_sides(sides, steps, args.out / f"e2e_profile_{name}_B{B}_N{N}.txt")
                except Exception as e:  # a diagnostic: the timed rows stand without it
                    log(f"e2e {name} B={B} N={N}: profile failed: {type(e).__name__}: {e}")
            for dec in sides.values():
                dec.close()
            del sides, ks, vs
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


def _profile_sides(sides: dict, steps: int, path: Path) -> None:
    """Each side's CUDA kernels over ``steps`` replayed steps (torch.profiler, CUPTI traces a graph's
    kernel nodes): per kernel name, launches and device µs per step, largest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    lines = []
    for label, dec in sides.items():
        with torch.inference_mode():
            dec.step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    dec.step()
                torch.cuda.synchronize()
        agg: dict[str, list] = {}
        for e in prof.events():
            if e.device_type != DeviceType.CUDA:
                continue
            a = agg.setdefault(e.name[:110], [0, 0.0])
            a[0] += 1
            a[1] += e.device_time if hasattr(e, "device_time") else e.cuda_time
        total = sum(v[1] for v in agg.values()) / steps
        lines.append(f"== {label}: {total:.1f} us of kernels per step, "
                     f"{sum(v[0] for v in agg.values()) / steps:.0f} launches per step")
        for nm, (n, us) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"{us / steps:10.1f} us {n / steps:7.1f}x  {nm}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    log(f"wrote {path}")
    log("\n".join(ln for ln in lines if ln.startswith("==")))


def use_plan(path: Path) -> None:
    """Replace ``decode_plan`` by the tuned configurations of ``tune_decode.py --best-json`` or
    ``tune_decode_layers.py --best-json``: the file's ``lat`` entry for every shape with
    B·Hkv·N ≤ FUSED_MAX_KV_ROWS (whatever its head dimension or batch: pass a file tuned on the shapes
    you run), its ``bw`` entry for the others; a class the file lacks keeps the shipped plan."""
    import json

    best = json.loads(path.read_text())

    def plan(B, Hkv, N, device, d, row_max=False):
        kind = "lat" if B * Hkv * N <= decode_mod.FUSED_MAX_KV_ROWS else "bw"
        if kind not in best:
            return shipped(B, Hkv, N, device, d, row_max)
        c = best[kind]
        splits = decode_mod.decode_splits(B, Hkv, N, c.get("min_split", c["block_n"]), device, c["waves"],
                                          c.get("max_splits"))  # min_split, max_splits: tune_decode_layers.py
        return decode_mod.DecodePlan(c["fused"], splits, c["block_n"], c["num_warps"], c["num_stages"],
                                     c["two_pass"], c["chunk"], c["block_v"], c.get("combine_warps", 4))

    shipped = decode_mod.decode_plan

    decode_mod.decode_plan = plan
    NOTES.append(f"decode plan from {path.name}: {best}")
    log(f"decode plan: {best}")


def write(out_dir: Path, bw, tf, elapsed):
    import pandas as pd

    c = card()
    df = pd.DataFrame(ROWS)
    df.insert(0, "card", c)
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"kernels_{c}.csv", index=False, float_format="%.6g")
    lines = [f"# Top-θ kernels vs SDPA on {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; measured ceilings: copy {bw:.0f} GB/s "
             f"(read+write), bf16 matmul {tf:.0f} TFLOP/s; run took {elapsed:.0f} s.", ""]
    lines += [f"- {n}" for n in NOTES]
    with pd.option_context("display.width", 250):
        lines += ["", "```", df.drop(columns=["card"]).to_string(index=False, float_format=lambda x: f"{x:.4g}"), "```"]
    (out_dir / f"kernels_{c}.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out_dir}/kernels_{c}.csv and .md")


def main():
    ap = argparse.ArgumentParser(description="Top-θ kernels vs SDPA")
    ap.add_argument("--only", default="decode,host,prefill,real,e2e")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    ap.add_argument("--decode-b", type=int, nargs="*", default=[], help="only these B of DECODE_SHAPES")
    ap.add_argument("--decode-n", type=int, nargs="*", default=[], help="only these N of DECODE_SHAPES")
    ap.add_argument("--prefill-shapes", nargs="+", default=["1x4096", "1x16384", "1x32768", "8x4096"],
                    help="prefill shapes as BxN (Llama-3-8B attention: 32/8 heads, d 128, bf16)")
    ap.add_argument("--prefill-fracs", type=float, nargs="+", default=[0.25, 0.1],
                    help="kept-element fractions of the prefill and real rows (besides 1.0)")
    ap.add_argument("--prefill-rounds", type=int, default=3, help="interleaved CUDA-graph rounds per prefill row")
    ap.add_argument("--no-real-decode", dest="real_decode", action="store_false",
                    help="real section: prefill rows only")
    ap.add_argument("--tutorial-launch", default=None,
                    help="BM,BN,WARPS,STAGES: also time tune_prefill's tutorial-form kernel at each square shape")
    ap.add_argument("--plan-json", type=Path, default=None,
                    help="decode launch plan from tune_decode.py or tune_decode_layers.py --best-json (lat: "
                         "B·Hkv·N ≤ 2^18, bw: the others) instead of decode_plan's rules")
    ap.add_argument("--e2e-models", nargs="+", default=list(E2E_MODELS), choices=list(E2E_MODELS))
    ap.add_argument("--e2e-b", type=int, nargs="*", default=[], help="only these batch sizes of E2E_SHAPES")
    ap.add_argument("--e2e-steps", type=int, default=20, help="replayed steps per timing (3 interleaved rounds)")
    ap.add_argument("--e2e-profile", action="store_true",
                    help="after timing, profile each side's replayed steps (CUDA kernels per step) into "
                         "e2e_profile_<model>_B<B>_N<N>.txt under --out")
    args = ap.parse_args()
    if args.plan_json is not None:
        use_plan(args.plan_json)
    t0 = time.time()
    bw, tf = ceilings()
    log(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s, bf16 mm {tf:.0f} TFLOP/s")
    sections = dict(decode=lambda: run_decode(args, bw), host=lambda: run_host(args), prefill=lambda: run_prefill(args), real=lambda: run_real(args),
                    e2e=lambda: run_e2e(args))
    for name in args.only.split(","):
        try:
            sections[name]()
        except Exception as e:  # keep the other sections' rows
            import traceback

            traceback.print_exc()
            NOTES.append(f"section {name} failed: {type(e).__name__}: {e}")
        write(args.out, bw, tf, time.time() - t0)


if __name__ == "__main__":
    main()
