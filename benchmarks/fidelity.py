"""Fidelity ablations: is Top-θ as accurate as exact top-k at the same kept fraction? (issue 7)

Set-up (fixed, deterministic): the bundled SmolLM2-135M-Instruct; the bundled ``pydoc`` corpus
split by :func:`topθ_core.tasks.heldout_documents` (even documents calibrate, odd ones are
held out), each half's topics joined in corpus order and cut into consecutive 2,048-token pieces;
8 calibration documents (16 for the "more data" row), 6 held-out documents.  Calibration:
pre-softmax, σ 0.1, top-k at calibration, offline SDC + VMC, layers 0-1 at k = 512, bin width
16, seed 0 (``torch.manual_seed(0)``; row sampling fraction 1, so no sampling randomness).

Measured per variant on the 6 held-out documents (one forward each; the dense side is computed
once and cached): perplexity change (pooled NLL), next-token KL(dense‖sparse) (mean over all
positions, via :func:`topθ_core.evaluation.kl_top1`), kept attention fraction in layers 2-29
(prefill, causal triangle), kept V rows, rows with nothing above θ, extrapolated rows, and the
spread of the kept count per thresholded row (L > k) relative to k in layers 2-29 (coefficient
of variation, p10/p50/p90).  Multiple choice (ARC-Easy, HellaSwag; ``--mc-items`` items, few-shot
prefixes so prompts reach ~1-1.5k tokens) through :func:`topθ_core.evaluation.evaluate_multiple_choice`.

Every Top-θ variant runs the PyTorch reference attention (observers force it), so kernel and
reference paths never mix within a comparison.

Plan ``rowmax`` (the two last ideas of issue 7): the default inference family (``SparseConfig()``:
Top-θ + exact SDC + VMC, interpolated lookup) at k = 32 and 64 with three kinds of θ, each over σ:
θ absolute (today's), θ relative to the row max (``theta_reference=row-max``, its own calibration
of t − m), and per-head k (``allocate_head_k``: k proportional to each head's mean count of
elements reaching 90% of the row's softmax mass on the calibration documents, clamped to
[k/4, 4k], layer mean unchanged; calibrated with that schedule), against exact top-k + exact SDC +
VMC over k (and top-k with the same per-head schedule).

Plan ``robust`` (robust θ aggregation): one calibration per k that also keeps a sample reservoir
(capacity 128, which holds every sample of a 16-length bin over 8 documents), finalized three ways
(mean-std, median + σ·1.4826·MAD, 10%-trimmed mean + σ·std), each run with the default inference
variant (``SparseConfig()``: Top-θ + exact SDC + VMC, interpolated lookup) at σ 0.1 and 0.5.  The
row samples are the same for all three, so only the aggregation differs.

    python benchmarks/fidelity.py run --device cuda --out DIR      # measurements → DIR/*.csv
    python benchmarks/fidelity.py run --plan robust --ks 64 --device cpu --sections table --out DIR
    python benchmarks/fidelity.py run --plan rowmax --device cuda --sections table,curves --out DIR
    python benchmarks/fidelity.py rowmax-report --raw DIR    # the section table of fidelity.md
    python benchmarks/fidelity.py report --raw DIR                 # → benchmarks/results/fidelity.{md,csv,html}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topθ_core.config import (SDC, Aggregation, CalibrationConfig, EmptyRowFloor, KSchedule, Lookup,  # noqa: E402
                              Selection, SparseConfig, ThetaReference)

RESULTS = ROOT / "benchmarks" / "results"
SEQ = 2048
SPARSE_LAYERS = list(range(2, 30))
N_CAL, N_CAL_MORE, N_EVAL = 8, 16, 6


# --------------------------------------------------------------------------- data
def documents(tok, part: str, n: int, seq: int = SEQ) -> list[torch.Tensor]:
    """The first ``n`` consecutive ``seq``-token pieces of one half of the pydoc corpus.

    The half's topics (in corpus order) are joined by blank lines, tokenized once and cut
    into consecutive pieces, so every document is exactly ``seq`` tokens of running text."""
    from topθ_core.tasks import heldout_documents

    text = "\n\n".join(heldout_documents("pydoc", None, part=part))
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < n * seq:
        raise ValueError(f"the pydoc {part} half has {ids.numel()} tokens, fewer than {n} × {seq}")
    return [ids[i * seq:(i + 1) * seq].clone() for i in range(n)]


MC_POOL = 500  # items handed to evaluate_multiple_choice: the first --mc-items are scored, the rest are the few-shot pool


def build_inputs(tok, seq: int = SEQ) -> dict:
    """Everything the run reads from the bundled data (so a machine without Parquet support can run it)."""
    from topθ_core.tasks import load_mc_task

    return {"seq": seq, "cal": documents(tok, "calibration", N_CAL_MORE, seq),
            "eval": documents(tok, "heldout", N_EVAL, seq),
            "arc_easy": load_mc_task("arc_easy", MC_POOL), "hellaswag": load_mc_task("hellaswag", MC_POOL)}


# --------------------------------------------------------------------------- per-row spread
class RowSpread:
    """Observer: kept count per thresholded row (L > k) relative to k, in the given layers."""

    def __init__(self, layers):
        self.layers = set(layers)
        self.hist = torch.zeros(4097, dtype=torch.float64)  # ratio·64, clamped at 64×
        self.n = self.s = self.ss = 0.0

    def __call__(self, layer, block) -> None:
        if layer not in self.layers:
            return
        mask = block.thresholded()  # (B, H, R): L > that head's k
        if not bool(mask.any()):
            return
        k = block.k_per_head().view(1, -1, 1).expand(mask.shape)
        r = (block.kept.sum(-1)[mask].to(torch.float64) / k[mask]).cpu()
        self.n += r.numel()
        self.s += float(r.sum())
        self.ss += float((r * r).sum())
        self.hist += torch.bincount((r * 64).round().clamp(max=4096).long(), minlength=4097).double()

    def summary(self) -> dict:
        if self.n == 0:
            return {"row_cv": float("nan"), "row_p10": float("nan"), "row_p50": float("nan"),
                    "row_p90": float("nan"), "row_mean": float("nan")}
        mean = self.s / self.n
        std = math.sqrt(max(0.0, self.ss / self.n - mean * mean))
        cdf = self.hist.cumsum(0) / self.hist.sum()
        q = lambda p: float(torch.searchsorted(cdf, torch.tensor([p], dtype=torch.float64))[0]) / 64  # noqa: E731
        return {"row_mean": mean, "row_cv": std / mean if mean else float("nan"),
                "row_p10": q(0.10), "row_p50": q(0.50), "row_p90": q(0.90)}


# --------------------------------------------------------------------------- measurement
@dataclass
class Dense:
    logits: list[torch.Tensor]
    nll: float
    tokens: int


class Bench:
    def __init__(self, lm, cal_docs, eval_docs, log=print):
        self.lm, self.cal_docs, self.eval_docs, self.log = lm, cal_docs, eval_docs, log
        from topθ_core.models import base_model, lm_head

        self.base, self.project = base_model(lm.model), lm_head(lm.model)
        self.device = next(lm.model.parameters()).device
        self.dense = self._dense()

    def _forward(self, ids):
        return self.project(self.base(input_ids=ids.view(1, -1).to(self.device), use_cache=False).last_hidden_state[0])

    @torch.inference_mode()
    def _dense(self) -> Dense:
        logits, nll, n = [], 0.0, 0
        for ids in self.eval_docs:
            lg = self._forward(ids).float()
            nll += float(F.cross_entropy(lg[:-1], ids[1:].to(lg.device), reduction="sum"))
            n += ids.numel() - 1
            logits.append(lg)
        return Dense(logits, nll / n, n)

    @torch.inference_mode()
    def evaluate(self, cfg: SparseConfig, th) -> dict:
        from topθ_core.evaluation import kl_top1
        from topθ_core.integration import sparse_run
        from topθ_core.metrics import SparsityMetrics

        t0 = time.perf_counter()
        kl_all, agree_all, nll, frames = [], [], 0.0, []
        spread = RowSpread(SPARSE_LAYERS)
        for ids, ld in zip(self.eval_docs, self.dense.logits):
            m = SparsityMetrics()
            with sparse_run(cfg, th, model=self.lm.model, metrics=m, observers=(spread,)):
                ls = self._forward(ids).float()
            nll += float(F.cross_entropy(ls[:-1], ids[1:].to(ls.device), reduction="sum"))
            kl, ag = kl_top1(ld, ls)
            kl_all.append(kl[:-1].cpu())  # positions that predict a scored token
            agree_all.append(ag[:-1].cpu())
            frames.append(m.to_frame())
        import pandas as pd

        df = pd.concat(frames).groupby(["layer", "phase", "head", "kv_head"], as_index=False).sum(numeric_only=True)
        d = df[df["phase"] == "prefill"]
        ds = d[d["layer"].isin(SPARSE_LAYERS)]
        kl = torch.cat(kl_all).numpy()
        sparse_nll = nll / self.dense.tokens
        return {
            "ppl_change": math.exp(sparse_nll - self.dense.nll) - 1.0,
            "kl_mean": float(kl.mean()), "kl_p95": float(np.quantile(kl, 0.95)),
            "top1": float(torch.cat(agree_all).float().mean()),
            "kept_sparse_layers": float(ds["kept"].sum() / ds["visible"].sum()),
            "kept_all_layers": float(d["kept"].sum() / d["visible"].sum()),
            "size_factor": float(ds["kept"].sum() / ds["topk_equiv"].sum()),
            "kept_v_rows": float(ds["kept_v_rows"].sum() / ds["kv_rows"].sum()),
            "empty_rows": int(d["empty_rows"].sum()), "extrapolated_rows": int(d["extrapolated_rows"].sum()),
            **spread.summary(), "dense_ppl": math.exp(self.dense.nll), "sparse_ppl": math.exp(sparse_nll),
            "eval_seconds": time.perf_counter() - t0,
        }


def cal_config(k: int, **kw) -> CalibrationConfig:
    return CalibrationConfig(k=KSchedule(k, {0: 512, 1: 512}), sigma=0.1, tac=True, bin_width=16, seed=0, **kw)


def theta_cfg(k: int, **kw) -> SparseConfig:
    base = dict(selection=Selection.TOP_THETA, sdc=SDC.OFFLINE, vmc=True, k=KSchedule(k, {0: 512, 1: 512}),
                lookup=Lookup.NEAREST, empty_row=EmptyRowFloor.MAX)
    base.update(kw)
    return SparseConfig(**base)


def topk_cfg(k: int, **kw) -> SparseConfig:
    base = dict(selection=Selection.TOP_K, sdc=SDC.NONE, vmc=False, k=KSchedule(k, {0: 512, 1: 512}))
    base.update(kw)
    return SparseConfig(**base)


# --------------------------------------------------------------------------- the run
def run(args) -> None:
    import pandas as pd

    from topθ_core.calibration import calibrate_sdc_under_theta, collect_stats
    from topθ_core.evaluation import evaluate_multiple_choice
    from topθ_core.fingerprint import model_fingerprint
    from topθ_core.models import load_model
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "fidelity_log.txt", "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    lm = load_model(args.model, device=args.device)
    if args.debug_layers:  # smoke tests only: keep the first n decoder layers
        from topθ_core.models import wrap_model

        lm.model.model.layers = lm.model.model.layers[: args.debug_layers]
        lm.model.config.num_hidden_layers = args.debug_layers
        lm = wrap_model(lm.model, lm.tokenizer, lm.name)
    fp = model_fingerprint(lm.model)
    inputs = torch.load(args.inputs, weights_only=False) if args.inputs else build_inputs(lm.tokenizer, args.seq)
    seq = int(inputs["seq"])
    cal_docs, eval_docs = inputs["cal"], inputs["eval"]
    if args.quick:
        cal_docs, eval_docs = [d[:160] for d in cal_docs[:4]], [d[:160] for d in eval_docs[:2]]
        seq = 160
        for task in ("arc_easy", "hellaswag"):
            inputs[task] = inputs[task][:20]
    if args.n_cal:
        cal_docs = cal_docs[: 2 * args.n_cal]
    if args.n_eval:
        eval_docs = eval_docs[: args.n_eval]
    n_cal = len(cal_docs) // 2
    log(f"model {fp.describe()} on {args.device}; {len(cal_docs)} cal docs, {len(eval_docs)} eval docs of {seq} tokens")
    bench = Bench(lm, cal_docs, eval_docs, log)
    log(f"dense ppl {math.exp(bench.dense.nll):.3f}")

    # ---- calibrations (statistics reused across σ, lookup, smoothing)
    stats, th, spreads = {}, {}, {}

    def calib(name, k, docs, **kw):
        t0 = time.perf_counter()
        cc = cal_config(k, **kw)
        s = collect_stats(lm.model, docs, cc)
        th[name] = s.finalize(cc.sigma, fingerprint=fp, k=cc.k, placement=cc.placement, calibration=cc,
                              data=f"pydoc calibration half, {len(docs)} docs × {docs[0].numel()} tokens")
        stats[name] = (s, cc)
        log(f"calibrated {name} in {time.perf_counter() - t0:.1f}s")

    def more(name, src, docs):
        s, cc = stats[src]
        t0 = time.perf_counter()
        s = collect_stats(lm.model, docs, cc, stats=s)  # continues (merges into) the same statistics
        th[name] = s.finalize(cc.sigma, fingerprint=fp, k=cc.k, placement=cc.placement, calibration=cc,
                              data=f"pydoc calibration half, {2 * len(docs)} docs")
        log(f"calibrated {name} in {time.perf_counter() - t0:.1f}s")

    ks = tuple(int(x) for x in args.ks.split(","))
    for k in ks:  # the robust plan keeps the samples too (the sums, hence mean-std, are the same)
        calib(f"k{k}", k, cal_docs[:n_cal], **({"aggregation": Aggregation.MEDIAN} if args.plan == "robust" else {}))
    if args.plan == "rowmax":
        from dataclasses import replace

        from topθ_core.k_allocation import allocate_head_k

        for k in ks:
            calib(f"k{k}-rowmax", k, cal_docs[:n_cal], theta_reference=ThetaReference.ROW_MAX)
            t0 = time.perf_counter()
            sched, spread = allocate_head_k(lm.model, cal_docs[:n_cal], cal_config(k).k, mass=HEAD_K_MASS,
                                            k_min=max(1, k // 4), k_max=4 * k)
            spreads[k] = (sched, spread)
            log(f"per-head k for k={k} in {time.perf_counter() - t0:.1f}s: "
                + "; ".join(f"L{l}: " + ",".join(str(x) for x in sched.heads_for(l, fp.n_heads) or [])
                            for l in (2, 10, 20, 29)))
            t0 = time.perf_counter()
            cc = replace(cal_config(k), k=sched)
            s = collect_stats(lm.model, cal_docs[:n_cal], cc)
            th[f"k{k}-headk"] = s.finalize(cc.sigma, fingerprint=fp, k=cc.k, placement=cc.placement, calibration=cc,
                                           data=f"pydoc calibration half, {n_cal} docs, per-head k")
            log(f"calibrated k{k}-headk in {time.perf_counter() - t0:.1f}s")
    if args.plan == "full" and 64 in ks:
        calib("k64-len1024", 64, [d[: seq // 2] for d in cal_docs[:n_cal]])
        import copy

        stats["k64-more"] = (copy.deepcopy(stats["k64"][0]), stats["k64"][1])
        more("k64-16docs", "k64-more", cal_docs[n_cal:])

    sdc_cache = {}

    def sdc_theta(name, cfg, sigma=0.1):
        key = (name, cfg.to_dict().__repr__(), sigma)
        if key not in sdc_cache:
            t0 = time.perf_counter()
            sdc_cache[key] = calibrate_sdc_under_theta(lm.model, cal_docs[:n_cal], th[name].with_sigma(sigma), cfg)
            log(f"SDC pass under θ for {cfg.label()} σ={sigma} in {time.perf_counter() - t0:.1f}s")
        return sdc_cache[key]

    rows = []
    raw_csv = out / "fidelity_raw.csv"

    t_start = time.perf_counter()
    sections = set(args.sections.split(","))

    class OutOfTime(Exception):
        pass

    def record(group, variant, cfg, thr, k, sigma=None, cal="8 docs × 2048", mc=False, curve=False):
        if time.perf_counter() - t_start > args.budget_s:
            raise OutOfTime
        mc = mc and "mc" in sections
        if "table" not in sections and not mc and not (curve and "curves" in sections):
            return None
        if callable(thr):
            thr = thr()
        r = bench.evaluate(cfg, thr)
        row = {"group": group, "variant": variant, "k": k, "selection": cfg.selection.value,
               "sigma": sigma, "calibration": cal, "config": cfg.label(),
               "kernel_compatible": cfg.kernel_compatible, "curve": curve, **r}
        if mc and args.mc_items:
            for task, shots in (("arc_easy", args.arc_shots), ("hellaswag", args.hs_shots)):
                t0 = time.perf_counter()
                items = inputs[task]
                res = evaluate_multiple_choice(lm, items, args.mc_items, cfg, thr, num_fewshot=shots, max_rows=64,
                                               n_boot=500)
                row[f"{task}_dense"] = res.value("acc_norm", "dense")
                row[f"{task}_sparse"] = res.value("acc_norm", "sparse")
                row[f"{task}_delta"] = res.value("acc_norm", "delta")
                row[f"{task}_kept"] = res.summary.iloc[0]["kept_attention_sparse"]
                row[f"{task}_prompt_tokens"] = res.info.get("mean_prompt_tokens")
                log(f"  {task}: {row[f'{task}_dense']:.3f} → {row[f'{task}_sparse']:.3f} "
                    f"({time.perf_counter() - t0:.1f}s)")
        rows.append(row)
        pd.DataFrame(rows).to_csv(raw_csv, index=False)
        log(f"{group:>12} | {variant:<40} ppl {r['ppl_change']:+.2%} KL {r['kl_mean']:.4f} "
            f"kept 1/{1 / r['kept_sparse_layers']:.1f} empty {r['empty_rows']} cv {r['row_cv']:.2f} "
            f"({r['eval_seconds']:.1f}s)")
        return row

    try:
        if args.plan == "cpu":
            measure_small(record, th, ks, sdc_theta, stats, calib, more, cal_docs, n_cal, seq, log)
        elif args.plan == "exact":
            measure_exact(record, th, ks, theta_cfg, topk_cfg)
        elif args.plan == "robust":
            measure_robust(record, stats, ks, fp, f"{n_cal} docs × {seq}")
        elif args.plan == "rowmax":
            measure_rowmax(record, th, ks, spreads, f"{n_cal} docs × {seq}")
        else:
            measure(record, th, ks, sdc_theta, theta_cfg, topk_cfg, args, sections)
    except OutOfTime:
        log("time budget reached: stopping")
    log("done")


def measure_small(record, th, ks, sdc_theta, stats, calib, more, cal_docs, n_cal, seq, log) -> None:
    """The priority-ordered subset that fits a loaded 2-core CPU (one k per process)."""
    import copy

    cal = f"{n_cal} docs × {seq}"
    for k in ks:
        base, t = theta_cfg(k), th[f"k{k}"]
        record("baseline", f"top-k k={k}", topk_cfg(k), None, k, cal=cal, curve=True)
        record("baseline", f"Top-θ k={k} (issue: nearest, σ 0.1)", base, t, k, 0.1, cal=cal, curve=True)
        record("floor", "empty-row floor none", base.with_(empty_row=EmptyRowFloor.NONE), t, k, 0.1, cal=cal)
        record("lookup", "interpolate", base.with_(lookup=Lookup.INTERPOLATE), t, k, 0.1, cal=cal)
        record("lookup", "interpolate + smoothing ±2 bins", base.with_(lookup=Lookup.INTERPOLATE, theta_smoothing=2),
               t, k, 0.1, cal=cal)
        record("lookup", "fit θ = a + b·ln L", base.with_(lookup=Lookup.FIT_LOG), t, k, 0.1, cal=cal)
        record("sdc", "SDC calibrated under θ", base, lambda: sdc_theta(f"k{k}", base), k, 0.1, cal=cal)
        record("keep", "first token + diagonal", base.with_(sink_tokens=1, recent_tokens=1), t, k, 0.1, cal=cal)
        combo = base.with_(lookup=Lookup.INTERPOLATE, theta_smoothing=2, sink_tokens=1, recent_tokens=1)
        record("combo", "combo: interp+smooth2, sink1+diag, SDC under θ", combo,
               lambda: sdc_theta(f"k{k}", combo), k, 0.1, cal=cal, curve=True)
        for sig in (0.0, -0.25, 0.25):
            record("sigma", f"σ = {sig:g}", base, t.with_sigma(sig), k, sig, cal=cal, curve=True)
        record("sdc", "SDC scale 0.5", base.with_(sdc_scale=0.5), t, k, 0.1, cal=cal)
        record("keep", "sink: first token", base.with_(sink_tokens=1), t, k, 0.1, cal=cal)
        for kk in (k * 3 // 4, k * 3 // 2):
            record("curve", f"top-k k={kk}", topk_cfg(kk), None, kk, cal=cal, curve=True)
        for sig in (0.0, 0.25):
            record("curve", "combo: interp+smooth2, sink1+diag, SDC under θ", combo,
                   lambda s=sig: sdc_theta(f"k{k}", combo, s), k, sig, cal=cal, curve=True)
        calib(f"k{k}-half", k, [d[: seq // 2] for d in cal_docs[:n_cal]])
        for lk in (Lookup.NEAREST, Lookup.FIT_LOG):
            record("coverage", f"calibrated ≤{seq // 2}, evaluated {seq}: {lk.value}", theta_cfg(k, lookup=lk),
                   th[f"k{k}-half"], k, 0.1, cal=f"{n_cal} docs × {seq // 2}")
        stats[f"k{k}-more"] = (copy.deepcopy(stats[f"k{k}"][0]), stats[f"k{k}"][1])
        more(f"k{k}-2x", f"k{k}-more", cal_docs[n_cal:])
        record("data", f"{2 * n_cal} calibration docs", base, th[f"k{k}-2x"], k, 0.1, cal=f"{2 * n_cal} docs × {seq}")


def measure(record, th, ks, sdc_theta, theta_cfg, topk_cfg, args, sections) -> None:
    """The ablation list, most decisive first (a time budget may cut the tail): the issue's table,
    the candidate fix, the trade-off curves, then one change at a time, then combinations."""
    sigmas_curve = (-0.5, -0.25, 0.0, 0.1, 0.25, 0.5, 1.0)
    # ---- 1. reproduction of the table
    for k in ks:
        record("baseline", f"top-k k={k}", topk_cfg(k), None, k, mc=True, curve=True)
        record("baseline", f"Top-θ k={k} (issue: nearest, σ 0.1)", theta_cfg(k), th[f"k{k}"], k, 0.1, mc=True,
               curve=True)
    # ---- 2. the candidate fix (the 512-token ablation's one clear win): SDC calibrated under θ
    for k in ks:
        base = theta_cfg(k)
        record("sdc", "SDC calibrated under θ", base, lambda b=base, kk=k: sdc_theta(f"k{kk}", b), k, 0.1, mc=True,
               curve=True)
    # ---- 3. trade-off curves: top-k over k; Top-θ (issue) and Top-θ + SDC under θ over σ
    for k in (16, 24, 48, 96, 128):
        record("curve", f"top-k k={k}", topk_cfg(k), None, k, curve=True)
    for k in ks:
        base = theta_cfg(k)
        for sig in sigmas_curve:
            if sig == 0.1:
                continue
            record("sigma", f"σ = {sig:g}", base, th[f"k{k}"].with_sigma(sig), k, sig, curve=True)
            record("curve", "SDC calibrated under θ", base,
                   lambda b=base, kk=k, sg=sig: sdc_theta(f"k{kk}", b, sg), k, sig, curve=True)
    # ---- 4. one change at a time from the baseline
    for k in ks:
        base = theta_cfg(k)
        t = th[f"k{k}"]
        record("baseline", f"top-k k={k} + exact SDC + VMC", topk_cfg(k, sdc=SDC.EXACT, vmc=True), None, k)
        record("floor", "empty-row floor none", base.with_(empty_row=EmptyRowFloor.NONE), t, k, 0.1)
        record("lookup", "interpolate", base.with_(lookup=Lookup.INTERPOLATE), t, k, 0.1)
        record("lookup", "interpolate + smoothing ±2 bins", base.with_(lookup=Lookup.INTERPOLATE, theta_smoothing=2), t, k, 0.1)
        record("lookup", "fit θ = a + b·ln L", base.with_(lookup=Lookup.FIT_LOG), t, k, 0.1)
        for sc in (0.5, 2.0):
            record("sdc", f"SDC scale {sc:g}", base.with_(sdc_scale=sc), t, k, 0.1)
        record("keep", "sink: first token", base.with_(sink_tokens=1), t, k, 0.1)
        record("keep", "diagonal (recent 1)", base.with_(recent_tokens=1), t, k, 0.1)
        record("keep", "first token + diagonal", base.with_(sink_tokens=1, recent_tokens=1), t, k, 0.1)
        record("keep", "first 4 + recent 8", base.with_(sink_tokens=4, recent_tokens=8), t, k, 0.1)
    if "k64" in th:
        record("data", "16 calibration docs", theta_cfg(64), th["k64-16docs"], 64, 0.1, cal="16 docs × 2048")
        record("data", "16 docs + fit θ(L)", theta_cfg(64, lookup=Lookup.FIT_LOG), th["k64-16docs"], 64, 0.1,
               cal="16 docs × 2048")
        for lk in (Lookup.NEAREST, Lookup.INTERPOLATE, Lookup.FIT_LOG):
            record("coverage", f"calibrated ≤1024, evaluated 2048: {lk.value}", theta_cfg(64, lookup=lk),
                   th["k64-len1024"], 64, 0.1, cal="8 docs × 1024")

    # ---- 5. combinations (decided up front; the table shows each part's effect above)
    combos = {
        "combo A: interp+smooth2, sink1+diag": dict(lookup=Lookup.INTERPOLATE, theta_smoothing=2, sink_tokens=1,
                                                    recent_tokens=1),
        "combo B: A + SDC under θ": dict(lookup=Lookup.INTERPOLATE, theta_smoothing=2, sink_tokens=1,
                                         recent_tokens=1, _sdc=True),
        "combo D: interp+smooth2 + SDC under θ (kernel-compatible)": dict(lookup=Lookup.INTERPOLATE,
                                                                          theta_smoothing=2, _sdc=True),
    }
    for k in ks:
        for name, kw in combos.items():
            kw = dict(kw)
            use_sdc = kw.pop("_sdc", False)
            cfg = theta_cfg(k, **kw)
            t = (lambda c=cfg, kk=k: sdc_theta(f"k{kk}", c, 0.1)) if use_sdc else th[f"k{k}"]
            record("combo", name, cfg, t, k, 0.1, mc=True, curve=True)


def measure_exact(record, th, ks, theta_cfg, topk_cfg) -> None:
    """Exact SDC (the dropped mass summed per row, as top-k's own compensation) with VMC, for
    Top-θ over σ and for top-k over k: the full plan showed the offline SDC term, not the
    selection, dominating Top-θ's loss (σ barely moves perplexity; SDC scale 0.5 halves it)."""
    for k in ks:
        record("baseline", f"top-k k={k}", topk_cfg(k), None, k, mc=True, curve=True)
        record("exact", "Top-θ + exact SDC + VMC", theta_cfg(k, sdc=SDC.EXACT), th[f"k{k}"], k, 0.1, mc=True,
               curve=True)
    for k in ks:
        for sig in (-0.25, 0.0, 0.25, 0.5, 1.0):
            record("exact-curve", "Top-θ + exact SDC + VMC", theta_cfg(k, sdc=SDC.EXACT), th[f"k{k}"].with_sigma(sig),
                   k, sig, mc=sig == 0.5, curve=True)
    for k in (16, 24, 32, 48, 64, 96, 128):
        record("exact-curve", f"top-k k={k} + exact SDC + VMC", topk_cfg(k, sdc=SDC.EXACT, vmc=True), None, k,
               curve=True, mc=k in ks)


def measure_robust(record, stats, ks, fp, cal) -> None:
    """The default variant (Top-θ + exact SDC + VMC) with θ from each aggregation of the same samples."""
    from dataclasses import replace

    for k in ks:
        s, cc = stats[f"k{k}"]
        cfg = SparseConfig(k=KSchedule(k, {0: 512, 1: 512}))  # the defaults: exact SDC, VMC, interpolate
        for agg in Aggregation:
            th = s.finalize(cc.sigma, fingerprint=fp, k=cc.k, placement=cc.placement,
                            calibration=replace(cc, aggregation=agg), data=f"pydoc calibration half, {cal}")
            for sig in (0.1, 0.5):
                record("robust", f"Top-θ + exact SDC + VMC, θ {agg.value}", cfg, th.with_sigma(sig), k, sig, cal=cal,
                       curve=True)


HEAD_K_MASS = 0.9  # per-head k ∝ mean count of elements reaching this share of the row's softmax mass
ROWMAX_SIGMAS = (-0.25, 0.1, 0.5, 1.0)


def measure_rowmax(record, th, ks, spreads, cal) -> None:
    """Top-θ with θ absolute / relative to the row max / per-head k, each over σ, vs exact top-k over k."""
    for kk in (16, 24, 32, 48, 64, 96, 128):
        record("rowmax", f"top-k k={kk} + exact SDC + VMC", topk_cfg(kk, sdc=SDC.EXACT, vmc=True), None, kk, cal=cal,
               curve=True)
    for k in ks:
        base = SparseConfig(k=KSchedule(k, {0: 512, 1: 512}))  # the defaults: exact SDC, VMC, interpolate
        sched = spreads[k][0]
        record("rowmax", f"top-k k={k} per-head k + exact SDC + VMC", SparseConfig(selection=Selection.TOP_K, sdc=SDC.EXACT, vmc=True, k=sched),
               None, k, cal=cal, curve=True)
        for sig in ROWMAX_SIGMAS:
            record("rowmax", "Top-θ + exact SDC + VMC, θ absolute", base, th[f"k{k}"].with_sigma(sig), k, sig, cal=cal,
                   curve=True)
            record("rowmax", "Top-θ + exact SDC + VMC, θ relative to row max",
                   base.with_(theta_reference=ThetaReference.ROW_MAX), th[f"k{k}-rowmax"].with_sigma(sig), k, sig,
                   cal=cal, curve=True)
            record("rowmax", "Top-θ + exact SDC + VMC, per-head k", base.with_(k=sched), th[f"k{k}-headk"].with_sigma(sig),
                   k, sig, cal=cal, curve=True)


def _interp_loglog(x, xs, ys):
    """Linear interpolation of log y against log x over the points (xs, ys) sorted by x; NaN outside."""
    lx, pts = math.log(x), sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if math.log(x0) <= lx <= math.log(x1):
            f = (lx - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 != x0 else 0.0
            return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
    return float("nan")


def rowmax_report(args) -> None:
    """The rowmax plan's table: each Top-θ point against exact top-k's curve (same KL → kept ratio)."""
    import pandas as pd

    raw = pd.concat([pd.read_csv(Path(d) / "fidelity_raw.csv") for d in args.raw.split(",")], ignore_index=True)
    raw = raw[raw["group"] == "rowmax"]
    tk = raw[raw["variant"].str.match(r"top-k k=\d+ \+ exact")].sort_values("kl_mean")
    lines = ["| k | variant | σ | Δ perplexity | KL | kept, layers 2-29 | × top-k (same k) | kept ÷ exact top-k's at the "
             "same KL | KL ÷ exact top-k's at the same kept | kept/row CV | p10 | p90 | empty rows |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in raw.iterrows():
        if r["variant"].startswith("top-k k=") and "per-head" not in r["variant"]:
            continue
        kept_same_kl = _interp_loglog(r["kl_mean"], tk["kl_mean"], tk["kept_sparse_layers"])
        kl_same_kept = _interp_loglog(r["kept_sparse_layers"], tk["kept_sparse_layers"], tk["kl_mean"])
        sig = "" if pd.isna(r["sigma"]) else f"{r['sigma']:g}"
        lines.append(f"| {r['k']} | {r['variant'].replace('Top-θ + exact SDC + VMC, ', '')} | {sig} | "
                     f"{r['ppl_change']:+.2%} | {r['kl_mean']:.4f} | 1/{1 / r['kept_sparse_layers']:.1f} | "
                     f"{r['size_factor']:.2f} | {r['kept_sparse_layers'] / kept_same_kl:.2f} | "
                     f"{r['kl_mean'] / kl_same_kept:.2f} | {r['row_cv']:.2f} | {r['row_p10']:.2f} | "
                     f"{r['row_p90']:.2f} | {int(r['empty_rows']):,} |")
    lines += ["", "exact top-k + exact SDC + VMC (the reference curve):", "",
              "| k | Δ perplexity | KL | kept, layers 2-29 |", "|---|---|---|---|"]
    for _, r in tk.sort_values("k").iterrows():
        lines.append(f"| {r['k']} | {r['ppl_change']:+.2%} | {r['kl_mean']:.4f} | 1/{1 / r['kept_sparse_layers']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text.replace("nan", "–"))


# --------------------------------------------------------------------------- report
TABLE_COLS = [("ppl_change", "Δ perplexity", "{:+.1%}"), ("kl_mean", "KL(dense‖sparse)", "{:.4f}"),
              ("arc_easy_delta", "Δ ARC-Easy", "{:+.1%}"), ("hellaswag_delta", "Δ HellaSwag", "{:+.1%}"),
              ("kept_sparse_layers", "kept, layers 2-29", None), ("size_factor", "× top-k", "{:.2f}"),
              ("kept_v_rows", "kept V rows", "{:.3f}"), ("row_cv", "kept/row CV", "{:.2f}"),
              ("row_p10", "p10", "{:.2f}"), ("row_p90", "p90", "{:.2f}"), ("empty_rows", "empty rows", "{:,}")]


def _fmt(v, f):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if f is None:
        return f"1/{1 / v:.1f}"
    return f.format(v)


def report(args) -> None:
    import pandas as pd

    raw = pd.concat([pd.read_csv(Path(d) / "fidelity_raw.csv") for d in args.raw.split(",")], ignore_index=True)
    raw = raw.drop_duplicates(subset=["group", "variant", "k", "sigma", "calibration"], keep="last")
    RESULTS.mkdir(parents=True, exist_ok=True)
    curve_only = raw["group"].str.endswith("curve") & ~((raw["group"] == "exact-curve") & (raw["sigma"] == 0.5))
    table = raw[~curve_only & ((raw["group"] != "combo") | (raw["sigma"].fillna(0.1) == 0.1))]
    table = table.drop(columns=["curve"])
    table.to_csv(RESULTS / "fidelity.csv", index=False)
    raw.to_csv(RESULTS / "fidelity_curves.csv", index=False)
    lines = ["| k | group | variant | σ | " + " | ".join(c[1] for c in TABLE_COLS) + " |",
             "|---|---|---|---|" + "---|" * len(TABLE_COLS)]
    for _, r in table.sort_values(["k"], kind="stable").iterrows():
        cells = [_fmt(r.get(c), f) for c, _, f in TABLE_COLS]
        sig = "" if pd.isna(r.get("sigma")) else f"{r['sigma']:g}"
        lines.append(f"| {r['k']} | {r['group']} | {r['variant']} | {sig} | " + " | ".join(cells) + " |")
    (RESULTS / "fidelity_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(raw)


def curve_name(row) -> str:
    """Which trade-off curve a measured point belongs to (σ varies along Top-θ curves, k along top-k)."""
    v = row["variant"]
    if "per-head" in v and row["selection"] == "top-k":
        return "top-k, per-head k + exact SDC + VMC"
    if row["group"] == "rowmax" and row["selection"] == "top-theta":
        return v.replace("Top-θ + exact SDC + VMC, ", "Top-θ, exact SDC, ")
    if row["selection"] == "top-k":
        return "top-k + exact SDC + VMC" if "exact SDC" in v else "top-k (plain)"
    if row["group"] == "sigma" or v.startswith("Top-θ k="):
        return "Top-θ, offline SDC (paper)"
    if v == "SDC calibrated under θ":
        return "Top-θ, offline SDC calibrated under θ"
    if v == "Top-θ + exact SDC + VMC":
        return "Top-θ, exact SDC"
    return v


def _plot(raw) -> None:
    import plotly.graph_objects as go

    pts = raw[raw["curve"]].copy()
    pts["curve_name"] = pts.apply(curve_name, axis=1)
    fig = go.Figure()
    styles = {"top-k (plain)": dict(color="black", width=3), "top-k + exact SDC + VMC": dict(color="gray", width=3, dash="dash")}
    for name in ("top-k (plain)", "top-k + exact SDC + VMC"):
        g = pts[pts["curve_name"] == name].sort_values("kept_sparse_layers")
        fig.add_trace(go.Scatter(x=g["kept_sparse_layers"], y=g["kl_mean"], mode="lines+markers", name=name,
                                 text=[f"k={k}" for k in g["k"]], line=styles[name]))
    th = pts[pts["selection"] == "top-theta"]
    for (name, k), g in th.groupby(["curve_name", "k"]):
        g = g.sort_values("kept_sparse_layers")
        fig.add_trace(go.Scatter(x=g["kept_sparse_layers"], y=g["kl_mean"], mode="lines+markers",
                                 name=f"{name} (k={k})", text=[f"σ={s:g}" for s in g["sigma"]]))
    fig.update_layout(title="SmolLM2-135M, pydoc 2,048-token documents: kept fraction (layers 2-29) vs KL(dense‖sparse)",
                      xaxis_title="kept attention fraction, layers 2-29", yaxis_title="mean next-token KL (nats)",
                      xaxis_type="log", yaxis_type="log", template="plotly_white")
    fig.write_html(RESULTS / "fidelity_tradeoff.html", include_plotlyjs="cdn")
    try:
        fig.write_image(RESULTS / "fidelity_tradeoff.png")
    except Exception as e:  # kaleido missing: HTML + CSV only
        print(f"PNG not written ({type(e).__name__}); HTML and CSV written")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--out", default="/tmp/fidelity")
    r.add_argument("--seq", type=int, default=SEQ)
    r.add_argument("--mc-items", type=int, default=200)
    r.add_argument("--arc-shots", type=int, default=25)
    r.add_argument("--hs-shots", type=int, default=10)
    r.add_argument("--plan", choices=("full", "cpu", "exact", "robust", "rowmax"), default="full")
    r.add_argument("--ks", default="32,64")
    r.add_argument("--n-cal", type=int, default=0, help="calibration documents (0: 8; the 'more data' row doubles it)")
    r.add_argument("--n-eval", type=int, default=0, help="held-out documents (0: 6)")
    r.add_argument("--sections", default="table,mc,curves", help="comma list of table, mc, curves")
    r.add_argument("--budget-s", type=float, default=1e9, help="start no new measurement after this many seconds")
    r.add_argument("--debug-layers", type=int, default=0, help="smoke tests only: truncate the model")
    r.add_argument("--quick", action="store_true", help="smoke test: 2+2 calibration docs, 2 eval docs")
    r.add_argument("--inputs", default=None, help="a file written by `prepare` (else read the bundled data)")
    q = sub.add_parser("prepare")
    q.add_argument("--out", default="/tmp/fidelity_inputs.pt")
    p = sub.add_parser("report")
    p.add_argument("--raw", default="/tmp/fidelity", help="comma list of run output folders")
    rr = sub.add_parser("rowmax-report")
    rr.add_argument("--raw", default="/tmp/fidelity", help="comma list of run output folders")
    args = ap.parse_args()
    if args.cmd == "prepare":
        from transformers import AutoTokenizer

        from topθ_core.models import bundled_checkpoint

        torch.save(build_inputs(AutoTokenizer.from_pretrained(bundled_checkpoint())), args.out, pickle_protocol=4)
        print(f"wrote {args.out}")
    else:
        {"run": run, "report": report, "rowmax-report": rowmax_report}[args.cmd](args)


if __name__ == "__main__":
    main()
