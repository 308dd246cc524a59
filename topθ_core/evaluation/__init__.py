"""Accuracy side of Top-θ: perplexity, multiple choice, cloze and agreement, dense vs sparse.

Every evaluation scores the *same* units (items, documents) with the same loaded model twice:
dense (the model's own attention) and sparse (inside :func:`~topθ_core.integration.sparse_run`),
and reports both, their paired difference with a bootstrap interval, and what the sparse pass
kept.  One module per concept:

* :mod:`.pair` — the paired runner (:func:`stream_pairs`: chunk by chunk, several sparse arms at
  once, dense values from the :mod:`.dense_cache` when known), :class:`Arm`, :class:`PairedTask`.
* :mod:`.perplexity`, :mod:`.multiple_choice`, :mod:`.cloze`, :mod:`.agreement` — the tasks.
* :mod:`.scoring` — log-likelihood of continuations and token NLLs under the active attention.
* :mod:`.intervals` — paired bootstrap intervals; :mod:`.counts` — kept fractions.
* :mod:`.results` — :class:`EvalResult`, saved as Parquet; :mod:`.registry` — named tasks,
  :func:`run_task`, :func:`stream_task`.

``progress(done, total)`` callbacks report work units (tokens or choices) for a progress bar;
``should_stop()`` cancels with :class:`EvaluationCancelled`.
"""

from .agreement import AgreementTask, evaluate_agreement, kl_top1
from .cloze import ClozeTask, evaluate_cloze
from .counts import KeptCounter, pool_metrics
from .dense_cache import DenseCache, dense_cache_for
from .intervals import paired_bootstrap, ratio_bootstrap
from .multiple_choice import (MultipleChoiceTask, choose_fewshot, evaluate_multiple_choice, fewshot_text,
                              harness_predictions)
from .pair import Arm, EvaluationCancelled, PairedTask, PairUpdate, evaluate_pair, stream_pairs
from .perplexity import PerplexityResult, PerplexityTask, evaluate_perplexity
from .registry import TASKS, build_task, run_task, stream_task
from .results import (RESULT_COLUMNS, SUMMARY_COLUMNS, EvalResult, load_results, make_result, save_result,
                      thresholds_id)
from .scoring import Request, encode_pair, score_requests, sliding_windows, token_nll

__all__ = [
    "AgreementTask", "Arm", "ClozeTask", "DenseCache", "EvalResult", "EvaluationCancelled", "KeptCounter",
    "MultipleChoiceTask", "PairUpdate", "PairedTask", "PerplexityResult", "PerplexityTask", "RESULT_COLUMNS",
    "Request", "SUMMARY_COLUMNS", "TASKS", "build_task", "choose_fewshot", "dense_cache_for", "encode_pair",
    "evaluate_agreement", "evaluate_cloze", "evaluate_multiple_choice", "evaluate_pair", "evaluate_perplexity",
    "fewshot_text", "harness_predictions", "kl_top1", "load_results", "make_result", "paired_bootstrap",
    "pool_metrics", "ratio_bootstrap", "run_task", "save_result", "score_requests", "sliding_windows",
    "stream_pairs", "stream_task", "thresholds_id", "token_nll",
]
