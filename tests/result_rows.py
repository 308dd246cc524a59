"""Test data the app's tests share: a saved evaluation result row, a zip archive of files."""

from __future__ import annotations

import io
import zipfile

import pandas as pd

from topθ_core.evaluation import RESULT_COLUMNS


def result_frame(tid: str, task: str, created: str, delta: float, metric: str = "acc", kept: float = 0.2, *,
                 half_width: float = 0.1, n: int = 20, label: str = "top-θ k=8") -> pd.DataFrame:
    """A one-row result of threshold set ``tid``: dense 0.5, Top-θ 0.5 + ``delta``, interval ± ``half_width``."""
    row = {c: None for c in RESULT_COLUMNS}
    row.update(task=task, metric=metric, dense=0.5, sparse=0.5 + delta, delta=delta, ci_low=delta - half_width,
               ci_high=delta + half_width, kept_attention=kept, config_label=label, thresholds_id=tid, n=n,
               model="tiny-llama", created=created, run_id=created)
    return pd.DataFrame([row], columns=RESULT_COLUMNS)


def make_zip(entries: dict[str, bytes]) -> bytes:
    """A zip archive holding ``entries`` (name → bytes), e.g. a threshold set to import."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()
