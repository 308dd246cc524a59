"""Prefill launch search on one GPU: ours against its ceilings, in one run on the same inputs.

    python benchmarks/tune_prefill.py [--n 16384 4096] [--old PATH] [--out DIR]
    python benchmarks/tune_prefill.py --apply DIR/prefill_best.json   # write the chosen table into prefill.py

Llama-3-8B attention (32/8 heads, d 128, bf16, B = 1, causal, random Q/K/V) at each N, and
SmolLM2's shape (9/3 heads, d 64, fp16) at 4k.  Timed, interleaved (median of rounds), after a
correctness check against the fp32 reference on the last rows:

* SDPA, every backend that takes the call (cuDNN, flash, efficient);
* ``topθ_prefill`` at each candidate launch (:data:`CANDIDATES`) in three configurations: the
  project default (exact SDC + VMC + floor), offline SDC (the paper's), and the plain path
  (dense: θ = −∞, no compensation);
* the tutorial form: Triton's fused-attention tutorial forward (python/tutorials/06-fused-attention.py,
  Triton 3.6) re-expressed here for bf16 and GQA: tensor descriptors, its two causal loops, its
  launch space.  Triton 3.6 does not warp-specialise its causal two-loop form on Hopper (the
  compile fails; the script records it), so on Hopper it runs without.  (A single causal loop
  does compile warp-specialised, but gave wrong results on an H200: run 12 in kernels.md.);
* the previous pointer-load kernels (``plain_fa``, and the old ``topθ_prefill`` if ``--old`` names
  its file) for the before/after.

Kernels are compiled first, in parallel worker processes, so the timing loop only loads them.
Writes ``prefill_tuning_<card>.csv`` and ``prefill_best.json`` (the best default-config launch per
head dim and loop form, by geometric-mean speed-up over the shapes; ``--apply`` writes it into
``prefill.py``'s launch table).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from topθ_core.config import DENSE, SDC, SparseConfig  # noqa: E402
from topθ_core.kernels import topθ_prefill  # noqa: E402
from topθ_core.kernels.prefill import PrefillLaunch  # noqa: E402
from topθ_core.kernels.reference import topθ_prefill_ref  # noqa: E402

DEFAULT = SparseConfig()  # exact SDC, VMC, floor max: the project default
OFFLINE = SparseConfig(sdc=SDC.OFFLINE)
MODES = {"default": DEFAULT, "offline": OFFLINE, "plain": DENSE}

CANDIDATES: dict[int, list[PrefillLaunch]] = {  # head dim → launches tried (without counts)
    128: [PrefillLaunch(128, 128, 8, 2), PrefillLaunch(128, 64, 8, 3), PrefillLaunch(128, 128, 8, 3),
          PrefillLaunch(64, 64, 4, 3)],
    64: [PrefillLaunch(128, 64, 4, 3), PrefillLaunch(64, 64, 4, 3), PrefillLaunch(128, 128, 8, 2)],
}
TUTORIAL_LAUNCHES = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]


def log(*a):
    print(*a, flush=True)


def card() -> str:
    return torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-")


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


# ------------------------------------------------------------------------------------------------
# The tutorial form (python/tutorials/06-fused-attention.py of Triton 3.6, forward): bf16/fp16 and
# GQA (K/V rows of query head h are those of KV head h // G); everything else as the tutorial has it.

@triton.jit
def _tutorial_inner(acc, l_i, m_i, q, desc_k, desc_v, kv_y, start_m, qk_scale, offs_m, offs_n,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGE: tl.constexpr, WS: tl.constexpr):
    if STAGE == 1:
        lo, hi = 0, start_m * BLOCK_M
    else:
        lo, hi = start_m * BLOCK_M, (start_m + 1) * BLOCK_M
        lo = tl.multiple_of(lo, BLOCK_M)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        qk = tl.dot(q, desc_k.load([kv_y + start_n, 0]).T)
        if STAGE == 2:
            qk = qk * qk_scale + tl.where(offs_m[:, None] >= (start_n + offs_n[None, :]), 0, -1.0e6)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk -= m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([kv_y + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + l_ij
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _tutorial_fwd(sm_scale, Q, K, V, O, Hq, Hkv, N_CTX, Y_Q, Y_KV, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, G: tl.constexpr, WS: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // Hq
    off_h = off_hz % Hq
    desc_q = tl.make_tensor_descriptor(Q, shape=[Y_Q, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    desc_o = tl.make_tensor_descriptor(O, shape=[Y_Q, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    desc_k = tl.make_tensor_descriptor(K, shape=[Y_KV, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(V, shape=[Y_KV, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    q_y = off_hz * N_CTX + start_m * BLOCK_M
    kv_y = (off_z * Hkv + off_h // G) * N_CTX
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504
    q = desc_q.load([q_y, 0])
    acc, l_i, m_i = _tutorial_inner(acc, l_i, m_i, q, desc_k, desc_v, kv_y, start_m, qk_scale, offs_m, offs_n,
                                    BLOCK_M, BLOCK_N, 1, WS)
    acc, l_i, m_i = _tutorial_inner(acc, l_i, m_i, q, desc_k, desc_v, kv_y, start_m, qk_scale, offs_m, offs_n,
                                    BLOCK_M, BLOCK_N, 2, WS)
    acc = acc / l_i[:, None]
    desc_o.store([q_y, 0], acc.to(desc_o.dtype))


def tutorial_fa(q, k, v, block_m=128, block_n=128, num_warps=8, num_stages=2, ws=False):
    """Dense causal attention in the tutorial's form (contiguous (B, H, N, d), N a multiple of block_m)."""
    B, Hq, N, D = q.shape
    o = torch.empty_like(q)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    _tutorial_fwd[(N // block_m, B * Hq)](D ** -0.5, q, k, v, o, Hq, k.shape[1], N, B * Hq * N, B * k.shape[1] * N,
                                          HEAD_DIM=D, BLOCK_M=block_m,
                                          BLOCK_N=block_n, G=Hq // k.shape[1], WS=ws, num_warps=num_warps,
                                          num_stages=num_stages)
    return o


# ------------------------------------------------------------------------------------------------
# The previous plain kernel (pointer loads, two causal loops): the ceiling kernels.md quoted before.

@triton.jit
def _plain_fa_tiles(acc, ds, m, q, offs_m, kb, vb, sk_n, lo, hi, scale_log2, BLOCK_N: tl.constexpr,
                    D: tl.constexpr, MASKED: tl.constexpr):
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
        ds = ds * alpha + tl.sum(p, 1)
        vt = tl.load(vb + offs_n[:, None] * sk_n + offs_d[None, :])
        acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
        m = m_new
    return acc, ds, m


@triton.jit
def _plain_fa_kernel(Q, K, V, O, sq_h, sq_m, sk_h, sk_n, so_h, so_m, scale_log2,
                     G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
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
    lo_diag = start_m * BLOCK_M
    acc, ds, m = _plain_fa_tiles(acc, ds, m, q, offs_m, kb, vb, sk_n, 0, lo_diag, scale_log2, BLOCK_N, D, False)
    acc, ds, m = _plain_fa_tiles(acc, ds, m, q, offs_m, kb, vb, sk_n, lo_diag, lo_diag + BLOCK_M, scale_log2,
                                 BLOCK_N, D, True)
    tl.store(O + h * so_h + offs_m[:, None] * so_m + offs_d[None, :], (acc / ds[:, None]).to(O.dtype.element_ty))


def plain_fa(q, k, v, block_m=128, block_n=64, num_warps=8, num_stages=3):
    """Dense causal attention, B = 1, N divisible by block_m, pointer loads (benchmark only)."""
    _, Hq, S, D = q.shape
    o = torch.empty_like(q)
    _plain_fa_kernel[(S // block_m, Hq)](
        q, k, v, o, q.stride(1), q.stride(2), k.stride(1), k.stride(2), o.stride(1), o.stride(2),
        D ** -0.5 * 1.4426950408889634, G=Hq // k.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, D=D,
        num_warps=num_warps, num_stages=num_stages)
    return o


def load_old(path: str | None):
    """The previous ``topθ_core/kernels/prefill.py`` as a module (for the before/after), or None."""
    if not path or not Path(path).is_file():
        return None
    import topθ_core.kernels as pkg

    spec = importlib.util.spec_from_file_location("topθ_core.kernels._prefill_before", path,
                                                  submodule_search_locations=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = pkg.__name__
    src = Path(path).read_text().replace('custom_op("toptheta::prefill"', 'custom_op("toptheta::prefill_before"')
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


# ------------------------------------------------------------------------------------------------

def _inputs(B, Hq, Hkv, N, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(B, h, N, d, device="cuda", dtype=dtype, generator=g) for h in (Hq, Hkv, Hkv))


def _theta(q, k, keep_frac=0.1):
    """θ per (head, row), linear in row length: the scores' quantile at a few rows (random data)."""
    from bench_kernels import _length_theta

    return _length_theta(q, k, keep_frac)


def _variants(d: int, old_path: str | None):
    """(name, kind, params) of everything timed at head dim d."""
    out = []
    for la in CANDIDATES[d]:
        tag = f"{la.block_m}x{la.block_n} w{la.num_warps} s{la.num_stages}"
        for mode in (MODES if d == 128 else ("default", "plain")):
            out.append((f"ours {mode} {tag}", "ours", (mode, la)))
    if d == 128:
        for bm, bn, nw, ns in TUTORIAL_LAUNCHES:
            out.append((f"tutorial {bm}x{bn} w{nw} s{ns}", "tutorial", (bm, bn, nw, ns)))
        out.append(("plain_fa (before) 128x64 w8 s3", "plain_fa", (128, 64, 8, 3)))
    if old_path:
        out.append(("before: topθ_prefill default", "old", ("default",)))
        out.append(("before: topθ_prefill offline", "old", ("offline",)))
        out.append(("before: topθ_prefill plain", "old", ("plain",)))
    return out


def _call(kind, params, q, k, v, theta, sdc, old):
    if kind == "ours":
        mode, la = params
        return lambda: topθ_prefill(q, k, v, theta, config=MODES[mode], k_keep=64, sdc_term=sdc, counts=False,
                                    block_m=la.block_m, block_n=la.block_n, num_warps=la.num_warps,
                                    num_stages=la.num_stages)[0]
    if kind == "tutorial":
        return lambda: tutorial_fa(q, k, v, *params)
    if kind == "plain_fa":
        return lambda: plain_fa(q, k, v, *params)
    if kind == "old":
        return lambda: old.topθ_prefill(q, k, v, theta, config=MODES[params[0]], k_keep=64, sdc_term=sdc,
                                        counts=False)[0]
    raise ValueError(kind)


def _shape(d):
    return (32, 8, torch.bfloat16) if d == 128 else (9, 3, torch.float16)


def _warm(job):
    """Worker: compile one variant by running it once at a small shape with the same specialisation."""
    d, name, kind, params, old_path = job
    try:
        Hq, Hkv, dt = _shape(d)
        q, k, v = _inputs(1, Hq, Hkv, 256, d, dt)
        theta = torch.zeros(1, Hq, 256, device="cuda")
        sdc = torch.rand(1, Hq, 256, device="cuda")
        t0 = time.time()
        _call(kind, params, q, k, v, theta, sdc, load_old(old_path) if kind == "old" else None)()
        torch.cuda.synchronize()
        return name, f"{time.time() - t0:.1f}s"
    except Exception as e:  # reported; the timing loop skips what does not compile
        return name, f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"


def precompile(jobs, workers):
    import multiprocessing as mp

    t0 = time.time()
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            res = list(ex.map(_warm, jobs))
    except Exception as e:  # a worker died: the timing loop compiles what is left, one at a time
        log(f"parallel compile stopped ({type(e).__name__}: {e}); compiling in the timing loop")
        return set()
    bad = [(n, r) for n, r in res if not r.endswith("s") or ":" in r]
    log(f"compiled {len(jobs)} variants in {time.time() - t0:.0f} s with {workers} processes; "
        f"{len(bad)} failed: " + "; ".join(f"{n} → {r}" for n, r in bad))
    return {n for n, _ in bad}


def _tutorial_ws():
    q, k, v = _inputs(1, 32, 8, 256, 128, torch.bfloat16)
    try:
        tutorial_fa(q, k, v, 128, 128, 4, 2, ws=True)
        torch.cuda.synchronize()
        return "compiles and runs"
    except Exception as e:
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def tutorial_ws_compiles() -> str:
    """Does Triton warp-specialise the tutorial's causal form (two loops) on this card?  (In a
    separate process: a compiler assertion may end it.)"""
    import multiprocessing as mp

    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            return ex.submit(_tutorial_ws).result(timeout=120)
    except Exception as e:
        return f"fails: the compiling process ended ({type(e).__name__})"


def sdpa_fns(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fns = {}
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def run(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        try:
            run()
            torch.cuda.synchronize()
            fns[f"sdpa {be.name.replace('_ATTENTION', '').lower()}"] = run
        except Exception:
            pass
    return fns


def tune(d, N, B, old_path, failed, rounds, rows):
    Hq, Hkv, dt = _shape(d)
    old = load_old(old_path)
    q, k, v = _inputs(B, Hq, Hkv, N, d, dt, seed=N + d)
    theta = _theta(q, k)
    sdc = torch.rand(B, Hq, N, device="cuda")
    flops = 4 * B * Hq * d * N * (N + 1) / 2
    r0 = N - 256
    refs = {}
    fns = dict(sdpa_fns(q, k, v))
    for name, kind, params in _variants(d, old_path):
        if name in failed:
            continue
        mode = params[0] if kind in ("ours", "old") else "plain"
        fn = _call(kind, params, q, k, v, theta, sdc, old)
        try:
            out = fn()
            torch.cuda.synchronize()
        except Exception as e:
            log(f"  {name}: {type(e).__name__}: {str(e)[:150]}")
            continue
        if mode not in refs:
            cfg = MODES[mode]
            refs[mode] = topθ_prefill_ref(q[:, :, r0:], k, v, theta[:, :, r0:], config=cfg, k_keep=64,
                                          sdc_term=sdc[:, :, r0:])[0].float()
        err = (out[:, :, r0:].float() - refs[mode]).abs().max().item()
        if not err < 0.05:
            log(f"  {name}: WRONG (max err {err:.3g}); not timed")
            continue
        fns[name] = fn
        rows.append(dict(d=d, N=N, B=B, variant=name, max_err=err))
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):  # interleaved: machine noise hits every variant alike
        for n, fn in fns.items():
            times[n].append(bench(fn))
    med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    best_sdpa = min((t, n) for n, t in med.items() if n.startswith("sdpa"))
    log(f"d={d} B={B} N={N}: best SDPA {best_sdpa[1]} {best_sdpa[0]:.3f} ms ({flops / best_sdpa[0] / 1e9:.0f} TF/s)")
    for n, t in sorted(med.items(), key=lambda x: x[1]):
        log(f"  {n:48s} {t:8.3f} ms {flops / t / 1e9:5.0f} TF/s  x{best_sdpa[0] / t:.3f}")
    for r in rows:
        if r["d"] == d and r["N"] == N and r["B"] == B and r["variant"] in med:
            r.update(ms=med[r["variant"]], sdpa_ms=best_sdpa[0], sdpa_backend=best_sdpa[1],
                     speedup=best_sdpa[0] / med[r["variant"]], TFLOPs=flops / med[r["variant"]] / 1e9)
    for n, t in med.items():
        if n.startswith("sdpa"):
            rows.append(dict(d=d, N=N, B=B, variant=n, ms=t, sdpa_ms=best_sdpa[0], sdpa_backend=best_sdpa[1],
                             speedup=best_sdpa[0] / t, TFLOPs=flops / t / 1e9))
    del q, k, v
    torch.cuda.empty_cache()
    return med


def best_launches(rows):
    """Per head dim, the launch with the best default-config speed-up (geometric mean over shapes)."""
    import math

    score: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        if r["variant"].startswith("ours default") and "speedup" in r:
            score.setdefault((r["d"], r["variant"].removeprefix("ours default ")), []).append(math.log(r["speedup"]))
    best: dict[int, tuple[float, str]] = {}
    for (d, tag), xs in score.items():
        g = math.exp(sum(xs) / len(xs))
        if d not in best or g > best[d][0]:
            best[d] = (g, tag)
    return best


def _parse(tag: str) -> list[int]:
    tile, nw, ns = tag.split()[-3:]
    bm, bn = tile.split("x")
    return [int(bm), int(bn), int(nw[1:]), int(ns[1:])]


def choose(rows, best, n_max) -> dict:
    """The launch per head dim (calls without counts) and the tutorial form's best launch at the largest N."""
    tut = sorted((r["ms"], r["variant"]) for r in rows
                 if r["variant"].startswith("tutorial") and r["N"] == n_max and "ms" in r)
    return dict(launches={str(d): _parse(tag) for d, (_, tag) in best.items()},
                tutorial=_parse(tut[0][1]) if tut else None)


def apply(choice: dict, path: Path = ROOT / "topθ_core" / "kernels" / "prefill.py") -> str:
    """Write the chosen launches into prefill.py's ``_LAUNCHES`` (entries without counts); returns the table."""
    import re

    src = path.read_text()
    m = re.search(r"_LAUNCHES: dict\[tuple\[int, bool\], PrefillLaunch\] = \{\n(.*?)\n\}\n", src, re.S)
    entries = {}
    for line in m.group(1).splitlines():
        k = re.match(r"\s*\((\d+), (True|False)\): (PrefillLaunch\([^)]*\)),", line)
        entries[(int(k.group(1)), k.group(2) == "True")] = k.group(3)
    for d, (bm, bn, nw, ns) in choice["launches"].items():
        entries[(int(d), False)] = f"PrefillLaunch({bm}, {bn}, {nw}, {ns})"
    body = "\n".join(f"    ({d}, {c}): {la}," for (d, c), la in sorted(entries.items()))
    path.write_text(src[:m.start(1)] + body + src[m.end(1):])
    return body


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 4096])
    ap.add_argument("--old", default=None, help="the previous prefill.py, timed for the before/after")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    ap.add_argument("--apply", type=Path, default=None,
                    help="only write a prefill_best.json's launch table into topθ_core/kernels/prefill.py")
    args = ap.parse_args()
    if args.apply:
        return log(apply(json.loads(args.apply.read_text())))
    t0 = time.time()
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    log(f"tutorial form warp-specialised (causal, two loops): {tutorial_ws_compiles()}")
    jobs = [(d, n, kind, p, args.old) for d in (128, 64) for n, kind, p in _variants(d, args.old)]
    failed = precompile(jobs, args.workers)
    rows: list[dict] = []
    for N in args.n:
        tune(128, N, 1, args.old, failed, args.rounds, rows)
    tune(64, 4096, 1, args.old, failed, args.rounds, rows)
    best = best_launches(rows)
    for d, (g, tag) in sorted(best.items()):
        log(f"best default-config launch, d={d}: {tag} (geometric-mean speed-up vs SDPA x{g:.3f})")
    choice = choose(rows, best, max(args.n))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_best.json").write_text(json.dumps(choice, indent=1))
    tut = choice["tutorial"]
    (args.out / "prefill_best.env").write_text(f'TUTORIAL_LAUNCH="{",".join(map(str, tut)) if tut else ""}"\n')
    log(f"chosen: {choice}")
    path = args.out / f"prefill_tuning_{card()}.csv"
    keys = ["d", "B", "N", "variant", "ms", "TFLOPs", "sdpa_ms", "sdpa_backend", "speedup", "max_err"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    log(f"wrote {path} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
