"""Where a decode step of transformers' sdpa path spends its time (the e2e baseline of bench_kernels).

A 4-layer random-weight Llama-3-8B-shaped model, B = 8, N = 16k, three decode steps under the
torch profiler (the model is prepared for Top-θ, but with no active run its attention is
transformers' own sdpa, bit for bit).  Run on a GPU:

    python benchmarks/profile_sdpa_decode.py

Result (H200, torch 2.11, transformers 5.17; ``results/logs/sdpa_decode_profile_run11_H200.log``):
SDPA picks cuDNN, whose forward spends ~9.5 ms of host time per call, because the key length
changes every step and each new shape builds a new cuDNN plan; the GPU itself is busy < 10 ms
for all 12 calls.  ``bench_kernels.py --e2e-no-cudnn`` times the baseline without cuDNN SDPA.
"""
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from topθ_core.models import cache_kwarg  # noqa: E402
from topθ_core.integration import prepare_model  # noqa: E402
B, N = 8, 16384
mc = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072)
with torch.device("cuda"):
    model = LlamaForCausalLM(mc).to(torch.bfloat16).eval()
prepare_model(model)
cache = DynamicCache(config=mc)
for layer in range(4):
    cache.update(torch.randn(B, 8, N, 128, device="cuda", dtype=torch.bfloat16), torch.randn(B, 8, N, 128, device="cuda", dtype=torch.bfloat16), layer)
tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
kw = {cache_kwarg(model): cache}  # `cache` in transformers ≥ 5.2x, `past_key_values` before
with torch.inference_mode():
    for _ in range(2):
        model(input_ids=tok, use_cache=True, **kw)
    torch.cuda.synchronize()
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            model(input_ids=tok, use_cache=True, **kw)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
