"""Background jobs of one browser session: calibration, evaluation and generation outlive the page.

Pure Python (no Streamlit).  A :class:`Job` runs ``work(job)`` in its own thread; ``work`` calls
the engine (which reports through callbacks), feeds ``job.progress`` and ``job.publish`` and checks
``job.should_stop``.  The page that started it only reads the job: switching pages reruns other
scripts but never touches the thread, and coming back finds it running or finished.  A cancelled or
failed job keeps no result (the engine raises its cancellation error before anything is written).

A :class:`JobBoard` is the job list of one session (the app keeps one in ``st.session_state``).
"""

from __future__ import annotations

import enum
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable


class JobState(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobCancelled(RuntimeError):
    """Raised by ``job.check()`` when the job was asked to stop."""


CANCEL_ERRORS: tuple[type[BaseException], ...] = (JobCancelled,)


def register_cancel_error(kind: type[BaseException]) -> None:
    """An engine's own cancellation error (``CalibrationCancelled``, ``EvaluationCancelled``) ends a job as cancelled."""
    global CANCEL_ERRORS
    if kind not in CANCEL_ERRORS:
        CANCEL_ERRORS = CANCEL_ERRORS + (kind,)


@dataclass
class Job:
    """One background job.  ``inputs`` identify what it computes (a page compares them with its
    controls to mark a shown result stale); ``partial`` is the latest published intermediate result."""

    kind: str
    label: str
    page: str
    inputs: dict = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    state: JobState = JobState.RUNNING
    done: float = 0.0
    total: float = 0.0
    unit: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    result: Any = None
    partial: Any = None
    announced: bool = False  # the jobs panel has seen the job end
    traceback: str = ""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    # ---- called by the work function (job thread) ---------------------------------------
    def progress(self, done: float, total: float) -> None:
        self.done, self.total = float(done), float(total)

    def publish(self, partial: Any) -> None:
        self.partial = partial

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        if self._stop.is_set():
            raise JobCancelled(f"{self.kind} cancelled")

    # ---- called by the pages ---------------------------------------------------------------
    def cancel(self) -> None:
        self._stop.set()

    @property
    def active(self) -> bool:
        return self.state is JobState.RUNNING

    @property
    def cancelling(self) -> bool:
        return self.active and self._stop.is_set()

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    def eta(self) -> float | None:
        """Seconds left at the pace so far (None until some work is done)."""
        if not self.active or self.done <= 0 or self.total <= 0:
            return None
        return self.elapsed * (self.total - self.done) / self.done

    def status_text(self) -> str:
        if self.state is JobState.DONE:
            return f"done in {self.elapsed:.1f} s"
        if self.state is JobState.FAILED:
            return f"failed: {self.error}"
        if self.state is JobState.CANCELLED:
            return "cancelled: nothing was saved"
        if self.cancelling:
            return "cancelling…"
        text = f"{self.fraction:.0%}"
        if self.total:
            text += f" · {self.done:,.0f}/{self.total:,.0f} {self.unit}".rstrip()
        eta = self.eta()
        return text + (f" · ETA {eta:.0f} s" if eta is not None else f" · {self.elapsed:.0f} s")


class JobBoard:
    """The jobs of one session, newest last.  Thread-safe."""

    def __init__(self, keep: int = 20):
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self.keep = keep

    def submit(self, kind: str, label: str, page: str, work: Callable[[Job], Any], *, inputs: dict | None = None,
               replace: bool = False) -> Job:
        """Start ``work(job)`` in a thread.  ``replace`` cancels this page's running jobs of the same kind first."""
        if replace:
            for old in self.jobs(page=page, kind=kind, active=True):
                old.cancel()
        job = Job(kind=kind, label=label, page=page, inputs=dict(inputs or {}))
        job._thread = threading.Thread(target=self._run, args=(job, work), name=f"toptheta-{kind}-{job.id}",
                                       daemon=True)
        with self._lock:
            self._jobs.append(job)
            ended = [j for j in self._jobs if not j.active]
            for j in ended[: max(0, len(self._jobs) - self.keep)]:
                self._jobs.remove(j)
        job._thread.start()
        return job

    @staticmethod
    def _run(job: Job, work: Callable[[Job], Any]) -> None:
        try:
            result = work(job)  # work checks should_stop before it writes anything
        except CANCEL_ERRORS:
            job.state = JobState.CANCELLED
        except Exception as e:  # noqa: BLE001 - the job reports every failure to its page
            job.error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            job.traceback = traceback.format_exc()
            job.state = JobState.FAILED
        else:
            job.result = result
            job.state = JobState.DONE
        finally:
            job.finished = time.time()

    def jobs(self, *, page: str | None = None, kind: str | None = None, active: bool | None = None) -> list[Job]:
        with self._lock:
            out = list(self._jobs)
        return [j for j in out if (page is None or j.page == page) and (kind is None or j.kind == kind)
                and (active is None or j.active == active)]

    def latest(self, page: str, kind: str | None = None) -> Job | None:
        js = self.jobs(page=page, kind=kind)
        return js[-1] if js else None

    def get(self, job_id: str) -> Job | None:
        return next((j for j in self.jobs() if j.id == job_id), None)

    @property
    def any_active(self) -> bool:
        return any(j.active for j in self.jobs())
