"""Reading user text data: ``.txt``, ``.jsonl``, ``.csv``, ``.parquet``.

* ``.txt``: documents separated by blank lines.
* ``.jsonl``: one JSON object per line with a string field ``text``.
* ``.csv`` / ``.parquet``: a column ``text``.

Every problem (missing path, unknown extension, invalid UTF-8, malformed line, missing
column, no usable text) raises :class:`DataFileError` naming the file and the problem.
:func:`read_texts_from_bytes` does the same for an upload held in memory.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

SUPPORTED = (".txt", ".jsonl", ".csv", ".parquet")


class DataFileError(ValueError):
    """A data file that cannot be used, with the file and the problem in the message."""


def read_texts(path: str | os.PathLike, column: str = "text") -> list[str]:
    """Documents of a data file (non-empty, stripped)."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    if not path.is_file():
        raise DataFileError(f"{path}: not a file")
    return read_texts_from_bytes(path.read_bytes(), path.name, column=column)


def read_texts_from_bytes(data: bytes, name: str, column: str = "text") -> list[str]:
    """Documents of an in-memory file whose type is given by ``name``'s extension."""
    ext = Path(name).suffix.lower()
    if ext not in SUPPORTED:
        raise DataFileError(f"{name}: unsupported file type {ext or '(none)'}; use one of {', '.join(SUPPORTED)}")
    if ext == ".parquet":
        texts = _parquet(data, name, column)
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFileError(f"{name}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
        if ext == ".txt":
            texts = re.split(r"\n\s*\n", text)
        elif ext == ".jsonl":
            texts = _jsonl(text, name, column)
        else:
            texts = _csv(text, name, column)
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataFileError(f"{name}: no usable text (every document is empty)")
    return texts


def _jsonl(text: str, name: str, column: str) -> list[str]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{name}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or column not in obj:
            raise DataFileError(f"{name}: line {i} has no field {column!r}")
        if not isinstance(obj[column], str):
            raise DataFileError(f"{name}: line {i}: field {column!r} is not a string")
        out.append(obj[column])
    return out


def _csv(text: str, name: str, column: str) -> list[str]:
    import pandas as pd

    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several parser errors
        raise DataFileError(f"{name}: not a readable CSV file ({e})") from None
    return _column(df, name, column)


def _parquet(data: bytes, name: str, column: str) -> list[str]:
    import pandas as pd

    try:
        df = pd.read_parquet(io.BytesIO(data))
    except Exception as e:  # pyarrow raises several error types for corrupt input
        raise DataFileError(f"{name}: not a readable Parquet file ({e})") from None
    return _column(df, name, column)


def _column(df, name: str, column: str) -> list[str]:
    if column not in df.columns:
        cols = ", ".join(map(str, df.columns[:10])) or "(none)"
        raise DataFileError(f"{name}: no column {column!r} (columns: {cols})")
    values = df[column].tolist()
    if any(v is not None and not isinstance(v, str) for v in values):
        raise DataFileError(f"{name}: column {column!r} holds non-text values")
    return [v for v in values if v]
