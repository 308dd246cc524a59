"""The paired runner: every evaluation scores the same units dense and sparse, and compares them.

A :class:`PairedTask` says what its units are (items, documents), how one arm scores a batch of
them, and how per-unit values become a per-item table and summary metrics.  :func:`stream_pairs`
runs the units in growing chunks; in each chunk the dense values come from the
:class:`~topθ_core.evaluation.dense_cache.DenseCache` when it has them (the dense arm never
changes for a model and task), the rest are computed, then every sparse :class:`Arm` scores the
chunk.  After each chunk it yields a :class:`PairUpdate` holding one :class:`EvalResult` per
sparse arm over the units done so far, with running paired intervals: a variant matrix fills in
side by side, item by item.  :func:`evaluate_pair` runs one arm to the end.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator, Sequence

import pandas as pd

from ..config import DENSE, Selection, SparseConfig
from ..integration import check_run, sparse_run
from ..metrics import SparsityMetrics
from ..thresholds import Thresholds
from .counts import KeptCounter
from .dense_cache import DenseCache
from .results import EvalResult, make_result

ProgressFn = Callable[[int, int], None]
CHUNKS = (1, 2, 4, 8)  # units per chunk: the first numbers come fast, later chunks batch well


class EvaluationCancelled(RuntimeError):
    """``should_stop`` asked the evaluation to stop; nothing was saved."""


@dataclass(frozen=True)
class Arm:
    """One side of a paired evaluation: the model's own dense attention, or a sparse config."""

    config: SparseConfig = DENSE
    thresholds: Thresholds | None = None

    @property
    def dense(self) -> bool:
        return self.config.selection is Selection.DENSE

    @property
    def label(self) -> str:
        return self.config.label()

    def run(self, fn: Callable, counter: KeptCounter | None, seq_len: int, weight: int = 1):
        """Call ``fn()`` (one model call) in this arm's attention; a sparse arm records what it kept.

        The arm's thresholds and k schedule are checked against the model once, by :meth:`check`, before
        any work (:func:`stream_pairs` does it), not here: the check reads a weight sample back from the
        device, once per model call otherwise."""
        if self.dense:
            return fn()
        m = SparsityMetrics()
        with sparse_run(self.config, self.thresholds, metrics=m):
            out = fn()
        if counter is not None:
            counter.add(m.to_frame(), seq_len, weight)
        return out

    def check(self, lm) -> None:
        """Fail fast, before any work, on thresholds of another model, a bad k schedule, …"""
        check_run(self.config, self.thresholds, lm.model)


@dataclass
class ArmState:
    """What one arm keeps across the chunks of a run: its counter, scratch (a few-shot prefix cache) and time."""

    arm: Arm
    counter: KeptCounter
    scratch: dict = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


class PairedTask:
    """A task of paired units.  Subclasses set ``name`` and ``units`` and implement the methods.

    ``score`` returns one value dict per unit (JSON-serialisable for the dense arm of a cacheable
    task); ``dense`` passes the dense arm's values of the same units to a sparse arm that needs
    them (agreement compares distributions).  ``tick(n)`` reports ``n`` work units done
    (:meth:`work` counts them: tokens, choices).
    """

    name: str = ""
    units: Sequence = ()
    num_fewshot: int = 0

    def unit_key(self, unit) -> str:
        raise NotImplementedError

    def cache_key(self) -> str | None:
        """What, besides the model and the unit, decides a dense value; ``None``: never cache."""
        return None

    def work(self, unit) -> int:
        return 1

    def total_tokens(self) -> int:
        """Tokens one arm runs through the model (for an estimate before running)."""
        return sum(self.work(u) for u in self.units)

    def score(self, lm, units: Sequence, state: ArmState, tick: Callable[[int], None],
              dense: Sequence[dict] | None = None) -> list[dict]:
        raise NotImplementedError

    def items_frame(self, units: Sequence, dense: Sequence[dict], sparse: Sequence[dict]) -> pd.DataFrame:
        raise NotImplementedError

    def summary_rows(self, items: pd.DataFrame) -> list[dict]:
        raise NotImplementedError

    def info(self) -> dict:
        return {}

    def kept_v_rows_decode(self, items: pd.DataFrame) -> float:
        return float("nan")


@dataclass
class PairUpdate:
    """Where a paired run stands: units done of total, and one result per sparse arm so far."""

    done: int
    total: int
    results: list[EvalResult]
    dense_cached: int  # units whose dense values came from the cache
    seconds: float

    @property
    def finished(self) -> bool:
        return self.done == self.total


def _chunks(n: int, sizes: Sequence[int]) -> Iterator[tuple[int, int]]:
    start, i = 0, 0
    while start < n:
        size = sizes[min(i, len(sizes) - 1)]
        yield start, min(n, start + size)
        start, i = start + size, i + 1


