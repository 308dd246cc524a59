"""Issue 2's calibration timing on this CPU: one process using every thread vs ``--workers N``.

Same 16 calibration texts as ``engine_cpu.py`` (pydoc, 300-600 tokens, fixed seed) and the same
config (pre-softmax, σ 0.1, TAC, VMC, layers 0-1 at k=512).  In one run, on the same tokens:

* one process with all torch threads: a plain dense forward of the base model, then
  :func:`calibrate`;
* N processes with 1/N of the threads each (documents sharded as the distributed job shards
  them): a plain dense forward of each shard (time = the slowest rank), then
  ``toptheta calibrate --workers N`` (time = the artifact's ``seconds``: first calibration
  forward → merged statistics, like the one-process figure, which excludes the model load; the
  command's wall time, process starts and model loads included, is reported beside it).

    python benchmarks/engine_cpu_workers.py [--workers 2] [--ks 16,32,64] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_cpu import pick_texts  # noqa: E402


def _dense_rank(rank: int, world: int, threads: int, docs: list[torch.Tensor], queue, barrier) -> None:
    from topθ_core import load_model
    from topθ_core.distributed import shard_documents

    torch.set_num_threads(threads)
    base = load_model("smollm2").model.model
    mine = [docs[i] for i in shard_documents([int(d.numel()) for d in docs], world)[rank]]
    with torch.inference_mode():
        base(input_ids=mine[0].view(1, -1)[:, :64])  # warm-up
        barrier.wait()
        t0 = time.perf_counter()
        for d in mine:
            base(input_ids=d.view(1, -1))
    queue.put(time.perf_counter() - t0)


def dense_workers(docs: list[torch.Tensor], world: int, threads: int) -> float:
    ctx = torch.multiprocessing.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(world)
    procs = [ctx.Process(target=_dense_rank, args=(r, world, threads, docs, queue, barrier)) for r in range(world)]
    for p in procs:
        p.start()
    times = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return max(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ks", default="16,32,64")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    from topθ_core import CalibrationConfig, KSchedule, calibrate, load_model
    from topθ_core.thresholds import load_thresholds

    threads = torch.get_num_threads()
    lm = load_model("smollm2")
    tok = lm.tokenizer
    texts = [t.strip() for t in pick_texts(tok, 16, 0)]  # data files are read stripped
    docs = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    n_tok = sum(int(d.numel()) for d in docs)
    base = lm.model.model
    with torch.inference_mode():
        base(input_ids=docs[0].view(1, -1)[:, :64])
        t0 = time.perf_counter()
        for d in docs:
            base(input_ids=d.view(1, -1))
        dense_one = time.perf_counter() - t0
    dense_n = dense_workers(docs, args.workers, max(1, threads // args.workers))
    print(f"dense forward, {n_tok} tokens: 1 process x {threads} threads {dense_one:.1f} s; "
          f"{args.workers} processes x {max(1, threads // args.workers)} {dense_n:.1f} s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "calib.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        for i, k in enumerate(map(int, args.ks.split(","))):
            ks = KSchedule.parse(k, "0:512,1:512")
            t0 = time.perf_counter()
            th1 = calibrate(lm, docs, CalibrationConfig(k=ks, sigma=0.1, tac=True, vmc=True))
            one = time.perf_counter() - t0
            out = Path(tmp) / f"k{k}-{i}"
            cmd = [sys.executable, "-m", "topθ_core.cli", "calibrate", "--workers", str(args.workers), "--model",
                   "smollm2", "--data", str(data), "--k", str(k), "--layer-k", "0:512,1:512", "--sigma", "0.1",
                   "--tac", "--vmc", "--out", str(out)]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
            wall = time.perf_counter() - t0
            if res.returncode != 0:
                raise SystemExit(res.stdout + res.stderr)
            meta = json.loads((out / "meta.json").read_text())
            assert meta["tokens"] == n_tok, (meta["tokens"], n_tok)
            thn = load_thresholds(out)
            nb = min(th1.count.shape[-1], thn.count.shape[-1])
            counts_equal = bool(torch.equal(th1.count[..., :nb], thn.count[..., :nb]))
            dtheta = float((th1.theta[..., :nb] - thn.theta[..., :nb]).nan_to_num().abs().max())
            row = dict(k=k, tokens=n_tok, threads=threads, workers=args.workers,
                       dense_one_s=dense_one, calib_one_s=one, dense_workers_s=dense_n,
                       calib_workers_s=meta["seconds"], calib_workers_cli_wall_s=wall,
                       rank_seconds=meta["distributed"]["rank_seconds"], counts_equal=counts_equal,
                       max_abs_dtheta=dtheta,
                       speedup_vs_500s=500 / meta["seconds"], calib_over_dense_workers=meta["seconds"] / dense_n,
                       calib_over_dense_one=one / dense_one)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out_dir / "engine_cpu_workers.csv", index=False)


if __name__ == "__main__":
    main()
