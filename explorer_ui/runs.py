"""Saved calibration runs: ``<runs dir>/<name>/`` holding a :class:`~topθ_core.thresholds.Thresholds` artifact.

Pure functions (no Streamlit).  The runs folder is ``$TOPTHETA_RUNS_DIR`` when set, else
``data/runs/`` beside the engine's data folder.  Artifacts are written by
:meth:`Thresholds.save`, which is atomic, so a cancelled or failed run leaves nothing behind;
folders whose name starts with a dot (its temporary folders) are never listed.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import zipfile
from pathlib import Path

import pandas as pd

from topθ_core.thresholds import META_FILE, TABLE_FILE, Thresholds

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")

RUN_COLUMNS = ["name", "model", "digest", "k", "sigma", "placement", "tac", "data", "documents", "tokens",
               "rows_sampled", "created", "path", "mtime"]


def runs_dir() -> Path:
    env = os.environ.get("TOPTHETA_RUNS_DIR")
    if env:
        return Path(env)
    from topθ_core.models import DATA_DIR

    return Path(DATA_DIR) / "runs"


def validate_run_name(name: str) -> str:
    """A run name usable as a folder name; raises ``ValueError`` saying what is wrong."""
    name = (name or "").strip()
    if not name:
        raise ValueError("give the run a name")
    if not _NAME_RE.match(name):
        raise ValueError(f"run name {name!r} may use letters, digits, '.', '_' and '-' only "
                         "(at most 80, not starting with '.' or '-')")
    return name


def default_run_name(source: str, k: int, now: float | None = None) -> str:
    """e.g. ``pydoc-k64-20261127-203812``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source).strip("-").lower()[:30] or "data"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    return f"{slug}-k{k}-{stamp}"


def unique_run_name(base: str, root: Path | None = None) -> str:
    """``base`` or ``base-2``, ``base-3`` … whichever does not exist yet."""
    root = root or runs_dir()
    name, i = base, 2
    while (root / name).exists():
        name, i = f"{base}-{i}", i + 1
    return name


def read_meta(path: Path) -> dict | None:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def describe_k(k: dict | None) -> str:
    if not k:
        return "?"
    over = k.get("overrides") or {}
    text = f"k={k.get('default')}"
    if over:
        text += " [" + ",".join(f"{l}:{v}" for l, v in sorted(over.items(), key=lambda x: int(x[0]))) + "]"
    return text


def list_runs(root: Path | None = None) -> pd.DataFrame:
    """One row per readable artifact under ``root``, newest first."""
    root = root or runs_dir()
    rows = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") or not p.is_dir() or not (p / TABLE_FILE).is_file():
                continue
            meta = read_meta(p)
            if not meta or "model" not in meta:
                continue
            cal = meta.get("calibration") or {}
            rows.append({
                "name": p.name,
                "model": meta["model"].get("name", "?"),
                "digest": meta["model"].get("digest", ""),
                "k": describe_k(meta.get("k")),
                "sigma": meta.get("sigma"),
                "placement": meta.get("placement"),
                "tac": cal.get("tac"),
                "data": meta.get("data", ""),
                "documents": meta.get("documents"),
                "tokens": meta.get("tokens"),
                "rows_sampled": meta.get("rows_sampled"),
                "created": meta.get("created", ""),
                "path": str(p),
                "mtime": (p / META_FILE).stat().st_mtime,
            })
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return df.sort_values(["mtime", "name"], ascending=[False, True]).reset_index(drop=True)


def runs_signature(root: Path | None = None) -> tuple:
    """Cheap change detector for caching :func:`list_runs` (names and mtimes)."""
    root = root or runs_dir()
    if not root.is_dir():
        return ()
    out = []
    for p in root.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        try:
            out.append((p.name, (p / META_FILE).stat().st_mtime))
        except OSError:
            continue
    return tuple(sorted(out))


def provenance_lines(meta: dict) -> list[str]:
    """Human-readable provenance of an artifact's meta, one fact a line."""
    m = meta.get("model", {})
    cal = meta.get("calibration") or {}
    lines = [
        f"model: {m.get('name', '?')} ({m.get('n_layers', '?')} layers, {m.get('n_heads', '?')}/"
        f"{m.get('n_kv_heads', '?')} heads, digest {str(m.get('digest', ''))[:12]})",
        f"{describe_k(meta.get('k'))}, σ={meta.get('sigma')}, {meta.get('placement')}-softmax, "
        f"bin width {meta.get('bin_width')}",
    ]
    if cal:
        lines.append(f"top-k at calibration: {'on' if cal.get('tac') else 'off'}, sample fraction "
                     f"{cal.get('sample_frac')}")
    if meta.get("theta_reference", "absolute") != "absolute":
        lines.append(f"θ compared with: the score minus its row's max ({meta['theta_reference']}); the GPU kernels "
                     "fall back to the PyTorch path for it")
    agg = meta.get("aggregation", "mean-std")
    if agg != "mean-std":
        res = meta.get("reservoir") or {}
        lines.append(f"θ aggregation: {agg} ({meta.get('statistics', '')}); up to {res.get('capacity')} samples "
                     f"per cell, {res.get('sampled_cells')} of {res.get('calibrated_cells')} cells sampled")
    if meta.get("data"):
        lines.append(f"data: {meta['data']}")
    if meta.get("tokens") is not None:
        lines.append(f"{meta.get('documents')} documents, {meta.get('tokens')} tokens, "
                     f"{meta.get('rows_sampled')} rows sampled, {meta.get('seconds')} s")
    defaults = meta.get("app_defaults")
    if defaults:
        lines.append("defaults: sdc=" + str(defaults.get("sdc")) + ", vmc=" + str(defaults.get("vmc")))
    if meta.get("created"):
        lines.append(f"created {meta['created']}")
    return lines


def save_run(thresholds: Thresholds, name: str, root: Path | None = None, app_defaults: dict | None = None) -> Path:
    """Save atomically under ``root/name`` (never overwrites: the name must be new)."""
    root = root or runs_dir()
    name = validate_run_name(name)
    if app_defaults:
        thresholds.meta["app_defaults"] = dict(app_defaults)
    return thresholds.save(root / name, overwrite=False)


def zip_run(path: Path) -> bytes:
    """The artifact folder as a zip (``<name>/thresholds.parquet``, ``<name>/meta.json``)."""
    path = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in (TABLE_FILE, META_FILE):
            z.write(path / f, arcname=f"{path.name}/{f}")
    return buf.getvalue()


def results_dir() -> Path | None:
    """Where evaluation results are saved/read: ``$TOPTHETA_RESULTS_DIR`` or the engine's default (None)."""
    env = os.environ.get("TOPTHETA_RESULTS_DIR")
    return Path(env) if env else None
