"""Bundled evaluation tasks and text corpora (pure Python; no torch, no streamlit).

Everything reads the small Parquet files committed in the repo's ``data/`` folder
(provenance, licences and row counts: ``data/README.md``; rebuild with
``python scripts/build_data.py``).

Three kinds of workload:

* **Corpora** (:func:`list_corpora`, :func:`load_corpus`): plain documents for
  calibration and perplexity. Each corpus file has a ``text`` column.
  ``pydoc`` (English prose, Python docs), ``lambada`` (English fiction),
  ``code`` (Python stdlib source, long files), ``humaneval`` (short Python
  functions) - so one can calibrate on one domain and test on another.
  ``corpus_lambada`` holds only LAMBADA passages *not* used by the ``lambada``
  cloze task, so calibrating on it does not touch the evaluated items.
* **Multiple choice** (:func:`list_mc_tasks`, :func:`load_mc_task`): items
  formatted exactly like EleutherAI lm-evaluation-harness (zero-shot).
  ``MCItem.choices`` are stored **without** the leading space: the harness
  scores ``log p(" " + choice | context)`` (its ``target_delimiter`` is a single
  space), so a scorer must join context and choice with :data:`TARGET_DELIMITER`
  (or use :meth:`MCItem.continuations`).
* **Cloze** (:func:`load_cloze_task`, LAMBADA): context and the held-out last
  word (again without the leading space; scored as ``" " + target``).
* **Generation prompts** (:func:`load_generation_prompts`): prompts for
  long-decode workloads (HumanEval, MBPP, GSM8K), harness zero-shot formats.

Item order is the order of the Parquet file (the upstream split order), so it is
deterministic; ``limit=n`` takes the first ``n`` items and raises ``ValueError``
when fewer exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .paths import bundled_file

__all__ = [
    "TARGET_DELIMITER",
    "FEWSHOT_DELIMITER",
    "heldout_documents",
    "MCItem",
    "ClozeItem",
    "list_corpora",
    "corpus_path",
    "load_corpus",
    "list_mc_tasks",
    "load_mc_task",
    "list_cloze_tasks",
    "load_cloze_task",
    "list_generation_tasks",
    "load_generation_prompts",
    "hellaswag_preprocess",
    "format_arc",
    "format_openbookqa",
    "format_hellaswag",
    "format_piqa",
    "format_boolq",
    "format_lambada",
    "format_humaneval_prompt",
    "format_mbpp_prompt",
    "format_gsm8k_prompt",
]


#: What lm-evaluation-harness puts between context and choice/target.
TARGET_DELIMITER = " "
#: What lm-evaluation-harness puts between few-shot examples (and after the last one).
FEWSHOT_DELIMITER = "\n\n"


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item.

    ``context`` and ``choices`` are harness-formatted; the scored continuation of
    choice ``c`` is ``" " + c`` (see :meth:`continuations`). ``gold`` indexes
    ``choices``. ``id`` is unique within a task.
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    id: str

    def continuations(self) -> tuple[str, ...]:
        """The strings the harness scores after ``context``: ``" " + choice``."""
        return tuple(TARGET_DELIMITER + c for c in self.choices)


@dataclass(frozen=True)
class ClozeItem:
    """One cloze item (LAMBADA): score/predict ``" " + target`` after ``context``."""

    context: str
    target: str
    id: str


# --------------------------------------------------------------------------- io
def _check_name(kind: str, name: str, available: Sequence[str]) -> None:
    if name not in available:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(available)}")


def _apply_limit(items: list, limit: int | None, what: str) -> list:
    if limit is None:
        return items
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValueError(f"limit must be an int or None, got {limit!r}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit > len(items):
        raise ValueError(f"limit={limit} but {what} has only {len(items)} items")
    return items[:limit]


@lru_cache(maxsize=None)
def _read_rows(filename: str) -> tuple[dict[str, Any], ...]:
    path = bundled_file(filename)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; rebuild the bundled data with `python scripts/build_data.py`"
        )
    import pyarrow.parquet as pq  # local import: keeps `import topθ_core.tasks` cheap

    return tuple(pq.read_table(path).to_pylist())


# --------------------------------------------------------------------------- corpora
_CORPORA: dict[str, str] = {
    "code": "corpus_code.parquet",
    "humaneval": "corpus_humaneval.parquet",
    "lambada": "corpus_lambada.parquet",
    "pydoc": "corpus_pydoc.parquet",
}


def list_corpora() -> list[str]:
    """Names accepted by :func:`load_corpus` (the ``corpus_`` prefix is optional there)."""
    return sorted(_CORPORA)


def _corpus_key(name: str) -> str:
    key = name[len("corpus_"):] if isinstance(name, str) and name.startswith("corpus_") else name
    _check_name("corpus", key, list_corpora())
    return key


def corpus_path(name: str) -> Path:
    """Path of a corpus Parquet file (it has a ``text`` column)."""
    return bundled_file(_CORPORA[_corpus_key(name)])


def load_corpus(name: str, limit: int | None = None) -> list[str]:
    """Documents of a bundled corpus, in file order; ``limit`` = first n documents."""
    key = _corpus_key(name)
    texts = [r["text"] for r in _read_rows(_CORPORA[key])]
    return _apply_limit(texts, limit, f"corpus {key!r}")


def heldout_documents(corpus: str, n: int | None = None, *, min_chars: int = 0, part: str = "heldout") -> list[str]:
    """Documents of a bundled corpus split in two fixed halves: ``part="calibration"`` packs the
    even-indexed documents, ``"heldout"`` the odd-indexed ones, so evaluation text is never
    calibration text.  Consecutive documents of a half are packed (joined by a blank line)
    until each has at least ``min_chars`` characters; ``n`` takes the first n packed ones."""
    if part not in ("calibration", "heldout"):
        raise ValueError(f"part must be 'calibration' or 'heldout', got {part!r}")
    docs = load_corpus(corpus)
    packed, buf = [], []
    for d in docs[(0 if part == "calibration" else 1)::2]:
        buf.append(d)
        if sum(len(b) for b in buf) + 2 * (len(buf) - 1) >= min_chars:
            packed.append(FEWSHOT_DELIMITER.join(buf))
            buf = []
            if n is not None and len(packed) == n:
                break
    if n is not None and len(packed) < n:
        raise ValueError(f"corpus {corpus!r} gives only {len(packed)} {part} documents of ≥ {min_chars} characters, "
                         f"but {n} were asked for")
    return packed


# --------------------------------------------------------------------------- formatting
def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness ``hellaswag.utils.preprocess``."""
    text = text.strip()
    # Brackets are artefacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def format_arc(rec: Mapping[str, Any], id: str | None = None) -> MCItem:
    """ARC (easy/challenge): ``"Question: {question}\\nAnswer:"``, choices = answer texts."""
    labels = list(rec["choices_label"])
    return MCItem(
        context=f"Question: {rec['question']}\nAnswer:",
        choices=tuple(rec["choices_text"]),
        gold=labels.index(rec["answerKey"]),
        id=str(rec["id"] if id is None else id),
    )


