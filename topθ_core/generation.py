"""Side-by-side greedy generation: dense vs Top-θ on one loaded model, step by step.

:func:`compare_generate` runs two greedy streams from the same prompt, one dense and one
sparse (each with its own KV cache), and yields a :class:`GenStep` per new token with the
next-token KL(dense‖sparse) measured on the sparse stream's own prefix: until the streams
diverge that is the dense stream's distribution; from the first divergence on, a third,
dense stream follows the sparse tokens (one prefill at the divergence, then one token a
step).  Kept V rows per step come from the sparse stream's decode metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .config import SparseConfig
from .integration import sparse_run
from .metrics import SparsityMetrics
from .thresholds import Thresholds


@dataclass(frozen=True)
class GenStep:
    step: int
    dense_token: int
    dense_text: str
    sparse_token: int
    sparse_text: str
    kl: float  # KL(dense ‖ sparse) of the next-token distribution on the sparse prefix (nats)
    diverged: bool  # the streams differ at or before this step
    dense_tok_s: float
    sparse_tok_s: float
    kept_v_rows: float  # sparse stream: kept V rows / KV rows at this step, pooled over layers (NaN at step 0)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where two token sequences differ (None if one is a prefix of the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dimension, from logits, in nats (float64)."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return ids.view(1, -1)
    return tokenizer(prompt, return_tensors="pt").input_ids


class _Stream:
    """One greedy stream with its own cache and timer."""

    def __init__(self, model, run=None):
        self.model, self.run, self.cache, self.seconds, self.tokens = model, run, None, 0.0, 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.run is None:
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        else:
            with sparse_run(*self.run[0], **self.run[1]):
                out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.seconds += time.perf_counter() - t0
        self.tokens += 1
        return out.logits[0, -1]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@torch.inference_mode()
def compare_generate(lm, prompt: str, config: SparseConfig, thresholds: Thresholds | None, *,
                     max_new_tokens: int = 32, chat: bool = False, stop_at_eos: bool = True) -> Iterator[GenStep]:
    """Greedy dense and sparse continuations of ``prompt``, one :class:`GenStep` per new token."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    prompt_ids = encode_prompt(tok, prompt, chat).to(device)
    if prompt_ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    metrics = SparsityMetrics()
    dense = _Stream(model)
    sparse = _Stream(model, ((config, thresholds), {"model": model, "metrics": metrics}))
    follow: _Stream | None = None  # dense on the sparse prefix, from the first divergence on
    ld, ls = dense.step(prompt_ids), sparse.step(prompt_ids)
    d_ids: list[int] = []
    s_ids: list[int] = []
    eos = getattr(tok, "eos_token_id", None)
    n_layers = lm.fingerprint.n_layers
    for step in range(max_new_tokens):
        lref = ld if follow is None else lf
        kl = float(kl_divergence(lref, ls))
        dt, st = int(ld.argmax()), int(ls.argmax())
        d_ids.append(dt)
        s_ids.append(st)
        diverged = first_divergence(d_ids, s_ids) is not None
        kept_v = float("nan")
        if step > 0:
            last = [metrics.decode_steps[layer][-1] for layer in range(n_layers) if metrics.decode_steps.get(layer)]
            if last:
                kept_v = sum(k for k, _ in last) / max(1, sum(t for _, t in last))
        yield GenStep(step=step, dense_token=dt, dense_text=tok.decode([dt]), sparse_token=st,
                      sparse_text=tok.decode([st]), kl=kl, diverged=diverged, dense_tok_s=dense.tok_s,
                      sparse_tok_s=sparse.tok_s, kept_v_rows=kept_v)
        if stop_at_eos and eos is not None and dt == eos and st == eos:
            return
        if step == max_new_tokens - 1:
            return
        ld = dense.step(torch.tensor([[dt]], device=device))
        ls = sparse.step(torch.tensor([[st]], device=device))
        if diverged:
            if follow is None:
                follow = _Stream(model)
                lf = follow.step(torch.cat([prompt_ids, torch.tensor([s_ids], device=device)], dim=1))
            else:
                lf = follow.step(torch.tensor([[st]], device=device))


def generate_pair(lm, prompt: str, config: SparseConfig, thresholds: Thresholds | None, *,
                  max_new_tokens: int = 32, chat: bool = False) -> dict:
    """Run :func:`compare_generate` to the end; texts, token ids, first divergence, mean KL."""
    steps = list(compare_generate(lm, prompt, config, thresholds, max_new_tokens=max_new_tokens, chat=chat))
    d = [s.dense_token for s in steps]
    s = [s.sparse_token for s in steps]
    kv = [x.kept_v_rows for x in steps if not math.isnan(x.kept_v_rows)]
    return {
        "dense_ids": d,
        "sparse_ids": s,
        "dense_text": lm.tokenizer.decode(d),
        "sparse_text": lm.tokenizer.decode(s),
        "first_divergence": first_divergence(d, s),
        "match_rate": sum(a == b for a, b in zip(d, s)) / max(1, len(d)),
        "mean_kl": sum(x.kl for x in steps) / max(1, len(steps)),
        "kept_v_rows_decode": sum(kv) / len(kv) if kv else float("nan"),
        "dense_tok_s": steps[-1].dense_tok_s if steps else float("nan"),
        "sparse_tok_s": steps[-1].sparse_tok_s if steps else float("nan"),
    }
