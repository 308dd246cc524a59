"""Side-by-side greedy generation: dense vs Top-θ on one loaded model, step by step.

:func:`compare_generate` runs two greedy streams from the same prompt, one dense and one
sparse (each with its own KV cache), and yields a :class:`GenStep` per new token with the
next-token KL(dense‖sparse) measured on the sparse stream's own prefix: until the streams
diverge that is the dense stream's distribution; from the first divergence on, a third,
dense stream follows the sparse tokens (one prefill at the divergence, then one token a
step).  Kept V rows per step come from the sparse stream's decode counts.

On CUDA both streams decode by default through :class:`~topθ_core.graph_decode.GraphDecoder`:
a static cache and one CUDA-graph replay per token, the dense side with the model's own
attention, the sparse side with the Top-θ kernels (``cuda_graphs``).  Tokens/s of both sides come
from the same run and get the same treatment: with graphs, the replayed decode steps, each
timed to the end of its GPU work; on CPU (or ``cuda_graphs=False``), every call of the stream,
prefill included, as before.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from . import dispatch
from .config import SparseConfig
from .graph_decode import GraphDecoder, graph_decode_supported
from .models import cache_kwarg, output_cache
from .integration import check_run, sparse_run
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
    dense_tok_s: float  # this stream's tokens/s so far (with CUDA graphs: of the replayed steps, once there is one)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stream:
    """One greedy stream with its own dynamic cache and timer (eager: one model call per token)."""

    def __init__(self, model, run=None, metrics: SparsityMetrics | None = None):
        self.model, self.run, self.metrics, self.cache = model, run, metrics, None
        self.seconds, self.tokens = 0.0, 0
        self.device = next(model.parameters()).device
        self.scratch: dict = {}  # the sparse run's fast-path caches (running V sums), carried from step to step

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        kw = {cache_kwarg(self.model): self.cache, "use_cache": True}
        t0 = time.perf_counter()
        if self.run is None:
            out = self.model(input_ids=ids, **kw)
        else:
            config, thresholds = self.run
            with sparse_run(config, thresholds, metrics=self.metrics) as state:  # checked once, by compare_generate
                state.scratch.update(self.scratch)
                out = self.model(input_ids=ids, **kw)
                self.scratch = state.scratch
        logits = out.logits[0, -1]
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.cache = output_cache(out)
        self.tokens += 1
        return logits

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def kept_v(self, n_layers: int) -> float:
        """Kept V rows / KV rows of the last decode step, pooled over layers (from the metrics)."""
        if self.metrics is None:
            return float("nan")
        last = [self.metrics.decode_steps[layer][-1] for layer in range(n_layers)
                if self.metrics.decode_steps.get(layer)]
        return sum(k for k, _ in last) / max(1, sum(t for _, t in last)) if last else float("nan")


class _GraphStream:
    """One greedy stream on a :class:`GraphDecoder` (static cache, CUDA-graph replays) and its timer."""

    def __init__(self, model, run, max_len: int):
        self.decoder = GraphDecoder(model, run, max_len=max_len)
        self.device = next(model.parameters()).device
        self.seconds, self.tokens = 0.0, 0  # all calls (prefill, the eager step that captures)
        self.replay_seconds, self.replays = 0.0, 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        graphed = False
        if self.decoder.cache is None:
            logits = self.decoder.prefill(ids)
        else:
            graphed = self.decoder.graphed
            logits = self.decoder.step(ids)
        logits = logits[0].clone()
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.tokens += 1
        if self.tokens > 1 and graphed:
            self.replay_seconds += dt
            self.replays += 1
        return logits

    @property
    def tok_s(self) -> float:
        if self.replays:
            return self.replays / self.replay_seconds
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def kept_v(self, n_layers: int) -> float:
        return self.decoder.kept_v_fraction()


def _use_graphs(model, config: SparseConfig, cuda_graphs: bool | None) -> bool:
    """Graph decode for both streams: asked for (default: on CUDA), the model attends over the whole
    cache in every layer, and the decode kernel takes this config and model (otherwise the sparse
    side would run the reference eagerly while the dense side replays: both stay eager)."""
    device = next(model.parameters()).device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise ValueError("cuda_graphs=True needs the model on a CUDA device")
    return bool(cuda_graphs) and graph_decode_supported(model) and dispatch.decode_kernel_takes(model, config)


@torch.inference_mode()
def compare_generate(lm, prompt: str, config: SparseConfig, thresholds: Thresholds | None, *,
                     max_new_tokens: int = 32, chat: bool = False, stop_at_eos: bool = True,
                     cuda_graphs: bool | None = None) -> Iterator[GenStep]:
    """Greedy dense and sparse continuations of ``prompt``, one :class:`GenStep` per new token.

    ``cuda_graphs``: decode both streams on a static cache with one CUDA-graph replay per token
    (``None``: on when the model is on CUDA).  Both streams stay eager (dynamic caches) when a layer
    does not attend over the whole cache (sliding windows) or the decode kernel does not take the
    config or the model (e.g. top-k selection, fp32 weights).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    prompt_ids = encode_prompt(tok, prompt, chat).to(device)
    if prompt_ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    check_run(config, thresholds, model)  # once, not in every timed step
    if _use_graphs(model, config, cuda_graphs):
        max_len = prompt_ids.shape[1] + max_new_tokens
        dense = _GraphStream(model, None, max_len)
        sparse = _GraphStream(model, lambda: sparse_run(config, thresholds), max_len)
    else:
        dense = _Stream(model)
        sparse = _Stream(model, (config, thresholds), metrics=SparsityMetrics())
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
        kept_v = sparse.kept_v(n_layers) if step > 0 else float("nan")
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
                  max_new_tokens: int = 32, chat: bool = False, cuda_graphs: bool | None = None) -> dict:
    """Run :func:`compare_generate` to the end; texts, token ids, first divergence, mean KL."""
    steps = list(compare_generate(lm, prompt, config, thresholds, max_new_tokens=max_new_tokens, chat=chat,
                                  cuda_graphs=cuda_graphs))
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
