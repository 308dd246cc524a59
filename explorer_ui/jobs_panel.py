"""The sidebar's jobs panel and the session's job board (the Streamlit side of :mod:`explorer_ui.jobs`)."""

from __future__ import annotations

import streamlit as st

from . import session_keys as K
from . import state
from .jobs import Job, JobBoard, JobState, register_cancel_error

POLL_S = 1.0  # how often a panel or a result area redraws while a job runs

PAGE_TITLES = {"calibrate": "Calibrate", "accuracy": "Accuracy", "compare": "Compare"}
_ICONS = {JobState.RUNNING: ":material/hourglass_top:", JobState.DONE: ":material/check_circle:",
          JobState.FAILED: ":material/error:", JobState.CANCELLED: ":material/cancel:"}


def _register_engine_errors() -> None:
    from topθ_core.calibration import CalibrationCancelled
    from topθ_core.evaluation import EvaluationCancelled

    register_cancel_error(CalibrationCancelled)
    register_cancel_error(EvaluationCancelled)


_register_engine_errors()


def board() -> JobBoard:
    """This browser session's jobs."""
    if K.JOBS not in st.session_state:
        st.session_state[K.JOBS] = JobBoard()
    return st.session_state[K.JOBS]


def page_job(page: str) -> Job | None:
    """The job a page shows: the last one started from it (``page`` as in :data:`PAGE_TITLES`)."""
    return board().latest(page)


def _announce(job: Job | None) -> bool:
    """Once per job, when it is first seen ended: mark it announced, and a finished calibration becomes the
    active threshold set (the sidebar selects it when next drawn).  True when this call announced it."""
    if job is None or job.active or job.announced:
        return False
    job.announced = True
    if job.state is JobState.DONE and job.kind == "calibrate" and isinstance(job.result, dict):
        st.session_state[K.PENDING_ACTIVE_RUN] = job.result.get("name")
    return True


def announce_ended() -> None:
    """At the top of every full run, before the sidebar is drawn: the jobs that ended since the last run
    are announced there, with no rerun of their own (a rerun requested in this run would drop the button
    press that may have started it)."""
    for job in board().jobs(active=False):
        _announce(job)


def finish(job: Job | None) -> None:
    """Called where a job's end can first be seen outside a full run (the jobs panel's poll, a page's
    result area redrawing itself): announce it and draw the whole app again (the sidebar's active set,
    the page's controls).  In a full run :func:`announce_ended` has announced it already: nothing happens."""
    if _announce(job):
        st.rerun(scope="app")


def render_jobs_panel() -> None:
    """Draw the jobs panel in the sidebar; it redraws itself every second while a job runs."""
    jobs = board()
    run_every = POLL_S if jobs.any_active else None

    @state.fragment(run_every=run_every)
    def panel() -> None:
        listed = list(reversed(jobs.jobs()))[:6]
        if not listed:
            return
        st.markdown("**Jobs**")
        for job in listed:
            box = st.container(border=True)
            box.markdown(f"{_ICONS[job.state]} **{job.label}** · {PAGE_TITLES.get(job.page, job.page)}")
            if job.active:
                box.progress(job.fraction, text=job.status_text())
                box.button("Cancel", key=f"job_cancel_{job.id}", on_click=job.cancel, disabled=job.cancelling,
                           width="stretch")
            else:
                box.caption(job.status_text())
        newly_ended = [job for job in jobs.jobs(active=False) if _announce(job)]  # listed or not
        if newly_ended or (run_every is not None and not jobs.any_active):
            st.rerun(scope="app")  # redraw the app (active set, the page's controls); the last end stops the polling

    with st.sidebar:
        panel()