def format_openbookqa(rec: Mapping[str, Any], id: str | None = None) -> MCItem:
    """OpenBookQA: context is the bare ``question_stem``, choices = answer texts."""
    labels = list(rec["choices_label"])
    return MCItem(
        context=rec["question_stem"],
        choices=tuple(rec["choices_text"]),
        gold=labels.index(rec["answerKey"].lstrip()),
        id=str(rec["id"] if id is None else id),
    )


def format_hellaswag(rec: Mapping[str, Any], id: str | None = None) -> MCItem:
    """HellaSwag: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``."""
    ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
    return MCItem(
        context=hellaswag_preprocess(rec["activity_label"] + ": " + ctx),
        choices=tuple(hellaswag_preprocess(e) for e in rec["endings"]),
        gold=int(rec["label"]),
        id=str(f"hellaswag-val-{rec['source_index']}" if id is None else id),
    )


def format_piqa(rec: Mapping[str, Any], id: str | None = None) -> MCItem:
    """PIQA: ``"Question: {goal}\\nAnswer:"``, choices ``[sol1, sol2]``."""
    return MCItem(
        context=f"Question: {rec['goal']}\nAnswer:",
        choices=(rec["sol1"], rec["sol2"]),
        gold=int(rec["label"]),
        id=str(f"piqa-val-{rec['source_index']}" if id is None else id),
    )


