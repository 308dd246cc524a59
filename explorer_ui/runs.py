"""Saved calibration runs: ``<runs dir>/<name>/`` holding a :class:`~topθ_core.thresholds.Thresholds` artifact,
and the saved evaluation results beside them.

Pure functions (no Streamlit).  The runs folder is ``$TOPTHETA_RUNS_DIR`` when set, else
``data/runs/`` beside the engine's data folder.  Artifacts are written by
:meth:`Thresholds.save`, which is atomic, so a cancelled or failed run leaves nothing behind;
folders whose name starts with a dot (its temporary folders) are never listed.  Renaming, deleting
and importing (:func:`rename_run`, :func:`delete_run`, :func:`import_run_zip`) are atomic too: a run
is there whole under its name or not at all; every refusal is a :class:`RunsError` saying why, with
nothing changed.  A σ chosen after calibration becomes a new run through :func:`save_sigma_run`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pandas as pd

from topθ_core.atomic import atomic_dir
from topθ_core.evaluation import RESULT_COLUMNS, thresholds_id
from topθ_core.paths import results_dir as engine_results_dir
from topθ_core.thresholds import META_FILE, TABLE_FILE, Thresholds, ThresholdsError, load_thresholds

from .evaluation_view import interval_text

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
        lines.append(f"θ compared with: the score minus its row's max ({meta['theta_reference']}); decode steps "
                     "run it in the GPU kernel, the prompt (prefill) on the PyTorch path")
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
    derived = meta.get("derived_from")
    if isinstance(derived, dict):
        lines.append(f"derived from run {derived.get('run')} (σ {derived.get('sigma')} → {meta.get('sigma')}): θ "
                     "re-aggregated from its stored statistics, no recalibration"
                     + (f", {derived['created']}" if derived.get("created") else ""))
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


# ---------------------------------------------------------------------------- managing saved runs
class RunsError(ValueError):
    """A run or result operation that cannot be done; the message says why.  Nothing was changed."""


MAX_IMPORT_BYTES = 256 * 1024 * 1024  # uncompressed size of an imported zip, at most
ARTIFACT_FILES = (TABLE_FILE, META_FILE)


def run_folder(name: str, root: Path | None = None) -> Path:
    """The folder of the saved run ``name``; raises :class:`RunsError` when there is no such run."""
    root = Path(root or runs_dir())
    try:
        name = validate_run_name(name)
    except ValueError as e:
        raise RunsError(str(e)) from None
    path = root / name
    if not (path / TABLE_FILE).is_file():
        raise RunsError(f"there is no saved threshold set named {name!r}")
    return path


def rename_run(old: str, new: str, root: Path | None = None) -> Path:
    """Rename a saved run (one ``rename``: atomic).  Its artifact is unchanged, so saved evaluation results
    still belong to it (they name a threshold set by :func:`~topθ_core.evaluation.thresholds_id`)."""
    root = Path(root or runs_dir())
    src = run_folder(old, root)
    try:
        new = validate_run_name(new)
    except ValueError as e:
        raise RunsError(str(e)) from None
    if new == src.name:
        raise RunsError(f"the set is already named {new!r}")
    dst = root / new
    if dst.exists():
        raise RunsError(f"a threshold set named {new!r} exists already; choose another name")
    os.rename(src, dst)
    return dst


def delete_run(name: str, root: Path | None = None) -> None:
    """Delete a saved run: first renamed to a hidden name (listings skip it at once), then removed."""
    path = run_folder(name, root)
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.deleted-", dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


@dataclass(frozen=True)
class ImportedRun:
    """What :func:`import_run_zip` saved; ``matches`` says whether it was made for the given model (None: no
    model to compare with)."""

    name: str
    path: Path
    model: str
    digest: str
    matches: bool | None

    def describe(self) -> str:
        text = f"Imported **{self.name}**, calibrated for {self.model} (digest {self.digest[:12]})"
        if self.matches is False:
            text += ": not the loaded model, so the sidebar lists it only when that model is loaded"
        return text + "."


def _zip_members(z: zipfile.ZipFile) -> tuple[str | None, dict[str, zipfile.ZipInfo]]:
    """(the zip's top folder or None, {artifact file name: its entry}); refuses anything unexpected."""
    files: dict[str, zipfile.ZipInfo] = {}
    tops: set[str | None] = set()
    total = 0
    for info in z.infolist():
        raw = info.filename
        parts = PurePosixPath(raw).parts
        if (raw.startswith(("/", "\\")) or "\\" in raw or ":" in raw or ".." in parts or not parts
                or any(p.startswith(".") for p in parts)):
            raise RunsError(f"the zip holds an unsafe or hidden path {raw!r}; nothing was imported")
        if info.is_dir():
            continue
        if len(parts) > 2 or parts[-1] not in ARTIFACT_FILES:
            raise RunsError(f"the zip holds {raw!r}: a threshold-set zip holds only <name>/{TABLE_FILE} and "
                            f"<name>/{META_FILE} (as this app's download writes)")
        if parts[-1] in files:
            raise RunsError(f"the zip holds {parts[-1]} twice")
        tops.add(parts[0] if len(parts) == 2 else None)
        files[parts[-1]] = info
        total += info.file_size
    if len(tops) > 1:
        raise RunsError("the zip's files are not in one folder")
    missing = [f for f in ARTIFACT_FILES if f not in files]
    if missing:
        raise RunsError(f"the zip lacks {', '.join(missing)}: it is not a threshold set")
    if total > MAX_IMPORT_BYTES:
        raise RunsError(f"the zip unpacks to {total / 1e6:.0f} MB, over the {MAX_IMPORT_BYTES / 1e6:.0f} MB limit")
    return next(iter(tops)), files


def import_run_zip(data: bytes, root: Path | None = None, name: str | None = None, default_name: str | None = None,
                   model_digest: str | None = None) -> ImportedRun:
    """Save a threshold-set zip (the format :func:`zip_run` writes) as a new run.

    The name is ``name``, else the zip's folder, else ``default_name`` (e.g. the upload's file name).  The
    files are written into a hidden folder beside the runs, loaded back with
    :func:`~topθ_core.thresholds.load_thresholds` (format, fields, table), and only then renamed into place,
    so a refused or broken zip leaves nothing.  A set made for another model is imported too; ``matches``
    (against ``model_digest``) and :meth:`ImportedRun.describe` say so.
    """
    root = Path(root or runs_dir())
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError):
        raise RunsError("not a zip file") from None
    with z:
        top, members = _zip_members(z)
        chosen = (name or "").strip() or top or (default_name or "").strip()
        if not chosen:
            raise RunsError("give the imported threshold set a name")
        try:
            chosen = validate_run_name(chosen)
        except ValueError as e:
            raise RunsError(str(e)) from None
        dest = root / chosen
        if dest.exists():
            raise RunsError(f"a threshold set named {chosen!r} exists already; give the import another name")
        tmp = None
        try:
            with atomic_dir(dest) as tmp:
                for fname, info in members.items():
                    (tmp / fname).write_bytes(z.read(info))
                fingerprint = load_thresholds(tmp).fingerprint  # checks format, fields, table and model fields
        except FileExistsError:
            raise RunsError(f"a threshold set named {chosen!r} exists already; give the import another name") from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise RunsError(f"the zip is damaged ({type(e).__name__}: {e}); nothing was imported") from None
        except Exception as e:  # noqa: BLE001 - ThresholdsError, or a meta.json of the wrong shape
            why = str(e).replace(f"{tmp}/", "").replace(str(tmp), chosen) if tmp is not None else str(e)
            kind = "" if isinstance(e, ThresholdsError) else f"{type(e).__name__}: "
            raise RunsError(f"the zip's threshold set cannot be used ({kind}{why}); nothing was imported") from None
    return ImportedRun(name=chosen, path=dest, model=str(fingerprint.name), digest=str(fingerprint.digest),
                       matches=None if model_digest is None else fingerprint.digest == model_digest)


