"""Runs: saved threshold sets (rename, delete, import a zip, download one) and saved evaluation results (a table,
CSV exports, delete).

Every change is a button callback (explorer_ui.runs does the work): callbacks run before the next rerun draws
the sidebar, so its list and the active set follow at once; deleting the active set makes it pick another.
"""

from functools import partial
from pathlib import Path

import streamlit as st

from explorer_ui import nav, runs, services
from explorer_ui import session_keys as K
from explorer_ui.sidebar import context

ctx = context()
digest = ctx.lm.fingerprint.digest if ctx.lm is not None else None
st.title("Runs")
st.caption(f"Threshold sets are saved under {runs.runs_dir()}, evaluation results under {runs.results_folder()}.")

note = st.container()  # always drawn, so the elements below keep their place (and state) when it empties
message = st.session_state.pop(K.RUNS_MESSAGE, None)
if message:
    {"ok": note.success, "warning": note.warning, "error": note.error}[message[0]](message[1])


def _say(kind: str, text: str) -> None:
    st.session_state[K.RUNS_MESSAGE] = (kind, text)


def _attempt(action, failed: str):
    """``action()``, or None after saying why it failed (a :class:`runs.RunsError` is one line, never a traceback)."""
    try:
        return action()
    except runs.RunsError as e:
        _say("error", f"{failed}: {e}")
        return None


def _follow_rename(old: str, new: str) -> None:
    """Settings that named the renamed set name it by its new name (the active set stays active)."""
    if st.session_state.get(K.ACTIVE_RUN) == old:
        st.session_state[K.PENDING_ACTIVE_RUN] = new
    remembered = st.session_state.get(K.ACTIVE_BY_MODEL) or {}
    for model, name in list(remembered.items()):
        if name == old:
            remembered[model] = new
    for key in (K.TH_RUN, K.TH_OVERLAY):
        if st.session_state.get(key) == old:
            st.session_state[key] = new
    st.session_state[K.RUNS_PICK] = new


def _rename() -> None:
    old, new = st.session_state.get(K.RUNS_PICK), st.session_state.get(K.RUNS_NEW_NAME, "")
    path = _attempt(lambda: runs.rename_run(old, new), "Not renamed")
    if path is None:
        return
    _follow_rename(old, path.name)
    st.session_state[K.RUNS_NEW_NAME] = ""
    _say("ok", f"Renamed **{old}** to **{path.name}**.")


def _delete() -> None:
    name = st.session_state.get(K.RUNS_PICK)
    active = st.session_state.get(K.ACTIVE_RUN) == name
    if _attempt(lambda: runs.delete_run(name) or True, "Not deleted") is None:
        return
    st.session_state[K.RUNS_DELETE_CONFIRM] = False
    remembered = st.session_state.get(K.ACTIVE_BY_MODEL) or {}
    for model in [m for m, n in remembered.items() if n == name]:
        del remembered[model]
    _say("ok", f"Deleted **{name}**." + (" It was the active threshold set: the sidebar picked another." if active
                                          else ""))


def _import(slot: int) -> None:
    upload = st.session_state.get(f"{K.RUNS_UPLOAD}_{slot}")
    if upload is None:
        _say("error", "Choose a zip file first.")
        return
    try:
        imported = runs.import_run_zip(upload.getvalue(), name=st.session_state.get(K.RUNS_IMPORT_NAME, ""),
                                       default_name=Path(upload.name).stem, model_digest=digest)
    except runs.RunsError as e:
        _say("error", f"{upload.name} was not imported: {e}")
        return
    st.session_state[K.RUNS_UPLOADS] = slot + 1  # a fresh, empty uploader
    st.session_state[K.RUNS_IMPORT_NAME] = ""
    st.session_state[K.RUNS_PICK] = imported.name
    _say("warning" if imported.matches is False else "ok", imported.describe())


def _delete_result() -> None:
    file = st.session_state.get(K.RUNS_RESULT)
    if _attempt(lambda: runs.delete_result(file) or True, "Not deleted") is None:
        return
    st.session_state[K.RUNS_RESULT_DELETE_CONFIRM] = False
    _say("ok", f"Deleted the saved result **{file}**.")


# ---------------------------------------------------------------- threshold sets
st.subheader("Threshold sets")
table = ctx.runs.copy()
if table.empty:
    st.info("No saved threshold sets yet: calibrate one, or import a zip below.")
    nav.link("calibrate", "Go to Calibrate", ":material/tune:")
