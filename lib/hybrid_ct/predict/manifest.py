"""What a batch has done, kept in its output folder: ``manifest.jsonl``, so that any rerun (one process or a
cluster, ``hybrid_ct.predict.runner`` / ``hybrid_ct.predict.cluster``) skips the cases that are done and valid
and redoes the others.

One JSON line per finished case, appended (and flushed to disk) by the one process that drives the batch; the
last line of a case wins, a torn last line (a crash while appending) is ignored, and ``compact()`` rewrites the
file atomically at the end of a run. A line holds::

    {"case", "input", "fingerprint" (the input files: path, size, mtime), "model_sha256" (the checkpoint
     file), "settings" (what else changes the outputs: intensity, overlays, formats, chest check, device,
     amp, package version), "status", "row" (the summary.csv row), "outputs" {file: [size, mtime_ns,
     sha256]}, "finished" (UTC)}

A case is *done and valid* when its last line has the same fingerprint, model and settings, its status is final
("ok", or "refused": the input is not a chest CT, which a rerun would only say again) and every output file is
there with its recorded size and, when its mtime changed, its recorded sha256. Anything else (no line, "error",
another model, other settings, a missing, truncated or half-written output) is run again.

    m = Manifest(out_dir)
    row = m.done(case.name, fp, model_sha, settings)   # the summary row, or None: run it
    m.record(case.name, str(case.path), fp, model_sha, settings, row, out_dir, files)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from hybrid_ct.errors import InputError
from hybrid_ct.files import file_sha256, write_atomic

log = logging.getLogger("hybrid_ct")

MANIFEST_NAME = "manifest.jsonl"
FINAL_STATUSES = ("ok", "refused")


def input_files(path: Path, files=()) -> list:
    """The files a case reads: its DICOM series' files, the file itself, or a series folder's own files."""
    if files:
        return [Path(f) for f in files]
    path = Path(path)
    if path.is_dir():
        return sorted(q for q in path.iterdir() if q.is_file() and not q.name.startswith("."))
    return [path]


def input_fingerprint(path: Path, files=(), kind: str = "", series_uid: str = "") -> str:
    """sha256 of what identifies a case's input without reading it again: each file's absolute path, size and
    mtime (as make / rsync do; a PACS export is rewritten, not edited in place), the kind and series UID."""
    h = hashlib.sha256(f"{kind}\0{series_uid}\n".encode())
    for f in input_files(path, files):
        try:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{os.path.abspath(f)}\0missing\n".encode())
    return h.hexdigest()


def settings_key(settings: dict) -> str:
    """A short stable key of the settings that change a case's outputs."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_facts(out_dir, names) -> dict:
    """{file name: [size, mtime_ns, sha256]} of a case's outputs, read where they were written."""
    facts = {}
    for name in names:
        st = os.stat(Path(out_dir) / name)
        facts[name] = [st.st_size, st.st_mtime_ns, file_sha256(Path(out_dir) / name)]
    return facts


def outputs_valid(out_dir, facts: dict) -> bool:
    for name, (size, mtime_ns, sha) in facts.items():
        p = Path(out_dir) / name
        try:
            st = os.stat(p)
        except OSError:
            return False
        if st.st_size != size:
            return False
        if st.st_mtime_ns != mtime_ns and file_sha256(p) != sha:
            return False
    return True


class Manifest:
    """The journal of one output folder (see the module text). One driver at a time: a second run into the
    same folder while one is writing is refused (an advisory lock on the file, where the file system has one)."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST_NAME
        self.records = {}
        self._file = None
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        torn = 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    self.records[str(rec["case"])] = rec
                except (ValueError, KeyError, TypeError):
                    torn += 1  # a line cut short by a crash while it was appended: that case runs again
        if torn:
            log.warning("%s: %d unreadable line(s) ignored (an interrupted write); those cases run again",
                        self.path, torn)

    def open(self) -> "Manifest":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        try:
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            self._file = None
            raise InputError(f"another hybrid-ct predict is writing into {self.out_dir} ({MANIFEST_NAME} is "
                             "locked): wait for it or choose another --out") from None
        except (ImportError, OSError):
            pass  # no advisory locks here (another OS, some network file systems): one driver is the user's care
        return self

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Manifest":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def done(self, case: str, fingerprint: str, model_sha256: str, settings: str):
        """The recorded summary row when ``case`` is done and valid for this input, model and settings, else None."""
        rec = self.records.get(case)
        if not rec or rec.get("status") not in FINAL_STATUSES:
            return None
        if (rec.get("fingerprint"), rec.get("model_sha256"), rec.get("settings")) != \
                (fingerprint, model_sha256, settings):
            return None
        if not outputs_valid(self.out_dir, rec.get("outputs") or {}):
            return None
        return dict(rec["row"])

    def record(self, case: str, input_path: str, fingerprint: str, model_sha256: str, settings: str, row: dict,
               outputs: dict) -> None:
        """Append a finished case (``outputs``: ``output_facts`` of its files); on disk before it returns."""
        rec = {"case": case, "input": input_path, "fingerprint": fingerprint, "model_sha256": model_sha256,
               "settings": settings, "status": row.get("status"), "row": row, "outputs": outputs,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.records[case] = rec
        if self._file is None:
            raise RuntimeError("Manifest.record outside `with Manifest(out):`")
        self._file.write(json.dumps(rec, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def compact(self) -> None:
        """Rewrite the journal with the last line of each case only (atomically; keeps other runs' cases)."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records.values())
        write_atomic(self.path, text)
        if self._file is not None:  # the lock and the appends go on on the new file
            self._file.close()
            self.open()
