"""Data-parallel calibration (topθ_core.distributed) against one process, on CPU with gloo.

* 2 ranks launched by ``torchrun`` through the command line (``-m topθ_core.distributed``)
  on a text file, against :func:`calibrate` in this process;
* 3 ranks forked from this process (no re-import) running several scenarios in one gloo
  group: an existing output directory, an uneven split, a rank with no document, a rank
  that raises, a rank that does not arrive within the timeout; and 2 forked ranks of which
  one dies.

The model is a tiny random Llama (3 layers, GQA 4/2 heads) with a word-level tokenizer,
both built here.  ``sample_frac = 1``: counts must be exactly equal, θ and SDC terms equal
to float tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from topθ_core.calibration import calibrate
from topθ_core.config import CalibrationConfig, KSchedule
from topθ_core.distributed import calibrate_distributed, shard_documents
from topθ_core.models import load_model
from topθ_core.thresholds import Thresholds, load_thresholds

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 120  # word tokens w0..w119 → ids 2..121
CONFIG = CalibrationConfig(k=KSchedule(8, {0: 24}), bin_width=8, tac=True, sample_frac=1.0)
DOC_LENGTHS = [150, 37, 5, 97, 64, 211, 1, 120, 73]
FEW_LENGTHS = [150, 40]
SAMPLED = CalibrationConfig(k=CONFIG.k, bin_width=8, tac=True, sample_frac=0.5)  # fewer documents than ranks: one rank calibrates nothing


def _documents(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB + 2, (n,), generator=g) for n in lengths]


def _build_tiny(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i + 2 for i in range(VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(path)
    return path


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(n: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    print(f"torchrun {n} ranks: {time.perf_counter() - t0:.1f} s, rc {res.returncode}")
    return res


def _trimmed(th: Thresholds, n_bins: int) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("count", "t_mean", "t_std", "sdc_mean"):
        t = getattr(th, name)
        assert not t[..., n_bins:].any(), f"{name} has values beyond bin {n_bins}"
        out[name] = torch.nn.functional.pad(t, (0, max(0, n_bins - t.shape[-1])))[..., :n_bins]
    out["theta"] = out["t_mean"] + th.sigma * out["t_std"]
    return out


def _assert_same(ref: Thresholds, got: Thresholds, label: str) -> None:
    used = lambda th: int(torch.nonzero(th.count.sum((0, 1)) > 0).max()) + 1  # noqa: E731
    assert used(ref) == used(got), f"{label}: calibrated length bins differ"
    a, b = _trimmed(ref, used(ref)), _trimmed(got, used(ref))
    assert torch.equal(a["count"], b["count"]), f"{label}: counts differ"
    for name in ("theta", "t_mean", "t_std", "sdc_mean"):
        err = (a[name] - b[name]).abs()
        print(f"{label} {name}: max abs err {err.max().item():.3e}, mean {err.mean().item():.3e}")
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=f"{label}: {name} differs")
    assert got.meta["rows_sampled"] == ref.meta["rows_sampled"]
    assert got.meta["tokens"] == ref.meta["tokens"] and got.meta["documents"] == ref.meta["documents"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _build_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def dist_lm(tiny_dir):
    return load_model(tiny_dir)


# ---- sharding ---------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 7, 12])
def test_shard_documents_partition_and_balance(world):
    lengths = DOC_LENGTHS
    shards = shard_documents(lengths, world)
    assert shards == shard_documents(lengths, world)  # deterministic
    assert sorted(i for s in shards for i in s) == list(range(len(lengths)))
    assert all(s == sorted(s) for s in shards)
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(lengths)
    if world > len(lengths):
        assert sum(1 for s in shards if not s) == world - len(lengths)


def test_shard_documents_rejects_no_ranks():
    with pytest.raises(ValueError, match="world_size"):
        shard_documents([3, 4], 0)


# ---- one process (no torchrun): the same code path with a world of one --------------------

def test_single_process_equals_calibrate(dist_lm, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    docs = _documents(DOC_LENGTHS)
    ref = calibrate(dist_lm, docs, CONFIG)
    got = calibrate_distributed(dist_lm, docs, CONFIG, tmp_path / "art")
    _assert_same(ref, got, "1 process")
    _assert_same(ref, load_thresholds(tmp_path / "art", expect_model=dist_lm.fingerprint), "1 process, reloaded")
    assert got.meta["distributed"]["world_size"] == 1


def test_single_process_errors_are_clear(dist_lm, tmp_path, monkeypatch):
    from topθ_core.distributed import DistributedCalibrationError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(DistributedCalibrationError, match="not longer than the smallest k"):
        calibrate_distributed(dist_lm, _documents([5, 6]), CONFIG, tmp_path / "short")
    with pytest.raises(DistributedCalibrationError, match="no such file"):
        calibrate_distributed(dist_lm, tmp_path / "missing.txt", CONFIG, tmp_path / "nofile")
    assert not (tmp_path / "short").exists() and not (tmp_path / "nofile").exists()


# ---- 2 ranks through the command line ----------------------------------------------------

def test_two_ranks_cli_equals_one_process(tiny_dir, dist_lm, tmp_path):
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB, (n,), generator=g))
             for n in (130, 33, 88, 61, 175, 12, 99)]
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(texts) + "\n")
    out = tmp_path / "art"
    res = _torchrun(2, "-m", "topθ_core.distributed", "--model", str(tiny_dir), "--data", str(data), "--k", "8",
                    "--layer-k", "0:24", "--bin-width", "8", "--tac", "--vmc", "--limit", "6", "--dtype", "float32",
                    "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    summary = [line for line in res.stdout.splitlines() if line.startswith("wrote ")]
    assert len(summary) == 1 and "on 2 rank(s) (gloo)" in summary[0], res.stdout
    got = load_thresholds(out, expect_model=dist_lm.fingerprint)
    ref = calibrate(dist_lm, texts[:6], CONFIG)
    _assert_same(ref, got, "2 ranks (CLI)")
    assert got.meta["data"] == str(data) and got.meta["intended_sdc"] == "exact"  # the default
    per_rank = got.meta["distributed"]["rank_documents"]
    assert sum(per_rank) == 6 and min(per_rank) > 0, per_rank


def test_workers_cli_equals_one_process(tiny_dir, dist_lm, tmp_path):
    """`toptheta calibrate --workers 2` starts its own local ranks (no torchrun): same artifact as one process."""
    g = torch.Generator().manual_seed(2)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB, (n,), generator=g))
             for n in (120, 45, 90, 160, 30)]
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(texts) + "\n")
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "topθ_core.cli", "calibrate", "--workers=2", "--model", str(tiny_dir),
           "--data", str(data), "--k", "8", "--layer-k", "0:24", "--bin-width", "8", "--tac", "--vmc",
           "--dtype", "float32", "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    print(f"--workers 2: {time.perf_counter() - t0:.1f} s, rc {res.returncode}")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = [line for line in res.stdout.splitlines() if line.startswith("wrote ")]
    assert len(summary) == 1 and "on 2 rank(s) (gloo)" in summary[0], res.stdout
    got = load_thresholds(out, expect_model=dist_lm.fingerprint)
    _assert_same(calibrate(dist_lm, texts, CONFIG), got, "--workers 2")
    assert min(got.meta["distributed"]["rank_documents"]) > 0


def test_workers_rejects_bad_count(tiny_dir, tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10\n")
    res = subprocess.run([sys.executable, "-m", "topθ_core.cli", "calibrate", "--workers", "0", "--model", str(tiny_dir),
                          "--data", str(data), "--out", str(tmp_path / "art")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--workers must be at least 1" in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "art").exists()
    # an abbreviation is refused, not taken for one process
    res = subprocess.run([sys.executable, "-m", "topθ_core.cli", "calibrate", "--work", "2", "--model", str(tiny_dir),
                          "--data", str(data), "--out", str(tmp_path / "art")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unrecognized arguments: --work" in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "art").exists()


class _FakeRank:
    """A stand-in for a rank's process: exits with ``code`` after ``after`` seconds, or runs until terminated."""

    def __init__(self, code: int | None, after: float = 0.0):
        self.code, self.t_end, self.returncode, self.terminated = code, time.monotonic() + after, None, False

    def poll(self):
        if self.returncode is None and self.code is not None and time.monotonic() >= self.t_end:
            self.returncode = self.code
        return self.returncode

    def terminate(self):
        self.terminated, self.returncode = True, -15

    def wait(self, timeout=None):
        return self.poll()

    def kill(self):
        self.terminate()


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_launch_local_stops_the_others_when_any_rank_fails(monkeypatch, failing_rank):
    """Whichever rank fails, the others are terminated after the grace period and its exit code is returned."""
    import topθ_core.distributed as dmod

    ranks = [_FakeRank(None), _FakeRank(None)]
    ranks[failing_rank] = _FakeRank(3, after=0.2)
    it = iter(ranks)
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: next(it))
    t0 = time.monotonic()
    code = dmod.launch_local(["--data", "x"], 2, grace_s=0.3)
    assert code == 3 and time.monotonic() - t0 < 3
    assert ranks[1 - failing_rank].terminated and not ranks[failing_rank].terminated


