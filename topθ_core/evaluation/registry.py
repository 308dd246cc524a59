"""Named tasks: what ``toptheta evaluate --task`` and the app's Accuracy page run.

:data:`TASKS` maps a task name to a builder ``(lm, limit, **options) -> PairedTask``; each builder
declares its options with their defaults, and unknown options are refused by name.
:func:`run_task` runs one sparse config against dense; :func:`stream_task` runs several
(a variant matrix) and yields as items complete.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterator, Sequence

from ..config import SparseConfig
from ..tasks import heldout_documents, list_mc_tasks, load_generation_prompts
from ..thresholds import Thresholds
from .agreement import AgreementTask
from .cloze import ClozeTask
from .multiple_choice import MultipleChoiceTask
from .pair import Arm, PairedTask, PairUpdate, ProgressFn, evaluate_pair, stream_pairs
from .perplexity import PerplexityResult, PerplexityTask
from .results import EvalResult


def perplexity_task(lm, limit: int | None, *, corpus: str = "pydoc", max_length: int | None = None,
                    stride: int | None = None, add_special_tokens: bool = True,
                    token_cap: int | None = None) -> PerplexityTask:
    """``limit`` held-out documents of a bundled corpus; metrics ``ppl``, ``nll``, ``bpb``."""
    return PerplexityTask(lm, heldout_documents(corpus, limit), name=f"perplexity:{corpus}", max_length=max_length,
                          stride=stride, add_special_tokens=add_special_tokens, token_cap=token_cap)


def agreement_task(lm, limit: int | None, *, corpus: str = "pydoc", prompt_task: str = "humaneval",
                   max_length: int = 512, max_new_tokens: int = 32) -> AgreementTask:
    """``limit`` (default 8) held-out documents (teacher-forced) and as many prompts (free-running)."""
    n = limit or 8
    return AgreementTask(lm, heldout_documents(corpus, n, min_chars=1000), load_generation_prompts(prompt_task, n),
                         max_length=max_length, max_new_tokens=max_new_tokens)


def _mc(name: str) -> Callable[..., PairedTask]:
    def build(lm, limit, *, num_fewshot: int = 0, max_rows: int = 32, max_tokens: int = 16384, n_boot: int = 2000,
              seed: int = 0) -> MultipleChoiceTask:
        return MultipleChoiceTask(lm, name, limit, num_fewshot=num_fewshot, max_rows=max_rows,
                                  max_tokens=max_tokens, n_boot=n_boot, seed=seed)
    return build


def _lambada(lm, limit, *, max_rows: int = 32, max_tokens: int = 16384, n_boot: int = 2000,
             seed: int = 0) -> ClozeTask:
    return ClozeTask(lm, "lambada", limit, max_rows=max_rows, max_tokens=max_tokens, n_boot=n_boot, seed=seed)


TASKS: dict[str, Callable[..., PairedTask]] = {
    "perplexity": perplexity_task,
    **{name: _mc(name) for name in list_mc_tasks()},
    "lambada": _lambada,
    "agreement": agreement_task,
}


def build_task(lm, task: str, limit: int | None = None, **options) -> PairedTask:
    """The :class:`PairedTask` of a named task.  Unknown tasks, unknown options and limits larger
    than the data raise ValueError."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    builder = TASKS[task]
    allowed = [p for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY]
    bad = set(options) - {p.name for p in allowed}
    if bad:
        raise ValueError(f"task {task!r} does not take option(s) {sorted(bad)}; it takes "
                         f"{sorted(p.name for p in allowed)}")
    return builder(lm, limit, **options)


def run_task(lm, task: str, limit: int | None, config: SparseConfig, thresholds: Thresholds | None,
             progress: ProgressFn | None = None, *, dense_cache=None, should_stop=None, **options) -> EvalResult:
    """Evaluate one named task, dense vs sparse; returns an :class:`EvalResult` (not saved:
    call ``result.save()`` to write it under the results folder).

    Tasks and what ``limit`` counts: ``perplexity`` documents of the held-out half of a bundled
    corpus (``corpus=`` default ``"pydoc"``, ``max_length=``, ``stride=``, ``token_cap=``;
    ``result.perplexity`` is the :class:`PerplexityResult`); ``arc_easy``, ``arc_challenge``,
    ``hellaswag``, ``piqa``, ``boolq``, ``openbookqa`` items (``num_fewshot=`` default 0; metrics
    ``acc``, ``acc_norm``, ``pred_changed``); ``lambada`` items (``acc``, ``ppl``); ``agreement``
    ``limit`` held-out documents and as many prompts (default 8).
    """
    t = build_task(lm, task, limit, **options)
    res = evaluate_pair(lm, t, config, thresholds, dense_cache=dense_cache, progress=progress,
                        should_stop=should_stop)
    if isinstance(t, PerplexityTask):
        res.perplexity = PerplexityResult.from_result(res)
    return res


def stream_task(lm, task: str | PairedTask, limit: int | None, arms: Sequence[Arm], *, dense_cache=None,
                progress: ProgressFn | None = None, should_stop=None, **options) -> Iterator[PairUpdate]:
    """A named task (or a built one) against every arm of a variant matrix, yielding as items complete."""
    t = task if isinstance(task, PairedTask) else build_task(lm, task, limit, **options)
    yield from stream_pairs(lm, t, arms, dense_cache=dense_cache, progress=progress, should_stop=should_stop)
