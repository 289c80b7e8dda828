"""The widget's job plumbing (Qt): one timer on the GUI thread delivers results and progress of the
background jobs (``hybrid_ct_slicer.jobs``) and ticks the training-status poller. The timer runs every
50 ms only while a job runs, wakes up for the next status poll otherwise, and stops when nothing is
polled (``jobs.timer_interval_ms``)."""

import logging
import time
import traceback

import qt
import slicer

from hybrid_ct_slicer.client import ServerError
from hybrid_ct_slicer.jobs import Poller, timer_interval_ms
from hybrid_ct_slicer.mrml import TransformError
from hybrid_ct_slicer.panel import cancel_message
from hybrid_ct_slicer.segments import SegmentError

DELIVER_MS = 50  # results and progress reach the GUI thread this often while a job runs
GIL_YIELD_S = 0.005  # per tick while jobs run: worker threads get the GIL even if Slicer holds it when idle
TRAIN_POLL_S = 5.0
IDLE_POLL_S = 30.0


class JobsMixin:
    """Mixed into the widget: needs ``self.jobs`` (JobRunner), ``self.ui``, ``self._sceneGeneration``,
    ``self._updateButtons`` and the poller callbacks ``_statusModel`` / ``_statusWork`` / ``_showTrainStatus``
    / ``_trainStatusFailed``."""

    def _createJobs(self):
        self._timer = qt.QTimer()
        self._timer.setInterval(DELIVER_MS)
        self._timer.connect("timeout()", self._tick)
        self._poller = Poller(self.jobs, "Training status", self._statusWork, TRAIN_POLL_S,
                              on_result=self._showTrainStatus, on_error=self._trainStatusFailed,
                              prepare=self._statusModel)

    def _scheduleTimer(self):
        """Tick every 50 ms while a job runs, at the next poll otherwise, never when idle."""
        interval = timer_interval_ms(self.jobs, self._poller, busy_ms=DELIVER_MS)
        if interval is None:
            self._timer.stop()
            return
        self._timer.setInterval(interval)
        if not self._timer.isActive():
            self._timer.start()

    def _startPolling(self):
        self._poller.start()
        self._scheduleTimer()

    def _tick(self):
        self.jobs.deliver()
        if self._poller is not None:
            self._poller.tick()
        if self.jobs.running:
            time.sleep(GIL_YIELD_S)  # let worker threads run even while Slicer's GUI thread holds the GIL
        self._updateButtons()
        self._scheduleTimer()

    def _start(self, what, work, onDone, *, onDiscard=None, exclusive=True):
        """Run ``work(job)`` (network and files, no Qt, no MRML) in a thread; ``onDone(result)`` later on the
        GUI thread."""
        job = self.jobs.start(what, work, exclusive=exclusive, tag=self._sceneGeneration,
                              on_done=lambda result: self._finished(what, onDone, result),
                              on_error=lambda exc: self._error(exc, what),
                              on_progress=self._progress if exclusive else None, on_discard=onDiscard)
        if job is None:
            self._setStatus(f"Busy with {self.jobs.exclusive.name}: wait or press Cancel.", error=True)
            return None
        if exclusive:
            self._setStatus(f"{what} ...")
            self._progress(0, what)
        self._updateButtons()
        self._scheduleTimer()
        return job

    def _finished(self, what, onDone, result):
        self.ui.progressBar.setFormat("%p%")
        try:
            onDone(result)
        except Exception as exc:  # noqa: BLE001
            self._error(exc, what)

    def _progress(self, percent, message):
        self.ui.progressBar.setValue(percent)
        self.ui.progressBar.setFormat(f"{message} %p%")

    def onCancel(self):
        job = self.jobs.exclusive
        if job is None:
            return
        sent = job.sent  # what the worker already asked the server to change
        if self.jobs.cancel(job):
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.setFormat("%p%")
            self._setStatus(cancel_message(job.name, sent), error=bool(sent))

    def _setStatus(self, text, error=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b" if error else "")
        (logging.error if error else logging.info)(text)

    def _error(self, exc, what):
        if isinstance(exc, (ServerError, SegmentError, TransformError, ValueError)):
            message = str(exc)
        else:
            message = f"{exc.__class__.__name__}: {exc}"
            logging.error(traceback.format_exc())
        self.ui.progressBar.setFormat("%p%")
        self._setStatus(f"{what} failed: {message}", error=True)
        slicer.util.errorDisplay(f"{what} failed.\n\n{message}", windowTitle="Hybrid CT")
