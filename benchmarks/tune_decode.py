"""Decode kernel launch-configuration search on one GPU (Llama-3-8B attention: 32/8 heads, d 128, bf16).

    python benchmarks/tune_decode.py [--out DIR] [--compile-only --part I --parts P]

Bandwidth-bound shapes (B·N ≥ 256k: B=32 N=32k, B=8 N=32k, B=32 N=8k) are timed eagerly (``do_bench``
medians, SDPA's fastest backend interleaved on the same inputs) for every configuration of
:data:`BW_CONFIGS`; latency-bound shapes (B=1, N=4k/16k/32k) under CUDA graphs for every
configuration of :data:`LAT_CONFIGS`.  Each output is checked against the fp32 reference first
(4 sequences).  The default config (exact SDC, VMC, floor max), θ per row from the score quantile
so that the union of kept V rows over a GQA group is ≈ f.

``--compile-only --part I --parts P`` runs each of this part's configurations once (no timing):
several such processes started side by side fill Triton's cache in parallel, so the timing process
compiles nothing.  Writes ``decode_tuning_<card>.csv`` (appending a ``run`` label) and prints the
best configuration per shape.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_kernels import DECODE_CFG as CFG, bench, card, log, row_quantile_theta, sdpa_best  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

from topθ_core.kernels import topθ_decode  # noqa: E402
from topθ_core.kernels.decode import decode_plan, decode_splits  # noqa: E402
from topθ_core.kernels.reference import topθ_decode_ref  # noqa: E402


class Cfg(NamedTuple):
    two_pass: bool
    fused: bool
    block_n: int
    num_warps: int
    num_stages: int
    waves: int  # programs per SM (split count = waves · SMs / (B·Hkv), at least one block each)
    chunk: int = 1024
    block_v: int = 32

    def label(self) -> str:
        loop = f"2pass c{self.chunk} v{self.block_v}" if self.two_pass else "1pass"
        return f"{'fused' if self.fused else 'split'} {loop} n{self.block_n} w{self.num_warps} s{self.num_stages} x{self.waves}"


BW_SHAPES = [(32, 32768), (8, 32768), (32, 8192)]
LAT_SHAPES = [(1, 4096), (1, 16384), (1, 32768)]
BW_CONFIGS = [
    Cfg(False, False, 64, 2, 3, 8),  # the one-pass two-launch plan of runs 6-11
    Cfg(True, False, 64, 2, 3, 8),
    Cfg(True, False, 64, 4, 3, 4),
    Cfg(True, False, 64, 4, 3, 8),
    Cfg(True, False, 128, 4, 3, 4),
    Cfg(True, False, 64, 2, 4, 8),
    Cfg(True, False, 64, 2, 3, 8, 2048),
    Cfg(True, False, 64, 2, 3, 8, 1024, 64),
    Cfg(True, True, 64, 2, 3, 8),
]
LAT_CONFIGS = [Cfg(tp, True, 64, w, 3, x) for tp in (True, False) for w in (2, 4) for x in (4, 8)]
FS = (1.0, 0.15)
LAT_FS = (0.15,)


def make(B, N, fs, Hq=32, Hkv=8, d=128):
    g = Hq // Hkv
    q = torch.randn(B, Hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, N, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, N, d, device="cuda", dtype=torch.bfloat16)
    scores = (q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2)) * d ** -0.5
    theta = {f: (torch.full((B, Hq, 1), float("-inf"), device="cuda") if f >= 1
                 else row_quantile_theta(scores, 1 - (1 - f) ** (1 / g))) for f in fs}
    del scores
    return q, k, v, theta, torch.rand(B, Hq, 1, device="cuda"), v.float().sum(2)


def run_cfg(q, k, v, th, sdc, vsum, c: Cfg):
    B, Hkv, N = k.shape[0], k.shape[1], k.shape[2]
    splits = decode_splits(B, Hkv, N, c.block_n, q.device, waves=c.waves)
    return lambda: topθ_decode(q, k, v, th, config=CFG, k_keep=64, sdc_term=sdc, v_sum=vsum, num_splits=splits,
                               block_n=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages, fused=c.fused,
                               two_pass=c.two_pass, chunk=c.chunk, block_v=c.block_v)


def jobs():
    return [("bw", s, c) for s in BW_SHAPES for c in BW_CONFIGS] + [("lat", s, c) for s in LAT_SHAPES
                                                                     for c in LAT_CONFIGS]


def compile_only(part: int, parts: int) -> None:
    mine = jobs()[part::parts]
    data = {}
    for kind, (B, N), c in mine:
        if (B, N) not in data:
            data = {(B, N): make(B, N, (0.15,))}
        q, k, v, theta, sdc, vsum = data[(B, N)]
        try:
            run_cfg(q, k, v, theta[0.15], sdc, vsum, c)()
        except Exception as e:  # reported again (and skipped) by the timing run
            log(f"compile {c.label()} B={B} N={N}: {type(e).__name__}: {str(e)[:120]}")
    torch.cuda.synchronize()


def tuning_parser(description: str) -> argparse.ArgumentParser:
    """The options every decode tuning script takes: output folder, run label, and the compile-only parts."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    ap.add_argument("--run", default="", help="label written into the CSV's run column")
    ap.add_argument("--compile-only", action="store_true", help="run this part's configurations once, no timing")
    ap.add_argument("--part", type=int, default=0)
    ap.add_argument("--parts", type=int, default=1)
    return ap


