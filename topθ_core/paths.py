"""Where the engine reads bundled data and writes its own files.

``BUNDLED_DATA`` is the repository's ``data/`` folder (the committed Parquet tasks and corpora).
``DATA_DIR`` is where converted models, results and caches go: ``$TOPTHETA_DATA`` when set, else
the same ``data/`` folder.  Bundled files are looked up in ``DATA_DIR`` first, so a user data
folder may hold its own copies.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data"
DATA_DIR = Path(os.environ.get("TOPTHETA_DATA", BUNDLED_DATA))


def bundled_file(name: str) -> Path:
    """A bundled data file: ``DATA_DIR/name`` if present there, else the repository's copy."""
    own = DATA_DIR / name
    return own if own.exists() else BUNDLED_DATA / name


def results_dir(directory: str | os.PathLike | None = None) -> Path:
    """Evaluation results: ``directory``, else ``$TOPTHETA_RESULTS_DIR``, else ``DATA_DIR/results``."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get("TOPTHETA_RESULTS_DIR")
    return Path(env) if env else DATA_DIR / "results"
