"""Time to first token of the decode-only mode against dense and full Top-θ (issue 14).

    python benchmarks/ttft.py [--n 4096 16384] [--out DIR]

A random-weight Llama-3-8B-shaped model (bf16, 32/8 heads, d 128) prefills a B = 1 prompt of N tokens
and returns its first next-token logits, in three ways on the same inputs: dense (no sparse run: the
model's SDPA, which picks its fastest backend), full Top-θ (the default config: the Triton prefill
kernel, exact SDC + VMC + floor) and decode-only (``prefill=dense``: SDPA for the prompt).  Each is the
median of interleaved CUDA-event timings after a warm-up.  Checks first: the decode-only prompt's
logits equal dense's bit for bit.  Writes ``ttft_<card>.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topθ_core.config import PrefillMode, SparseConfig  # noqa: E402
from topθ_core.fingerprint import model_fingerprint  # noqa: E402
from topθ_core.integration import prepare_model, sparse_run  # noqa: E402
from topθ_core.statistics import ThresholdStats  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                 rope_theta=500000.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--theta", type=float, default=2.0, help="θ everywhere (random weights: a constant is enough)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B)).to(torch.bfloat16).eval()
    prepare_model(model)
    fp = model_fingerprint(model)
    cfg = SparseConfig()
    stats = ThresholdStats(fp.n_layers, fp.n_heads, bin_width=1024, device="cpu")
    lengths = torch.arange(1024, max(args.n) + 1025, 1024)
    for layer in range(fp.n_layers):
        stats.add(layer, lengths, torch.full((len(lengths), fp.n_heads), args.theta),
                  torch.full((len(lengths), fp.n_heads), 1.0))
    th = stats.finalize(0.0, fingerprint=fp, k=cfg.k, placement=cfg.placement)
    card = torch.cuda.get_device_name(0)
    ways = {"dense (SDPA)": None, "Top-θ prefill (kernel)": cfg,
            "decode-only (prefill=dense)": cfg.with_(prefill=PrefillMode.DENSE)}
    rows = []
    for n in args.n:
        ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, n), device="cuda")

        def first_logits(c):
            with torch.inference_mode():
                if c is None:
                    return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits
                with sparse_run(c, th, model=model):
                    return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

        ref = first_logits(None)
        assert torch.equal(first_logits(ways["decode-only (prefill=dense)"]), ref), "decode-only prompt is not dense"
        times = {w: [] for w in ways}
        for _ in range(args.rounds):  # interleaved, so machine noise hits every way
            for w, c in ways.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                first_logits(c)
                end.record()
                torch.cuda.synchronize()
                times[w].append(start.elapsed_time(end))
        base = statistics.median(times["dense (SDPA)"])
        for w, ts in times.items():
            ms = statistics.median(ts)
            rows.append({"card": card, "model": "llama3-8b (random weights)", "B": 1, "N": n, "way": w,
                         "ttft_ms": round(ms, 2), "vs_dense": round(base / ms, 3)})
            print(f"{card} N={n:>6} {w:<28} {ms:8.1f} ms  ×{base / ms:.2f} of dense", flush=True)
    import pandas as pd

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ttft_{card.split()[-1]}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
