"""Decode launch plans timed as an end-to-end step runs them: one CUDA graph of L consecutive layer calls,
each layer over its own K/V buffers, against SDPA's fastest backend in the same form.

    python benchmarks/tune_decode_layers.py [--out DIR] [--run LABEL] [--compile-only --part I --parts P]

``tune_decode.py`` times one call on the same inputs again and again: at B = 1 a layer's K (33.5 MB at
N = 16k) then stays in the 50 MB L2, which no real decode step sees (32 layers of cache between two
reads of one layer).  Here every layer reads its own cold cache, as in ``bench_kernels.py --only e2e``,
whose profile (run 16) showed the decode kernel at 28.9 µs per layer against cuDNN's 23.8 at B = 1,
N = 16k.  Shapes: :data:`SHAPES` (Llama-3-8B attention, 32/8 heads, d 128; SmolLM2-135M, 9/3, d 64),
bf16, the default config (exact SDC, VMC, floor), θ per head from the score quantile so that a group
keeps f ≈ 0.15 of the V rows, static lengths (the kernel reads ``lengths`` like a captured step).
Configurations: :data:`LAT` (fused shapes) or :data:`BW` (the others), and the shipped
``decode_plan`` ("plan").  Each configuration's first layer is checked against the fp32 reference.
``--compile-only --part I --parts P`` fills Triton's cache (several processes side by side).  Writes
``decode_layers_<card>.csv``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_kernels import DECODE_CFG as CFG, SDPA_BACKENDS, card, log, row_quantile_theta, sdpa_best  # noqa: E402
from tune_decode import tuning_parser, write_rows  # noqa: E402

from topθ_core.kernels import topθ_decode  # noqa: E402
from topθ_core.kernels.decode import FUSED_MAX_KV_ROWS, decode_plan, decode_splits  # noqa: E402
from topθ_core.kernels.reference import topθ_decode_ref  # noqa: E402

LAYERS = 32
F_KEPT = 0.15
SHAPES = [  # (label, B, N, Hq, Hkv, d)
    ("llama3-8b", 1, 4096, 32, 8, 128), ("llama3-8b", 1, 16384, 32, 8, 128), ("llama3-8b", 1, 32768, 32, 8, 128),
    ("llama3-8b", 8, 4096, 32, 8, 128), ("smollm2-135m", 1, 2048, 9, 3, 64), ("smollm2-135m", 1, 8000, 9, 3, 64),
    ("llama3-8b", 8, 16384, 32, 8, 128), ("llama3-8b", 1, 65536, 32, 8, 128), ("llama3-8b", 1, 131072, 32, 8, 128),
]


class Cfg(NamedTuple):
    """A launch: programs per SM (``waves``) of ``num_warps``, splits of at least ``min_split`` keys and at
    most ``max_splits`` per (batch, KV head); the two-launch form's combine runs with ``combine_warps``."""

    fused: bool
    block_n: int
    num_warps: int
    num_stages: int
    waves: int
    min_split: int = 64
    max_splits: int = 1 << 20
    combine_warps: int = 4

    def splits(self, B, Hkv, N, device) -> int:
        return decode_splits(B, Hkv, N, self.min_split, device, self.waves, self.max_splits)

    def label(self) -> str:
        cap = "" if self.max_splits >= 1 << 20 else f" cap{self.max_splits}"
        comb = "" if self.fused else f" cw{self.combine_warps}"
        return (f"{'fused' if self.fused else 'split'} n{self.block_n} w{self.num_warps} s{self.num_stages} "
                f"x{self.waves} min{self.min_split}{cap}{comb}")


LAT = [Cfg(True, 64, 4, 3, 2, 256), Cfg(True, 64, 4, 3, 2, 128), Cfg(True, 64, 4, 3, 2, 64), Cfg(True, 64, 4, 3, 1, 64),
       Cfg(True, 64, 2, 3, 4, 256), Cfg(True, 64, 2, 3, 4, 128), Cfg(True, 64, 4, 3, 3, 128)]