def main():
    ap = tuning_parser("decode launch configurations, one call on the same inputs")
    ap.add_argument("--only", default="bw,lat")
    ap.add_argument("--best-json", type=Path, default=None,
                    help="write the best configuration per class (bw, lat) here, for bench_kernels --plan-json")
    args = ap.parse_args()
    if args.compile_only:
        compile_only(args.part, args.parts)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    name = card()
    rows = []
    best = {}
    for kind in args.only.split(","):
        kind_rows = sweep(name, kind, args.run)
        rows += kind_rows
        best[kind] = pick(kind_rows)
        log(f"best {kind}: {best[kind]}")
    if args.best_json is not None:
        import json

        args.best_json.write_text(json.dumps(best, indent=1))
    write_rows(rows, args.out / f"decode_tuning_{name}.csv")


def write_rows(rows: list[dict], path: Path) -> None:
    """Rows (dicts, columns in first-seen order) → a CSV at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    log(f"wrote {path}")


def pick(rows: list[dict]) -> dict:
    """The configuration with the best geometric-mean speed-up over the class's shapes and fractions."""
    import math

    score: dict[str, list[float]] = {}
    cfgs = {}
    for r in rows:
        score.setdefault(r["config"], []).append(math.log(r["speedup"]))
        cfgs[r["config"]] = {k: r[k] for k in Cfg._fields}
    n = max(len(v) for v in score.values())
    label = max((k for k, v in score.items() if len(v) == n), key=lambda k: sum(score[k]))
    return dict(cfgs[label], label=label, geomean_speedup=math.exp(sum(score[label]) / n))


def sweep(name: str, kind: str, run: str) -> list[dict]:
    rows = []
    shapes, configs, fs = (BW_SHAPES, BW_CONFIGS, FS) if kind == "bw" else (LAT_SHAPES, LAT_CONFIGS, LAT_FS)
    graph = kind == "lat"
    for B, N in shapes:
        q, k, v, theta, sdc, vsum = make(B, N, fs)
        base_fn, be = sdpa_best(q, k, v, False)
        plan = decode_plan(B, 8, N, q.device, 128)
        refs = {f: topθ_decode_ref(q[:4], k[:4], v[:4], theta[f][:4], config=CFG, k_keep=64, sdc_term=sdc[:4])[0]
                for f in fs}
        res: dict[float, list] = {f: [] for f in fs}
        timer = (lambda fn: do_bench_cudagraph(fn, rep=25, return_mode="median")) if graph else bench
        tb0 = timer(base_fn)  # SDPA before and after the configurations: its time drifts with the machine
        start = len(rows)
        for c in configs:
            for f in fs:
                fn = run_cfg(q, k, v, theta[f], sdc, vsum, c)
                try:
                    out, cnt = fn()
                    err = (out[:4].float() - refs[f]).abs().max().item()
                except Exception as e:  # a configuration that does not compile (registers, shared memory)
                    log(f"  {c.label()} failed: {type(e).__name__}: {str(e)[:160]}")
                    break
                fv = cnt.kept_v_rows.sum().item() / (B * 8 * N)
                to = timer(fn)
                tb = tb0
                res[f].append((to, c, tb))
                rows.append(dict(card=name, run=run, kind=kind, config=c.label(), two_pass=c.two_pass,
                                 fused=c.fused, block_n=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages,
                                 waves=c.waves, chunk=c.chunk, block_v=c.block_v, B=B, N=N, f=round(f, 4),
                                 f_kept_v=round(fv, 4), sdpa_us=tb * 1e3, ours_us=to * 1e3, speedup=tb / to,
                                 max_err=err, graph=graph))
        tb = (tb0 + timer(base_fn)) / 2
        for r in rows[start:]:
            r["sdpa_us"], r["speedup"] = tb * 1e3, tb * 1e3 / r["ours_us"]
        res = {f: [(t, c, tb) for t, c, _ in lst] for f, lst in res.items()}
        log(f"[{name}] {kind} B={B} N={N} (sdpa {be} {tb*1e3:.1f} us; plan {plan})")
        for f in fs:
            best = sorted(res[f], key=lambda r: r[0])
            log(f"  f={f:.3f}: " + "; ".join(f"{c.label()} {t*1e3:.1f}us x{tb/t:.2f}" for t, c, tb in best[:4]))
        del q, k, v, theta
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
