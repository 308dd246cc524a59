"""A tiny, randomly initialised Llama checkpoint with a byte-level BPE tokenizer.

Used by the app's tests and for trying the app offline in seconds: the app loads it like
any local checkpoint (sidebar → local path, or ``TOPTHETA_APP_MODEL=<dir>``).  Nothing is
downloaded; the tokenizer is trained here on a built-in paragraph.
"""

from __future__ import annotations

from pathlib import Path

_TRAIN_TEXT = """Top-theta attention keeps the attention elements whose score beats a calibrated threshold.
The threshold depends on the layer, the head and the row length, and is calibrated once per model.
def attention(query, key, value):
    scores = query @ key.transpose(-1, -2)
    return softmax(scores) @ value
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9, 10, 100, 1000.
Python is a programming language that lets you work quickly and integrate systems effectively.
"""


def make_tiny_model(path: str | Path, *, layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    vocab: int = 384, seed: int = 0) -> Path:
    """Write a tiny Llama checkpoint + tokenizer to ``path`` (created) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(make_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "data/models/tiny-llama"))
