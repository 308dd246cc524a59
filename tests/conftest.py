"""Shared fixtures: tiny randomly initialised models of several families, a tiny tokenizer,
and (for tests marked ``slow``) the bundled SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TOPTHETA_APP_THREADS", "2")  # AppTests run the app in this process: keep the tests' threads
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from topθ_core.tiny import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state: random test data (the kernel tests draw their
    Q/K/V seeds from it) is the same on every run and in any test order, so a result never depends on
    the draw (an unseeded kernel test once failed one run in many, its error bound met by chance)."""
    torch.manual_seed(0)


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