# latency-bound shapes in other forms: two launches, more warps or stages, wider blocks (--lat-forms)
LAT_FORMS = [Cfg(True, 64, 4, 3, 2), Cfg(False, 64, 2, 3, 8, combine_warps=8), Cfg(False, 64, 4, 3, 2, combine_warps=8),
             Cfg(False, 64, 2, 3, 4, combine_warps=8), Cfg(True, 64, 4, 4, 2), Cfg(True, 128, 8, 3, 2),
             Cfg(True, 64, 8, 3, 1), Cfg(True, 128, 4, 3, 2), Cfg(True, 64, 4, 3, 2, max_splits=16)]
BW = [Cfg(False, 64, 2, 3, 8), Cfg(False, 64, 2, 3, 8, max_splits=64), Cfg(False, 64, 2, 3, 8, max_splits=32),
      Cfg(False, 64, 2, 3, 8, max_splits=64, combine_warps=8), Cfg(False, 64, 2, 3, 8, combine_warps=8),
      Cfg(False, 64, 2, 3, 4)]


def kind_of(B, Hkv, N) -> str:
    return "lat" if B * Hkv * N <= FUSED_MAX_KV_ROWS else "bw"


def make_layers(B, N, Hq, Hkv, d, layers):
    """Per layer: q, k, v, θ (f ≈ F_KEPT of a group's V rows), SDC term, V sum, static lengths."""
    g = Hq // Hkv
    out = []
    for _ in range(layers):
        q = torch.randn(B, Hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, N, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, N, d, device="cuda", dtype=torch.bfloat16)
        scores = (q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2)) * d ** -0.5
        th = row_quantile_theta(scores, 1 - (1 - F_KEPT) ** (1 / g))
        del scores
        out.append((q, k, v, th, torch.rand(B, Hq, 1, device="cuda"), v.float().sum(2),
                    torch.full((B,), N, dtype=torch.int32, device="cuda")))
    return out


def call(layer, c: Cfg | None):
    q, k, v, th, sdc, vsum, lens = layer
    B, Hkv, N = k.shape[0], k.shape[1], k.shape[2]
    if c is None:  # the shipped decode_plan
        return topθ_decode(q, k, v, th, config=CFG, k_keep=64, sdc_term=sdc, v_sum=vsum, lengths=lens)
    return topθ_decode(q, k, v, th, config=CFG, k_keep=64, sdc_term=sdc, v_sum=vsum, lengths=lens,
                       num_splits=c.splits(B, Hkv, N, q.device), block_n=c.block_n, num_warps=c.num_warps,
                       num_stages=c.num_stages, fused=c.fused, two_pass=False, combine_warps=c.combine_warps)


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def time_graph(g, reps=20) -> float:
    """Median µs of one replay (all layers)."""
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(ts)[2]


def compile_only(part: int, parts: int) -> None:
    jobs = [(s, c) for s in SHAPES for c in (LAT if kind_of(s[1], s[4], s[2]) == "lat" else BW)]
    for s, c in jobs[part::parts]:
        layer = make_layers(*s[1:], 1)[0]
        try:
            call(layer, c)
        except Exception as e:  # reported (and skipped) by the timing run
            log(f"compile {c.label()} {s}: {type(e).__name__}: {str(e)[:120]}")
    torch.cuda.synchronize()