def test_launch_local_reports_a_signal_as_128_plus_its_number(monkeypatch):
    import topθ_core.distributed as dmod

    ranks = iter([_FakeRank(0), _FakeRank(-9, after=0.1)])
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: next(ranks))
    assert dmod.launch_local(["--data", "x"], 2, grace_s=0.1) == 128 + 9


def test_launch_local_terminates_ranks_when_it_is_interrupted(monkeypatch):
    import topθ_core.distributed as dmod

    ranks = [_FakeRank(None), _FakeRank(None)]
    it = iter(ranks)
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: next(it))
    monkeypatch.setattr(dmod.time, "sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        dmod.launch_local(["--data", "x"], 2)
    assert all(r.terminated for r in ranks)


# ---- 3 ranks (forked from this process: no re-import, no reload) ---------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fork_ranks(world: int, target, *args, timeout: float = 240) -> list[int]:
    """Run ``target(rank, *args)`` in ``world`` forked processes joined in one gloo group."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    port = _free_port()

    def entry(rank: int) -> None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        target(rank, *args)

    t0 = time.perf_counter()
    procs = [ctx.Process(target=entry, args=(r,)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
    for p in procs:
        if p.is_alive():
            p.kill()
    print(f"{world} forked ranks: {time.perf_counter() - t0:.1f} s")
    return [p.exitcode for p in procs]


def _scenarios(rank: int, lm, work: Path) -> None:
    """Every rank of the 3-rank job: records each scenario's outcome in rankR.json."""
    import datetime

    import torch.distributed as dist

    from topθ_core.distributed import DistributedCalibrationError

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    report: dict = {}

    def run(name: str, docs, out: Path, config=CONFIG, **kw) -> None:
        try:
            th = calibrate_distributed(lm, docs, config, out, **kw)
            report[name] = {"error": None}
            torch.save({"count": th.count, "t_mean": th.t_mean, "t_std": th.t_std, "sdc_mean": th.sdc_mean,
                        "created": th.meta["created"]}, work / f"{name}_rank{rank}.pt")
        except DistributedCalibrationError as e:
            report[name] = {"error": str(e), "agreed": e.agreed}
        (work / f"rank{rank}.json").write_text(json.dumps(report))

    run("exists", _documents(DOC_LENGTHS), work / "exists")
    run("uneven", _documents(DOC_LENGTHS), work / "uneven")
    run("few", _documents(FEW_LENGTHS), work / "few")
    run("sampled", _documents(DOC_LENGTHS), work / "sampled", config=SAMPLED)
    bad = _documents(DOC_LENGTHS) + [torch.full((30,), 10_000)]  # token id beyond the vocabulary
    run("fail", bad, work / "fail")

    def late(done: int, total: int) -> None:
        if rank == 2 and done == 0:
            time.sleep(6)

    run("timeout", _documents(DOC_LENGTHS), work / "timeout", timeout=2, progress=late)
    os._exit(0)  # the group is broken after the timeout: skip its teardown


def test_three_ranks_scenarios(dist_lm, tmp_path):
    (tmp_path / "exists").mkdir()
    codes = _fork_ranks(3, _scenarios, dist_lm, tmp_path)
    assert codes == [0, 0, 0], codes
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]

    # an existing artifact is refused before any work, on every rank
    for rep in reports:
        assert rep["exists"]["agreed"] and "already exists" in rep["exists"]["error"]
    assert not any((tmp_path / "exists").iterdir())

    # uneven split (9 documents over 3 ranks) and a rank with no document
    for name, lengths in (("uneven", DOC_LENGTHS), ("few", FEW_LENGTHS)):
        ref = calibrate(dist_lm, _documents(lengths), CONFIG)
        for rep in reports:
            assert rep[name]["error"] is None, rep[name]
        got = load_thresholds(tmp_path / name, expect_model=dist_lm.fingerprint)
        _assert_same(ref, got, f"3 ranks, {name}")
        for r in range(3):  # every rank returns what rank 0 wrote
            mine = torch.load(tmp_path / f"{name}_rank{r}.pt")
            for key in ("count", "t_mean", "t_std", "sdc_mean"):
                torch.testing.assert_close(mine[key], getattr(got, key), rtol=0, atol=0)
            assert mine["created"] == got.meta["created"]
    assert 0 in json.loads((tmp_path / "few" / "meta.json").read_text())["distributed"]["rank_documents"]

    # sample_frac < 1: which rows are sampled depends on the split, how many per call does not
    ref = calibrate(dist_lm, _documents(DOC_LENGTHS), SAMPLED)
    got = load_thresholds(tmp_path / "sampled")
    assert got.meta["rows_sampled"] == ref.meta["rows_sampled"]
    assert torch.equal(got.count.sum(-1), ref.count.sum(-1))

    # a rank that raises: every rank reports it by rank number and error; nothing written
    for rep in reports:
        err = rep["fail"]["error"]
        assert rep["fail"]["agreed"], err
        assert "collecting statistics failed on rank" in err and "IndexError" in err, err
        assert "no artifact was written" in err
    assert not (tmp_path / "fail").exists()

    # a rank that does not arrive within the timeout: the others fail with a clear error
    print("timeout errors:", *(rep["timeout"]["error"] for rep in reports), sep="\n  ")
    assert "rank 2 did not arrive within 2 s" in reports[0]["timeout"]["error"]  # rank 0 names the late rank
    assert "rank 1:" in reports[1]["timeout"]["error"]
    assert reports[2]["timeout"]["error"], "the late rank must fail too"
    assert not (tmp_path / "timeout").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary directories left behind: {leftovers}"


