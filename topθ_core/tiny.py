"""Tiny randomly initialised models and a byte-level BPE tokenizer, for tests and offline demos.

Nothing is downloaded: the tokenizer is trained here on a built-in paragraph.  The app loads a
written checkpoint like any local one (``python -m topθ_core.tiny data/models/tiny-llama``, then
``TOPTHETA_APP_MODEL=data/models/tiny-llama``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Attention keeps what matters and drops the rest. "
    "Thresholds are calibrated once per layer and head, then used for every row length. "
    "def add(a, b):\n    return a + b\n"
) * 4

DEMO_TEXT = """Top-theta attention keeps the attention elements whose score beats a calibrated threshold.
The threshold depends on the layer, the head and the row length, and is calibrated once per model.
def attention(query, key, value):
    scores = query @ key.transpose(-1, -2)
    return softmax(scores) @ value
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9, 10, 100, 1000.
Python is a programming language that lets you work quickly and integrate systems effectively.
""" * 4


def tiny_config(family: str = "llama", **over):
    """A small config of a transformers model family (GQA: 4 query heads, 2 KV heads)."""
    import transformers as tf

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    common.update(over)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=48, attn_logit_softcapping=50.0,
                               final_logit_softcapping=None, query_pre_attn_scalar=16)
    raise ValueError(f"unknown tiny model family {family!r}")


def tiny_model(family: str = "llama", seed: int = 0, **over) -> torch.nn.Module:
    """A randomly initialised model of ``family`` (eval mode); ``over`` overrides config fields."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    impl = "eager" if family == "gemma2" else "sdpa"  # gemma2 soft-caps logits, which sdpa cannot
    return AutoModelForCausalLM.from_config(tiny_config(family, **over), attn_implementation=impl).eval()


def tiny_tokenizer(vocab_size: int = 300, text: str = TINY_TEXT, specials: Sequence[str] = ("<s>", "</s>")):
    """A byte-level BPE tokenizer trained on ``text`` (offline, deterministic); BOS/EOS are the first
    and last of ``specials`` (one special token serves as BOS, EOS and UNK)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    extra = {"unk_token": specials[0]} if len(specials) == 1 else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[-1], **extra)


def write_tiny_checkpoint(path: str | Path, *, layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                          vocab: int = 384, seed: int = 0) -> Path:
    """Write a tiny Llama checkpoint + tokenizer to ``path`` (created) and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(vocab, DEMO_TEXT, ("<|endoftext|>",))
    tok.save_pretrained(path)
    model = tiny_model("llama", seed, vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                       tie_word_embeddings=True)
    model.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(write_tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "data/models/tiny-llama"))
