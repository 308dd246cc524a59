"""Dense results on disk, so that a variant toggle runs only the sparse side.

The dense arm of a paired evaluation never changes for a given model, task setting and item,
so its per-item values (log-likelihoods, NLL sums) are kept under
``<results>/dense_cache/<model key>/<task key hash>.parquet`` (columns ``unit``, ``value`` as
JSON).  The model key joins the model's fingerprint digest with its dtype and device type, since
those change the numbers.  Writes are atomic and merge with what is there; a cache file that
cannot be read is treated as empty.  Values are only ever complete items.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pandas as pd

from ..atomic import atomic_file
from ..paths import results_dir

_LOCK = threading.Lock()


def model_key(lm) -> str:
    """``<digest16>-<dtype>-<device type>`` of a LoadedModel."""
    p = next(lm.model.parameters())
    return f"{lm.fingerprint.digest[:16]}-{str(p.dtype).replace('torch.', '')}-{p.device.type}"


class DenseCache:
    """Per-item dense values of one model; ``directory=None`` keeps them in memory only."""

    def __init__(self, directory: Path | None, key: str):
        self.directory = None if directory is None else Path(directory) / key
        self.key = key
        self._memory: dict[str, dict[str, dict]] = {}  # task key → unit → value
        self._read: dict[str, float] = {}  # task key → mtime of the file last read
        self.hits = 0
        self.misses = 0

    def _path(self, task_key: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{hashlib.sha256(task_key.encode()).hexdigest()[:24]}.parquet"

    def _load(self, task_key: str) -> dict[str, dict]:
        mem = self._memory.setdefault(task_key, {})
        path = self._path(task_key)
        if path is None or not path.is_file():
            return mem
        mtime = path.stat().st_mtime
        if self._read.get(task_key) != mtime:
            try:
                df = pd.read_parquet(path)
                mem.update({u: json.loads(v) for u, v in zip(df["unit"], df["value"])})
            except Exception:  # noqa: BLE001 - a damaged cache is only a cache
                pass
            self._read[task_key] = mtime
        return mem

    def get(self, task_key: str, units: list[str]) -> dict[str, dict]:
        """The cached values among ``units`` (unit → value)."""
        with _LOCK:
            mem = self._load(task_key)
            found = {u: mem[u] for u in units if u in mem}
        self.hits += len(found)
        self.misses += len(units) - len(found)
        return found

    def known(self, task_key: str, units: list[str]) -> int:
        """How many of ``units`` have cached values (without counting hits or misses)."""
        with _LOCK:
            mem = self._load(task_key)
            return sum(u in mem for u in units)

    def put(self, task_key: str, values: dict[str, dict]) -> None:
        """Add complete per-unit values (JSON-serialisable) and write the task's file atomically."""
        if not values:
            return
        with _LOCK:
            mem = self._load(task_key)
            mem.update(values)
            path = self._path(task_key)
            if path is None:
                return
            frame = pd.DataFrame({"unit": list(mem), "value": [json.dumps(v) for v in mem.values()],
                                  "task": task_key})
            with atomic_file(path) as tmp:
                frame.to_parquet(tmp, index=False)
            self._read[task_key] = path.stat().st_mtime


def dense_cache_for(lm, directory: str | Path | None = None, *, on_disk: bool = True) -> DenseCache:
    """The dense cache of ``lm`` under ``<results dir>/dense_cache`` (or in memory only)."""
    root = results_dir(directory) / "dense_cache" if on_disk else None
    return DenseCache(root, model_key(lm))
