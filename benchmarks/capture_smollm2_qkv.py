"""Capture post-RoPE Q/K/V of a few SmolLM2 layers at 4k tokens (CPU) as a benchmark fixture.

The bundled SmolLM2-135M-Instruct (9 query heads, 3 KV heads, d = 64) runs once on CPU over
concatenated text from the bundled corpora; a capturing attention function registered through
transformers' ``AttentionInterface`` (the host's extension point) records the query, key and
value tensors it receives and then runs sdpa.  Written as fp16 to
``benchmarks/fixtures/smollm2_qkv_4k.pt`` (≈ 8 MB per layer): model weights never travel to the
GPU machine, only these tensors do.  The folder is git-ignored (``.git/info/exclude``).

    python benchmarks/capture_smollm2_qkv.py [--tokens 4096] [--layers 2,15,28]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "fixtures" / "smollm2_qkv_4k.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", default="2,15,28")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from topθ_core.models import load_model
    from topθ_core.tasks import load_corpus

    captured: dict[int, dict[str, torch.Tensor]] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        layer = int(module.layer_idx)
        if layer in layers:
            captured[layer] = {"q": query.detach().to(torch.float16).clone(),
                               "k": key.detach().to(torch.float16).clone(),
                               "v": value.detach().to(torch.float16).clone()}
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("capture_qkv", capture)
    AttentionMaskInterface.register("capture_qkv", sdpa_mask)
    lm = load_model("smollm2")
    text = "\n\n".join(load_corpus("code") + load_corpus("pydoc"))
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"only {ids.shape[1]} tokens of text available")
    lm.model.set_attn_implementation("capture_qkv")
    with torch.inference_mode():
        lm.model.model(input_ids=ids, use_cache=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": lm.name, "tokens": int(ids.shape[1]), "layers": layers,
            "scale": float(lm.model.config.head_dim ** -0.5) if getattr(lm.model.config, "head_dim", None) else None}
    torch.save({"meta": meta, "layers": captured}, args.out)
    size = args.out.stat().st_size / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB): layers {sorted(captured)}, "
          f"q {tuple(captured[layers[0]]['q'].shape)}, k {tuple(captured[layers[0]]['k'].shape)}")


if __name__ == "__main__":
    main()
