"""Greedy decode steps on a static KV cache, captured once as a CUDA graph and replayed.

A decode step of an eager transformers model is dozens of small launches per layer, and at
batch 1 the host issuing them, not the GPU, sets the pace (``benchmarks/results/kernels.md``).
:class:`GraphDecoder` removes the host from the loop: the cache is preallocated
(:class:`StaticKVCache`, one (B, Hkv, max_len, d) buffer per layer, written at a position held
in a device tensor), the attention mask is a static (B, 1, 1, max_len) bool tensor whose
prefix grows on the device, and one whole step (embedding, every layer, the LM head, the
greedy argmax and the position update) is captured in a CUDA graph after one eager step.  Each
later step is one ``replay()``.

Both sides get the same treatment: ``run=None`` decodes densely through the model's own
attention (transformers' sdpa with the static mask, whichever SDPA backend torch picks, or the
one a caller forces around :meth:`GraphDecoder.step`'s first call); a ``run`` factory (e.g.
``lambda: sparse_run(config, thresholds)``, after one ``check_run(config, thresholds, model)``)
decodes through Top-θ: the run's scratch holds the step's valid key counts
(:data:`~topθ_core.dispatch.STATIC_LENGTHS`, a (B,) device tensor the step advances), so the
decode kernel reads each sequence's length on the device and one captured launch serves every step.

The prefill runs eagerly through a dynamic cache (the model's ordinary path, with the kernels
when the run uses them), then its keys and values are copied into the static buffers.  A step
captured with a reference-path attention inside could not replay (the reference synchronises),
so when the eager step shows that some layer did not run the kernel, the decoder stays eager
(:attr:`GraphDecoder.graphed` is False) on the same static cache.  Masks other than a plain
causal prefix (sliding windows) are not reproduced by the static mask, so such models are
refused (:func:`graph_decode_supported`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from . import dispatch
from .integration import THETA_LOOKUP
from .models import cache_kwarg, output_cache

RunFactory = Callable[[], ContextManager]

def graph_decode_supported(model: torch.nn.Module) -> bool:
    """True when every layer attends causally over the whole cache (no sliding window, no chunking)."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    if getattr(cfg, "attention_chunk_size", None):
        return False
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return all(t == "full_attention" for t in layer_types)
    return not getattr(cfg, "sliding_window", None)


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    lay = cache.layers[layer]
    return lay.keys, lay.values


try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # pragma: no cover - transformers is a dependency
    Cache = CacheLayerMixin = object


class _StaticLayer(CacheLayerMixin):
    """One layer's preallocated keys and values; ``update`` writes at the shared device position."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.pos = keys, values, pos
        self.max_cache_len = keys.shape[2]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # preallocated
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[2] != 1:
            raise ValueError("a static decode cache takes one new token per step")
        self.keys.index_copy_(2, self.pos, key_states)
        self.values.index_copy_(2, self.pos, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self):
        return self.pos[0]

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len


class StaticKVCache(Cache):
    """A transformers cache over preallocated (B, Hkv, max_len, d) buffers, one per layer.

    Every layer writes its new key and value at ``pos`` (a (1,) int64 device tensor the decoder
    advances on the device), so a captured step replays without host involvement.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], pos: torch.Tensor):
        super().__init__(layers=[_StaticLayer(k, v, pos) for k, v in zip(keys, values)])
        self.pos = pos


