"""The server's child processes live and die with it; one training at a time, across restarts too.

MONAI Label runs training and scoring as ``python -m monailabel.interfaces.utils.app -m train ...``
subprocesses. Stock, a ``kill -9`` of the server leaves them running (the training went on and died
later on a broken pipe), a restarted server could start a second training beside the orphan, and on
SIGTERM the interpreter waited for them. Three mechanisms, each tested (tests/test_app_lifecycle.py):

- :func:`die_with_parent`: a task subprocess asks Linux to SIGKILL it when the server dies
  (``prctl(PR_SET_PDEATHSIG)``), and exits at once if the server is already gone;
- :class:`TrainingLock`: ``<model_dir>/train.lock`` holds the training process's PID and start time;
  a new training is refused (409) while that process lives, and a lock whose process is gone is stale
  and removed;
- :func:`shutdown_children_on_signals`: SIGTERM / SIGINT first kill every task subprocess tree, then
  hand over to uvicorn's own handler (graceful HTTP shutdown).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

SERVER_PID_ENV = "HYBRID_CT_SERVER_PID"
TASK_METHODS = ("train", "scoring", "batch_infer")
_PR_SET_PDEATHSIG = 1


def is_task_subprocess(argv=None) -> bool:
    """True in MONAI Label's train / scoring subprocesses (``-m monailabel.interfaces.utils.app``)."""
    first = os.path.normpath(str((argv or sys.argv or [""])[0]))
    return first.endswith(os.path.join("monailabel", "interfaces", "utils", "app.py"))


def mark_server_process() -> None:
    """Called once in the server: its PID is inherited by the task subprocesses through the environment."""
    os.environ[SERVER_PID_ENV] = str(os.getpid())


def die_with_parent() -> bool:
    """In a task subprocess: be killed when the server dies; exit now if it already has. Linux only."""
    expected = os.environ.get(SERVER_PID_ENV)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError) as e:
        logger.warning("cannot tie this task to the server's life (%s): the training lock still guards restarts", e)
        return False
    if expected and str(os.getppid()) != expected:  # the server died before prctl took effect
        logger.error("the server (pid %s) is gone: this task exits", expected)
        os._exit(1)
    return True


class TrainingLock:
    """``train.lock`` = {"pid", "create_time", "started"} of the process that trains now."""

    def __init__(self, model_dir):
        self.path = Path(model_dir) / "train.lock"

    def owner(self) -> dict | None:
        """The live owner, or None (a stale lock -- its process gone or its PID reused -- is removed)."""
        try:
            info = json.loads(self.path.read_text())
            proc = psutil.Process(int(info["pid"]))
            if abs(proc.create_time() - float(info["create_time"])) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE:
                return info
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            pass
        logger.warning("removing the stale training lock %s", self.path)
        self.path.unlink(missing_ok=True)
        return None

    def acquire(self) -> None:
        owner = self.owner()
        if owner and int(owner["pid"]) != os.getpid():
            raise RuntimeError(f"another training (pid {owner['pid']}, since {owner.get('started')}) holds {self.path}")
        me = psutil.Process(os.getpid())
        info = {"pid": me.pid, "create_time": me.create_time(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{me.pid}.tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.path)

    def release(self) -> None:
        owner = self.owner()
        if owner and int(owner["pid"]) == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def kill_task_processes() -> int:
    """Kill every train / scoring / batch subprocess of this server, with their children."""
    from monailabel.utils.async_tasks.utils import processes

    killed = 0
    for method in TASK_METHODS:
        for process in list(processes(method).values()):
            try:
                tree = psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]
            except psutil.Error:
                continue
            for p in tree:
                try:
                    p.kill()
                    killed += 1
                except psutil.Error:
                    pass
    if killed:
        logger.info("killed %d task process(es) on shutdown", killed)
    return killed


def shutdown_children_on_signals(signals=(signal.SIGTERM, signal.SIGINT)) -> bool:
    """Wrap the current (uvicorn's) handlers: kill the task subprocesses first. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        logger.warning("signal handlers not installed (not the main thread): task subprocesses still die with "
                       "the server through PR_SET_PDEATHSIG")
        return False
    for sig in signals:
        previous = signal.getsignal(sig)

        def handler(signum, frame, _previous=previous):
            kill_task_processes()
            if callable(_previous):
                _previous(signum, frame)
            elif _previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        signal.signal(sig, handler)
    return True