def stream_pairs(lm, task: PairedTask, arms: Sequence[Arm], *, dense_cache: DenseCache | None = None,
                 progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
                 chunks: Sequence[int] = CHUNKS) -> Iterator[PairUpdate]:
    """Score ``task``'s units dense and under every sparse arm, chunk by chunk; yield after each chunk.

    ``progress(done, total)`` counts work units (:meth:`PairedTask.work`) over every arm that runs
    (cached dense units are not run).  ``should_stop()`` is checked between model calls' batches;
    when it returns True :class:`EvaluationCancelled` is raised and nothing is kept but the dense
    cache's complete entries.
    """
    arms = list(arms)
    if not arms or any(a.dense for a in arms):
        raise ValueError("give one or more sparse arms (the dense arm is always run)")
    units = list(task.units)
    if not units:
        raise ValueError("no items to evaluate")
    for a in arms:
        a.check(lm)
    ks = arms[0].config.k.as_list(lm.fingerprint.n_layers)
    dense_state = ArmState(Arm(), KeptCounter(ks))
    states = [ArmState(a, KeptCounter(a.config.k.as_list(lm.fingerprint.n_layers))) for a in arms]
    cache_key = task.cache_key() if dense_cache is not None else None
    keys = [task.unit_key(u) for u in units]
    cached = dense_cache.get(cache_key, keys) if cache_key is not None else {}
    from_cache = set(cached)
    work = [task.work(u) for u in units]
    total_work = sum(w for w, k in zip(work, keys) if k not in cached) + len(arms) * sum(work)
    done_work = [0]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()

    def tick(n: int) -> None:
        done_work[0] += n
        if progress:
            progress(min(done_work[0], total_work), total_work)
        if should_stop is not None and should_stop():
            raise EvaluationCancelled("evaluation cancelled")

    if progress:
        progress(0, total_work)
    dense_vals: list[dict] = []
    sparse_vals: list[list[dict]] = [[] for _ in arms]
    for a, b in _chunks(len(units), chunks):
        if should_stop is not None and should_stop():
            raise EvaluationCancelled("evaluation cancelled")
        chunk, chunk_keys = units[a:b], keys[a:b]
        missing = [i for i, k in enumerate(chunk_keys) if k not in cached]
        if missing:
            t1 = time.perf_counter()
            fresh = task.score(lm, [chunk[i] for i in missing], dense_state, tick)
            dense_state.seconds += time.perf_counter() - t1
            new = {chunk_keys[i]: v for i, v in zip(missing, fresh)}
            cached.update(new)
            if cache_key is not None:
                dense_cache.put(cache_key, new)
        chunk_dense = [cached[k] for k in chunk_keys]
        dense_vals += chunk_dense
        for j, st in enumerate(states):
            t1 = time.perf_counter()
            sparse_vals[j] += task.score(lm, chunk, st, tick, dense=chunk_dense)
            st.seconds += time.perf_counter() - t1
        results = [_result(lm, task, units[:b], dense_vals, sparse_vals[j], st, dense_state, created,
                           time.perf_counter() - t0) for j, st in enumerate(states)]
        if cache_key is None:  # uncacheable dense values (full logits) are not kept past their chunk
            cached = {}
        yield PairUpdate(done=b, total=len(units), results=results,
                         dense_cached=sum(k in from_cache for k in keys[:b]), seconds=time.perf_counter() - t0)


def _result(lm, task: PairedTask, units, dense_vals, sparse_vals, state: ArmState, dense_state: ArmState,
            created: str, seconds: float) -> EvalResult:
    items = task.items_frame(units, dense_vals, sparse_vals)
    rows = task.summary_rows(items)
    kept = state.counter.fractions(task.kept_v_rows_decode(items))
    info = dict(task.info(), dense_seconds=dense_state.seconds, sparse_seconds=state.seconds)
    return make_result(task.name, rows, items, state.counter.pooled(), state.arm.config, state.arm.thresholds,
                       getattr(lm, "name", ""), seconds, kept, len(units), info, num_fewshot=task.num_fewshot,
                       run_id=state.run_id, created=created)


def evaluate_pair(lm, task: PairedTask, config: SparseConfig, thresholds: Thresholds | None, *,
                  dense_cache: DenseCache | None = None, progress: ProgressFn | None = None,
                  should_stop: Callable[[], bool] | None = None) -> EvalResult:
    """Run one sparse config against dense to the end; the final :class:`EvalResult`."""
    last = None
    for last in stream_pairs(lm, task, [Arm(config, thresholds)], dense_cache=dense_cache, progress=progress,
                             should_stop=should_stop):
        pass
    return last.results[0]