def _dies(rank: int, lm, work: Path) -> None:
    """Rank 1 is killed mid-calibration; rank 0 must fail fast (lost peer), not wait for the timeout."""
    import datetime

    import torch.distributed as dist

    from topθ_core.distributed import DistributedCalibrationError

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))

    def die(done: int, total: int) -> None:
        if rank == 1:
            os._exit(3)

    t0 = time.perf_counter()
    try:
        calibrate_distributed(lm, _documents(DOC_LENGTHS), CONFIG, work / "art", timeout=120, progress=die)
        outcome = {"error": None}
    except DistributedCalibrationError as e:
        outcome = {"error": str(e), "seconds": time.perf_counter() - t0}
    (work / "rank0.json").write_text(json.dumps(outcome))
    os._exit(0)


def test_dead_rank_fails_fast_without_artifact(dist_lm, tmp_path):
    codes = _fork_ranks(2, _dies, dist_lm, tmp_path, timeout=100)
    assert codes == [0, 3], codes
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    print("dead rank:", outcome)
    assert outcome["error"] and "died" in outcome["error"]
    assert outcome["seconds"] < 60, "a dead peer must be noticed long before the timeout"
    assert not (tmp_path / "art").exists()


# ---- robust aggregation: sample reservoirs gathered and merged across ranks ----------------

