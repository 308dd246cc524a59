"""Decode kernel launch-configuration search on one GPU (Llama-3-8B shapes).

    python benchmarks/tune_decode.py [--out DIR] [--stages 1,2,3]

Stage 1 times every configuration (block size, warps, stages, waves of programs per SM) at
B=32, N=32k for f = 1 and 0.15, checks each output against the fp32 reference, and stage 2
re-times the best few on the other bandwidth-bound shapes.  Stage 3 sweeps the split count (and
warps) on the small, latency-bound shapes under CUDA graphs, where the launch's own length, not
the host, decides.  SDPA is measured in the same run on the same inputs.  Writes
``decode_tuning_<card>.csv`` and prints the best configuration per shape.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_kernels import CFG, bench, card, log, row_quantile_theta, sdpa_best, sdpa_ms  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

from topθ_core.kernels import topθ_decode  # noqa: E402
from topθ_core.kernels.decode import decode_plan, decode_splits  # noqa: E402
from topθ_core.kernels.reference import topθ_decode_ref  # noqa: E402

CONFIGS = [  # (block_n, num_warps, num_stages, waves of programs per SM)
    # A per-lane-statistics variant (D_S, D_U, counts and argmax accumulated elementwise and
    # reduced once per split) was timed here on 2026-11-27 and was 10-50 % slower at every
    # configuration (register pressure); results/decode_tuning_H200.csv keeps its rows.
    (64, 2, 3, 8),  # the two-launch kernel's default (run 6)
    (64, 2, 2, 8),
    (64, 2, 4, 8),
    (64, 2, 3, 4),
    (128, 4, 3, 4),
]
SMALL = [(1, 4096), (1, 16384), (1, 32768), (8, 4096)]  # latency-bound shapes (B, N)
SMALL_SPLITS = [4, 8, 16, 32, 64, 128]


def make(B, N, f, Hq=32, Hkv=8, d=128):
    g = Hq // Hkv
    q = torch.randn(B, Hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, N, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, N, d, device="cuda", dtype=torch.bfloat16)
    scores = (q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2)) * d ** -0.5
    theta = {ff: (torch.full((B, Hq, 1), float("-inf"), device="cuda") if ff >= 1
                  else row_quantile_theta(scores, 1 - (1 - ff) ** (1 / g))) for ff in f}
    del scores
    return q, k, v, theta, torch.rand(B, Hq, 1, device="cuda"), v.float().sum(2)


def run_cfg(q, k, v, th, sdc, vsum, c):
    bn, nw, ns, waves = c
    B, Hkv, N = k.shape[0], k.shape[1], k.shape[2]
    splits = decode_splits(B, Hkv, N, bn, q.device, waves=waves)
    return lambda: topθ_decode(q, k, v, th, config=CFG, k_keep=64, sdc_term=sdc, v_sum=vsum, num_splits=splits,
                               block_n=bn, num_warps=nw, num_stages=ns)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    ap.add_argument("--top", type=int, default=2)
    ap.add_argument("--stages", default="1,2,3")
    args = ap.parse_args()
    stages = {int(x) for x in args.stages.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    name = card()
    rows = []
    fs = (1.0, 1 / 3, 0.15, 0.05)
    if 1 in stages:
        rows += stage12(name, fs, args.top, 2 in stages)
    if 3 in stages:
        rows += stage3(name)
    path = args.out / f"decode_tuning_{name}.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    log(f"wrote {path}")


def stage3(name):
    """Split count × warps on the latency-bound shapes, CUDA-graph medians (f = 1 and 0.15)."""
    rows = []
    for B, N in SMALL:
        q, k, v, theta, sdc, vsum = make(B, N, (1.0, 0.15))
        base_fn, be = sdpa_best(q, k, v, False)
        base = do_bench_cudagraph(base_fn, rep=25, return_mode="median")
        default = decode_plan(B, 8, N, q.device).splits  # the committed plan's split count
        best = {}
        for nw in (2, 4):
            for S in sorted(set(SMALL_SPLITS + [default])):
                if S > triton.cdiv(N, 64):
                    continue
                for f in (1.0, 0.15):
                    fn = lambda: topθ_decode(q, k, v, theta[f], config=CFG, k_keep=64, sdc_term=sdc,  # noqa: E731
                                             v_sum=vsum, num_splits=S, num_warps=nw)
                    fn()
                    t = do_bench_cudagraph(fn, rep=25, return_mode="median")
                    rows.append(dict(card=name, stage=3, block_n=64, num_warps=nw, num_stages=3, splits=S, B=B, N=N,
                                     f=f, sdpa_us=base * 1e3, ours_us=t * 1e3, speedup=base / t,
                                     max_err=float("nan"), default_splits=default))
                    best.setdefault(f, []).append((t, S, nw))
        for f, lst in best.items():
            lst.sort()
            log(f"  [{name}] B={B} N={N} f={f:.2f} graph: sdpa {base*1e3:.1f} us ({be}); best "
                + ", ".join(f"S={S} w={nw} {t*1e3:.1f} us" for t, S, nw in lst[:3])
                + f"; default S={default}: " + ", ".join(f"w={nw} {t*1e3:.1f}" for t, S, nw in lst if S == default))
        del q, k, v, theta
        torch.cuda.empty_cache()
    return rows


def stage12(name, fs, top, second):
    rows = []
    # stage 1
    B, N = 32, 32768
    q, k, v, theta, sdc, vsum = make(B, N, fs)
    base, be = sdpa_ms(q, k, v, False)
    log(f"[{name}] stage 1 B={B} N={N}: sdpa {base*1e3:.0f} us ({be})")
    refs = {}
    for f in (1.0, 0.15):
        ref, _ = topθ_decode_ref(q[:4], k[:4], v[:4], theta[f][:4], config=CFG, k_keep=64, sdc_term=sdc[:4])
        refs[f] = ref
    score = {}
    for c in CONFIGS:
        tot = 0.0
        for f in (1.0, 0.15):
            fn = run_cfg(q, k, v, theta[f], sdc, vsum, c)
            try:
                out, _ = fn()
                err = (out[:4].float() - refs[f]).abs().max().item()
                t = bench(fn)
            except Exception as e:  # a configuration that does not compile (registers, shared memory)
                log(f"  {c} f={f}: failed: {type(e).__name__}: {str(e)[:160]}")
                tot = float("inf")
                break
            tot += t
            rows.append(dict(card=name, stage=1, block_n=c[0], num_warps=c[1], num_stages=c[2], waves=c[3], B=B, N=N, f=f, sdpa_us=base * 1e3, ours_us=t * 1e3, speedup=base / t,
                             max_err=err))
            log(f"  {c} f={f:.2f}: {t*1e3:.0f} us  x{base/t:.2f}  err {err:.2e}")
        score[c] = tot
    best = sorted(score, key=score.get)[:top]
    log(f"stage 1 best: {best}")
    del q, k, v, theta
    torch.cuda.empty_cache()
    if not second:
        return rows
    # stage 2
    for B, N in ((32, 16384), (8, 32768), (8, 16384)):
        q, k, v, theta, sdc, vsum = make(B, N, fs)
        base, be = sdpa_ms(q, k, v, False)
        for c in best:
            for f in (1.0, 0.15):
                t = bench(run_cfg(q, k, v, theta[f], sdc, vsum, c))
                rows.append(dict(card=name, stage=2, block_n=c[0], num_warps=c[1], num_stages=c[2], waves=c[3], B=B, N=N, f=f, sdpa_us=base * 1e3, ours_us=t * 1e3, speedup=base / t,
                                 max_err=float("nan")))
                log(f"  B={B} N={N} {c} f={f:.2f}: {t*1e3:.0f} us vs sdpa {base*1e3:.0f} ({be})  x{base/t:.2f}")
        del q, k, v, theta
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