else:
    table.insert(1, "for loaded model", table["digest"] == digest if digest is not None else None)
    table.insert(1, "active", table["name"] == ctx.run_name)
    shown = table.drop(columns=["path", "mtime", "digest"])
    st.dataframe(shown, hide_index=True, width="stretch")
    st.download_button("Table as CSV", data=runs.table_csv(shown), file_name="threshold-sets.csv", mime="text/csv",
                       key="runs_sets_csv", icon=":material/download:", on_click="ignore")

    names = list(table["name"])
    if st.session_state.get(K.RUNS_PICK) not in names:
        st.session_state[K.RUNS_PICK] = ctx.run_name if ctx.run_name in names else names[0]
    pick = st.selectbox("Threshold set", names, key=K.RUNS_PICK)
    row = table[table["name"] == pick].iloc[0]
    meta = runs.read_meta(Path(row["path"])) or {}
    st.caption(" · ".join(runs.provenance_lines(meta)))
    c1, c2, c3 = st.columns(3)
    with c1:
        st.text_input("New name", key=K.RUNS_NEW_NAME, placeholder=pick)
        st.button("Rename", key=K.RUNS_RENAME, on_click=_rename, icon=":material/edit:")
    with c2:
        confirm = st.checkbox(f"Yes, delete {pick}", key=K.RUNS_DELETE_CONFIRM)
        st.button("Delete", key=K.RUNS_DELETE, on_click=_delete, disabled=not confirm, icon=":material/delete:",
                  help="removes the folder; saved evaluation results of the set are kept")
    with c3:
        st.download_button("Download (.zip)", data=partial(runs.zip_run, row["path"]), file_name=f"{pick}.zip",
                           mime="application/zip", key="runs_zip", icon=":material/download:", on_click="ignore")

importer = st.expander("Import a threshold set (.zip)", expanded=table.empty, key=K.RUNS_IMPORT_OPEN,
                       on_change="rerun")
if importer.open:
    slot = int(st.session_state.get(K.RUNS_UPLOADS, 0))
    upload = importer.file_uploader("Zip of a threshold set (as Download writes: <name>/thresholds.parquet and "
                                    "<name>/meta.json)", type=["zip"], key=f"{K.RUNS_UPLOAD}_{slot}")
    importer.text_input("Name", key=K.RUNS_IMPORT_NAME, placeholder="the zip's folder name")
    importer.button("Import", key=K.RUNS_IMPORT, on_click=_import, args=(slot,), disabled=upload is None,
                    icon=":material/upload:", help="a set for another model is imported too; the sidebar lists it "
                                                   "when that model is loaded")

# ---------------------------------------------------------------- evaluation results
st.subheader("Saved evaluation results")
files = services.saved_result_files()
if files.empty:
    st.info("No saved evaluation results yet: run one on the Accuracy page.")
    nav.link("accuracy", "Go to Accuracy", ":material/fact_check:")
    st.stop()
st.dataframe(files.drop(columns=["thresholds_id"]), hide_index=True, width="stretch")
everything = services.saved_results()
st.download_button(f"All {len(everything)} result rows as CSV", data=runs.table_csv(everything),
                   file_name="evaluation-results.csv", mime="text/csv", key="runs_results_csv",
                   icon=":material/download:", on_click="ignore")

if st.session_state.get(K.RUNS_RESULT) not in list(files["file"]):
    st.session_state[K.RUNS_RESULT] = files["file"].iloc[0]
labels = {r["file"]: f"{r['created']} · {r['task']} · {r['config_label']} · {r['threshold_set']}"
          for _, r in files.iterrows()}
chosen = st.selectbox("Result", list(files["file"]), key=K.RUNS_RESULT, format_func=labels.get)
try:
    rows = runs.read_result_file(chosen)
except runs.RunsError as e:
    st.error(str(e))
else:
    st.dataframe(rows, hide_index=True, width="stretch")
    r1, r2 = st.columns(2)
    r1.download_button("This result as CSV", data=runs.table_csv(rows), file_name=f"{Path(chosen).stem}.csv",
                       mime="text/csv", key="runs_result_csv", icon=":material/download:", on_click="ignore")
    sure = r2.checkbox("Yes, delete this result", key=K.RUNS_RESULT_DELETE_CONFIRM)
    r2.button("Delete result", key=K.RUNS_RESULT_DELETE, on_click=_delete_result, disabled=not sure,
              icon=":material/delete:")
