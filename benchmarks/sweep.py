"""Accuracy benchmarks on the bundled SmolLM2: ARC-Easy timing, k/variant sweep, few-shot
headline check, distribution shift, per-layer k search.

Each stage writes ``benchmarks/results/<stage>.csv`` (+ ``.parquet``) and appends a section
to ``benchmarks/results/accuracy.md`` with the machine, the sizes run and the measured times.
Thresholds are calibrated on the calibration half of a bundled corpus and cached under
``data/cache/thresholds/`` (see ``topθ_core.sweeps.cached_thresholds``); stages skip Top-θ
points whose thresholds are not cached unless ``--calibrate`` is given.

    python benchmarks/sweep.py arc --limit 570            # ARC-Easy dense + Top-θ k=64, timed
    python benchmarks/sweep.py sweep --docs 2 --tokens 512
    python benchmarks/sweep.py variants --docs 2 --tokens 512
    python benchmarks/sweep.py headline --limit 40 --shots 25
    python benchmarks/sweep.py shift --calibrate
    python benchmarks/sweep.py ksearch --docs 2 --tokens 384 --budget 0.02
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topθ_core import evaluation as ev  # noqa: E402
from topθ_core import k_allocation as ka  # noqa: E402
from topθ_core import sweeps as sw  # noqa: E402
from topθ_core.tasks import heldout_documents  # noqa: E402
from topθ_core.config import SDC, CalibrationConfig, KSchedule, Placement, Selection, SparseConfig  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> str:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, float32"
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average at start {load:.1f}"
            + (" (CPU shared with other jobs)" if load > 1.5 else " (machine otherwise idle)"))


def markdown_table(df: pd.DataFrame) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write(stage: str, df: pd.DataFrame, notes: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    df.to_csv(OUT / f"{stage}.csv", index=False)
    df.to_parquet(OUT / f"{stage}.parquet", index=False)
    with open(OUT / "accuracy.md", "a") as f:
        f.write(f"\n## {stage} ({datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')})\n\n{notes}\n\n")
        f.write(markdown_table(df))
        f.write("\n")
    log(f"wrote {OUT / (stage + '.csv')}")


def paper_cal(k: int, placement: Placement = Placement.PRE) -> CalibrationConfig:
    return CalibrationConfig(k=KSchedule(k, sw.PAPER_DENSE_LAYERS), placement=placement, sigma=0.1, tac=True)


def thresholds_getter(lm, corpus: str, calibrate: bool):
    """Cached thresholds for a calibration config; with ``calibrate`` False an artifact made
    with the same corpus, k schedule, placement and σ by an older engine version is reused
    (the cache key covers every calibration field, which grows as the engine does)."""
    import json

    from topθ_core.thresholds import load_thresholds

    def get(cal: CalibrationConfig):
        if calibrate:
            return sw.cached_thresholds(lm, corpus, cal, log=log)
        for d in sorted(sw.CACHE_DIR.glob(f"{corpus}-k{cal.k.default}-{cal.placement.value}-*"), reverse=True):
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            c = meta.get("calibration", {})
            if (KSchedule.from_dict(meta["k"]) == cal.k and c.get("sigma") == cal.sigma and c.get("tac") == cal.tac
                    and meta.get("placement") == cal.placement.value):
                log(f"using cached thresholds {d.name}")
                return load_thresholds(d, expect_model=lm.fingerprint)
        return None

    return get


def topθ(k: int, **kw) -> SparseConfig:
    return SparseConfig(selection=Selection.TOP_THETA, k=KSchedule(k, sw.PAPER_DENSE_LAYERS), **kw)


def stage_arc(lm, args) -> None:
    k = args.k
    get = thresholds_getter(lm, "pydoc", True)
    th = get(paper_cal(k))
    cfg = topθ(k)
    log(f"ARC-Easy {args.limit} items, zero-shot, dense + {cfg.label()}")
    r = ev.run_task(lm, "arc_easy", args.limit, cfg, th, progress=None)
    r.save()
    df = r.summary.copy()
    df["dense_seconds"], df["sparse_seconds"] = r.info["dense_seconds"], r.info["sparse_seconds"]
    write("arc_easy_timing", df[["task", "metric", "dense", "sparse", "delta", "ci_low", "ci_high", "kept_attention",
                                 "kept_attention_sparse", "n", "seconds", "dense_seconds", "sparse_seconds",
                                 "config_label"]],
          f"Machine: {machine()}. ARC-Easy validation, {r.summary['n'].iloc[0]} items, zero-shot harness format, "
          f"{r.info['choices']} choices scored per pass (context computed once per item, items batched). "
          f"Total {r.seconds:.0f}s: dense {r.info['dense_seconds']:.0f}s, Top-θ {r.info['sparse_seconds']:.0f}s. "
          f"Mean prompt {r.info['mean_prompt_tokens']:.0f} tokens: rows with L ≤ k are dense by rule, so at "
          f"zero-shot most rows are dense.")


def stage_sweep(lm, args, variants: bool) -> None:
    texts = heldout_documents("pydoc", args.docs, min_chars=3000)
    get = thresholds_getter(lm, "pydoc", args.calibrate)
    if variants:
        pts = [p for p in sw.sweep_configs(ks=(), variant_ks=(args.k,), post=args.calibrate)]
        stage = f"variants_k{args.k}"
    else:
        pts = sw.sweep_configs(ks=tuple(args.ks), variants=False)
        stage = "sweep_k"
    log(f"{stage}: {len(pts)} points on {len(texts)} held-out pydoc docs × ≤{args.tokens} tokens")
    df = sw.run_sweep(lm, pts, texts, max_length=args.tokens, thresholds_for=get, log=log)
    write(stage, df, f"Machine: {machine()}. Perplexity on {len(texts)} held-out pydoc documents (first "
                     f"{args.tokens} tokens each, {int(df['tokens'].iloc[0]) if len(df) else 0} predicted tokens); "
                     f"thresholds calibrated on 6 calibration-half pydoc documents × ≤1024 tokens, σ=0.1, TAC; "
                     f"layers 0-1 at k=512. Top-θ points without cached thresholds were skipped.")


def stage_headline(lm, args) -> None:
    prev = OUT / "headline_fewshot.csv"
    rows = pd.read_csv(prev).to_dict("records") if prev.exists() and args.append else []
    for k in args.ks:
        for sel in args.selections:
            if sel == "top-theta":
                th = thresholds_getter(lm, "pydoc", args.calibrate)(paper_cal(k))
                if th is None:
                    log(f"skip Top-θ k={k}: no thresholds")
                    continue
                cfg = topθ(k)
            else:
                th, cfg = None, SparseConfig(selection=Selection.TOP_K, sdc=SDC.EXACT, vmc=True,
                                             k=KSchedule(k, sw.PAPER_DENSE_LAYERS))
            t0 = time.perf_counter()
            r = ev.run_task(lm, args.task, args.limit, cfg, th, num_fewshot=args.shots)
            r.save()
            s = r.summary.set_index("metric")
            rows.append({"task": args.task, "shots": args.shots, "prompt_tokens": r.info["mean_prompt_tokens"],
                         "config": cfg.label(), "n": int(s.loc["acc", "n"]),
                         "acc_dense": s.loc["acc", "dense"], "acc_sparse": s.loc["acc", "sparse"],
                         "acc_delta": s.loc["acc", "delta"], "acc_ci": f"[{s.loc['acc', 'ci_low']:.3f}, {s.loc['acc', 'ci_high']:.3f}]",
                         "acc_norm_dense": s.loc["acc_norm", "dense"], "acc_norm_sparse": s.loc["acc_norm", "sparse"],
                         "acc_norm_delta": s.loc["acc_norm", "delta"],
                         "acc_norm_ci": f"[{s.loc['acc_norm', 'ci_low']:.3f}, {s.loc['acc_norm', 'ci_high']:.3f}]",
                         "pred_changed": s.loc["pred_changed", "sparse"],
                         "kept_attention": s.loc["acc", "kept_attention"],
                         "attention_reduction": 1 / s.loc["acc", "kept_attention"],
                         "kept_attention_sparse": s.loc["acc", "kept_attention_sparse"],
                         "kept_v_rows_prefill": s.loc["acc", "kept_v_rows_prefill"],
                         "seconds": time.perf_counter() - t0})
            log(f"headline {cfg.label()}: {rows[-1]}")
            write("headline_fewshot", pd.DataFrame(rows),
                  f"Machine: {machine()}. {args.task}, {args.shots}-shot (a fixed block of solved validation items "
                  f"outside the evaluated ones, computed once per pass via a KV cache), first {args.limit} items. "
                  f"Kept attention counts the shared prefix once per item (as if each prompt ran alone).")


def stage_shift(lm, args) -> None:
    cal = paper_cal(args.k)
    corpora = args.corpora
    if not args.calibrate:
        corpora = [c for c in corpora if thresholds_getter(lm, c, False)(cal) is not None]
    df = sw.distribution_shift(lm, corpora, args.eval_corpora, topθ(args.k), cal, n_docs=args.docs,
                               max_length=args.tokens, log=log)
    write("distribution_shift", df, f"Machine: {machine()}. Top-θ k={args.k} thresholds calibrated on each corpus "
                                    f"(calibration half), perplexity on each corpus's held-out half, {args.docs} docs × "
                                    f"≤{args.tokens} tokens.")


def stage_ksearch(lm, args) -> None:
    val = heldout_documents("pydoc", args.docs, min_chars=3000)
    t0 = time.perf_counter()
    sens = ka.layer_sensitivity(lm, val, max_length=args.tokens)
    log(f"sensitivity pass {time.perf_counter() - t0:.0f}s")
    cache = ev.dense_cache_for(lm, on_disk=False)

    def loss(cfg):
        r = ev.evaluate_perplexity(lm, val, cfg, None, max_length=args.tokens, truncate=True, dense_cache=cache)
        loss.last = r
        return r.sparse_nll - r.dense_nll

    res = ka.search_layer_k(lm, loss, args.budget, sens=sens, fixed=sw.PAPER_DENSE_LAYERS, log=log)
    rows = [{"kind": "searched", "schedule": f"{res['schedule'].default} [{res['schedule'].to_text()}]",
             "proxy_kept_frac": res["kept_frac"], "delta_nll": res["loss"], "evaluations": len(res["evaluations"])}]
    # uniform k at the same pool of candidates, for comparison
    for k in args.uniform:
        cfg = SparseConfig(selection=Selection.TOP_K, sdc=SDC.NONE, vmc=False, k=KSchedule(k, sw.PAPER_DENSE_LAYERS))
        r = ev.evaluate_perplexity(lm, val, cfg, None, max_length=args.tokens, truncate=True, dense_cache=cache)
        rows.append({"kind": f"uniform k={k}", "schedule": cfg.k.to_text() and f"{k} [{cfg.k.to_text()}]",
                     "proxy_kept_frac": r.kept_attention, "delta_nll": r.sparse_nll - r.dense_nll, "evaluations": 1})
        log(f"uniform k={k}: kept {r.kept_attention:.3f} ΔNLL {r.sparse_nll - r.dense_nll:.4f}")
    ev_df = pd.DataFrame(res["evaluations"], columns=["path_index", "proxy_kept_frac", "delta_nll"])
    ev_df.to_csv(OUT / "ksearch_evaluations.csv", index=False)
    sens.to_csv(OUT / "ksearch_sensitivity.csv", index=False)
    write("ksearch", pd.DataFrame(rows),
          f"Machine: {machine()}. Budget ΔNLL ≤ {args.budget} nats/token on {len(val)} held-out pydoc docs × "
          f"≤{args.tokens} tokens (top-k selection stands in for Top-θ during the search; layers 0-1 fixed at 512). "
          f"Searched schedule from the greedy dropped-mass path, binary search with real evaluations; "
          f"'proxy_kept_frac' is the dense-pass estimate for the searched schedule and the measured kept "
          f"fraction for uniform rows. Total {time.perf_counter() - t0:.0f}s.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["arc", "sweep", "variants", "headline", "shift", "ksearch"])
    p.add_argument("--limit", type=int, default=570)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--ks", type=int, nargs="+", default=list(sw.SWEEP_KS))
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--shots", type=int, default=25)
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--calibrate", action="store_true", help="calibrate thresholds that are not cached yet")
    p.add_argument("--corpora", nargs="+", default=["pydoc", "code"])
    p.add_argument("--eval-corpora", nargs="+", default=["pydoc", "code"])
    p.add_argument("--selections", nargs="+", default=["top-theta", "top-k"], choices=["top-theta", "top-k"])
    p.add_argument("--append", action="store_true", help="headline: keep rows of earlier runs in the CSV")
    p.add_argument("--budget", type=float, default=0.02)
    p.add_argument("--uniform", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--device", default="cpu", help="cpu or cuda (accuracy stages; the ARC timing is a CPU number)")
    args = p.parse_args(argv)
    from topθ_core.models import load_model

    lm = load_model("smollm2", device=args.device)
    log(f"{args.stage}: {machine()}")
    {"arc": stage_arc, "sweep": lambda lm, a: stage_sweep(lm, a, False),
     "variants": lambda lm, a: stage_sweep(lm, a, True), "headline": stage_headline, "shift": stage_shift,
     "ksearch": stage_ksearch}[args.stage](lm, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
