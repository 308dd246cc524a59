"""The bundled evaluation data as lm-evaluation-harness tasks, offline.

``lm_eval ... --include_path TASKS_DIR --tasks toptheta_arc_easy`` (or ``--tasks
toptheta_bundled`` for all of them).  Each YAML here is lm-eval 0.4.13's own task
configuration (``doc_to_text``, ``doc_to_target``, ``doc_to_choice``, ``process_docs``,
metrics, version), with two changes: the documents come from ``data/*.parquet`` through
:func:`load_bundled` (``custom_dataset``; no hub access), and the evaluated split is the one
bundled (``data/README.md``: ARC, OpenBookQA, PIQA, BoolQ and HellaSwag validation, LAMBADA
test; HellaSwag, BoolQ and LAMBADA are seeded subsets).  :func:`load_bundled` turns each
bundled row back into the upstream data set's schema, so lm-eval formats it itself.
``tests/test_lm_eval.py`` checks that every prompt equals what lm-eval's own task YAML makes
of the same documents, and equals :mod:`topθ_core.tasks`' formatting (what the app scores).

:func:`upstream_config` is lm-eval's own YAML of a task pointed at the same bundled documents,
:func:`requests` what a task config asks the model and :func:`harness_requests` what
:mod:`topθ_core.evaluation` scores for the same items, so the three can be compared.
``python -m topθ_core.lm_eval_tasks`` prints :data:`TASKS_DIR`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["TASKS_DIR", "TASKS", "load_bundled", "upstream_config", "requests", "harness_requests"]

#: The folder to pass to lm-eval's ``--include_path``.
TASKS_DIR: Path = Path(__file__).resolve().parent


def _arc(r: Mapping[str, Any]) -> dict:  # allenai/ai2_arc
    return {"id": r["id"], "question": r["question"], "answerKey": r["answerKey"],
            "choices": {"text": list(r["choices_text"]), "label": list(r["choices_label"])}}


def _openbookqa(r: Mapping[str, Any]) -> dict:  # allenai/openbookqa, main
    return {"id": r["id"], "question_stem": r["question_stem"], "answerKey": r["answerKey"],
            "choices": {"text": list(r["choices_text"]), "label": list(r["choices_label"])}}


def _hellaswag(r: Mapping[str, Any]) -> dict:  # Rowan/hellaswag (its label is a string there)
    return {"ind": r["ind"], "activity_label": r["activity_label"], "ctx_a": r["ctx_a"], "ctx_b": r["ctx_b"],
            "ctx": r["ctx"], "endings": list(r["endings"]), "source_id": r["source_id"], "split": "val",
            "split_type": r["split_type"], "label": str(r["label"]), "source_index": r["source_index"]}


def _piqa(r: Mapping[str, Any]) -> dict:  # baber/piqa
    return {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"]),
            "source_index": r["source_index"]}


def _boolq(r: Mapping[str, Any]) -> dict:  # aps/super_glue, boolq
    return {"question": r["question"], "passage": r["passage"], "idx": r["source_index"],
            "label": int(bool(r["answer"]))}


def _lambada(r: Mapping[str, Any]) -> dict:  # EleutherAI/lambada_openai: the passage; lm-eval splits off its last word
    return {"text": r["context"] + " " + r["target"], "source_index": r["source_index"]}


#: bundled name → (parquet file, split it is, row → upstream document)
_BUNDLED: dict[str, tuple[str, str, Callable[[Mapping[str, Any]], dict]]] = {
    "arc_easy": ("arc_easy.parquet", "validation", _arc),
    "arc_challenge": ("arc_challenge.parquet", "validation", _arc),
    "openbookqa": ("openbookqa.parquet", "validation", _openbookqa),
    "hellaswag": ("hellaswag.parquet", "validation", _hellaswag),
    "piqa": ("piqa.parquet", "validation", _piqa),
    "boolq": ("boolq.parquet", "validation", _boolq),
    "lambada_openai": ("lambada.parquet", "test", _lambada),
}

#: our task name → (bundled data, the lm-eval 0.4.13 task YAML it copies, under lm_eval/tasks/; the task is
#: upstream's of the same name as the bundled data)
TASKS: dict[str, tuple[str, str]] = {
    "toptheta_arc_easy": ("arc_easy", "arc/arc_easy.yaml"),
    "toptheta_arc_challenge": ("arc_challenge", "arc/arc_challenge.yaml"),
    "toptheta_openbookqa": ("openbookqa", "openbookqa/openbookqa.yaml"),
    "toptheta_hellaswag": ("hellaswag", "hellaswag/hellaswag.yaml"),
    "toptheta_piqa": ("piqa", "piqa/piqa.yaml"),
    "toptheta_boolq": ("boolq", "super_glue/boolq/default.yaml"),
    "toptheta_lambada_openai": ("lambada_openai", "lambada/lambada_openai.yaml"),
}


def load_bundled(bundled_task: str, **_task_metadata):
    """lm-eval ``custom_dataset``: the bundled rows of ``bundled_task`` as a ``datasets.DatasetDict``
    with one split (``validation``, LAMBADA ``test``), in upstream schema and file order.

    lm-eval passes the task's metadata (with ``--model_args`` merged in) as keywords; they are ignored.
    """
    import datasets
    import pyarrow.parquet as pq

    from ..paths import bundled_file

    if bundled_task not in _BUNDLED:
        raise ValueError(f"unknown bundled task {bundled_task!r}; available: {', '.join(_BUNDLED)}")
    filename, split, to_doc = _BUNDLED[bundled_task]
    path = bundled_file(filename)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild the bundled data with `python scripts/build_data.py`")
    docs = [to_doc(r) for r in pq.read_table(path).to_pylist()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


def upstream_config(name: str) -> dict:
    """lm-eval's own task configuration for our task ``name`` (its installed YAML, ``!function``
    helpers resolved), pointed at the bundled documents and split instead of the hub."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    bundled, yaml_path = TASKS[name]
    cfg = load_yaml(Path(lm_eval.__file__).resolve().parent / "tasks" / yaml_path)
    split = _BUNDLED[bundled][1]
    cfg.update(custom_dataset=load_bundled, dataset_kwargs={"bundled_task": bundled}, training_split=None,
               validation_split="validation" if split == "validation" else None,
               test_split="test" if split == "test" else None)
    return cfg


def requests(config: dict, limit: int | None = None):
    """``(task, [(doc_id, (context, continuation)), ...])``: every log-likelihood request lm-eval
    builds from a task config (zero-shot) on its first ``limit`` documents (all with ``None``)."""
    from lm_eval.api.task import ConfigurableTask

    task = ConfigurableTask(config=config)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task, sorted(((i.doc_id, i.arguments) for i in task.instances), key=lambda r: r[0])


def harness_requests(name: str, limit: int | None = None) -> list[tuple[int, tuple[str, str]]]:
    """``[(item, (context, continuation)), ...]`` that :mod:`topθ_core.evaluation` scores for our task
    ``name`` (:mod:`topθ_core.tasks`' formatting), in the same order as :func:`requests`."""
    from ..tasks import TARGET_DELIMITER, load_cloze_task, load_mc_task

    bundled = TASKS[name][0]
    if _BUNDLED[bundled][1] == "test":  # LAMBADA
        return [(i, (x.context, TARGET_DELIMITER + x.target)) for i, x in enumerate(load_cloze_task("lambada", limit))]
    return [(i, (x.context, c)) for i, x in enumerate(load_mc_task(bundled, limit)) for c in x.continuations()]