class GraphDecoder:
    """Greedy decoding of one batch of sequences on a static cache: one CUDA-graph replay per step.

    ``model``: a transformers causal LM (prepared for Top-θ when ``run`` is given).  ``run``: a
    factory of the context every step of this stream runs in (``None``: dense, the model's own
    attention).  ``max_len``: cache capacity (prompt + new tokens).  ``cuda_graph``: capture the
    step after the first one and replay it (default, CUDA only), or stay eager on the same
    static cache.

    Use: :meth:`prefill` (or :meth:`load_cache`), then :meth:`step` per new token; each returns
    the next-token logits (B, V) (a static buffer when replayed: copy it to keep it), and
    :attr:`next_tokens` (B, 1) holds their argmax, the next step's input unless :meth:`step` is
    given other tokens.  :meth:`kept_v_fraction` reads the Top-θ kept-V-row fraction of the last
    step.
    """

    def __init__(self, model: torch.nn.Module, run: RunFactory | None = None, *, max_len: int,
                 cuda_graph: bool = True):
        if max_len < 2:
            raise ValueError("max_len must hold at least the prompt and one new token")
        if not graph_decode_supported(model):
            raise ValueError("graph decode needs full causal attention in every layer (no sliding window)")
        self.model, self.run, self.max_len = model, run, int(max_len)
        self.cuda_graph = bool(cuda_graph)
        self.graphed = False  # a captured step exists and is replayed
        self.length = 0  # keys in the cache
        self.cache = None
        self._graph = None
        self._scratch: dict = {}  # the run's scratch, carried from step to step (running V sums, counts)
        self._kept: list | None = None  # Top-θ: every layer's kernel counts of the last step (summed when read)
        self._kv_heads = 0

    # ---- cache ------------------------------------------------------------------------------
    def load_cache(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int | None = None) -> None:
        """Start from per-layer keys/values (B, Hkv, L, d) (e.g. a prefill's), copied into fresh static
        buffers of ``max_len`` keys; or, with ``length``, adopt (B, Hkv, max_len, d) buffers as they are
        (no copy) of which the first ``length`` keys are the cache.  Drops any captured step."""
        B, _, n, _ = keys[0].shape
        L = n if length is None else int(length)
        if L >= self.max_len:
            raise ValueError(f"the cache holds {L} keys: max_len={self.max_len} leaves no room to decode")
        if length is not None and (n != self.max_len or not 1 <= L):
            raise ValueError(f"adopted buffers must hold max_len={self.max_len} keys and 1 ≤ length, got {n}, {L}")
        dev, dt = keys[0].device, keys[0].dtype
        self._graph, self.graphed, self._scratch, self._kept = None, False, {}, None
        self.pos = torch.full((1,), L, dtype=torch.long, device=dev)
        if length is None:
            ks, vs = [], []
            for k, v in zip(keys, values):
                kb = torch.zeros(B, k.shape[1], self.max_len, k.shape[3], dtype=dt, device=dev)
                vb = torch.zeros(B, v.shape[1], self.max_len, v.shape[3], dtype=dt, device=dev)
                kb[:, :, :L] = k
                vb[:, :, :L] = v
                ks.append(kb)
                vs.append(vb)
        else:
            ks, vs = list(keys), list(values)
        self.cache = StaticKVCache(ks, vs, self.pos)
        self.batch = B
        self._kv_heads = len(ks) * B * ks[0].shape[1]
        self.mask = torch.zeros(B, 1, 1, self.max_len, dtype=torch.bool, device=dev)
        self.mask[..., :L] = True
        self.position_ids = torch.full((B, 1), L, dtype=torch.long, device=dev)
        self.next_tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self._lengths = torch.full((B,), L + 1, dtype=torch.int32, device=dev)
        self.length = L

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids`` (B, P) eagerly (dynamic cache, inside ``run``) and keep its keys
        and values; returns the last position's logits (B, V)."""
        kw = {cache_kwarg(self.model): None, "use_cache": True, "logits_to_keep": 1}
        with self._run_context():
            out = self.model(input_ids=ids, **kw)
        cache = output_cache(out)
        kv = [_layer_kv(cache, i) for i in range(len(cache.layers))]
        self.load_cache([k for k, _ in kv], [v for _, v in kv])
        logits = out.logits[:, -1]
        self.next_tokens.copy_(logits.argmax(-1, keepdim=True))
        return logits

    # ---- steps ------------------------------------------------------------------------------
    def _run_context(self) -> ContextManager:
        return self.run() if self.run is not None else contextlib.nullcontext()

    def _forward(self, state) -> torch.Tensor:
        """One step on the static state: key ``pos`` becomes visible, the model writes its K/V there,
        greedy next token, position + 1; the layers' kernel counts are kept for :meth:`kept_v_fraction`.
        Device work only (capturable)."""
        self.mask.index_fill_(-1, self.pos, True)
        self._lengths.copy_(self.pos.expand(self.batch)).add_(1)  # this step's valid keys (its new key: pos)
        if state is not None and hasattr(state, "scratch"):
            state.scratch.pop(THETA_LOOKUP, None)  # this step's lengths: θ looked up anew (once, for all layers)
        out = self.model(input_ids=self.next_tokens, position_ids=self.position_ids, attention_mask=self.mask,
                         use_cache=True, **{cache_kwarg(self.model): self.cache})
        logits = out.logits[:, -1]
        self.next_tokens.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.position_ids.add_(1)
        self._kept = self._layer_counts(state)  # summed only when read: no reduction kernels in the step
        return logits

    def _layer_counts(self, state):
        """Every layer's kernel counts of this step, or ``None`` (dense, or a layer ran the reference)."""
        if state is None or not hasattr(state, "scratch"):
            return None
        counts = [state.scratch.get((dispatch.COUNTS, i)) for i in range(len(self.cache.layers))]
        return None if any(c is None for c in counts) else counts

    def step(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Decode one token per sequence: ``tokens`` (B, 1) or (B,) (default: :attr:`next_tokens`).
        Returns the logits (B, V) after it."""
        if self.cache is None:
            raise RuntimeError("prefill (or load_cache) first")
        if self.length >= self.max_len:
            raise RuntimeError(f"the static cache is full ({self.max_len} keys)")
        if tokens is not None:
            self.next_tokens.copy_(tokens.reshape(self.batch, 1))
        if self.graphed:
            self._graph.replay()
            logits, self._kept = self._logits, self._graph_kept
        else:
            logits = self._eager_step()
        self.length += 1
        return logits

    def _eager_step(self) -> torch.Tensor:
        """One eager step inside ``run`` (the scratch carried over); on CUDA, then capture the next one
        with the same run state, unless some layer ran the reference path (which synchronises)."""
        dev = self.mask.device
        capture = self.cuda_graph and dev.type == "cuda"
        with self._run_context() as state:
            sparse = state is not None and hasattr(state, "scratch")
            if sparse:
                state.scratch.update({k: v for k, v in self._scratch.items()
                                      if not (isinstance(k, tuple) and k and k[0] == dispatch.COUNTS)})
                state.scratch[dispatch.STATIC_LENGTHS] = self._lengths
            if not capture:
                logits = self._forward(state)
            else:  # eager step on the stream that will capture: lazy initialisations happen there
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    logits = self._forward(state)
                    logits = logits.clone()
                if sparse and self._layer_counts(state) is None:
                    self.cuda_graph = False  # some layer took the reference path: stay eager
                else:
                    eager_kept = self._kept
                    side.synchronize()
                    self._graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self._graph, stream=side):
                        self._logits = self._forward(state)
                    self._graph_kept, self._kept = self._kept, eager_kept
                    self.graphed = True
                torch.cuda.current_stream(dev).wait_stream(side)
            if sparse:
                self._scratch = state.scratch  # keeps the tensors the captured step reads alive
        return logits

    def kept_v_fraction(self) -> float:
        """Top-θ: kept V rows / visible keys over every (layer, sequence, KV head) of the last step
        (NaN for dense or before a step); one synchronisation."""
        if self._kept is None or not self._kv_heads:
            return float("nan")
        total = torch.stack([c.kept_v_rows for c in self._kept]).sum()
        return float(total) / (self._kv_heads * self.length)

    def close(self) -> None:
        """Drop the captured step, the cache and the run's scratch."""
        self._graph, self.graphed, self.cache, self._scratch, self._kept = None, False, None, {}, None
