"""Data-parallel calibration throughput: 1 GPU vs 2 GPUs (NCCL), plus a device_map check.

One command on a machine with 2 GPUs (no internet needed):

    python benchmarks/bench_distributed.py

It builds a randomly initialised Llama-3-8B-shaped model with fewer layers (bf16, saved
once to a temporary checkpoint), then launches with ``torchrun`` (NCCL_NVLS_ENABLE=0):

1. ``1gpu``        one rank, one GPU (the baseline: no process group, no communication);
2. ``2gpu-dp``     two ranks, one GPU each, NCCL: documents sharded, one all_reduce;
3. ``2gpu-devmap`` one rank whose model is spread over both GPUs (``device_map="auto"``).

Correctness first: every run's artifact must match the 1-GPU artifact (counts exactly,
θ / SDC within tolerance); then throughput (calibration tokens/s, timed from the first
forward to the merged statistics, after a warm-up), speed-up and scaling efficiency.
Writes ``benchmarks/results/distributed.md`` and ``distributed.json`` (rows for the app).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# Llama-3-8B: hidden 4096, 32 query / 8 KV heads, head dim 128, MLP 14336, vocab 128256
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="decoder layers (Llama-3-8B has 32)")
    p.add_argument("--docs", type=int, default=64, help="calibration documents (random token ids)")
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--layer-k", default="0:512,1:512")
    p.add_argument("--workdir", default=None, help="checkpoint and artifacts (default: a temporary directory)")
    p.add_argument("--out", default=None, help="results markdown (default benchmarks/results/distributed.md; "
                   "with --smoke: inside the work directory)")
    p.add_argument("--no-devmap", action="store_true", help="skip the device_map='auto' run")
    p.add_argument("--smoke", action="store_true",
                   help="CPU/gloo dry run of the whole pipeline on a tiny model (checks the script, not speed)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # tag of a torchrun worker
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device-map", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


SMOKE_SHAPE = dict(SHAPE, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=1000)


def _shape(args) -> dict:
    return SMOKE_SHAPE if args.smoke else SHAPE


def _sync(args) -> None:
    if not args.smoke:
        torch.cuda.synchronize()


def _config(args):
    from topθ_core.config import CalibrationConfig, KSchedule

    return CalibrationConfig(k=KSchedule.parse(args.k, args.layer_k), tac=True, sample_frac=1.0, bin_width=16)


def _documents(args) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.docs,), generator=g).tolist()
    return [torch.randint(0, _shape(args)["vocab_size"], (n,), generator=g) for n in lengths]


# ---- step 0: the random checkpoint -------------------------------------------------------

def build_checkpoint(args, path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=args.layers, **_shape(args))
    with torch.device("cpu" if args.smoke else "cuda:0"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if args.smoke else torch.bfloat16)
    model.save_pretrained(path)
    # token ids are passed directly; the tokenizer only satisfies the checkpoint loader
    tok = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    (path / "bench_info.json").write_text(json.dumps({"params": n}))


# ---- one torchrun job --------------------------------------------------------------------

def worker(args, work: Path) -> None:
    import torch.distributed as dist

    from topθ_core.calibration import collect_stats
    from topθ_core.distributed import calibrate_distributed, load_rank_model, rank_info

    tag = args.worker
    info = rank_info()
    ckpt = work / "checkpoint"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        device = torch.device("cpu")
        lm = load_rank_model(ckpt, device=device, dtype=dtype)
    elif args.device_map:
        gpus = list(range(torch.cuda.device_count()))
        lm = load_rank_model(ckpt, device_map="auto", gpus=gpus, dtype=dtype)
        device = torch.device("cuda", gpus[0])
    else:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        lm = load_rank_model(ckpt, device=device, dtype=dtype)
    if not args.smoke:
        torch.cuda.set_device(device)
    if info.world_size > 1:
        if args.smoke:
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("nccl", device_id=device)
        dist.all_reduce(torch.zeros(1, device=device))  # NCCL communicator set-up outside the timing
    config = _config(args)
    docs = _documents(args)

    # warm-up: one short document through the calibration path (kernels, cuBLAS handles, allocator)
    collect_stats(lm.model, [docs[0][:1024]], config)
    dense_tps = None
    if info.world_size == 1 and not args.device_map:  # context: plain dense forwards of the same tokens
        base = getattr(lm.model, lm.model.base_model_prefix)
        _sync(args)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for d in docs:
                base(input_ids=d.view(1, -1).to(device), use_cache=False)
        _sync(args)
        dense_tps = sum(d.numel() for d in docs) / (time.perf_counter() - t0)
    if not args.smoke:
        torch.cuda.reset_peak_memory_stats()
    if info.world_size > 1:
        dist.barrier()
    _sync(args)
    t0 = time.perf_counter()
    th = calibrate_distributed(lm, docs, config, work / f"art-{tag}", data_description="random token ids")
    _sync(args)
    wall = time.perf_counter() - t0
    peak = 0.0 if args.smoke else torch.cuda.max_memory_allocated(device) / 2**30
    if info.world_size > 1:
        peaks = [None] * info.world_size
        dist.all_gather_object(peaks, peak)
        dist.destroy_process_group()
    else:
        peaks = [peak]
    if info.rank == 0:
        m = th.meta
        placement = sorted({str(v) for v in getattr(lm.model, "hf_device_map", {}).values()}) or [str(device)]
        (work / f"{tag}.json").write_text(json.dumps({
            "tag": tag, "ranks": info.world_size, "gpus": 2 if (args.device_map or info.world_size == 2) else 1,
            "card": "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name(device), "tokens": m["tokens"], "documents": m["documents"],
            "seconds": m["seconds"], "wall_s": wall, "rank_seconds": m["distributed"]["rank_seconds"],
            "rank_tokens": m["distributed"]["rank_tokens"], "peak_gib": peaks, "placement": placement,
            "dense_tokens_per_s": dense_tps,
        }))


# ---- the driver ----------------------------------------------------------------------------

def _launch(args, work: Path, tag: str, nproc: int, extra: list[str], env: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(Path(__file__).resolve()), "--worker", tag, "--workdir", str(work), "--layers", str(args.layers),
           "--docs", str(args.docs), "--min-len", str(args.min_len), "--max-len", str(args.max_len),
           "--k", str(args.k), "--layer-k", args.layer_k, *(["--smoke"] if args.smoke else []), *extra]
    print(f"== {tag}: {' '.join(cmd[3:6])} ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    print(f"   done in {time.perf_counter() - t0:.1f} s", flush=True)


def _compare(ref_dir: Path, dir_: Path) -> dict:
    from topθ_core.thresholds import load_thresholds

    a, b = load_thresholds(ref_dir), load_thresholds(dir_)
    same_shape = a.count.shape == b.count.shape
    out = {"counts_equal": bool(same_shape and torch.equal(a.count, b.count)), "same_shape": same_shape}
    if same_shape:
        cal = a.count > 0
        for name, x, y in (("theta", a.theta, b.theta), ("sdc", a.sdc_mean, b.sdc_mean)):
            d = (x[cal] - y[cal]).abs()
            scale = x[cal].abs().max().clamp_min(1e-30)
            out[f"{name}_max_abs"] = float(d.max())
            out[f"{name}_max_rel_to_range"] = float(d.max() / scale)
    out["ok"] = bool(out["counts_equal"] and out.get("theta_max_rel_to_range", 1.0) <= 1e-3
                     and out.get("sdc_max_rel_to_range", 1.0) <= 1e-3)
    return out


def driver(args) -> int:
    n_gpu = torch.cuda.device_count()
    if n_gpu < 2 and not args.smoke:
        print(f"this benchmark needs 2 CUDA GPUs; found {n_gpu}", file=sys.stderr)
        return 2
    import importlib.util

    import transformers

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1" if args.smoke else "4")
    if args.smoke:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        ckpt = work / "checkpoint"
        if not (ckpt / "config.json").is_file():
            print(f"== building a random {args.layers}-layer Llama-3-8B-shaped checkpoint in {ckpt}", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build", "--workdir", str(work),
                            "--layers", str(args.layers)] + (["--smoke"] if args.smoke else []),
                           cwd=ROOT, env=env, check=True)
        for art in work.glob("art-*"):
            shutil.rmtree(art)
        runs = [("1gpu", 1, []), ("2gpu-dp", 2, [])]
        devmap = not (args.no_devmap or args.smoke) and importlib.util.find_spec("accelerate") is not None
        if devmap:
            runs.append(("2gpu-devmap", 1, ["--device-map", "auto"]))
        for tag, nproc, extra in runs:
            _launch(args, work, tag, nproc, extra, env)
        rows = [json.loads((work / f"{tag}.json").read_text()) for tag, _, _ in runs]
        for r in rows:
            r["check"] = None if r["tag"] == "1gpu" else _compare(work / "art-1gpu", work / f"art-{r['tag']}")
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
        base = rows[0]["tokens_per_s"]
        for r in rows:
            r["speedup"] = r["tokens_per_s"] / base
            r["scaling_efficiency"] = r["speedup"] / r["gpus"]
        params = json.loads((ckpt / "bench_info.json").read_text())["params"]
        if args.out is None:
            args.out = str(work / "distributed-smoke.md" if args.smoke else RESULTS / "distributed.md")
        _write(args, rows, params, transformers.__version__, devmap)
        ok = all(r["check"] is None or r["check"]["ok"] for r in rows)
        print("correctness:", "OK" if ok else "MISMATCH (see the table)")
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _write(args, rows: list[dict], params: int, tf_version: str, devmap: bool) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    card = rows[0]["card"]
    tokens = rows[0]["tokens"]
    label = {"1gpu": "1 GPU, 1 rank", "2gpu-dp": "2 GPUs, 2 ranks (NCCL data parallel)",
             "2gpu-devmap": "2 GPUs, 1 rank (device_map=auto)"}
    lines = [
        "# Distributed calibration: 1 vs 2 GPUs",
        "",
        f"Card: {card} ×2 · torch {torch.__version__} · transformers {tf_version} · Python "
        f"{platform.python_version()} · NCCL_NVLS_ENABLE=0 · {time.strftime('%Y-%m-%d')}",
        "",
        f"Model: random Llama-3-8B-shaped, {args.layers} of 32 layers ({params / 1e9:.2f} B parameters, bf16; "
        "hidden 4096, 32/8 heads, MLP 14336). Calibration: k = "
        f"{args.k} (layers {args.layer_k}), TAC, sample_frac 1, bin width 16, reference attention. "
        f"Data: {args.docs} documents of {args.min_len}–{args.max_len} random token ids ({tokens} tokens).",
        "",
        "Tokens/s = tokens / (first calibration forward → merged statistics), after a warm-up; NCCL set up "
        "before timing. Command: `python benchmarks/bench_distributed.py`.",
        "",
        "## Correctness (against the 1-GPU artifact)",
        "",
        "| run | counts equal | max abs Δθ | max Δθ / max abs θ | max abs ΔSDC | ok |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows[1:]:
        c = r["check"]
        lines.append(f"| {label[r['tag']]} | {c['counts_equal']} | {c.get('theta_max_abs', float('nan')):.3g} | "
                     f"{c.get('theta_max_rel_to_range', float('nan')):.3g} | {c.get('sdc_max_abs', float('nan')):.3g} "
                     f"| {'yes' if c['ok'] else 'NO'} |")
    lines += ["", "## Throughput", "",
              "| run | tokens/s | speed-up | scaling efficiency | seconds | per-rank seconds | per-rank tokens | "
              "peak GiB per rank | model placement |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {label[r['tag']]} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}× | "
                     f"{100 * r['scaling_efficiency']:.0f}% | {r['seconds']:.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in r['rank_seconds'])} | "
                     f"{', '.join(map(str, r['rank_tokens']))} | {', '.join(f'{p:.1f}' for p in r['peak_gib'])} | "
                     f"{', '.join(r['placement'])} |")
    dense = rows[0].get("dense_tokens_per_s")
    if dense:
        lines += ["", f"For context: plain dense forwards (sdpa) of the same tokens on 1 GPU run at {dense:.0f} "
                      f"tokens/s, so calibration costs {dense / rows[0]['tokens_per_s']:.1f}× a dense pass."]
    if not devmap:
        lines += ["", "The device_map run was skipped (accelerate missing or --no-devmap)."]
    lines += ["", "Scaling efficiency = speed-up / GPUs. The device_map run is a correctness check of a model "
                  "split over GPUs (layers run one after another), not a way to go faster.", ""]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        [{k: v for k, v in r.items()} | {"card": card, "layers": args.layers, "params": params} for r in rows],
        indent=2))
    print("\n".join(lines))


def main(argv=None) -> int:
    args = _args(argv)
    if args.build:
        build_checkpoint(args, Path(args.workdir) / "checkpoint")
        return 0
    if args.worker:
        worker(args, Path(args.workdir))
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
