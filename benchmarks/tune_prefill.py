"""Prefill kernel launch-configuration search on one GPU (Llama-3-8B attention, B = 1, causal).

    python benchmarks/tune_prefill.py [--n 4096 16384] [--out DIR]

For each N and kept-element fraction (1 and 0.1, random Q/K/V) it times, in one run on the
same inputs: SDPA (fastest backend), a plain dense Triton FlashAttention-2 kernel written here
(no Top-θ work at all: what Triton reaches with this loop structure on the card, the ceiling
for ours), and ``topθ_prefill`` at every configuration below with tile skipping on and off.
Every output is checked against the fp32 reference on the last rows.  Writes
``prefill_tuning_<card>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_kernels import CFG, _length_theta, bench, card, log, sdpa_ms  # noqa: E402

from topθ_core.kernels import topθ_prefill  # noqa: E402
from topθ_core.kernels.reference import topθ_prefill_ref  # noqa: E402

CONFIGS = [  # (block_m, block_n, num_warps, num_stages); run 1 (prefill_tuning_H200.csv) also had
    # 128x64 w4 s3 (1.8x slower without tile skipping), 128x128 w8 s3 (out of shared memory),
    # 64x128 w4 s3 and 128x32 w4 s4 (both 5-10 % slower)
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (64, 64, 4, 4),
]


@triton.jit
def _plain_fa_tiles(acc, ds, m, nk, q, th, offs_m, kb, vb, sk_n, lo, hi, scale_log2, BLOCK_N: tl.constexpr,
                    D: tl.constexpr, MASKED: tl.constexpr, THETA: tl.constexpr, COUNT: tl.constexpr):
    offs_d = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(kb + offs_n[:, None] * sk_n + offs_d[None, :])
        s = tl.dot(q, tl.trans(kt)) * scale_log2
        if MASKED:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        if THETA:
            keep = s > th[:, None]
            p = tl.where(keep, p, 0.0)
            if COUNT == 1:
                nk += tl.sum(keep.to(tl.int32), 1).to(tl.float32)
            elif COUNT == 2:
                nk += tl.sum(keep.to(tl.float32), 1)
            elif COUNT == 3:
                nk = tl.minimum(nk, tl.min(s, 1))
        ds = ds * alpha + tl.sum(p, 1)
        vt = tl.load(vb + offs_n[:, None] * sk_n + offs_d[None, :])
        acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
        m = m_new
    return acc, ds, m, nk


@triton.jit
def _plain_fa_kernel(Q, K, V, O, TH, sq_h, sq_m, sk_h, sk_n, so_h, so_m, Sq, scale_log2,
                     G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                     THETA: tl.constexpr = False, COUNT: tl.constexpr = 0):
    """THETA / COUNT add one piece of Top-θ's per-tile work at a time (the ablation): the
    compare with θ and the masked exponentials; then the kept count as an int32 (1) or float
    (2) row sum, or a row minimum (3)."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :])
    kb = K + (h // G) * sk_h
    vb = V + (h // G) * sk_h
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    ds = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    th = tl.load(TH + h * Sq + offs_m) if THETA else tl.zeros([BLOCK_M], tl.float32)
    nk = tl.zeros([BLOCK_M], tl.float32)
    lo_diag = start_m * BLOCK_M
    acc, ds, m, nk = _plain_fa_tiles(acc, ds, m, nk, q, th, offs_m, kb, vb, sk_n, 0, lo_diag, scale_log2,
                                     BLOCK_N, D, False, THETA, COUNT)  # below the diagonal: no mask
    acc, ds, m, nk = _plain_fa_tiles(acc, ds, m, nk, q, th, offs_m, kb, vb, sk_n, lo_diag, lo_diag + BLOCK_M,
                                     scale_log2, BLOCK_N, D, True, THETA, COUNT)  # the diagonal block
    o = acc / ds[:, None] + nk[:, None] * 0.0
    tl.store(O + h * so_h + offs_m[:, None] * so_m + offs_d[None, :], o.to(O.dtype.element_ty))


def plain_fa(q, k, v, block_m=128, block_n=64, num_warps=8, num_stages=3, theta=None, count=0):
    """Dense causal attention, B = 1, Sq = Sk divisible by block_m (benchmark only)."""
    _, Hq, S, D = q.shape
    o = torch.empty_like(q)
    _plain_fa_kernel[(S // block_m, Hq)](
        q, k, v, o, theta if theta is not None else q, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
        o.stride(1), o.stride(2), S,
        D ** -0.5 * 1.4426950408889634, G=Hq // k.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, D=D,
        num_warps=num_warps, num_stages=num_stages)
    return o


def ablation(N: int = 16384) -> None:
    """Which piece of Top-θ's per-tile work costs the time: the plain kernel plus one piece at a
    time, then ``topθ_prefill`` with fewer features switched on."""
    from topθ_core.config import DENSE, SDC, EmptyRowFloor, SparseConfig

    Hq, Hkv, d, dt = 32, 8, 128, torch.bfloat16
    q, k, v = (torch.randn(1, h, N, d, device="cuda", dtype=dt) for h in (Hq, Hkv, Hkv))
    flops = 4 * Hq * d * N * (N + 1) / 2
    theta = _length_theta(q, k, 0.1)
    base, be = sdpa_ms(q, k, v, True)
    log(f"ablation N={N} sdpa {base:.3f} ms ({be})")
    for bm, bn, nw, ns in ((128, 64, 8, 3), (64, 64, 4, 3)):
        for th, cnt in ((None, 0), (theta, 0), (theta, 1), (theta, 2), (theta, 3)):
            t = bench(lambda: plain_fa(q, k, v, bm, bn, nw, ns, theta=th, count=cnt))
            log(f"  plain {bm}x{bn} w{nw} theta={th is not None} count={cnt}: {t:.3f} ms ({flops / t / 1e9:.0f} TF/s)")
        for name, cfg in (("dense", DENSE), ("no sdc/vmc/floor", SparseConfig(sdc=SDC.NONE, vmc=False,
                                                                                 empty_row=EmptyRowFloor.NONE)),
                          ("offline sdc only", SparseConfig(sdc=SDC.OFFLINE, vmc=False, empty_row=EmptyRowFloor.NONE)),
                          ("bench default", CFG)):
            kw = dict(config=cfg, k_keep=64, sdc_term=torch.rand(1, Hq, N, device="cuda"), block_m=bm, block_n=bn,
                      num_warps=nw, num_stages=ns, skip_tiles=False, counts=False)
            t = bench(lambda: topθ_prefill(q, k, v, theta, **kw))
            log(f"  ours {bm}x{bn} w{nw} {name}: {t:.3f} ms ({flops / t / 1e9:.0f} TF/s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ablation", action="store_true", help="only the per-piece cost ablation")
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    args = ap.parse_args()
    if args.ablation:
        return ablation()
    Hq, Hkv, d, dt = 32, 8, 128, torch.bfloat16
    c = card()
    rows = []
    for N in args.n:
        q, k, v = (torch.randn(1, h, N, d, device="cuda", dtype=dt) for h in (Hq, Hkv, Hkv))
        flops = 4 * Hq * d * N * (N + 1) / 2
        base, be = sdpa_ms(q, k, v, True)
        log(f"N={N} sdpa {base:.3f} ms ({be}, {flops / base / 1e9:.0f} TF/s)")
        ref_dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        for bm, bn, nw, ns in CONFIGS:
            try:
                o = plain_fa(q, k, v, bm, bn, nw, ns)
                err = (o.float() - ref_dense.float()).abs().max().item()
                t = bench(lambda: plain_fa(q, k, v, bm, bn, nw, ns))
            except Exception as e:  # a configuration that does not compile (shared memory, registers)
                log(f"  plain FA {bm}x{bn} w{nw} s{ns}: {type(e).__name__}")
                continue
            rows.append(dict(card=c, kernel="plain_triton_fa", N=N, f_target="1.0", block_m=bm, block_n=bn,
                             num_warps=nw, num_stages=ns, skip="", baseline_ms=base, ours_ms=t, speedup=base / t,
                             ours_TFLOPs=flops / t / 1e9, max_err=err))
            log(f"  plain FA {bm}x{bn} w{nw} s{ns}: {t:.3f} ms ({flops / t / 1e9:.0f} TF/s) x{base / t:.2f} "
                f"err {err:.1e}")
        sdc = torch.rand(1, Hq, N, device="cuda")
        thetas = [("1.0", torch.full((1, Hq, N), float("-inf"), device="cuda")), ("0.1", _length_theta(q, k, 0.1))]
        r0 = N - 512
        for label, theta in thetas:
            kw = dict(config=CFG, k_keep=64, sdc_term=sdc)
            ref, _ = topθ_prefill_ref(q[:, :, r0:], k, v, theta[:, :, r0:], config=CFG, k_keep=64,
                                      sdc_term=sdc[:, :, r0:])
            for bm, bn, nw, ns in CONFIGS:
                for skip in (True, False):
                    tune = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, skip_tiles=skip)
                    try:
                        out, cnt = topθ_prefill(q, k, v, theta, **kw, **tune)
                        err = (out[:, :, r0:].float() - ref.float()).abs().max().item()
                        t = bench(lambda: topθ_prefill(q, k, v, theta, counts=False, **kw, **tune))
                    except Exception as e:
                        log(f"  ours {bm}x{bn} w{nw} s{ns} skip={skip}: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    fe = cnt.kept.sum().item() / (Hq * N * (N + 1) / 2)
                    rows.append(dict(card=c, kernel="topθ_prefill", N=N, f_target=label, f_kept_elems=round(fe, 4),
                                     block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, skip=skip, baseline_ms=base,
                                     ours_ms=t, speedup=base / t, ours_TFLOPs=flops / t / 1e9, max_err=err))
                    log(f"  ours f={label} {bm}x{bn} w{nw} s{ns} skip={skip}: {t:.3f} ms ({flops / t / 1e9:.0f} TF/s) "
                        f"x{base / t:.2f} fe={fe:.3f} err {err:.1e}")
        del q, k, v
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefill_tuning_{c}.csv"
    keys = sorted({k for r in rows for k in r}, key=lambda x: list(rows[0]).index(x) if x in rows[0] else 99)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