def format_boolq(rec: Mapping[str, Any], id: str | None = None) -> MCItem:
    """BoolQ: ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices ``["no", "yes"]``."""
    return MCItem(
        context=f"{rec['passage']}\nQuestion: {rec['question']}?\nAnswer:",
        choices=("no", "yes"),
        gold=1 if bool(rec["answer"]) else 0,
        id=str(f"boolq-val-{rec['source_index']}" if id is None else id),
    )


def format_lambada(rec: Mapping[str, Any], id: str | None = None) -> ClozeItem:
    """LAMBADA (OpenAI version): context = text minus last word, target = last word."""
    return ClozeItem(
        context=rec["context"],
        target=rec["target"],
        id=str(f"lambada-{rec['source_index']}" if id is None else id),
    )


def format_humaneval_prompt(rec: Mapping[str, Any]) -> str:
    """HumanEval: the bare ``prompt`` (signature + docstring), as in the harness."""
    return rec["prompt"]


def format_mbpp_prompt(rec: Mapping[str, Any]) -> str:
    """MBPP, lm-evaluation-harness ``mbpp`` doc_to_text (the prompt ends with ``[BEGIN]\\n``)."""
    t = list(rec["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {rec['text']} "
        f"Your code should pass these tests:\n\n{t[0]}\n{t[1]}\n{t[2]}\n[BEGIN]\n"
    )


def format_gsm8k_prompt(rec: Mapping[str, Any]) -> str:
    """GSM8K, lm-evaluation-harness ``gsm8k`` doc_to_text (zero-shot)."""
    return f"Question: {rec['question']}\nAnswer:"


# --------------------------------------------------------------------------- registries
_MC_TASKS: dict[str, tuple[str, Callable[[Mapping[str, Any]], MCItem]]] = {
    "arc_easy": ("arc_easy.parquet", format_arc),
    "arc_challenge": ("arc_challenge.parquet", format_arc),
    "hellaswag": ("hellaswag.parquet", format_hellaswag),
    "piqa": ("piqa.parquet", format_piqa),
    "boolq": ("boolq.parquet", format_boolq),
    "openbookqa": ("openbookqa.parquet", format_openbookqa),
}

_CLOZE_TASKS: dict[str, tuple[str, Callable[[Mapping[str, Any]], ClozeItem]]] = {
    "lambada": ("lambada.parquet", format_lambada),
}

_GEN_TASKS: dict[str, tuple[str, Callable[[Mapping[str, Any]], str]]] = {
    "humaneval": ("humaneval.parquet", format_humaneval_prompt),
    "mbpp": ("mbpp.parquet", format_mbpp_prompt),
    "gsm8k": ("gsm8k.parquet", format_gsm8k_prompt),
}


def list_mc_tasks() -> list[str]:
    return list(_MC_TASKS)


def _load(registry: Mapping[str, tuple[str, Callable]], kind: str, name: str, limit: int | None) -> list:
    """The formatted records of a bundled task: ``registry[name]`` is (file, formatter)."""
    _check_name(kind, name, list(registry))
    filename, fmt = registry[name]
    return [fmt(r) for r in _apply_limit(list(_read_rows(filename)), limit, f"task {name!r}")]


def load_mc_task(name: str, limit: int | None = None) -> list[MCItem]:
    """Harness-formatted multiple-choice items of a bundled task (file order)."""
    return _load(_MC_TASKS, "multiple-choice task", name, limit)


def list_cloze_tasks() -> list[str]:
    return list(_CLOZE_TASKS)


def load_cloze_task(name: str, limit: int | None = None) -> list[ClozeItem]:
    return _load(_CLOZE_TASKS, "cloze task", name, limit)


def list_generation_tasks() -> list[str]:
    return list(_GEN_TASKS)


def load_generation_prompts(name: str, limit: int | None = None) -> list[str]:
    """Prompts for long-decode workloads (humaneval, mbpp, gsm8k), file order."""
    return _load(_GEN_TASKS, "generation task", name, limit)
