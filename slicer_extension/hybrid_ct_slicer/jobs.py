"""Background jobs for the module, free of Qt: a thread per job, a cancel flag, a progress callback.

The GUI never waits on the network: HybridCT.py starts every server call as a :class:`Job` through a
:class:`JobRunner` and calls :meth:`JobRunner.deliver` from a ``QTimer`` on the GUI thread; that is
where results, errors and progress reach the widgets (MRML and Qt are touched only there).

- one *exclusive* job at a time (Run, Submit, Next sample, ...: the buttons are disabled meanwhile),
  any number of *background* jobs (status polls);
- :meth:`JobRunner.cancel` drops a job at once: the GUI is free again, the thread stops at its next
  check (transfers check between chunks) and whatever it still returns is discarded
  (``on_discard`` removes its temp files);
- jobs carry a ``tag`` (the scene generation): :meth:`JobRunner.drop_tag` drops every job tied to a
  scene that was closed;
- :class:`Poller` repeats a job every ``interval_s``; an error (a timeout) is reported and the next
  poll still happens.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any, Callable


class Cancelled(Exception):
    """Raised inside a job's work when the job was cancelled."""


class Job:
    """One unit of work in a thread. ``work(job)`` may call ``job.progress(percent, message)`` and
    ``job.check_cancelled()`` (raises :class:`Cancelled`)."""

    def __init__(self, name: str, work: Callable[["Job"], Any], *, on_done: Callable[[Any], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_progress: Callable[[int, str], None] | None = None,
                 on_discard: Callable[[Any], None] | None = None, tag: Any = None):
        self.name = name
        self.tag = tag
        self._work = work
        self.on_done, self.on_error, self.on_progress, self.on_discard = on_done, on_error, on_progress, on_discard
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._progress = (0, name)
        self.result: Any = None
        self.error: BaseException | None = None
        self.trace = ""
        self.dropped = False
        self._sent: list[str] = []  # what the worker asked the server to change (see Workflow.sent)
        self._thread = threading.Thread(target=self._run, name=f"HybridCT {name}", daemon=True)

    # -------------------------------------------------------------- worker side
    def progress(self, percent: float, message: str = "") -> None:
        with self._lock:
            self._progress = (max(0, min(100, int(percent))), str(message or self.name))

    def mark_sent(self, what: str) -> None:
        """Worker side: a request that changes the server's state is about to be sent."""
        with self._lock:
            if what not in self._sent:
                self._sent.append(what)

    @property
    def sent(self) -> list[str]:
        with self._lock:
            return list(self._sent)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled(f"{self.name} was cancelled")

    def _run(self) -> None:
        try:
            self.result = self._work(self)
        except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread
            self.error = exc
            self.trace = traceback.format_exc()
        finally:
            self._finished.set()

    # -------------------------------------------------------------- GUI side
    def start(self) -> "Job":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def get_progress(self) -> tuple[int, str]:
        with self._lock:
            return self._progress


class JobRunner:
    """Starts jobs and hands their outcome to callbacks in the thread that calls :meth:`deliver`."""

    def __init__(self):
        self.exclusive: Job | None = None
        self.jobs: list[Job] = []
        self._dropped: list[Job] = []

    @property
    def busy(self) -> bool:
        return self.exclusive is not None

    @property
    def running(self) -> bool:
        return bool(self.jobs or self._dropped)

    def start(self, name: str, work: Callable[[Job], Any], *, exclusive: bool = True, **callbacks) -> Job | None:
        """Start a job; None (nothing started) while another exclusive job runs."""
        if exclusive and self.exclusive is not None:
            return None
        job = Job(name, work, **callbacks)
        if exclusive:
            self.exclusive = job
        self.jobs.append(job)
        return job.start()

    def _drop(self, job: Job) -> None:
        job.cancel()
        job.dropped = True
        if job in self.jobs:
            self.jobs.remove(job)
            self._dropped.append(job)
        if job is self.exclusive:
            self.exclusive = None

    def cancel(self, job: Job | None = None) -> bool:
        """Cancel ``job`` (default: the exclusive one); its outcome is never delivered."""
        job = job or self.exclusive
        if job is None:
            return False
        self._drop(job)
        return True

    def drop_tag(self, tag: Any) -> int:
        """Drop every job tied to ``tag`` (e.g. the scene that was closed); returns how many."""
        doomed = [j for j in self.jobs if j.tag == tag]
        for job in doomed:
            self._drop(job)
        return len(doomed)

    def deliver(self) -> None:
        """Call from the GUI thread: progress of the running jobs, outcome of the finished ones."""
        for job in list(self._dropped):
            if job.finished:
                self._dropped.remove(job)
                if job.error is None and job.on_discard is not None and job.result is not None:
                    job.on_discard(job.result)
        for job in list(self.jobs):
            if not job.finished:
                if job.on_progress is not None:
                    job.on_progress(*job.get_progress())
                continue
            self.jobs.remove(job)
            if job is self.exclusive:
                self.exclusive = None
            if job.error is not None:
                if job.on_error is not None and not isinstance(job.error, Cancelled):
                    job.on_error(job.error)
            elif job.on_done is not None:
                job.on_done(job.result)

    def shutdown(self) -> None:
        for job in list(self.jobs):
            self._drop(job)


class Poller:
    """Runs ``work(job)`` as a background job every ``interval_s`` while :attr:`active`.

    An error is handed to ``on_error`` and counted in :attr:`failures`; the next poll happens anyway
    (one timeout must not stop the status for good). ``tick(now)`` is called by the GUI's timer.
    """

    def __init__(self, runner: JobRunner, name: str, work: Callable[..., Any], interval_s: float, *,
                 on_result: Callable[[Any], None], on_error: Callable[[BaseException], None],
                 prepare: Callable[[], Any] | None = None):
        """``prepare()`` runs in the thread calling :meth:`tick` (the GUI thread) when a poll starts and its
        value is handed to ``work(job, value)``: what the worker needs from the widgets is read there, never
        from the worker thread."""
        self.runner, self.name, self.work, self.interval_s = runner, name, work, float(interval_s)
        self.prepare = prepare
        self.on_result, self.on_error = on_result, on_error
        self.active = False
        self.failures = 0
        self._job: Job | None = None
        self._next = 0.0

    def start(self, now: float | None = None) -> None:
        self.active = True
        self._next = time.monotonic() if now is None else now

    def stop(self) -> None:
        self.active = False

    def _done(self, result) -> None:
        self._job = None
        self.failures = 0
        self.on_result(result)

    def _error(self, exc) -> None:
        self._job = None
        self.failures += 1
        self.on_error(exc)

    def tick(self, now: float | None = None) -> bool:
        """Start a poll when one is due and none is in flight; True when one was started."""
        now = time.monotonic() if now is None else now
        if not self.active or now < self._next:
            return False
        if self._job is not None:
            if not self._job.dropped:
                return False
            self._job = None
        self._next = now + self.interval_s
        work = self.work
        if self.prepare is not None:
            value = self.prepare()
            work = lambda job: self.work(job, value)  # noqa: E731
        self._job = self.runner.start(self.name, work, exclusive=False, on_done=self._done, on_error=self._error)
        return True

    def seconds_to_next(self, now: float | None = None) -> float | None:
        """Seconds until the next poll is due (0 when due), None when polling is off."""
        if not self.active:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self._next - now)


def timer_interval_ms(runner: JobRunner, poller: Poller | None = None, now: float | None = None,
                      busy_ms: int = 50, max_idle_ms: int = 60_000) -> int | None:
    """How often the GUI's timer must tick: ``busy_ms`` while a job runs (progress, results), else only when
    the next status poll is due, and None (stop the timer) when nothing runs and nothing is polled."""
    if runner.running:
        return busy_ms
    due = poller.seconds_to_next(now) if poller is not None else None
    if due is None:
        return None
    return int(min(max_idle_ms, max(busy_ms, due * 1000)))
