"""What one greedy decode step of the bundled SmolLM2 costs on this CPU (the Sparsity page's decode strip).

    python benchmarks/decode_step_cpu.py        # → medians over 3 repeats of 8 steps after a 256-token prompt

Dense (the model's own sdpa) and Top-θ through the PyTorch reference with the Sparsity page's metrics
(thresholds calibrated here on 2 pydoc documents × 256 tokens, k = 64), float32, this machine's threads.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explorer_ui import analysis  # noqa: E402
from topθ_core import tasks  # noqa: E402
from topθ_core.calibration import calibrate  # noqa: E402
from topθ_core.config import CalibrationConfig, KSchedule  # noqa: E402
from topθ_core.models import BUNDLED, load_model  # noqa: E402


def main(steps: int = 8, repeats: int = 3) -> None:
    lm = load_model(BUNDLED, device="cpu", dtype=torch.float32)
    texts = tasks.load_corpus("pydoc")
    th = calibrate(lm, texts[:2], CalibrationConfig(k=KSchedule(default=64)), max_length=256)
    cfg = analysis.default_sparse_config(th)
    ids = lm.tokenizer(texts[5], return_tensors="pt").input_ids[:, :256]
    dense = []
    with torch.inference_mode():
        for _ in range(repeats):
            out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            t0 = time.perf_counter()
            for _ in range(steps):
                out = lm.model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, logits_to_keep=1,
                               **analysis._cache_kwargs(lm.model, out))
            dense.append((time.perf_counter() - t0) / steps)
    sparse, prefill = [], []
    for i in range(repeats):
        snap, cont = analysis.sparsity_prefill(lm, f"{i} " + texts[5], cfg, th, layer=2, keep_cache=True)
        snap = analysis.sparsity_decode(lm, snap, cont, steps)
        prefill.append(snap.seconds)
        sparse.append(snap.decode_seconds / steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 256-token prompt, {steps} steps × {repeats}")
    print(f"dense decode step: {1e3 * statistics.median(dense):.0f} ms  {[round(1e3 * x) for x in dense]}")
    print(f"Top-θ decode step (reference + metrics): {1e3 * statistics.median(sparse):.0f} ms  "
          f"{[round(1e3 * x) for x in sparse]}")
    print(f"Top-θ prefill snapshot: {statistics.median(prefill):.2f} s  {[round(x, 2) for x in prefill]}")


if __name__ == "__main__":
    main()
