"""Top-θ as an lm-evaluation-harness backend, the offline task configs, and agreement of our
accuracy harness (topθ_core.evaluation) with lm-eval's own scoring on the same items.

References are lm-eval 0.4.13 itself: its task YAMLs (prompts) and its ``hf`` backend (HFLM on a
plain transformers copy of the checkpoint, no Top-θ code).  A tiny random Llama keeps most tests
fast; one slow test repeats the agreement on the bundled SmolLM2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lm_eval  # the test extra installs it: a missing lm-eval fails here rather than skipping
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from topθ_core.config import SDC, ConfigError, KSchedule, Placement, Selection, SparseConfig
from topθ_core.lm_eval_model import TopThetaLM, sample_table, sparse_config_from_args
from topθ_core.lm_eval_tasks import TASKS, TASKS_DIR, harness_requests, requests, upstream_config

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS_DIR))


# --------------------------------------------------------------------------- registration
def test_backend_registered_and_declared():
    import tomllib
    from importlib.metadata import EntryPoint

    assert get_model("toptheta") is TopThetaLM
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    value = project["entry-points"]["lm_eval.models"]["toptheta"]  # lm-eval's plugin group (releases after 0.4.13)
    assert EntryPoint("toptheta", value, "lm_eval.models").load() is TopThetaLM
    assert project["scripts"]["toptheta-lm-eval"] == "topθ_core.lm_eval_model:main"
    lm_eval_req = [r for r in project["optional-dependencies"]["lmeval"] if r.startswith("lm-eval")]
    assert lm_eval_req == [f"lm-eval=={lm_eval.__version__}"]  # pinned to the version these tests ran against
    assert any(r.startswith("toptheta-explorer[") and "lmeval" in r for r in project["optional-dependencies"]["test"])


def test_every_sparse_config_field_is_a_model_argument():
    """Each field, given as lm-eval hands it over (a string, number or bool), sets that field."""
    import enum

    base = SparseConfig(selection=Selection.TOP_K, k=KSchedule(32))
    for f in dataclasses.fields(SparseConfig):
        value = getattr(base, f.name)
        arg = value.value if isinstance(value, enum.Enum) else value.default if isinstance(value, KSchedule) else value
        got = sparse_config_from_args(**{"selection": "top-k", "k": 32, f.name: arg})
        assert getattr(got, f.name) == value, f.name
    with pytest.raises(ConfigError, match="not SparseConfig fields"):
        sparse_config_from_args(sdc_scal=2.0)


def test_model_args_build_the_config():
    # defaults: the engine's (exact SDC + VMC, pre-softmax, the paper's k schedule)
    assert sparse_config_from_args(selection="top-k") == SparseConfig(selection=Selection.TOP_K)
    cfg = sparse_config_from_args(selection="top-k", k="32", layer_k="0:512;1:256", vmc="false", sdc="none",
                                  sink_tokens=0, capk=False)
    assert cfg == SparseConfig(selection=Selection.TOP_K, k=KSchedule.parse(32, "0:512,1:256"), sdc=SDC.NONE,
                               vmc=False)
    # post-softmax without an explicit SDC takes none, as `toptheta evaluate` does
    post = sparse_config_from_args(selection="top-k", placement="post")
    assert post.placement is Placement.POST and post.sdc is SDC.NONE and post.vmc
    # an explicit, invalid combination is refused, never adjusted
    with pytest.raises(ConfigError, match="SDC applies to pre-softmax"):
        sparse_config_from_args(selection="top-k", placement="post", sdc="exact")
    with pytest.raises(ConfigError, match="sdc='exactly'"):
        sparse_config_from_args(sdc="exactly")
    with pytest.raises(ConfigError, match="vmc must be true or false"):
        sparse_config_from_args(vmc="maybe")


# --------------------------------------------------------------------------- offline tasks
PROMPT_DOCS = 100  # per task in CI; benchmarks/lm_eval_agreement.py checks every bundled item


@pytest.mark.parametrize("name", list(TASKS))
def test_task_prompts_equal_lm_eval_and_our_harness(name):
    """Every request our task makes equals what lm-eval's own YAML makes of the same documents, and
    what topθ_core.evaluation scores (topθ_core.tasks' formatting); so do the gold answers."""
    from topθ_core.tasks import load_mc_task

    task, ours = requests(load_yaml(TASKS_DIR / f"{name.removeprefix('toptheta_')}.yaml"), PROMPT_DOCS)
    ref_task, ref = requests(upstream_config(name), PROMPT_DOCS)
    assert len(ours) > PROMPT_DOCS - 1 and ours == ref
    assert ours == harness_requests(name, PROMPT_DOCS)
    mine, theirs = task.config.to_dict(), ref_task.config.to_dict()
    for key in ("output_type", "target_delimiter", "fewshot_delimiter", "metric_list"):
        assert mine.get(key) == theirs.get(key), key
    assert mine["metadata"]["version"] == theirs["metadata"]["version"]
    if task.OUTPUT_TYPE == "multiple_choice":
        docs = list(task.eval_docs)[:PROMPT_DOCS]
        assert [task.doc_to_target(d) for d in docs] == [x.gold for x in load_mc_task(TASKS[name][0], PROMPT_DOCS)]


def test_tasks_found_by_name_and_tag(task_manager):
    assert sorted(task_manager.match_tasks(list(TASKS))) == sorted(TASKS)
    loaded = task_manager.load(["toptheta_bundled"])
    assert set(TASKS) <= set(loaded["tasks"])


# --------------------------------------------------------------------------- a tiny model, end to end
def _tiny_lm(seed: int, max_positions: int = 4096):
    from topθ_core.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama", seed=seed, max_position_embeddings=max_positions)
    model.config.bos_token_id, model.config.eos_token_id = 0, 1
    return model, tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A saved tiny Llama (positions for every bundled prompt), loaded in float64, and its thresholds (k=8).

    float64 so that no attention score lands within rounding of θ: in float32 two correct
    computations of one row (batched or not, masked or not) round scores differently, and an
    element that close to θ is kept by one and dropped by the other.
    """
    from topθ_core import CalibrationConfig, calibrate
    from topθ_core.models import load_model
    from topθ_core.tasks import load_corpus

    path = tmp_path_factory.mktemp("tiny-llama-lm-eval")
    model, tok = _tiny_lm(0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    lm = load_model(str(path), dtype=torch.float64)
    th = calibrate(lm, [d[:800] for d in load_corpus("lambada")[:3]], CalibrationConfig(k=KSchedule(8), tac=True))
    th_dir = th.save(path / "thresholds")
    return path, th_dir, lm


def _lm_eval(model, task_manager, tasks, limit):
    out = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, log_samples=True, num_fewshot=0,
                                  task_manager=task_manager, bootstrap_iters=0)
    return {t: sample_table(out["samples"][t]) for t in tasks}, out


def _hf(path, dtype=torch.float32, batch_size=4):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()  # no Top-θ code
    return HFLM(pretrained=plain, tokenizer=AutoTokenizer.from_pretrained(path), batch_size=batch_size)


def _ours(lm, task, limit, config, thresholds):
    from topθ_core.evaluation import run_task

    return run_task(lm, task, limit, config, thresholds).items.reset_index(drop=True)


def _assert_mc_equal(lm_eval_table, ours_items, arm, bundled, atol):
    """Per item: every choice's log-likelihood within ``atol``; acc and acc_norm equal wherever the
    decision is not within ``atol`` of a tie (a closer call is not decided by these numbers)."""
    from topθ_core.tasks import load_mc_task

    items = load_mc_task(bundled, len(ours_items))
    assert len(lm_eval_table) == len(ours_items)
    for i, row in lm_eval_table.iterrows():
        ll = np.asarray(ours_items.loc[i, f"{arm}_ll"])
        print(f"{bundled} doc {i}: max |Δll| {np.abs(ll - row['ll']).max():.2e}")
        np.testing.assert_allclose(row["ll"], ll, atol=atol, rtol=0)
        for metric, score in (("acc", ll), ("acc_norm", ll / np.array([len(c) for c in items[i].choices]))):
            top2 = np.sort(score)[-2:]
            if top2[1] - top2[0] > 2 * atol:
                assert row[metric] == ours_items.loc[i, f"{arm}_{metric}"], (i, metric)


def test_tiny_model_agrees_with_lm_eval(tiny_ckpt, task_manager):
    """hf ≡ our dense harness; toptheta(selection=dense) ≡ hf; toptheta(Top-θ) ≡ our sparse harness,
    per item, on multiple-choice and cloze tasks."""
    path, th_dir, lm = tiny_ckpt
    tasks, n = ["toptheta_arc_easy", "toptheta_hellaswag", "toptheta_lambada_openai"], 3
    hf, _ = _lm_eval(_hf(path, torch.float64), task_manager, tasks, n)
    dense, _ = _lm_eval(TopThetaLM(pretrained=lm, selection="dense", batch_size=4), task_manager, tasks, n)
    tt_model = TopThetaLM(pretrained=lm, thresholds=str(th_dir), batch_size=4)
    tt, out = _lm_eval(tt_model, task_manager, tasks, n)
    assert 0 < out["config"]["kept_attention_prefill"] < 1  # Top-θ acted, and lm-eval's results say how much
    assert out["config"]["toptheta_config"] == tt_model.sparse_config.label() and tt_model.thresholds is not None
    for t in tasks:
        assert dense[t]["ll"].tolist() == hf[t]["ll"].tolist()  # the same sdpa on the same weights: bit for bit
    for bundled in ("arc_easy", "hellaswag"):
        ours = _ours(lm, bundled, n, tt_model.sparse_config, tt_model.thresholds)
        _assert_mc_equal(hf[f"toptheta_{bundled}"], ours, "dense", bundled, 1e-4)
        _assert_mc_equal(tt[f"toptheta_{bundled}"], ours, "sparse", bundled, 1e-4)
        assert any(not np.allclose(a, b, atol=1e-3) for a, b in zip(ours["dense_ll"], ours["sparse_ll"]))
    ours = _ours(lm, "lambada", n, tt_model.sparse_config, tt_model.thresholds)
    for table, arm in ((hf, "dense"), (tt, "sparse")):
        t = table["toptheta_lambada_openai"]
        np.testing.assert_allclose([ll[0] for ll in t["ll"]], ours[f"{arm}_ll"], atol=1e-4, rtol=0)
        assert [float(g[0]) for g in t["greedy"]] == ours[f"{arm}_acc"].tolist()


def test_thresholds_of_another_model_refused(tiny_ckpt, tmp_path):
    from topθ_core.thresholds import ThresholdsError

    _, th_dir, _ = tiny_ckpt
    other = tmp_path / "other"
    model, tok = _tiny_lm(1)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(ThresholdsError, match="calibrated for") as e:
        TopThetaLM(pretrained=str(other), thresholds=str(th_dir), device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="does not take model argument"):
        TopThetaLM(pretrained=str(other), selection="top-k", sdc_scal=2.0, device="cpu")


def test_command_line_offline(tiny_ckpt, tmp_path):
    """`toptheta-lm-eval run --model toptheta ...` in a fresh process with the hub switched off:
    results and per-sample logs on disk, the Top-θ config and kept fraction in the results."""
    path, th_dir, _ = tiny_ckpt
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    args = ["run", "--model", "toptheta", "--model_args", f"pretrained={path},thresholds={th_dir},sdc=exact,vmc=true",
            "--device", "cpu", "--include_path", str(TASKS_DIR), "--tasks", "toptheta_arc_easy,toptheta_lambada_openai",
            "--limit", "2", "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    p = subprocess.run([sys.executable, "-c", "from topθ_core.lm_eval_model import main; main()", *args], env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(f.read_text()) for f in out.rglob("results_*.json")]
    assert len(results) == 1
    r = results[0]
    assert set(r["results"]) == {"toptheta_arc_easy", "toptheta_lambada_openai"}
    assert r["results"]["toptheta_arc_easy"]["sample_len"] == 2 and "acc_norm,none" in r["results"]["toptheta_arc_easy"]
    assert r["config"]["toptheta_config"].startswith("top-theta k=8") and 0 < r["config"]["kept_attention_prefill"] <= 1
    assert len(list(out.rglob("samples_toptheta_arc_easy_*.jsonl"))) == 1


def test_command_line_refuses_thresholds_of_another_model(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """One line on stderr and exit status 2 (lm-eval's default device, cuda:0, falls back to the CPU)."""
    _, th_dir, _ = tiny_ckpt
    from topθ_core.lm_eval_model import main

    other = tmp_path / "other"
    model, tok = _tiny_lm(1)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    monkeypatch.setattr(sys, "argv", ["toptheta-lm-eval", "run", "--model", "toptheta", "--model_args",
                                      f"pretrained={other},thresholds={th_dir}", "--include_path", str(TASKS_DIR),
                                      "--tasks", "toptheta_arc_easy", "--limit", "1"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("toptheta-lm-eval: error: these thresholds were calibrated for"), err[-5:]


# --------------------------------------------------------------------------- a known disagreement
def test_tokenizer_that_adds_bos_agrees_with_lm_eval(task_manager, tmp_path):
    """A tokenizer whose default adds BOS (Llama 2/3): lm-eval scores ``BOS + context``; so must we."""
    from tokenizers.processors import TemplateProcessing

    from topθ_core.models import load_model

    model, tok = _tiny_lm(2)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    if reloaded("a").input_ids[0] != reloaded.bos_token_id:  # a setup failure must not pass as the known xfail
        pytest.fail("the test tokenizer does not add BOS", pytrace=False)
    hf, _ = _lm_eval(_hf(tmp_path), task_manager, ["toptheta_arc_easy"], 3)
    ours = _ours(load_model(str(tmp_path)), "arc_easy", 3, SparseConfig(selection=Selection.TOP_K, k=KSchedule(4096)),
                 None)
    _assert_mc_equal(hf["toptheta_arc_easy"], ours, "dense", "arc_easy", 1e-4)


# --------------------------------------------------------------------------- the bundled model
@pytest.mark.slow
def test_smollm2_agrees_with_lm_eval(smollm2, task_manager, tmp_path):
    """The bundled SmolLM2 in float32: per item, lm-eval's hf backend and our dense harness give the
    same log-likelihoods, acc and acc_norm; toptheta(dense) is hf; toptheta(Top-θ, k=16) is our
    sparse harness (to 1e-2: an element within float32 rounding of θ may be kept by one and not
    the other; benchmarks/results/lm_eval_agreement.md)."""
    from topθ_core import CalibrationConfig, calibrate
    from topθ_core.tasks import load_corpus

    th = calibrate(smollm2, [d[:600] for d in load_corpus("pydoc")[0:4:2]],
                   CalibrationConfig(k=KSchedule.parse(16, "0:512,1:512"), tac=True))
    tt_model = TopThetaLM(pretrained=smollm2, thresholds=str(th.save(tmp_path / "k16")), batch_size=8)
    hf_model = _hf(smollm2.model.name_or_path, batch_size=8)  # the same batches as toptheta's: bit for bit
    dense_model = TopThetaLM(pretrained=smollm2, selection="dense", batch_size=8)
    for bundled, n in {"arc_easy": 10, "hellaswag": 4}.items():
        name = f"toptheta_{bundled}"
        hf, _ = _lm_eval(hf_model, task_manager, [name], n)
        dense, _ = _lm_eval(dense_model, task_manager, [name], n)
        tt, _ = _lm_eval(tt_model, task_manager, [name], n)
        ours = _ours(smollm2, bundled, n, tt_model.sparse_config, tt_model.thresholds)
        assert dense[name]["ll"].tolist() == hf[name]["ll"].tolist()
        _assert_mc_equal(hf[name], ours, "dense", bundled, 2e-4)
        _assert_mc_equal(tt[name], ours, "sparse", bundled, 1e-2)
        assert max(np.abs(np.subtract(d, s)).max() for d, s in zip(ours["dense_ll"], ours["sparse_ll"])) > 1e-2


def test_app_accuracy_page_shows_lm_evals_numbers(tiny_ckpt, task_manager, tmp_path, monkeypatch):
    """The Accuracy page, on the same model, task, items and config, shows what lm-eval computes: per item
    (the page's own result) and in its table (acc, acc_norm of both arms)."""
    pytest.importorskip("streamlit")
    import time

    from streamlit.testing.v1 import AppTest

    from topθ_core.models import load_model

    path, _, _ = tiny_ckpt
    monkeypatch.setenv("TOPTHETA_APP_MODEL", str(path))
    monkeypatch.setenv("TOPTHETA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("TOPTHETA_RESULTS_DIR", str(tmp_path / "results"))
    at = AppTest.from_file("e2e/app_entry.py", default_timeout=120).run()
    at.switch_page(str(Path(__file__).resolve().parents[1] / "pages" / "accuracy.py")).run()
    at.radio(key="acc_selection").set_value("top-k").run()
    at.number_input(key="acc_k").set_value(4)
    at.number_input(key="acc_limit").set_value(3)
    at.button(key="acc_run").click().run()
    job = at.session_state["app_jobs"].latest("accuracy")
    t0 = time.monotonic()
    while job.active:
        assert time.monotonic() - t0 < 120
        time.sleep(0.1)
    at.run()
    assert not at.exception and job.error is None, job.error
    result = job.result["update"].results[0]
    shown = at.dataframe[0].value.set_index("metric")
    lm = load_model(str(path))  # as the app loads it: float32
    tt, _ = _lm_eval(TopThetaLM(pretrained=lm, selection="top-k", k=4, sdc="exact", vmc=True, batch_size=4),
                     task_manager, ["toptheta_arc_easy"], 3)
    hf, _ = _lm_eval(_hf(path, torch.float32), task_manager, ["toptheta_arc_easy"], 3)
    items = result.items.reset_index(drop=True)
    _assert_mc_equal(hf["toptheta_arc_easy"], items, "dense", "arc_easy", 1e-3)
    _assert_mc_equal(tt["toptheta_arc_easy"], items, "sparse", "arc_easy", 1e-3)
    for metric in ("acc", "acc_norm"):
        assert shown.loc[metric, "dense"] == pytest.approx(items[f"dense_{metric}"].mean())
        assert shown.loc[metric, "Top-θ"] == pytest.approx(items[f"sparse_{metric}"].mean())