def main():
    ap = tuning_parser("decode launch plans over 32 cold layers, as a decode step runs them")
    ap.add_argument("--shapes", nargs="*", default=[], help="only these shapes, as MODEL:B:N")
    ap.add_argument("--lat-forms", action="store_true", help="latency-bound shapes: LAT_FORMS instead of LAT")
    ap.add_argument("--best-json", type=Path, default=None,
                    help="write the fastest configuration per class (geometric mean over the class's d-128 shapes) "
                         "for bench_kernels.py --plan-json")
    args = ap.parse_args()
    if args.shapes:
        SHAPES[:] = [s for s in SHAPES if f"{s[0]}:{s[1]}:{s[2]}" in args.shapes]
    if args.lat_forms:
        LAT[:] = LAT_FORMS
    if args.compile_only:
        compile_only(args.part, args.parts)
        return
    name, rows, configs = card(), [], {}
    for label, B, N, Hq, Hkv, d in SHAPES:
        kind = kind_of(B, Hkv, N)
        layers = make_layers(B, N, Hq, Hkv, d, LAYERS)
        q, k, v, th, sdc, _, lens = layers[0]
        ref = topθ_decode_ref(q, k, v, th, config=CFG, k_keep=64, sdc_term=sdc, lengths=lens)[0].float()
        _, be = sdpa_best(q, k, v, False)

        def sdpa_all():
            with sdpa_kernel([SDPA_BACKENDS[be]]) if SDPA_BACKENDS[be] is not None else contextlib.nullcontext():
                for lq, lk, lv, *_ in layers:
                    F.scaled_dot_product_attention(lq, lk, lv, enable_gqa=True)

        g_base = graph_of(sdpa_all)
        t_base = [time_graph(g_base)]
        plan = decode_plan(B, Hkv, N, q.device, d)
        res = []
        for c in [None] + (LAT if kind == "lat" else BW):
            try:
                out, cnt = call(layers[0], c)
                err = (out.float() - ref).abs().max().item()
                fv = cnt.kept_v_rows.sum().item() / (B * Hkv * N)
                g = graph_of(lambda c=c: [call(lay, c) for lay in layers])
            except Exception as e:  # registers or shared memory: this configuration does not launch
                log(f"  {'plan' if c is None else c.label()} failed: {type(e).__name__}: {str(e)[:160]}")
                continue
            t = time_graph(g)
            del g
            res.append((t, c, err, fv))
        t_base.append(time_graph(g_base))
        tb = sum(t_base) / len(t_base) / LAYERS
        del g_base
        for t, c, err, fv in res:
            if c is not None:
                configs[c.label()] = c
            rows.append(dict(card=name, run=args.run, kind=kind, model=label,
                             config=f"plan (splits {plan.splits}, warps {plan.num_warps})" if c is None else c.label(),
                             splits=plan.splits if c is None else c.splits(B, Hkv, N, q.device),
                             B=B, N=N, heads=f"{Hq}/{Hkv}", d=d, f_kept_v=round(fv, 4), sdpa_backend=be,
                             sdpa_us_per_layer=tb, ours_us_per_layer=t / LAYERS, speedup=tb / (t / LAYERS),
                             max_err=err))
        ranked = sorted(rows[len(rows) - len(res):], key=lambda r: r["ours_us_per_layer"])
        log(f"[{name}] {kind} {label} B={B} N={N}: sdpa ({be}) {tb:.1f} us/layer; plan {plan}")
        for r in ranked[:6] + [r for r in ranked[6:] if r["config"].startswith("plan")]:
            log(f"   {r['config']:<40} {r['ours_us_per_layer']:6.1f} us/layer x{r['speedup']:.3f} "
                f"fv {r['f_kept_v']:.3f} err {r['max_err']:.1e}")
        del layers
        torch.cuda.empty_cache()
    write_rows(rows, args.out / f"decode_layers_{name}.csv")
    if args.best_json is not None:
        args.best_json.write_text(json.dumps(best_configs(rows, configs), indent=1))
        log(f"best: {args.best_json.read_text()}")


def best_configs(rows: list[dict], configs: dict) -> dict:
    """Per class (lat, bw): the configuration with the best geometric-mean speed-up over its d-128 shapes."""
    import math

    best = {}
    for kind in ("lat", "bw"):
        score: dict[str, list[float]] = {}
        for r in rows:
            if r["kind"] == kind and r["d"] == 128 and r["config"] in configs:
                score.setdefault(r["config"], []).append(math.log(r["speedup"]))
        if score:
            n = max(len(v) for v in score.values())
            label = max((k for k, v in score.items() if len(v) == n), key=lambda k: sum(score[k]))
            best[kind] = dict(configs[label]._asdict(), two_pass=False, chunk=1024, block_v=32, label=label,
                              geomean_speedup=math.exp(sum(score[label]) / n))
    return best


if __name__ == "__main__":
    main()
