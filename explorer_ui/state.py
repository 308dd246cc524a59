"""Settings that survive: page switches, reloads, and links (``st.query_params``).

Streamlit forgets a widget's value when a run does not draw the widget (another page is open, or a
fragment reran alone).  :func:`keep` runs at the start of every run and every fragment run (through
:func:`fragment`): it copies each declared setting into a store that is not a widget's, and puts back
from that store what Streamlit dropped, so a setting outlives the page.  :func:`write_url` mirrors the open page's settings (and the
sidebar's) into the URL after each run, and :func:`restore_from_url` seeds a new session from it, so a
reload keeps the view and a copied link opens the same view elsewhere.  Values coming from a URL are
parsed by the setting's declared type; one that does not parse is ignored, never an error.

The declarations are ``session_keys.SETTINGS``: key → (page, type).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import streamlit as st

from . import session_keys as K

_RESTORED = "_state_restored"  # not a widget: the session read its URL once
_STORE = "_state_store"  # not a widget: the last value of every declared setting
_PAGE = "_state_page"  # not a widget: the open page's url path, whose settings the URL mirrors


def encode(value: Any) -> str:
    """A setting's value as URL text (lists as JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def decode(text: str, kind: type) -> Any:
    """URL text → a value of ``kind`` (int, float, bool, str or list); raises ValueError when it does not parse."""
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if kind is list:
        value = json.loads(text)
        if not isinstance(value, list):
            raise ValueError(f"not a list: {text!r}")
        return value
    if kind is int:
        return int(text)
    if kind is float:
        value = float(text)
        if value != value:  # NaN
            raise ValueError("NaN")
        return value
    return str(text)


def keep(reassert: bool = False) -> None:
    """Call first in every run and fragment run: declared settings outlive the pages that draw them.

    ``reassert`` (the app's full runs): also hand every kept value back through the Session State API,
    so each widget drawn in this run is sent with its value.  Without it, a widget coming back into
    view showed its *default* after a job had ended on another page (k 64 instead of 16; browser test
    ``test_settings_show_after_a_job_ended_on_another_page``), most likely because the job's
    ``st.rerun`` turned the value put back into "old" state, the widget went out without a value, and
    the browser, which had forgotten the widget while another page was open, drew the default.
    """
    store = st.session_state.setdefault(_STORE, {})
    for key in K.SETTINGS:
        if key in st.session_state:
            store[key] = st.session_state[key]
        if key in store and (reassert or key not in st.session_state):
            st.session_state[key] = store[key]


def fragment(func=None, *, run_every=None):
    """``st.fragment`` whose every run first :func:`keep` s the settings (a fragment's rerun would
    otherwise let Streamlit drop the widgets it did not draw) and then mirrors the open page's settings
    into the URL (a fragment's rerun does not reach the app script's own :func:`write_url`)."""
    def wrap(f):
        @functools.wraps(f)  # the fragment's identity is the wrapped function's module and name
        def body(*args, **kwargs):
            keep()
            try:
                return f(*args, **kwargs)
            finally:
                if st.session_state.get(_PAGE):
                    write_url(st.session_state[_PAGE])

        return st.fragment(body, run_every=run_every)

    return wrap(func) if func is not None else wrap


def restore_from_url() -> None:
    """Once per session: seed settings from the URL's query parameters (values that do not parse are skipped)."""
    if st.session_state.get(_RESTORED):
        return
    st.session_state[_RESTORED] = True
    for key, text in st.query_params.items():
        spec = K.SETTINGS.get(key)
        if spec is None or key in st.session_state:
            continue
        try:
            st.session_state[key] = decode(text, spec[1])
        except (ValueError, TypeError, json.JSONDecodeError):
            continue


def page_values(page: str) -> dict[str, Any]:
    """The current values of ``page``'s settings and the sidebar's (those set in this session)."""
    return {key: st.session_state[key] for key, (p, _) in K.SETTINGS.items()
            if p in (page, "sidebar") and key in st.session_state}


def write_url(page: str) -> None:
    """Mirror ``page``'s settings (and the sidebar's) into the URL, so the view is a link; ``page`` is
    remembered as the open one (fragments' reruns mirror it too)."""
    st.session_state[_PAGE] = page
    want = {k: encode(v) for k, v in page_values(page).items()}
    if dict(st.query_params) != want:
        st.query_params.from_dict(want)
