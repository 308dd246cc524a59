"""Cached loaders: models with ``st.cache_resource`` (shared, never mutated per session), tables with ``st.cache_data``.

A loaded model is shared by every session.  Sessions never change it: sparse settings
travel in :func:`topθ_core.integration.sparse_run`'s ContextVar, which is per thread, and
Streamlit runs each session's script in its own thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from topθ_core.models import BUNDLED, LoadedModel, load_model
from topθ_core.thresholds import Thresholds, load_thresholds

from . import analysis, bench_results, kernel_headline, runs

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def default_model_spec() -> str:
    """``$TOPTHETA_APP_MODEL`` (a local checkpoint, e.g. a tiny test model) or the bundled model."""
    return os.environ.get("TOPTHETA_APP_MODEL", "").strip() or BUNDLED


def available_devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dtypes_for(device: str) -> list[str]:
    return ["float32", "bfloat16", "float16"] if device == "cuda" else ["float32", "bfloat16"]


def app_threads() -> int:
    """Torch threads for the app's model work: ``$TOPTHETA_APP_THREADS``, else one core fewer than the machine
    has (at least 1), so the browser and the app server keep a core.  On the 2-core box a 20-item evaluation in
    the app took 16.8 s with one thread and 18.9 s with two (one-off runs, benchmarks/results/app_speed.md; the
    14-20x slowdown once blamed on threads was Streamlit's full garbage collection after every rerun, turned
    off in ``.streamlit/config.toml``)."""
    env = os.environ.get("TOPTHETA_APP_THREADS", "").strip()
    return max(1, int(env)) if env.isdigit() else max(1, (os.cpu_count() or 2) - 1)


@st.cache_resource(show_spinner=False)
def configure_threads() -> int:
    """Set torch's thread count once per app process (:func:`app_threads`); returns it."""
    import torch

    n = app_threads()
    torch.set_num_threads(n)
    return n


@st.cache_resource(show_spinner=False, max_entries=4)
def get_model(spec: str, device: str, dtype: str) -> LoadedModel:
    """One :class:`LoadedModel` per (spec, device, dtype), shared by every session."""
    import torch

    return load_model(spec, device=device, dtype=getattr(torch, DTYPES[dtype]))


@st.cache_resource(show_spinner=False, max_entries=32)
def get_thresholds(path: str, mtime: float) -> Thresholds:
    """A threshold artifact, read once per (path, mtime); shared read-only."""
    return load_thresholds(path)


@st.cache_data(show_spinner=False, max_entries=32)
def threshold_frame(path: str, mtime: float) -> pd.DataFrame:
    return get_thresholds(path, mtime).to_frame()


def artifact_mtime(path: str | Path) -> float:
    try:
        return (Path(path) / "meta.json").stat().st_mtime
    except OSError:
        return 0.0


@st.cache_data(show_spinner=False, max_entries=8)
def _list_runs(root: str, signature: tuple) -> pd.DataFrame:
    return runs.list_runs(Path(root))


def list_runs() -> pd.DataFrame:
    root = runs.runs_dir()
    return _list_runs(str(root), runs.runs_signature(root))


@st.cache_data(show_spinner=False, max_entries=64)
def bundled_texts(kind: str, name: str, limit: int) -> list[str]:
    return analysis.bundled_texts(kind, name, limit)


@st.cache_data(show_spinner=False)
def sample_prompts() -> dict[str, str]:
    return analysis.sample_prompts()


@st.cache_data(show_spinner=False, max_entries=4)
def _bench_results(signature: tuple) -> list:
    return bench_results.list_results()


def _bench_signature() -> tuple:
    root = bench_results.RESULTS_DIR
    return tuple((str(p), p.stat().st_mtime) for p in bench_results.result_paths(root))


def benchmark_results() -> list:
    """Saved benchmark results (no logs), re-read only when one of those files changes."""
    return _bench_results(_bench_signature())


@st.cache_data(show_spinner=False, max_entries=4)
def _kernel_headline(signature: tuple) -> pd.DataFrame:
    return kernel_headline.headline(bench_results.RESULTS_DIR)


def kernel_headline_table() -> pd.DataFrame:
    """The Kernels headline (:func:`explorer_ui.kernel_headline.headline`), re-read when a result file changes."""
    return _kernel_headline(_bench_signature())


@st.cache_data(show_spinner=False, max_entries=8)
def _run_ids(root: str, signature: tuple) -> dict[str, str]:
    return runs.run_thresholds_ids(Path(root))


def run_thresholds_ids() -> dict[str, str]:
    """{thresholds_id: run name} of the saved runs (names the threshold set of a saved evaluation result)."""
    root = runs.runs_dir()
    return _run_ids(str(root), runs.runs_signature(root))


def _results_signature() -> tuple:
    d = runs.results_folder()
    if not d.is_dir():
        return ()
    return tuple(sorted((p.name, s.st_mtime_ns, s.st_size) for p in d.glob("*.parquet") for s in [p.stat()]))


@st.cache_data(show_spinner=False, max_entries=4)
def _saved_results(folder: str, signature: tuple) -> pd.DataFrame:
    from topθ_core.evaluation import load_results

    return load_results(folder)


def saved_results() -> pd.DataFrame:
    """Every saved evaluation result row (:func:`topθ_core.evaluation.load_results`), re-read only when a
    file of the results folder changes, not on every rerun."""
    return _saved_results(str(runs.results_folder()), _results_signature())


@st.cache_data(show_spinner=False, max_entries=4)
def _saved_result_files(folder: str, signature: tuple, names: tuple) -> pd.DataFrame:
    return runs.result_files(Path(folder), dict(names))


def saved_result_files() -> pd.DataFrame:
    """One row per saved result file (:func:`explorer_ui.runs.result_files`), re-read when the folder changes."""
    return _saved_result_files(str(runs.results_folder()), _results_signature(),
                               tuple(sorted(run_thresholds_ids().items())))


@st.cache_resource(show_spinner=False, max_entries=8)
def paired_task(model_key: str, task: str, limit: int, options_json: str, _lm: LoadedModel):
    """An evaluation task built for this model (items tokenized once), shared by the reruns of every session:
    building one tokenizes every item (0.3-0.5 s for 500 items in a review's one-off timing), which each
    Accuracy rerun did."""
    import json

    from topθ_core.evaluation import build_task

    return build_task(_lm, task, limit, **json.loads(options_json))


@st.cache_resource(show_spinner=False, max_entries=8)
def dense_cache(model_key: str, results_dir: str, _lm: LoadedModel):
    """The on-disk dense cache of one model (``model_key`` names it), shared by every session of this process."""
    from topθ_core.evaluation import dense_cache_for

    return dense_cache_for(_lm, results_dir)


@st.cache_resource(show_spinner=False)
def measured_rates() -> dict:
    """Tokens/s measured by finished evaluations, ``{(model key, task kind): {"dense": r, "sparse": r}}``,
    shared by every session (the estimate shown before Run)."""
    return {}
