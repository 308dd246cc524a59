"""The ``toptheta`` CLI end to end on a tiny checkpoint, and every bad input it must refuse clearly."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from topθ_core.cli import build_parser, main
from topθ_core.config import ConfigError, KSchedule, SparseConfig, CalibrationConfig, parse_layer_k
from topθ_core.datafiles import DataFileError, read_texts

DOCS = [
    ("Attention keeps what matters and drops the rest. " * 6).strip(),
    ("The quick brown fox jumps over the lazy dog, again and again. " * 5).strip(),
    ("def add(a, b):\n    return a + b\n" * 6).strip(),
]


@pytest.fixture()
def data_file(tmp_path):
    p = tmp_path / "docs.txt"
    p.write_text("\n\n".join(DOCS))
    return p


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_calibrate_evaluate_generate_on_a_local_checkpoint(tiny_checkpoint, data_file, tmp_path, capsys):
    out_dir = tmp_path / "th"
    code, out, err = run(capsys, "calibrate", "--model", tiny_checkpoint, "--data", data_file, "--k", 8,
                         "--layer-k", "0:16", "--tac", "--vmc", "--bin-width", 8, "--out", out_dir)
    assert code == 0, err
    assert "calibrated 3 documents" in out and str(out_dir) in out
    assert sorted(os.listdir(out_dir)) == ["meta.json", "thresholds.parquet"]
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["k"] == {"default": 8, "overrides": {"0": 16}} and meta["calibration"]["tac"] is True

    code, out, err = run(capsys, "evaluate", "--model", tiny_checkpoint, "--thresholds", out_dir, "--data", data_file)
    assert code == 0, err
    res = json.loads(out)
    for key in ("dense_nll", "dense_ppl", "sparse_nll", "sparse_ppl", "kept_attention", "kept_attention_sparse",
                "kept_v_rows"):
        assert key in res and res[key] is not None
    assert 0 < res["kept_attention"] < 1 and res["sparse_ppl"] > 0

    code, out, err = run(capsys, "generate", "--model", tiny_checkpoint, "--thresholds", out_dir,
                         "--prompt", "The quick brown", "--max-new-tokens", 6)
    assert code == 0, err
    assert out.count("dense  :") == 1 and out.count("sparse :") == 1 and "KL" in out


@pytest.mark.parametrize("content,name,message", [
    (b"\xff\xfe not utf8", "bad.txt", "not valid UTF-8"),
    (b"\n\n   \n", "empty.txt", "no usable text"),
    (b'{"body": "x"}\n', "wrong.jsonl", "no field 'text'"),
    (b'{"text": "x"\n', "broken.jsonl", "line 1 is not valid JSON"),
    (b"body\nhello\n", "wrong.csv", "no column 'text'"),
    (b"PAR1garbage", "bad.parquet", "not a readable Parquet"),
    (b"hello", "notes.docx", "unsupported file type"),
])
def test_bad_data_files_are_clear_errors(tmp_path, content, name, message, tiny_checkpoint, capsys):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataFileError, match=message):
        read_texts(p)
    code, _, err = run(capsys, "calibrate", "--model", tiny_checkpoint, "--data", p, "--out", tmp_path / "o")
    assert code == 2 and name in err and message.split("'")[0] in err
    assert not (tmp_path / "o").exists()


def test_good_data_formats_read_the_same_documents(tmp_path):
    texts = ["first document", "second one\nwith two lines"]
    (tmp_path / "a.txt").write_text("\n\n".join(texts))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    pd.DataFrame({"text": texts, "id": [1, 2]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "a.parquet")
    for ext in ("txt", "jsonl", "csv", "parquet"):
        assert read_texts(tmp_path / f"a.{ext}") == texts


def test_missing_paths_and_wrong_model_thresholds(tmp_path, tiny_checkpoint, data_file, capsys):
    code, _, err = run(capsys, "calibrate", "--model", tmp_path / "no-model", "--data", data_file, "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "calibrate", "--model", tiny_checkpoint, "--data", tmp_path / "nope.txt", "--out",
                       tmp_path / "o")
    assert code == 2 and "nope.txt: no such file" in err
    code, _, err = run(capsys, "evaluate", "--model", tiny_checkpoint, "--thresholds", tmp_path / "missing",
                       "--data", data_file)
    assert code == 2 and "does not exist" in err
    # thresholds made for another model
    from topθ_core.tiny import tiny_model, tiny_tokenizer

    other = tmp_path / "other-model"
    m = tiny_model("llama", seed=11)
    m.save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    th = tmp_path / "th-other"
    assert main(["calibrate", "--model", str(other), "--data", str(data_file), "--k", "8", "--layer-k", "",
                 "--out", str(th)]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "evaluate", "--model", tiny_checkpoint, "--thresholds", th, "--data", data_file)
    assert code == 2 and "other-model" in err and "calibrated for" in err
    # k larger than every document: nothing to calibrate, said plainly, nothing written
    code, _, err = run(capsys, "calibrate", "--model", tiny_checkpoint, "--data", data_file, "--k", 5000,
                       "--layer-k", "", "--out", tmp_path / "big-k")
    assert code == 2 and "smallest k" in err and not (tmp_path / "big-k").exists()


def test_config_refuses_invalid_combinations():
    with pytest.raises(ConfigError, match="VMC with pre-softmax placement and no SDC"):
        SparseConfig(placement="pre", sdc="none", vmc=True)
    with pytest.raises(ConfigError, match="needs calibrated thresholds, which top-k does not use"):
        SparseConfig(selection="top-k", sdc="exp-threshold", vmc=False)
    with pytest.raises(ConfigError, match="pre-softmax placement only"):
        SparseConfig(placement="post", sdc="exact")
    with pytest.raises(ConfigError, match="not one of"):
        SparseConfig(sdc="approximate")
    with pytest.raises(ConfigError, match="sample_frac"):
        CalibrationConfig(sample_frac=0.0)
    with pytest.raises(ConfigError, match="LAYER:K"):
        parse_layer_k("0=512")
    with pytest.raises(ConfigError, match="twice"):
        parse_layer_k("0:512,0:64")
    with pytest.raises(ConfigError, match="at least 1"):
        KSchedule(0)
    with pytest.raises(ConfigError, match="names layer"):
        KSchedule(64, {40: 512}).as_list(30)
    ks = KSchedule.parse(64, "0:512,1:512")
    assert ks.as_list(4) == [512, 512, 64, 64] and KSchedule.from_dict(ks.to_dict()) == ks
    cfg = SparseConfig(k=ks)
    assert SparseConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.label() == "top-theta k=64 [0:512,1:512] pre sdc=exact vmc"


def test_evaluate_bundled_task_writes_results_and_refuses_bad_tasks(tiny_checkpoint, data_file, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setenv("TOPTHETA_RESULTS_DIR", str(tmp_path / "data" / "results"))
    code, out, err = run(capsys, "evaluate", "--model", tiny_checkpoint, "--selection", "top-k", "--k", 4,
                         "--layer-k", "", "--task", "arc_easy", "--limit", 3)
    assert code == 0, err
    res = json.loads(out)
    table = pd.read_parquet(res["results"])
    assert set(table["metric"]) >= {"acc", "acc_norm"} and (table["n"] == 3).all()
    assert str(tmp_path / "data" / "results") in res["results"]
    code, _, err = run(capsys, "evaluate", "--model", tiny_checkpoint, "--task", "mmlu", "--selection", "dense")
    assert code == 2 and "unknown task 'mmlu'" in err
    code, _, err = run(capsys, "evaluate", "--model", tiny_checkpoint, "--task", "arc_easy", "--limit", 100000,
                       "--selection", "dense")
    assert code == 2 and "100000" in err


def test_fidelity_flags_reach_the_config(tiny_checkpoint, data_file, tmp_path, capsys):
    out_dir = tmp_path / "th"
    code, out, err = run(capsys, "calibrate", "--model", tiny_checkpoint, "--data", data_file, "--k", 8,
                         "--layer-k", "", "--tac", "--vmc", "--sdc-source", "theta", "--out", out_dir)
    assert code == 0, err
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["calibration"]["sdc_source"] == "theta"
    code, out, err = run(capsys, "generate", "--model", tiny_checkpoint, "--thresholds", out_dir, "--prompt", "The quick",
                         "--max-new-tokens", 3, "--sink-tokens", 1, "--recent-tokens", 1, "--theta-smoothing", 1,
                         "--lookup", "fit-log")
    assert code == 0, err
    assert "sink" in out or "recent" in out or "fit-log" in out  # the config label names the options


def test_theta_reference_and_per_head_k_flags(tiny_checkpoint, data_file, tmp_path, capsys):
    """calibrate writes the kind of θ and the per-head k; evaluate/generate read both from the artifact."""
    out_dir = tmp_path / "rel"
    code, out, err = run(capsys, "calibrate", "--model", tiny_checkpoint, "--data", data_file, "--k", 8,
                         "--layer-k", "", "--tac", "--vmc", "--theta-reference", "row-max", "--allocate-head-k", 0.9,
                         "--out", out_dir)
    assert code == 0, err
    assert "row max" in out and "per-head k" in out
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["theta_reference"] == "row-max" and meta["calibration"]["theta_reference"] == "row-max"
    heads = KSchedule.from_dict(meta["k"])
    assert len(heads.head_overrides) == 3 * 4 and all(sum(heads.heads_for(l, 4)) == 32 for l in range(3)
                                                      if heads.heads_for(l, 4))
    code, out, err = run(capsys, "generate", "--model", tiny_checkpoint, "--thresholds", out_dir, "--prompt", "The quick",
                         "--max-new-tokens", 3)
    assert code == 0, err
    assert "θ-row-max" in out and "head-k×12" in out
    code, out, err = run(capsys, "calibrate", "--model", tiny_checkpoint, "--data", data_file, "--k", 8,
                         "--theta-reference", "row-max", "--placement", "post", "--sdc", "none", "--out", tmp_path / "x")
    assert code == 2 and "placement=pre" in err and not (tmp_path / "x").exists()
    code, out, err = run(capsys, "calibrate", "--model", tiny_checkpoint, "--data", data_file, "--k", 8,
                         "--head-k", "1.9:4", "--out", tmp_path / "y")
    assert code == 2 and "(1, 9)" in err and not (tmp_path / "y").exists()


def test_calibrate_defaults_are_the_api_defaults_and_the_papers():
    """`toptheta calibrate` with no settings calibrates exactly CalibrationConfig() (TAC on, σ 0.1, layers 0-1
    at k=512), in one process on the CPU; both command lines parse the same flags."""
    from topθ_core.calibration_job import job_from_args
    from topθ_core.config import CalibrationConfig
    from topθ_core.distributed import _parser as dist_parser

    args = build_parser().parse_args(["calibrate", "--data", "d.txt", "--out", "o"])
    job = job_from_args(args)
    assert job.config == CalibrationConfig()
    assert job.config.tac and job.config.sigma == 0.1 and job.config.k.as_list(3) == [512, 512, 64]
    assert (job.device, job.workers, job.parallel) == ("cpu", 1, False)
    assert job.intended.sdc.value == "exact" and job.intended.vmc
    off = job_from_args(build_parser().parse_args(["calibrate", "--data", "d", "--out", "o", "--no-tac", "--no-vmc"]))
    assert not off.config.tac and not off.config.vmc
    dist = job_from_args(dist_parser().parse_args(["--data", "d.txt", "--out", "o"]), distributed=True)
    assert dist.config == job.config and dist.parallel and dist.device is None  # torchrun picks the rank's GPU
    with pytest.raises(ConfigError, match="--device-map"):
        job_from_args(build_parser().parse_args(["calibrate", "--data", "d", "--out", "o", "--device-map", "auto"]))
    with pytest.raises(ConfigError, match="one process"):
        job_from_args(build_parser().parse_args(["calibrate", "--data", "d", "--out", "o", "--workers", "2",
                                                 "--allocate-head-k", "0.9"]))


def test_generate_cuda_graphs_flag(tiny_checkpoint, capsys):
    """--cuda-graphs reaches generation: on a CPU model it is refused with one line, not a traceback;
    --no-cuda-graphs is the CPU's own path."""
    code, _, err = run(capsys, "generate", "--model", tiny_checkpoint, "--prompt", "hello there", "--selection",
                       "top-k", "--k", 4, "--layer-k", "", "--max-new-tokens", 2, "--cuda-graphs")
    assert code == 2 and "needs the model on a CUDA device" in err
    code, out, err = run(capsys, "generate", "--model", tiny_checkpoint, "--prompt", "hello there", "--selection",
                         "top-k", "--k", 4, "--layer-k", "", "--max-new-tokens", 2, "--no-cuda-graphs")
    assert code == 0, err
    assert "tok/s" in out
