"""Shared fixtures: tiny randomly initialised models of several families, a tiny tokenizer,
and (for tests marked ``slow``) the bundled SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Attention keeps what matters and drops the rest. "
    "Thresholds are calibrated once per layer and head, then used for every row length. "
    "def add(a, b):\n    return a + b\n"
) * 4


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
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    impl = "eager" if family == "gemma2" else "sdpa"  # gemma2 soft-caps logits, which sdpa cannot
    model = AutoModelForCausalLM.from_config(tiny_config(family, **over), attn_implementation=impl)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    return fast


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny Llama checkpoint directory with a tokenizer (usable as --model PATH)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", num_hidden_layers=3)
    model.config.bos_token_id, model.config.eos_token_id = 0, 1
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm():
    from topθ_core.models import wrap_model

    model = tiny_model("llama")
    return wrap_model(model, tiny_tokenizer(), name="tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    from topθ_core.models import load_model

    return load_model("smollm2")
