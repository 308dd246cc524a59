"""Decode-only mode on the bundled SmolLM2: how closely it follows dense, and full Top-θ (issue 14).

    python benchmarks/decode_only_fidelity.py [--prompts 4] [--tokens 512] [--new 64]

Thresholds: the default calibration (k = 64, layers 0-1 at 512, σ 0.1, TAC) on the calibration half of
the bundled pydoc corpus (``sweeps.cached_thresholds``).  Prompts: held-out pydoc documents cut to
``--tokens`` tokens, so decode rows (L > 64) are thresholded.  Each prompt is continued greedily for
``--new`` tokens three ways on the same loaded model: dense, full Top-θ (default config) and decode-only
(the same config with ``prefill=dense``).  Per way against dense: the mean next-token KL(dense ‖ sparse)
on the sparse stream's own prefix, the greedy match rate and the first divergence
(``generation.generate_pair``); decode-only against full Top-θ: match rate and first divergence of the
two sparse streams.  Also each way's prompt time on this CPU (median of 3).  Writes
``benchmarks/results/decode_only.md`` and ``decode_only.csv``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topθ_core.config import CalibrationConfig, PrefillMode, SparseConfig  # noqa: E402
from topθ_core.generation import first_divergence, generate_pair  # noqa: E402
from topθ_core.integration import sparse_run  # noqa: E402
from topθ_core.models import load_model  # noqa: E402
from topθ_core.sweeps import cached_thresholds  # noqa: E402
from topθ_core.tasks import heldout_documents  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm = load_model("smollm2")
    th = cached_thresholds(lm, "pydoc", CalibrationConfig())
    full = SparseConfig(k=th.k)
    ways = {"full Top-θ": full, "decode-only": full.with_(prefill=PrefillMode.DENSE)}
    texts = heldout_documents("pydoc", args.prompts, min_chars=4000)
    rows = []
    for i, text in enumerate(texts):
        ids = lm.tokenizer(text, return_tensors="pt").input_ids[0][: args.tokens]
        prompt = lm.tokenizer.decode(ids, skip_special_tokens=True)
        got = {w: generate_pair(lm, prompt, c, th, max_new_tokens=args.new) for w, c in ways.items()}
        for w, g in got.items():
            fd = g["first_divergence"]
            rows.append({"prompt": i, "way": w, "vs": "dense", "tokens": len(g["dense_ids"]),
                         "mean_kl": g["mean_kl"], "match_rate": g["match_rate"],
                         "first_divergence": len(g["dense_ids"]) if fd is None else fd,
                         "kept_v_rows_decode": g["kept_v_rows_decode"]})
        a, b = got["decode-only"]["sparse_ids"], got["full Top-θ"]["sparse_ids"]
        fd = first_divergence(a, b)
        rows.append({"prompt": i, "way": "decode-only", "vs": "full Top-θ", "tokens": min(len(a), len(b)),
                     "mean_kl": float("nan"), "match_rate": sum(x == y for x, y in zip(a, b)) / max(1, min(len(a), len(b))),
                     "first_divergence": min(len(a), len(b)) if fd is None else fd, "kept_v_rows_decode": float("nan")})
        print(f"prompt {i}: " + "; ".join(f"{r['way']} vs {r['vs']}: match {r['match_rate']:.2f}, first div "
                                          f"{r['first_divergence']}, KL {r['mean_kl']:.4f}" for r in rows[-3:]),
              flush=True)
    # time to first token on this CPU: the prompt's forward in each way, median of 3
    ids = lm.tokenizer(texts[0], return_tensors="pt").input_ids[:, : args.tokens]
    ttft = {}
    for w, c in {"dense": None, **ways}.items():
        ts = []
        for _ in range(3):
            with torch.inference_mode():
                s = time.perf_counter()
                if c is None:
                    lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
                else:
                    with sparse_run(c, th, model=lm.model):
                        lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
                ts.append(time.perf_counter() - s)
        ttft[w] = statistics.median(ts)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "decode_only.csv", index=False)
    agg = df.groupby(["way", "vs"], sort=False).agg(prompts=("prompt", "nunique"), tokens=("tokens", "sum"),
                                                    mean_kl=("mean_kl", "mean"), match_rate=("match_rate", "mean"),
                                                    first_divergence=("first_divergence", "mean"),
                                                    kept_v_rows_decode=("kept_v_rows_decode", "mean")).reset_index()
    lines = [
        "# Decode-only mode on the bundled SmolLM2 (issue 14)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `python benchmarks/decode_only_fidelity.py` on this machine's CPU "
        f"({os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}, float32), {time.perf_counter() - t0:.0f} s "
        "in all. Thresholds: default calibration (k = 64, layers 0-1 at 512, σ 0.1, TAC) on the pydoc calibration half. "
        f"{len(texts)} held-out pydoc prompts of {args.tokens} tokens, {args.new} greedy tokens each. Config: the default "
        "(Top-θ, exact SDC, VMC, floor); decode-only is the same with `prefill=dense`.",
        "",
        "Perplexity of a prompt is unchanged by construction in decode-only mode (its logits are dense's: "
        "`tests/test_decode_only.py`, and bit for bit on an H200 in `kernels.md`, run 14).",
        "",
        "| way | compared with | prompts | tokens | mean next-token KL (nats) | greedy match | mean first divergence | kept V rows (decode) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in agg.itertuples():
        kl = "–" if pd.isna(r.mean_kl) else f"{r.mean_kl:.4f}"
        kv = "–" if pd.isna(r.kept_v_rows_decode) else f"{r.kept_v_rows_decode:.1%}"
        lines.append(f"| {r.way} | {r.vs} | {r.prompts} | {r.tokens} | {kl} | {r.match_rate:.1%} | "
                     f"{r.first_divergence:.1f} | {kv} |")
    lines += ["", f"Time to first token on this CPU ({args.tokens}-token prompt, the prompt's forward, median of 3): "
              + ", ".join(f"{w} {s * 1000:.0f} ms" for w, s in ttft.items())
              + " (the full Top-θ prompt runs the PyTorch reference here; on a GPU see `kernels.md`).", ""]
    (args.out / "decode_only.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