def save_sigma_run(thresholds: Thresholds, sigma: float, name: str, source: str, root: Path | None = None) -> Path:
    """Save ``thresholds`` with another σ as the new run ``name``: θ re-aggregated from the stored statistics
    (:meth:`Thresholds.with_sigma`), no recalibration.  ``meta["derived_from"]`` records the source run, its
    σ and its :func:`~topθ_core.evaluation.thresholds_id`."""
    sigma = float(sigma)
    if not math.isfinite(sigma):
        raise RunsError(f"σ must be a finite number, not {sigma}")
    if sigma == thresholds.sigma:
        raise RunsError(f"σ = {sigma:g} is {source}'s own σ: choose another σ to save a new set")
    root = Path(root or runs_dir())
    try:
        name = validate_run_name(name)
    except ValueError as e:
        raise RunsError(str(e)) from None
    if (root / name).exists():
        raise RunsError(f"a threshold set named {name!r} exists already; choose another name")
    new = thresholds.with_sigma(sigma)
    new.meta["derived_from"] = {"run": source, "sigma": thresholds.sigma, "thresholds_id": thresholds_id(thresholds),
                                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        return save_run(new, name, root)
    except FileExistsError:
        raise RunsError(f"a threshold set named {name!r} exists already; choose another name") from None


def sigma_run_name(source: str, sigma: float, root: Path | None = None) -> str:
    """A free name for ``source`` re-aggregated at ``sigma``, e.g. ``k64-s0.5``."""
    return unique_run_name(f"{source}-s{float(sigma):g}"[:80], Path(root or runs_dir()))


# ---------------------------------------------------------------------------- saved evaluation results
RESULT_FILE_COLUMNS = ["file", "created", "task", "metrics", "config_label", "threshold_set", "thresholds_id",
                       "model", "n", "rows"]
_RESULT_FILE_RE = re.compile(r"^[^./\\][^/\\]*\.parquet$")


def results_folder() -> Path:
    """The folder evaluation results are saved in (``$TOPTHETA_RESULTS_DIR`` or the engine's default)."""
    return engine_results_dir(results_dir())


def meta_thresholds_id(meta: dict) -> str:
    """:func:`~topθ_core.evaluation.thresholds_id` of the artifact whose ``meta.json`` is ``meta``, without
    reading its table (the loaded artifact's meta is the file's minus ``shape``)."""
    return thresholds_id(SimpleNamespace(meta={k: v for k, v in meta.items() if k != "shape"}))


def run_thresholds_ids(root: Path | None = None) -> dict[str, str]:
    """{thresholds_id: run name} of every saved run under ``root``."""
    out = {}
    for _, r in list_runs(root).iterrows():
        meta = read_meta(Path(r["path"]))
        if meta is not None:
            out.setdefault(meta_thresholds_id(meta), r["name"])
    return out


def result_file(file: str, directory: Path | None = None) -> Path:
    """The path of a saved result file by its name; refuses names outside the results folder."""
    if not isinstance(file, str) or not _RESULT_FILE_RE.match(file):
        raise RunsError(f"{file!r} is not a saved result file name")
    path = Path(directory or results_folder()) / file
    if not path.is_file():
        raise RunsError(f"there is no saved result {file!r}")
    return path


def read_result_file(file: str, directory: Path | None = None) -> pd.DataFrame:
    try:
        return pd.read_parquet(result_file(file, directory))
    except RunsError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a foreign or corrupt file
        raise RunsError(f"{file} cannot be read ({type(e).__name__}: {e})") from None


def _first(df: pd.DataFrame, column: str):
    return df[column].iloc[0] if column in df and len(df) else None


def result_files(directory: Path | None = None, names: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per saved result file (one evaluation run), newest first (:data:`RESULT_FILE_COLUMNS`).

    ``names`` ({thresholds_id: run name}, :func:`run_thresholds_ids`) fills ``threshold_set``; a result whose
    set was deleted shows its id only.  Unreadable files are skipped, as :func:`load_results` does."""
    d = Path(directory or results_folder())
    names = names or {}
    rows = []
    for p in sorted(d.glob("*.parquet")) if d.is_dir() else []:
        if not _RESULT_FILE_RE.match(p.name):
            continue
        try:
            df = pd.read_parquet(p)
        except Exception:  # noqa: BLE001
            continue
        tid = _first(df, "thresholds_id")
        rows.append({"file": p.name, "created": _first(df, "created") or "", "task": _first(df, "task"),
                     "metrics": ", ".join(str(m) for m in df["metric"].dropna().unique()) if "metric" in df else "",
                     "config_label": _first(df, "config_label"),
                     "threshold_set": "(none)" if tid in (None, "none") else names.get(tid, f"(deleted: {tid})"),
                     "thresholds_id": tid, "model": _first(df, "model"), "n": _first(df, "n"), "rows": len(df)})
    out = pd.DataFrame(rows, columns=RESULT_FILE_COLUMNS)
    return out.sort_values(["created", "file"], ascending=False, kind="stable").reset_index(drop=True)


def delete_result(file: str, directory: Path | None = None) -> None:
    """Delete one saved result file (one unlink: it is there or not)."""
    result_file(file, directory).unlink()


def table_csv(df: pd.DataFrame) -> bytes:
    """A table as UTF-8 CSV (no index), for a download."""
    return df.to_csv(index=False).encode("utf-8")


def active_results(results: pd.DataFrame, tid: str) -> pd.DataFrame:
    """The latest saved row per (task, metric) of the threshold set ``tid``, newest first.

    ``results``: :func:`~topθ_core.evaluation.load_results` rows (oldest first)."""
    if results is None or results.empty or "thresholds_id" not in results:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    mine = results[results["thresholds_id"] == tid]
    if mine.empty:
        return pd.DataFrame(columns=results.columns)
    mine = mine.sort_values("created", kind="stable") if "created" in mine else mine
    latest = mine.groupby(["task", "metric"], sort=False).tail(1)
    return latest.iloc[::-1].reset_index(drop=True)


def results_display(rows: pd.DataFrame) -> pd.DataFrame:
    """Saved result rows as a table to read: task, metric, dense, Top-θ, Δ, its 95% interval, n, kept fractions."""
    def num(r, c):
        v = r.get(c)
        return float(v) if v is not None and pd.notna(v) else float("nan")

    out = []
    for _, r in rows.iterrows():
        lo, hi = num(r, "ci_low"), num(r, "ci_high")
        out.append({"task": r.get("task"), "metric": r.get("metric"), "dense": num(r, "dense"),
                    "Top-θ": num(r, "sparse"), "Δ (Top-θ − dense)": num(r, "delta"),
                    "95% interval": interval_text(lo, hi),
                    "n": r.get("n"), "kept attention": num(r, "kept_attention"),
                    "kept V rows (decode)": num(r, "kept_v_rows_decode"), "config": r.get("config_label"),
                    "saved": r.get("created")})
    return pd.DataFrame(out)
