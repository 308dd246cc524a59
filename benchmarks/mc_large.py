"""Multiple choice at full task size (issue 7): does Top-θ stay within 1 point of dense?

The fidelity ablations scored 100 items per task (paired intervals of about ±5 points). This
script scores every bundled ARC-Easy item (570, 25-shot) and HellaSwag item (1,000, 10-shot),
acc_norm, dense vs sparse on the same items with a paired bootstrap 95% interval, for the
default variant (Top-θ + exact SDC + VMC) and exact top-k with the same compensation, at k = 64
and k = 32 (layers 0-1 at 512).  Thresholds are calibrated as in ``fidelity.py``: 8 pieces of
2,048 tokens of the pydoc calibration half, pre-softmax, σ 0.1, top-k at calibration.

    python benchmarks/mc_large.py --device cuda --out DIR      # → DIR/mc_large.csv (one row per variant and task)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topθ_core import CalibrationConfig, KSchedule, SparseConfig, calibrate, load_model  # noqa: E402
from topθ_core.config import SDC, Selection  # noqa: E402
from topθ_core.evaluation import evaluate_multiple_choice  # noqa: E402
from topθ_core.tasks import heldout_documents  # noqa: E402

TASKS = (("arc_easy", 25), ("hellaswag", 10))


def calibration_docs(tok, n: int = 8, seq: int = 2048) -> list[torch.Tensor]:
    text = "\n\n".join(heldout_documents("pydoc", None, part="calibration"))
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return [ids[i * seq:(i + 1) * seq].clone() for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ks", default="64,32")
    ap.add_argument("--items", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lm = load_model("smollm2", device=args.device)
    docs = calibration_docs(lm.tokenizer)
    rows = []
    for k in map(int, args.ks.split(",")):
        ks = KSchedule(k, {0: 512, 1: 512})
        t0 = time.perf_counter()
        th = calibrate(lm, docs, CalibrationConfig(k=ks, sigma=0.1, tac=True, vmc=True),
                       data_description="pydoc calibration half, 8 × 2048 tokens")
        print(f"k={k}: calibrated in {time.perf_counter() - t0:.1f}s", flush=True)
        for name, cfg in (("Top-θ + exact SDC + VMC", SparseConfig(sdc=SDC.EXACT, vmc=True, k=ks)),
                          ("top-k + exact SDC + VMC", SparseConfig(selection=Selection.TOP_K, sdc=SDC.EXACT,
                                                                   vmc=True, k=ks))):
            for task, shots in TASKS:
                t0 = time.perf_counter()
                res = evaluate_multiple_choice(lm, task, args.items, cfg, th, num_fewshot=shots, max_rows=64,
                                               n_boot=2000)
                s = res.summary[res.summary["metric"] == "acc_norm"].iloc[0]
                row = dict(k=k, variant=name, task=task, shots=shots, items=int(s["n"]),
                           dense=s["dense"], sparse=s["sparse"], delta=s["delta"], ci_low=s["ci_low"],
                           ci_high=s["ci_high"], kept_attention=res.summary.iloc[0].get("kept_attention"),
                           kept_attention_sparse=res.summary.iloc[0].get("kept_attention_sparse"),
                           mean_prompt_tokens=res.info.get("mean_prompt_tokens"),
                           seconds=round(time.perf_counter() - t0, 1), device=args.device,
                           card=torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
                rows.append(row)
                pd.DataFrame(rows).to_csv(args.out / "mc_large.csv", index=False)
                print(f"k={k} {name:<26} {task:<9} n={row['items']} {row['dense']:.3f} → {row['sparse']:.3f} "
                      f"Δ {100 * row['delta']:+.1f} [{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}] "
                      f"kept {row['kept_attention']:.3f} / sparse layers {row['kept_attention_sparse']:.3f} "
                      f"({row['seconds']}s)", flush=True)


if __name__ == "__main__":
    main()