ROBUST = {"median": CalibrationConfig(k=CONFIG.k, bin_width=8, tac=True, aggregation="median"),
          "trimmed": CalibrationConfig(k=CONFIG.k, bin_width=8, tac=True, aggregation="trimmed-mean",
                                       trim_fraction=0.2),
          "small": CalibrationConfig(k=CONFIG.k, bin_width=8, tac=True, aggregation="median", reservoir_capacity=4)}


def _robust(rank: int, lm, work: Path) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    for name, config in ROBUST.items():
        th = calibrate_distributed(lm, _documents(DOC_LENGTHS), config, work / name if rank == 0 else None)
        torch.save({"t_mean": th.t_mean, "t_std": th.t_std, "count": th.count}, work / f"{name}_rank{rank}.pt")
    os._exit(0)


def test_two_ranks_robust_aggregation_equal_one_process(dist_lm, tmp_path):
    """Every (layer, head, bin) holds ≤ 72 samples here: with capacity 128 the merged reservoirs hold
    every sample, so median and trimmed mean equal one process's; with capacity 4 they are a sample."""
    codes = _fork_ranks(2, _robust, dist_lm, tmp_path)
    assert codes == [0, 0], codes
    for name, config in ROBUST.items():
        ref = calibrate(dist_lm, _documents(DOC_LENGTHS), config)
        got = load_thresholds(tmp_path / name, expect_model=dist_lm.fingerprint)
        assert got.meta["aggregation"] == config.aggregation.value
        assert got.meta["distributed"]["world_size"] == 2
        for r in range(2):  # both ranks merged the same reservoirs
            mine = torch.load(tmp_path / f"{name}_rank{r}.pt")
            for key in ("count", "t_mean", "t_std"):
                torch.testing.assert_close(mine[key], getattr(got, key), rtol=0, atol=0)
        if name == "small":
            assert torch.equal(got.count, ref.count)
            assert got.meta["reservoir"]["sampled_cells"] > 0 and got.meta["reservoir"]["capacity"] == 4
            cal = got.count > 0  # a sample: no equality to check (the merge itself is tested in test_aggregation)
            assert torch.isfinite(got.t_mean[cal]).all() and (got.t_std[cal] >= 0).all()
            continue
        assert got.meta["reservoir"]["sampled_cells"] == 0
        _assert_same(ref, got, f"2 ranks, {name}")
