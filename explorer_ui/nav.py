"""Links between pages (``st.page_link`` needs the same absolute path ``app.py`` gave ``st.Page``)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

PAGES_DIR = Path(__file__).resolve().parents[1] / "pages"


def page_path(name: str) -> str:
    return str(PAGES_DIR / f"{name}.py")


def link(name: str, label: str, icon: str | None = None, container=None) -> None:
    """A link to ``pages/<name>.py``; silently absent where the page is not registered (page-only tests)."""
    try:
        (container or st).page_link(page_path(name), label=label, icon=icon)
    except Exception:  # noqa: BLE001 - StreamlitAPIException / page not found: the link is optional
        pass
