"""``toptheta``: calibrate, evaluate and generate from the command line.

    toptheta calibrate --model smollm2 --data FILE --k 64 --layer-k 0:512,1:512 --out DIR
    toptheta calibrate --model smollm2 --data FILE --aggregation median --out DIR
    toptheta evaluate  --model smollm2 --thresholds DIR --data FILE
    toptheta evaluate  --model smollm2 --thresholds DIR --task arc_easy --limit 100
    toptheta generate  --model smollm2 --thresholds DIR --prompt TEXT --max-new-tokens 32

Errors (bad data file, missing model, thresholds for another model, invalid config)
print one line ``toptheta: error: …`` and exit with status 2; nothing half-written stays.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .calibration_job import CalibrationJob, add_calibration_arguments, job_from_args, torch_dtype
from .config import (SDC, ConfigError, EmptyRowFloor, KSchedule, Lookup, Placement, PrefillMode, Selection,
                     SparseConfig, ThetaReference, fit_sdc)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a local checkpoint directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-special-tokens", action="store_true", help="tokenize without BOS/special tokens")


def _add_sparse(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=None, help="kept elements per row (default: the thresholds' k)")
    p.add_argument("--layer-k", default=None, help="per-layer overrides, e.g. 0:512,1:512")
    p.add_argument("--head-k", default=None, help="per-(layer, head) overrides, e.g. 2.0:48,2.1:80 "
                                                  "(default: the thresholds' own)")
    p.add_argument("--placement", choices=[e.value for e in Placement], default=None)
    p.add_argument("--selection", choices=[e.value for e in Selection], default="top-theta")
    p.add_argument("--sdc", choices=[e.value for e in SDC], default="exact")
    p.add_argument("--sdc-scale", type=float, default=1.0)
    p.add_argument("--vmc", dest="vmc", action="store_true", default=True)
    p.add_argument("--no-vmc", dest="vmc", action="store_false")
    p.add_argument("--capk", action="store_true")
    p.add_argument("--empty-row", choices=[e.value for e in EmptyRowFloor], default="max")
    p.add_argument("--lookup", choices=[e.value for e in Lookup], default="interpolate")
    p.add_argument("--theta-smoothing", type=int, default=0, help="moving average of θ over ±N length bins")
    p.add_argument("--sink-tokens", type=int, default=0, help="always keep the first N positions (reference path)")
    p.add_argument("--recent-tokens", type=int, default=0, help="always keep the last N positions (reference path)")
    p.add_argument("--prefill", choices=[e.value for e in PrefillMode], default=PrefillMode.TOP_THETA.value,
                   help="dense: decode-only mode, the prompt runs the model's dense attention (dense time to first "
                        "token and prompt accuracy), only decode steps are sparse")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="toptheta", description="Top-θ attention: calibrate, evaluate, generate")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("calibrate", help="calibrate thresholds and write an artifact directory",
                       allow_abbrev=False)  # `--work 2` must not pass for --workers and then run one process
    add_calibration_arguments(c)

    e = sub.add_parser("evaluate", help="dense vs sparse on a data file or a bundled task")
    _add_model(e)
    e.add_argument("--thresholds", default=None, help="artifact directory (needed for top-theta)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="data file for perplexity")
    src.add_argument("--task", help="bundled task: perplexity, arc_easy, arc_challenge, hellaswag, piqa, boolq, "
                                    "lambada, agreement")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--max-length", type=int, default=None)
    _add_sparse(e)

    g = sub.add_parser("generate", help="dense and Top-θ continuations side by side")
    _add_model(g)
    g.add_argument("--thresholds", default=None)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="decode both streams as captured CUDA-graph steps on a static cache (default: on with "
                        "--device cuda; tokens/s of both sides come from the same run)")
    _add_sparse(g)
    return ap


def _read_data(spec: str, limit: int | None = None) -> tuple[list[str], str]:
    from .datafiles import read_texts

    if spec.startswith("bundled:"):
        from .tasks import load_corpus

        texts = load_corpus(spec.split(":", 1)[1])
    else:
        texts = read_texts(spec)
    if limit is not None:
        if limit < 1:
            raise ValueError("--limit must be at least 1")
        texts = texts[:limit]
    return texts, spec


def _sparse_config(args, thresholds) -> SparseConfig:
    if args.k is not None:
        k = KSchedule.parse(args.k, args.layer_k, args.head_k)
    elif thresholds is not None:
        k = thresholds.k
        if args.layer_k is not None or args.head_k is not None:
            k = KSchedule.parse(k.default, args.layer_k if args.layer_k is not None else dict(k.overrides),
                                args.head_k if args.head_k is not None else dict(k.head_overrides))
    else:
        k = KSchedule.parse(64, args.layer_k if args.layer_k is not None else "0:512,1:512", args.head_k)
    placement = args.placement or (thresholds.placement.value if thresholds is not None else "pre")
    selection = Selection(args.selection)
    sdc = fit_sdc(args.sdc, selection, placement)
    # the kind of θ is the artifact's (calibration writes it, inference only reads it)
    reference = thresholds.theta_reference if thresholds is not None and selection is Selection.TOP_THETA \
        else ThetaReference.ABSOLUTE
    return SparseConfig(selection=selection, placement=placement, sdc=sdc, sdc_scale=args.sdc_scale,
                        vmc=args.vmc, capk=args.capk, empty_row=args.empty_row, k=k, lookup=args.lookup,
                        theta_smoothing=args.theta_smoothing, sink_tokens=args.sink_tokens,
                        recent_tokens=args.recent_tokens, theta_reference=reference, prefill=args.prefill)


def _load(args):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=torch_dtype(args.dtype, args.device))


def _load_thresholds(args, lm):
    if not args.thresholds:
        return None
    from .thresholds import load_thresholds

    return load_thresholds(args.thresholds, expect_model=lm.fingerprint)


def cmd_calibrate(job: CalibrationJob) -> int:
    """One process: read the data, load the model, calibrate, write the artifact."""
    from dataclasses import replace
    from pathlib import Path

    from .calibration import calibrate, prepare_documents
    from .models import load_model

    texts, desc = _read_data(job.data, job.limit)
    if Path(job.out).exists() and not job.overwrite:
        raise FileExistsError(f"{job.out} already exists (pass --overwrite to replace it)")
    lm = load_model(job.model, device=job.device, dtype=torch_dtype(job.dtype, job.device))
    cfg = job.config
    if job.allocate_head_k is not None:
        from .k_allocation import allocate_head_k

        docs = prepare_documents(texts, lm.tokenizer, job.max_length, job.add_special_tokens)
        cfg = replace(cfg, k=allocate_head_k(lm, docs, cfg.k, mass=job.allocate_head_k)[0])
    th = calibrate(lm, texts, cfg, max_length=job.max_length, add_special_tokens=job.add_special_tokens,
                   data_description=desc)
    th.meta.update(job.extra_meta)
    th.save(job.out, overwrite=job.overwrite)
    df = th.to_frame()
    print(f"calibrated {th.meta.get('documents')} documents, {th.meta.get('tokens')} tokens in "
          f"{th.meta.get('seconds')} s ({th.meta.get('tokens', 0) / max(th.meta.get('seconds') or 1e-9, 1e-9):.0f} tok/s): "
          f"{len(df)} (layer, head, length-bin) thresholds, k={cfg.k.default}"
          f"{' [' + cfg.k.to_text() + ']' if cfg.k.overrides else ''}"
          f"{f' + {len(cfg.k.head_overrides)} per-head k' if cfg.k.head_overrides else ''}, σ={cfg.sigma}, "
          f"{cfg.aggregation.value}{', TAC' if cfg.tac else ''}"
          f"{', θ relative to the row max' if cfg.theta_reference.value == 'row-max' else ''} → {job.out}")
    return 0


def cmd_evaluate(args) -> int:
    lm = _load(args)
    th = _load_thresholds(args, lm)
    cfg = _sparse_config(args, th)
    from . import evaluation

    if args.data:
        texts, _ = _read_data(args.data, args.limit)
        res = evaluation.evaluate_perplexity(lm, texts, cfg, th, max_length=args.max_length,
                                             add_special_tokens=not args.no_special_tokens)
        print(json.dumps(_jsonable(res.to_dict())))
    else:
        res = evaluation.run_task(lm, args.task, args.limit, cfg, th)
        path = res.save()  # results Parquet under data/results/, read by the app and sweeps
        print(json.dumps(_jsonable({"results": str(path), "summary": res.summary.to_dict(orient="records")})))
    return 0


def cmd_generate(args) -> int:
    from .generation import compare_generate

    lm = _load(args)
    th = _load_thresholds(args, lm)
    cfg = _sparse_config(args, th)
    steps = list(compare_generate(lm, args.prompt, cfg, th, max_new_tokens=args.max_new_tokens, chat=args.chat,
                                  cuda_graphs=args.cuda_graphs))
    d = "".join(x.dense_text for x in steps)
    s = "".join(x.sparse_text for x in steps)
    div = next((i for i, x in enumerate(steps) if x.dense_token != x.sparse_token), None)
    print(f"prompt : {args.prompt}")
    print(f"config : {cfg.label()}")
    if div is None:
        print(f"dense  : {d}\nsparse : {s}\nidentical over {len(steps)} tokens")
    else:
        dd = "".join(x.dense_text for x in steps[:div]) + "⟦" + "".join(x.dense_text for x in steps[div:]) + "⟧"
        ss = "".join(x.sparse_text for x in steps[:div]) + "⟦" + "".join(x.sparse_text for x in steps[div:]) + "⟧"
        print(f"dense  : {dd}\nsparse : {ss}\nfirst divergence at generated token {div} (⟦ marks it)")
    kl = sum(x.kl for x in steps) / len(steps)
    print(f"mean next-token KL(dense‖sparse) {kl:.4f} nats; dense {steps[-1].dense_tok_s:.1f} tok/s, "
          f"sparse {steps[-1].sparse_tok_s:.1f} tok/s")
    return 0


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return obj


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from .datafiles import DataFileError
    from .models import ModelLoadError
    from .thresholds import ThresholdsError

    try:
        if args.command == "calibrate":
            job = job_from_args(args)
            if job.parallel:  # local ranks (--workers) or one rank of a torchrun job (--distributed)
                from .distributed import exit_after, run_job

                return exit_after(run_job(job, [a for a in argv[1:] if a != "--distributed"]))
            return cmd_calibrate(job)
        return {"evaluate": cmd_evaluate, "generate": cmd_generate}[args.command](args)
    except (DataFileError, ModelLoadError, ThresholdsError, ConfigError, FileExistsError, ValueError) as e:
        print(f"toptheta: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
