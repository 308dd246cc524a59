"""Saved benchmark results under ``benchmarks/results/`` (pure: no Streamlit).

Tables (``.csv``, ``.parquet``, ``.jsonl``, ``.json``) are read into DataFrames; Markdown
reports are returned as text.  The card a result came from is read from a ``device``,
``card``, ``gpu`` or ``device_name`` column (or a JSON field of that name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
CARD_COLUMNS = ("card", "device_name", "gpu", "device")
TABLE_EXT = (".csv", ".parquet", ".jsonl", ".json")


@dataclass
class ResultFile:
    path: Path
    kind: str  # "table" | "markdown"
    table: pd.DataFrame | None = None
    text: str | None = None
    error: str | None = None

    @property
    def cards(self) -> list[str]:
        if self.table is None:
            return []
        for c in CARD_COLUMNS:
            if c in self.table.columns:
                return sorted({str(x) for x in self.table[c].dropna().unique()})
        return []


def read_result(path: Path) -> ResultFile:
    path = Path(path)
    try:
        if path.suffix == ".md":
            return ResultFile(path, "markdown", text=path.read_text())
        if path.suffix == ".csv":
            df = pd.read_csv(path)
        elif path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix == ".jsonl":
            df = pd.read_json(path, lines=True)
        else:
            obj = json.loads(path.read_text())
            df = pd.json_normalize(obj if isinstance(obj, list) else obj.get("rows", [obj]))
        return ResultFile(path, "table", table=df)
    except Exception as e:  # a malformed file is reported, not raised
        return ResultFile(path, "table", error=f"{path.name}: cannot be read ({type(e).__name__}: {e})")


def result_paths(root: Path | None = None) -> list[Path]:
    """The result files under ``root``: tables and Markdown reports, sorted; development logs (anything
    under a ``logs/`` folder, ``*.log``) and other files (``.html``) are left out."""
    root = Path(root or RESULTS_DIR)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix in TABLE_EXT or p.suffix == ".md")
                  and "logs" not in p.relative_to(root).parts[:-1])


def list_results(root: Path | None = None) -> list[ResultFile]:
    return [read_result(p) for p in result_paths(root)]


def numeric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]


def find_benchmark_script(root: Path | None = None) -> Path | None:
    """The kernel benchmark script the Kernels page runs when CUDA is present."""
    bench = (root or ROOT) / "benchmarks"
    for name in ("bench_kernels.py", "kernel_bench.py", "benchmark_kernels.py", "kernels.py"):
        if (bench / name).is_file():
            return bench / name
    hits = sorted(bench.glob("*kernel*.py")) if bench.is_dir() else []
    return hits[0] if hits else None


def default_axes(df: pd.DataFrame) -> tuple[str | None, str | None, str | None]:
    """Sensible (x, y, group) defaults for a benchmark table: speed-up against the kept fraction per kernel."""
    nums = numeric_columns(df)
    others = [c for c in df.columns if c not in nums]
    pick = lambda prefs, pool: next((c for c in prefs if c in pool), None)  # noqa: E731
    y = pick(("speedup", "speedup_graph", "ours_ms", "ms", "tokens_per_s"), nums) or (nums[1] if len(nums) > 1 else None)
    x = pick(("f_kept_v", "f_target", "f_kept_elems", "N", "seq_len", "n"), [c for c in nums if c != y]) or \
        next((c for c in nums if c != y), None)
    group = pick(("kernel", "variant", "data", "config"), others)
    return x, y, group
