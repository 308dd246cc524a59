"""Managing saved runs and results (explorer_ui.runs) and the Kernels headline (explorer_ui.kernel_headline),
without Streamlit: rename, delete, zip import (every malformed kind refused, nothing half-written), σ saved as a
new set, result files, and the headline rules on the real CSV and on frames with columns or rows missing."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer_ui import bench_results, kernel_headline, runs  # noqa: E402
from topθ_core.evaluation import thresholds_id  # noqa: E402
from topθ_core.thresholds import load_thresholds  # noqa: E402
from result_rows import make_zip, result_frame  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """One real threshold artifact of the tiny model (calibrated once), copied per test by ``root``."""
    from topθ_core.calibration import calibrate
    from topθ_core.config import CalibrationConfig, KSchedule
    from topθ_core.models import load_model
    from topθ_core.tiny import TINY_TEXT, write_tiny_checkpoint

    base = tmp_path_factory.mktemp("artifact")
    lm = load_model(write_tiny_checkpoint(base / "tiny"))
    th = calibrate(lm, [TINY_TEXT * 4, TINY_TEXT * 3], CalibrationConfig(k=KSchedule(8)), max_length=96,
                   data_description="tiny text")
    return runs.save_run(th, "src", root=base / "runs"), lm.fingerprint.digest


@pytest.fixture
def root(tmp_path, artifact):
    import shutil

    path, _ = artifact
    shutil.copytree(path, tmp_path / "runs" / "src")
    return tmp_path / "runs"


def listing(root: Path) -> list[str]:
    """Every entry of the runs folder, hidden ones included (a refused action must leave none behind)."""
    return sorted(p.name for p in root.iterdir())


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def artifact_entries(root: Path, folder: str = "src", meta_edit=None) -> dict[str, bytes]:
    meta = json.loads((root / "src" / "meta.json").read_text())
    if meta_edit:
        meta_edit(meta)
    return {f"{folder}/thresholds.parquet": (root / "src" / "thresholds.parquet").read_bytes(),
            f"{folder}/meta.json": json.dumps(meta).encode()}


# ---------------------------------------------------------------------------- rename / delete
def test_rename_keeps_the_artifact_and_refuses_clearly(root):
    before = tree(root / "src")
    path = runs.rename_run("src", "renamed", root)
    assert path == root / "renamed" and listing(root) == ["renamed"]
    assert tree(path) == before  # the artifact is untouched: results keep naming it by its thresholds_id
    assert list(runs.list_runs(root)["name"]) == ["renamed"]
    runs.save_run(load_thresholds(path), "other", root=root)
    for old, new, why in [("nope", "x", "no saved threshold set named 'nope'"),
                          ("renamed", "other", "exists already"),
                          ("renamed", "bad name/..", "letters, digits"),
                          ("renamed", "renamed", "already named"),
                          ("../renamed", "x", "letters, digits")]:
        with pytest.raises(runs.RunsError, match=re.escape(why)):
            runs.rename_run(old, new, root)
    assert listing(root) == ["other", "renamed"]


def test_delete_removes_whole_and_refuses_unknown(root):
    runs.delete_run("src", root)
    assert listing(root) == []  # no hidden leftover either
    with pytest.raises(runs.RunsError, match="no saved threshold set named 'src'"):
        runs.delete_run("src", root)
    (root / "plain").mkdir()  # a folder that is not an artifact is not a run
    with pytest.raises(runs.RunsError):
        runs.delete_run("plain", root)
    assert listing(root) == ["plain"]


# ---------------------------------------------------------------------------- zip import
def test_zip_round_trip_and_model_check(root, artifact):
    _, digest = artifact
    src = load_thresholds(root / "src")
    imported = runs.import_run_zip(runs.zip_run(root / "src"), root, name="copy", model_digest=digest)
    assert imported.name == "copy" and imported.matches is True and imported.model == src.fingerprint.name
    back = load_thresholds(root / "copy")
    assert back.meta == src.meta and torch.equal(back.count, src.count)
    assert torch.allclose(back.theta, src.theta, equal_nan=True)
    # the zip's folder name is the default name; it exists already → refused, nothing written
    with pytest.raises(runs.RunsError, match="'src' exists already"):
        runs.import_run_zip(runs.zip_run(root / "src"), root)
    # another model's set is imported too, and says which model it is for
    other = make_zip(artifact_entries(root, "foreign", lambda m: m["model"].update(name="llama-70b", digest="f" * 64)))
    imp = runs.import_run_zip(other, root, model_digest=digest)
    assert imp.name == "foreign" and imp.matches is False and imp.model == "llama-70b"
    assert "llama-70b" in imp.describe() and "not the loaded model" in imp.describe()
    # flat zip (files at the top): named by the given default (e.g. the upload's file name)
    flat = make_zip({k.split("/")[1]: v for k, v in artifact_entries(root).items()})
    assert runs.import_run_zip(flat, root, default_name="from-flat").name == "from-flat"
    with pytest.raises(runs.RunsError, match="give the imported threshold set a name"):
        runs.import_run_zip(flat, root)
    assert listing(root) == ["copy", "foreign", "from-flat", "src"]


def _bad_zips(root: Path) -> list[tuple[bytes, str]]:
    good = artifact_entries(root, "new")
    table = good["new/thresholds.parquet"]
    return [
        (b"PK\x03\x04 this is not really a zip", "not a zip file"),
        (b"", "not a zip file"),
        (make_zip({"../evil/meta.json": b"{}", "new/thresholds.parquet": table}), "unsafe or hidden path"),
        (make_zip({"/etc/new/meta.json": b"{}"}), "unsafe or hidden path"),
        (make_zip({"new\\..\\meta.json": b"{}"}), "unsafe or hidden path"),
        (make_zip({"C:/new/meta.json": b"{}"}), "unsafe or hidden path"),
        (make_zip({**good, "new/.hidden": b"x"}), "unsafe or hidden path"),
        (make_zip({**good, "new/notes.txt": b"x"}), "holds 'new/notes.txt'"),
        (make_zip({**good, "new/sub/meta.json": b"{}"}), "holds 'new/sub/meta.json'"),
        (make_zip({"new/thresholds.parquet": table}), "lacks meta.json"),
        (make_zip({"a/thresholds.parquet": table, "b/meta.json": good["new/meta.json"]}), "not in one folder"),
        (make_zip({"new/thresholds.parquet": table, "new/meta.json": b"{not json"}), "not valid JSON"),
        (make_zip({"new/thresholds.parquet": table, "new/meta.json": b"[1, 2]"}), "cannot be used"),
        (make_zip(artifact_entries(root, "new", lambda m: m.update(format_version=99))), "format version 99"),
        (make_zip(artifact_entries(root, "new", lambda m: m.pop("sigma"))), "lacks the field 'sigma'"),
        (make_zip(artifact_entries(root, "new", lambda m: m.update(model={"name": "x"}))), "cannot be used"),
        (make_zip({"new/thresholds.parquet": b"garbage", "new/meta.json": good["new/meta.json"]}),
         "not a readable Parquet file"),
        (make_zip({"bad name/thresholds.parquet": table, "bad name/meta.json": good["new/meta.json"]}),
         "letters, digits"),
    ]


def test_malformed_zips_are_refused_and_leave_nothing(root):
    before = listing(root)
    for data, why in _bad_zips(root):
        with pytest.raises(runs.RunsError, match=re.escape(why)):
            runs.import_run_zip(data, root)
        assert listing(root) == before, why  # nothing half-written, no hidden temporary left
    # a damaged member (CRC mismatch) is found while reading, and still leaves nothing
    data = bytearray(make_zip(artifact_entries(root, "damaged")))  # stored, not deflated: the bytes are visible
    i = data.find(b"PAR1") + 8  # inside the Parquet bytes of the first member
    data[i] ^= 0xFF
    with pytest.raises(runs.RunsError, match="the zip is damaged .BadZipFile"):
        runs.import_run_zip(bytes(data), root)
    assert listing(root) == before


def test_zip_size_limit(root, monkeypatch):
    monkeypatch.setattr(runs, "MAX_IMPORT_BYTES", 100)
    with pytest.raises(runs.RunsError, match="over the"):
        runs.import_run_zip(runs.zip_run(root / "src"), root, name="big")
    assert listing(root) == ["src"]


# ---------------------------------------------------------------------------- σ as a new set
def test_save_sigma_run_reaggregates_without_recalibrating(root, monkeypatch):
    import topθ_core.calibration as calibration
    from topθ_core.statistics import ThresholdStats

    def refuse(*a, **kw):
        raise AssertionError("saving a σ must not recalibrate")

    monkeypatch.setattr(calibration, "calibrate", refuse)
    monkeypatch.setattr(ThresholdStats, "finalize", refuse)
    src = load_thresholds(root / "src")
    path = runs.save_sigma_run(src, 0.75, "src-s0.75", "src", root)
    new = load_thresholds(path)
    assert new.sigma == 0.75 and torch.equal(new.t_mean, src.t_mean) and torch.equal(new.t_std, src.t_std)
    expect = src.t_mean + 0.75 * src.t_std  # θ = t_mean + σ·t_std at calibrated cells
    assert torch.allclose(new.theta, torch.where(src.count > 0, expect, torch.nan), equal_nan=True)
    assert torch.allclose(new.theta, src.with_sigma(0.75).theta, equal_nan=True)
    derived = new.meta["derived_from"]
    assert derived["run"] == "src" and derived["sigma"] == src.sigma and derived["thresholds_id"] == thresholds_id(src)
    assert thresholds_id(new) != thresholds_id(src)
    assert any(line.startswith("derived from run src (σ 0.1 → 0.75)") for line in runs.provenance_lines(new.meta))
    assert src.sigma == 0.1 and "derived_from" not in src.meta  # the source is untouched
    for sigma, name, why in [(0.1, "x", "own σ"), (math.nan, "x", "finite"), (0.5, "src-s0.75", "exists already"),
                             (0.5, "../x", "letters, digits")]:
        with pytest.raises(runs.RunsError, match=why):
            runs.save_sigma_run(src, sigma, name, "src", root)
    assert listing(root) == ["src", "src-s0.75"]
    assert runs.sigma_run_name("src", 0.75, root) == "src-s0.75-2" and runs.sigma_run_name("src", 1, root) == "src-s1"


# ---------------------------------------------------------------------------- saved results
def test_meta_thresholds_id_equals_the_loaded_artifacts(root):
    meta = json.loads((root / "src" / "meta.json").read_text())
    assert "shape" in meta
    assert runs.meta_thresholds_id(meta) == thresholds_id(load_thresholds(root / "src"))
    assert runs.run_thresholds_ids(root) == {thresholds_id(load_thresholds(root / "src")): "src"}


def test_result_files_delete_and_csv(tmp_path, root):
    from topθ_core.evaluation import load_results

    tid = runs.meta_thresholds_id(json.loads((root / "src" / "meta.json").read_text()))
    d = tmp_path / "results"
    d.mkdir()
    result_frame(tid, "arc_easy", "2026-01-01T00:00:01", 0.01).to_parquet(d / "a.parquet")
    result_frame("gone12345678", "pydoc", "2026-01-02T00:00:02", -0.02).to_parquet(d / "b.parquet")
    result_frame("none", "pydoc", "2026-01-03T00:00:03", 0.0).to_parquet(d / "c.parquet")
    (d / "broken.parquet").write_bytes(b"junk")
    (d / ".tmp.parquet").write_bytes(b"junk")
    files = runs.result_files(d, runs.run_thresholds_ids(root))
    assert list(files["file"]) == ["c.parquet", "b.parquet", "a.parquet"]  # newest first, unreadable skipped
    assert list(files["threshold_set"]) == ["(none)", "(deleted: gone12345678)", "src"]
    rows = runs.read_result_file("a.parquet", d)
    assert pd.read_csv(io.BytesIO(runs.table_csv(rows)))["delta"].tolist() == [0.01]
    for bad in ("../a.parquet", "/etc/passwd", ".tmp.parquet", "a.csv", "missing.parquet"):
        with pytest.raises(runs.RunsError):
            runs.delete_result(bad, d)
    with pytest.raises(runs.RunsError, match="cannot be read"):
        runs.read_result_file("broken.parquet", d)
    runs.delete_result("b.parquet", d)
    assert sorted(p.name for p in d.iterdir()) == [".tmp.parquet", "a.parquet", "broken.parquet", "c.parquet"]
    assert len(load_results(d)) == 2


def test_active_results_latest_per_task_and_metric():
    frames = [result_frame("t1", "arc", "2026-01-01", 0.01), result_frame("t1", "arc", "2026-01-03", 0.03),
              result_frame("t1", "arc", "2026-01-02", 0.02, metric="acc_norm"),
              result_frame("t2", "arc", "2026-01-04", 0.04), result_frame("t1", "ppl", "2026-01-05", 0.5, "ppl")]
    results = pd.concat(frames, ignore_index=True).sort_values("created", kind="stable")
    latest = runs.active_results(results, "t1")
    assert list(zip(latest["task"], latest["metric"], latest["delta"])) == [
        ("ppl", "ppl", 0.5), ("arc", "acc", 0.03), ("arc", "acc_norm", 0.02)]
    assert runs.active_results(results, "t3").empty and runs.active_results(pd.DataFrame(), "t1").empty
    shown = runs.results_display(latest)
    assert list(shown["95% interval"])[1] == "[-0.0700, +0.1300]" and list(shown["n"]) == [20, 20, 20]


# ---------------------------------------------------------------------------- kernel headline
def _latest(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["run"] == df["run"].max()]


def test_headline_on_the_saved_csv_follows_its_rules():
    """Each headline value equals the row the documented rule picks, found here by plain filtering."""
    csv = pd.read_csv(RESULTS / "kernels_H200.csv")
    head = kernel_headline.headline(RESULTS)
    h200 = head[head["card"] == "H200"].set_index("measure")
    decode = _latest(csv[csv["kernel"] == "decode"])
    for label, f in (("1/3", 1 / 3), ("0.15", 0.15)):
        at = decode[(pd.to_numeric(decode["f_target"], errors="coerce") - f).abs() <= 0.02]
        big = at.assign(size=at["B"] * at["N"]).sort_values(["size", "B"]).iloc[-1]
        row = h200.loc[f"decode, f = {label}"]
        assert row["speedup"] == big["speedup"] and row["speedup_graph"] == big["speedup_graph"]
        assert (row["low"], row["high"]) == (at["speedup_graph"].min(), at["speedup_graph"].max())
        assert f"B={big['B']}" in row["shape"] and f"run {big['run']}" in row["source"]
    prefill = _latest(csv[csv["kernel"] == "prefill"])
    prefill = prefill[prefill["N"] == prefill["N"].max()]
    near = prefill.loc[(prefill["f_kept_elems"] - 0.1).abs().idxmin()]
    assert h200.loc["prefill", "speedup"] == near["speedup"]
    assert h200.loc["prefill", "speedup_graph"] == near["speedup_graph"]  # the same row under CUDA graphs
    e2e = csv[csv["kernel"].str.startswith("e2e")]
    method = lambda k: k.split(" (")[0]  # noqa: E731  "e2e decode, CUDA graph (llama3-8b, …)" → "e2e decode, CUDA graph"
    e2e = e2e[e2e["kernel"].map(method) == method(_latest(e2e)["kernel"].iloc[0])]  # the latest run's method
    assert len(e2e) < len(csv[csv["kernel"].str.startswith("e2e")])  # the saved file has older eager rows
    for (kernel, b, n), g in e2e.groupby(["kernel", "B", "N"]):
        g = _latest(g)  # each shape from the latest run that measured it
        fastest = g.loc[g["tokens_per_s_sdpa"].idxmax()]
        model = kernel.split("(")[1].split(",")[0]
        tokens = f"{n // 1024}k" if n % 1024 == 0 else str(n)  # 16384 → 16k; 8000 stays 8000 (not "7k")
        row = h200.loc[f"end to end ({model}), B={b}, N={tokens}"]
        assert row["speedup"] == fastest["speedup"] and row["tokens_per_s"] == fastest["tokens_per_s_topθ"]
        assert row["tokens_per_s_baseline"] == g["tokens_per_s_sdpa"].max()
    shown = kernel_headline.display_frame(head[head["card"] == "H200"])
    assert list(shown.columns)[:2] == ["measure", "speed-up vs SDPA"]
    assert shown.set_index("measure").loc["prefill", "speed-up vs SDPA"] == f"{near['speedup']:.2f}×"


def test_headline_end_to_end_takes_each_shape_from_its_latest_run():
    """A later run that re-measures one shape replaces that shape only; the others keep their latest run;
    rows of an older method (another kernel label but for the model) are left out."""
    e2e = "e2e decode, CUDA graph (llama3-8b, random weights)"
    rows = pd.DataFrame({"card": "H200", "_source": "kernels_H200.csv", "kernel": e2e, "data": "random-weights",
                         "B": [1, 8, 1, 8, 1, 32], "N": 16384, "run": [15, 15, 18, 18, 19, 11],
                         "speedup": [0.90, 0.99, 0.97, 1.05, 0.98, 1.3], "tokens_per_s_sdpa": 100.0,
                         "tokens_per_s_topθ": [90.0, 99.0, 97.0, 105.0, 98.0, 130.0]})
    rows.loc[5, "kernel"] = "e2e decode (llama3-8b, random weights)"  # an older method (an eager loop)
    head = kernel_headline.headline_from_frames(rows).set_index("measure")
    b1, b8 = head.loc["end to end (llama3-8b), B=1, N=16k"], head.loc["end to end (llama3-8b), B=8, N=16k"]
    assert (b1["speedup"], b8["speedup"]) == (0.98, 1.05)
    assert "run 19" in b1["source"] and "run 18" in b8["source"]
    assert not any("B=32" in m for m in head.index)  # the eager loop's row is not mixed in


def test_headline_survives_missing_columns_and_rows(tmp_path):
    # a card without end-to-end rows, without speedup_graph / run / card columns: card from the file name
    pd.DataFrame({"kernel": ["decode", "decode", "decode", "prefill"], "B": [1, 32, 32, 1],
                  "N": [4096, 4096, 16384, 8192], "f_kept_v": [0.15, 0.15, 0.149, 0.11],
                  "speedup": [0.7, 1.1, 1.2, 0.5]}
                 ).to_csv(tmp_path / "kernels_H100.csv", index=False)
    # a file without the kernel column adds nothing, and breaks nothing
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "kernels_B200.csv", index=False)
    (tmp_path / "kernels_broken.csv").write_bytes(b"\xff\xfe\x00garbage,,\n\"")
    # an end-to-end file with its own columns: the tokens/s ratio stands in for a missing speedup column
    pd.DataFrame({"card": ["H100", "H100", "H100"], "B": [1, 1, 1], "N": [8192] * 3, "run": [1, 2, 2],
                  "tokens_per_s_toptheta": [10.0, 30.0, 30.0], "tokens_per_s_sdpa": [99.0, 20.0, 25.0],
                  "baseline_backend": ["old", "cudnn", "flash"]}).to_csv(tmp_path / "e2e_H100.csv", index=False)
    logs = tmp_path / "logs"
    logs.mkdir()
    pd.DataFrame({"a": [1]}).to_csv(logs / "kernels_X.csv", index=False)  # logs are never results
    (logs / "run.log").write_text("log")
    head = kernel_headline.headline(tmp_path)
    h100 = head[head["card"] == "H100"].set_index("measure")
    assert list(h100.index) == ["decode, f = 1/3", "decode, f = 0.15", "prefill", "end to end, B=1, N=8k"]
    assert h100.loc["decode, f = 1/3", "note"] == kernel_headline.NOT_MEASURED
    assert math.isnan(h100.loc["decode, f = 1/3", "speedup"])
    assert h100.loc["decode, f = 0.15", "speedup"] == 1.2  # the largest shape (B·N), eager range without graphs
    assert (h100.loc["decode, f = 0.15", "low"], h100.loc["decode, f = 0.15", "high"]) == (0.7, 1.2)
    assert math.isnan(h100.loc["decode, f = 0.15", "speedup_graph"])
    assert h100.loc["prefill", "speedup"] == 0.5
    e2e = h100.loc["end to end, B=1, N=8k"]  # latest run, fastest baseline (flash: 25 tokens/s)
    assert e2e["speedup"] == pytest.approx(30 / 25) and e2e["baseline"] == "flash"
    b200 = head[head["card"] == "B200"]
    assert list(b200["note"]) == [kernel_headline.NOT_MEASURED] * 4
    shown = kernel_headline.display_frame(b200)
    assert set(shown["speed-up vs SDPA"]) == {kernel_headline.NOT_MEASURED}
    assert "X" not in set(head["card"])
    assert kernel_headline.headline(tmp_path / "missing").empty
    cells = kernel_headline.metric_cells(head[head["card"] == "H100"])
    assert cells[1][:2] == ("decode, f = 0.15", "1.20×") and "B=32" in cells[1][2]
    assert [p.name for p in bench_results.result_paths(tmp_path)] == [
        "e2e_H100.csv", "kernels_B200.csv", "kernels_H100.csv", "kernels_broken.csv"]


def test_card_from_file_name():
    assert kernel_headline.card_from_name(Path("kernels_H200.csv")) == "H200"
    assert kernel_headline.card_from_name(Path("e2e_H100_sxm.csv")) == "H100_sxm"
    assert kernel_headline.card_from_name(Path("e2e.csv")) == ""
