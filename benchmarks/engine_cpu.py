"""Issue 2's engine measurements on SmolLM2 on this CPU.

16 calibration texts and 16 held-out texts of 300-600 tokens (bundled pydoc corpus, fixed
seed).  Baseline: plain dense forward passes of the base model on the same calibration
tokens, timed in the same run.  For k = 16, 32, 64 (pre-softmax, σ 0.1, TAC, offline SDC,
VMC, layers 0-1 at 512): calibration time and throughput, perplexity evaluation time, kept
attention fraction and perplexity change on the held-out texts.

    python benchmarks/engine_cpu.py [--ks 16,32,64] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import pandas as pd
import torch

from topθ_core import CalibrationConfig, KSchedule, SparseConfig, calibrate, load_model
from topθ_core.evaluation import evaluate_perplexity
from topθ_core.tasks import load_corpus


def pick_texts(tok, n: int, skip: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed + skip)
    out, seen = [], 0
    for text in load_corpus("pydoc"):
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) < 300:
            continue
        seen += 1
        if seen <= skip:
            continue
        out.append(tok.decode(ids[: rng.randint(300, 600)]))
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="16,32,64")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    lm = load_model("smollm2")
    tok = lm.tokenizer
    calib, heldout = pick_texts(tok, 16, 0), pick_texts(tok, 16, 16)
    docs = [tok(t, return_tensors="pt").input_ids[0] for t in calib]
    n_tok = sum(int(d.numel()) for d in docs)
    base = lm.model.model
    with torch.inference_mode():
        base(input_ids=docs[0].view(1, -1))  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for d in docs:
            base(input_ids=d.view(1, -1))
        dense_s, dense_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = []
    for k in map(int, args.ks.split(",")):
        ks = KSchedule.parse(k, "0:512,1:512")
        t0, c0 = time.perf_counter(), time.process_time()
        th = calibrate(lm, docs, CalibrationConfig(k=ks, sigma=0.1, tac=True, vmc=True), data_description="pydoc 16")
        calib_s, calib_cpu = time.perf_counter() - t0, time.process_time() - c0
        cfg = SparseConfig(k=ks, placement="pre", sdc="offline", vmc=True)
        res = evaluate_perplexity(lm, heldout, cfg, th)
        r = res.to_dict()
        rows.append({
            "k": k, "calib_tokens": n_tok, "calib_s": calib_s, "calib_tok_s": n_tok / calib_s,
            "dense_forward_s": dense_s, "calib_over_dense": calib_s / dense_s,
            "dense_forward_cpu_s": dense_cpu, "calib_cpu_s": calib_cpu, "calib_over_dense_cpu": calib_cpu / dense_cpu,
            "eval_texts": len(heldout), "eval_tokens": r["tokens"], "eval_s": r["seconds"],
            "eval_dense_s": r["dense_seconds"], "eval_sparse_s": r["sparse_seconds"],
            "dense_ppl": r["dense_ppl"], "sparse_ppl": r["sparse_ppl"],
            "ppl_change_pct": 100 * (r["sparse_ppl"] / r["dense_ppl"] - 1),
            "kept_attention": r["kept_attention"], "kept_attention_sparse": r["kept_attention_sparse"],
            "kept_v_rows": r["kept_v_rows"], "empty_rows": r["empty_rows"],
        })
        print(json.dumps(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "engine_cpu.csv", index=False)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    lines = [
        "# Engine on CPU: calibration and evaluation on SmolLM2-135M-Instruct",
        "",
        f"Machine: {machine} (the project's 2-core CPU box; timings are noisy, ratios are measured in the same run).",
        f"Calibration: 16 pydoc texts, {n_tok} tokens (300-600 each). Held-out: 16 other pydoc texts. "
        "Pre-softmax, σ 0.1, TAC, offline SDC + VMC, layers 0-1 at k=512. Produced by `benchmarks/engine_cpu.py`.",
        "",
        f"Plain dense forward of the base model over the 16 calibration texts: {dense_s:.1f} s wall, "
        f"{dense_cpu:.1f} s CPU ({n_tok / dense_s:.0f} tok/s wall). The box was shared with other jobs while this ran, "
        "so the CPU-time ratio (process CPU seconds, all threads) is the robust overhead figure.",
        "",
        "| k | calibration s (wall) | tok/s | × dense forward (wall / CPU time) | eval s (16 texts, dense+sparse) | dense ppl | Top-θ ppl | Δppl | kept attention (all / layers k<L) | kept V rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['k']} | {r['calib_s']:.1f} | {r['calib_tok_s']:.0f} | {r['calib_over_dense']:.2f} / "
                     f"{r['calib_over_dense_cpu']:.2f} | "
                     f"{r['eval_s']:.1f} | {r['dense_ppl']:.3f} | {r['sparse_ppl']:.3f} | {r['ppl_change_pct']:+.1f}% | "
                     f"{r['kept_attention']:.3f} / {r['kept_attention_sparse']:.3f} | {r['kept_v_rows']:.3f} |")
    (out / "engine_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
