"""Model versions on disk: publish atomically, list, roll back in one call.

Layout of the model folder (``apps/hybrid_ct/model`` unless ``--conf model_dir`` says otherwise)::

    pretrained.pt          the shipped checkpoint (optional, read-only; by default the one inside the hybrid_ct
                           package when this folder has none); version name "shipped"
    versions/v0001.pt     every published version is kept
    versions/v0001.json   its metadata (created, metric, training summary, ``promotion``: the retrain's
                          comparison with the model served when it started, and whether it was made current;
                          ``sha256`` of the checkpoint)
    versions/quarantine/  versions set aside at start-up because they did not load (skipped.json says why)
    current               one line: the version being served; replaced with os.replace (atomic)
    train_stats.json      progress and metrics of the last training run (MONAI Label train_stats)

Readers never see a half-written file: checkpoints and metadata are written to a temporary file in the
same folder and renamed; a new version number is claimed with ``os.link`` (fails if it exists), so
two publishers can never overwrite each other. Temporary names carry the writer's PID: a start removes
those of dead writers (:meth:`ModelStore.recover`, ``lib/recovery.py``). Without a ``current`` pointer the newest version is
served, else the shipped checkpoint; with neither, :class:`ModelNotReadyError` ("no trained model yet").
A version published with ``make_current=False`` (a retrain that was worse than the served model) is kept
but not served: the pointer is written with the version served before, so that fallback never picks it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from hybrid_ct.net.checkpoint import load_checkpoint, save_checkpoint
from hybrid_ct.errors import InputError, ModelNotReadyError

from .recovery import fault_point, remove_stale_temps

logger = logging.getLogger(__name__)

SHIPPED = "shipped"
VERSION_RE = re.compile(r"^v(\d{4,9})$")


class UnknownVersionError(InputError):
    """A version name that is malformed or not in the store (HTTP 404)."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_and_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(folder) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_safe(obj):
    """``obj`` with NaN / infinite floats as None: strict JSON (``/info/`` answers 500 on a NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def read_json(path: Path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


class ModelStore:
    def __init__(self, model_dir, shipped="pretrained.pt"):
        """``shipped``: the shipped checkpoint, a path (relative to ``model_dir``) or None for none."""
        self.dir = Path(model_dir)
        self.versions_dir = self.dir / "versions"
        self.pointer = self.dir / "current"
        self.shipped = None if shipped is None else self.dir / shipped
        self.stats_path = self.dir / "train_stats.json"
        self.quarantine_dir = self.versions_dir / "quarantine"
        self._shipped_meta_cache: tuple = (None, {})

    # ------------------------------------------------------------------ naming
    def _lock(self) -> FileLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir / ".store.lock"), timeout=120)

    def has_shipped(self) -> bool:
        return self.shipped is not None and self.shipped.is_file()

    def path(self, version: str) -> Path:
        if version == SHIPPED:
            if self.shipped is None:
                raise UnknownVersionError("this server has no shipped model")
            return self.shipped
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise UnknownVersionError(f"unknown model version {version!r}: versions look like 'v0001' or 'shipped'")
        return self.versions_dir / f"{version}.pt"

    def _numbers(self) -> list:
        if not self.versions_dir.is_dir():
            return []
        out = []
        for p in self.versions_dir.iterdir():
            m = VERSION_RE.match(p.stem) if p.suffix == ".pt" else None
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def _quarantined(self) -> list:
        if not self.quarantine_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.quarantine_dir.glob("v*.pt") if (m := VERSION_RE.match(p.stem)))

    def skipped(self) -> list:
        """[{version, reason, at}] of the versions set aside because they did not load (see :meth:`recover`)."""
        return read_json(self.quarantine_dir / "skipped.json", []) or []

    # ------------------------------------------------------------------ start-up
    def check_version(self, version: str) -> str | None:
        """Why ``version`` cannot be served (its file differs from the hash written when it was published, or
        it does not load), or None when it can."""
        path = self.path(version)
        side = read_json(path.with_suffix(".json"), {}) or {}
        digest = side.get("sha256") if isinstance(side, dict) else None
        try:
            if digest:
                return None if _fsync_and_hash(path) == digest else "its file differs from the one published (sha256)"
            load_checkpoint(path)
        except (OSError, ModelNotReadyError) as e:
            return str(e).replace(str(self.dir), "<model_dir>")
        return None

    def recover(self) -> dict:
        """At the server's start: remove what killed writers left (temporary files), set aside versions that
        do not load (to ``versions/quarantine/``, never deleted; their numbers are never reused) and, when
        the pointer named one of them, serve its parent (the version served before it) or else the newest
        good version. Returns {"removed": [...], "skipped": [{version, reason}], "current": ...}."""
        with self._lock():
            removed = remove_stale_temps(self.dir)
            skipped = []
            for n in self._numbers():
                version = f"v{n:04d}"
                reason = self.check_version(version)
                if reason is None:
                    continue
                self.quarantine_dir.mkdir(parents=True, exist_ok=True)
                parent = (read_json(self.path(version).with_suffix(".json"), {}) or {}).get("parent")
                for src in (self.path(version), self.path(version).with_suffix(".json")):
                    if src.exists():
                        os.replace(src, self.quarantine_dir / src.name)
                skipped.append({"version": version, "reason": reason, "parent": parent, "at": _iso(time.time())})
                logger.error("model version %s skipped: %s (moved to %s)", version, reason, self.quarantine_dir)
            if skipped:
                write_atomic(self.quarantine_dir / "skipped.json", json.dumps(self.skipped() + skipped, indent=2))
                named = (self.pointer.read_text().strip() if self.pointer.is_file() else "")
                bad = {s["version"]: s.get("parent") for s in skipped}
                if named in bad:
                    fallback = bad[named]
                    while fallback in bad:
                        fallback = bad[fallback]
                    if not (fallback and self._servable(fallback)):
                        fallback = self._last_promoted()
                    if fallback:
                        self.set_current(fallback)
                    else:
                        self.pointer.unlink(missing_ok=True)
                    logger.error("the served model version %s did not load: now serving %s", named, fallback)
            named = self.pointer.read_text().strip() if self.pointer.is_file() else ""
            if named and not self._servable(named):  # garbage or a missing file: the last promoted version
                fallback = self._last_promoted()
                logger.error("the model pointer names %r, which cannot be served: now serving %s", named[:80], fallback)
                if fallback:
                    self.set_current(fallback)
                else:
                    self.pointer.unlink(missing_ok=True)
            if removed:
                logger.warning("removed temporary files left by killed writers in %s: %s", self.dir, removed)
        return {"removed": removed, "skipped": skipped, "current": self.current()}

    def _last_promoted(self) -> str | None:
        """The newest version made current (not one kept as worse, nor one waiting for its judgement), else the
        shipped model."""
        for n in reversed(self._numbers()):
            meta = read_json(self.path(f"v{n:04d}").with_suffix(".json"), {}) or {}
            if (meta.get("promotion") or {}).get("decision") not in ("kept", "pending"):
                return f"v{n:04d}"
        return SHIPPED if self.has_shipped() else None

    def _servable(self, version: str) -> bool:
        try:
            return self.path(version).is_file()
        except UnknownVersionError:
            return False

    # ------------------------------------------------------------------ reading
    def _shipped_meta(self) -> dict:
        """Metadata of the shipped checkpoint: its sidecar JSON, else the checkpoint's own meta (cached)."""
        side = read_json(self.shipped.with_suffix(".json"))
        if isinstance(side, dict):
            return side
        try:
            st = self.shipped.stat()
        except OSError:
            return {}
        key = (st.st_mtime_ns, st.st_size)
        if self._shipped_meta_cache[0] != key:
            try:
                _, meta = load_checkpoint(self.shipped)
            except ModelNotReadyError:
                meta = {}
            self._shipped_meta_cache = (key, meta)
        return self._shipped_meta_cache[1]

    def entry(self, version: str) -> dict:
        path = self.path(version)
        if not path.is_file():
            raise UnknownVersionError(f"unknown model version {version!r}: not in {self.dir}")
        if version == SHIPPED:
            meta = self._shipped_meta()
            metric = meta.get("metric", meta.get("best_metric"))
            return {"version": SHIPPED, "created": meta.get("created") or _iso(path.stat().st_mtime),
                    "metric": metric if isinstance(metric, (int, float)) else None,
                    "trained_version": meta.get("version")}
        meta = read_json(path.with_suffix(".json"), {}) or {}
        return {"version": version, "created": meta.get("created") or _iso(path.stat().st_mtime),
                "metric": meta.get("metric"), "parent": meta.get("parent"), "epochs": meta.get("epochs"),
                "train_images": meta.get("train_images"), "val_images": meta.get("val_images"),
                "promotion": meta.get("promotion")}

    def versions(self) -> list:
        """Every servable version, oldest first (the shipped checkpoint first)."""
        out = []
        if self.has_shipped():
            out.append(self.entry(SHIPPED))
        for n in self._numbers():
            try:
                out.append(self.entry(f"v{n:04d}"))
            except UnknownVersionError:  # deleted meanwhile
                continue
        return out

    def current(self) -> str | None:
        """The version served now, or None when there is no model at all."""
        try:
            name = self.pointer.read_text().strip()
        except OSError:
            name = ""
        if name:
            try:
                if self.path(name).is_file():
                    return name
            except UnknownVersionError:
                pass
            logger.warning("model pointer %s names %r, which is missing: falling back", self.pointer, name)
        nums = self._numbers()
        if nums:
            return f"v{nums[-1]:04d}"
        return SHIPPED if self.has_shipped() else None

    def resolve(self) -> tuple:
        """-> (version, path, key) of the served model; ``key`` changes whenever the served file does."""
        version = self.current()
        if version is None:
            raise ModelNotReadyError(
                "no trained model yet: put a trained checkpoint at "
                f"{self.shipped} or train one (POST /train/hybrid_ct) on labelled studies")
        path = self.path(version)
        try:
            st = path.stat()
        except OSError as e:
            raise ModelNotReadyError(f"no trained model yet: model version {version} vanished ({e})") from e
        return version, path, (version, str(path), st.st_mtime_ns, st.st_size)

    def summary(self) -> dict:
        try:
            current = self.current()
        except OSError:
            current = None
        return {"current": current, "ready": current is not None, "model_dir": str(self.dir),
                "skipped": [{k: v for k, v in s.items() if k != "parent"} for s in self.skipped()]}

    # ------------------------------------------------------------------ writing
    def set_current(self, version: str) -> None:
        write_atomic(self.pointer, version + "\n")

    def publish(self, model, meta: dict | None = None, make_current: bool = True) -> str:
        """Save ``model`` as the next version (atomic); returns the version name.

        ``make_current``: serve it now; False keeps serving the version served before (pinned in the
        pointer file), unless there is none, when the new version is the only model and is served."""
        meta = dict(meta or {})
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = None
        try:
            with self._lock():
                fd, tmp = tempfile.mkstemp(dir=self.versions_dir, prefix=f".publish.{os.getpid()}.", suffix=".tmp")
                os.close(fd)
                previous = self.current()
                if previous is not None and not self.pointer.is_file():
                    self.set_current(previous)  # pinned first: a kill after the link must not serve an unvetted version
                n = max(self._numbers() + self._quarantined() + [0]) + 1  # a skipped number is never reused
                while True:
                    version = f"v{n:04d}"
                    meta.update(version=version, created=_iso(time.time()), parent=previous)
                    fault_point("publish.start")
                    save_checkpoint(tmp, model, meta)
                    fault_point("publish.saved")
                    digest = _fsync_and_hash(tmp)  # on disk before it gets a name; its hash goes in the sidecar
                    try:
                        os.link(tmp, self.path(version))  # claims the name; fails when it exists
                        break
                    except FileExistsError:
                        n += 1
                _fsync_dir(self.versions_dir)
                fault_point("publish.linked")
                side = {k: v for k, v in meta.items() if k not in ("history",)}
                side["sha256"] = digest
                write_atomic(self.path(version).with_suffix(".json"), json.dumps(side, indent=2, default=str))
                fault_point("publish.sidecar")
                if make_current or previous is None:
                    self.set_current(version)
                else:
                    self.set_current(previous)  # without a pointer the newest version would be served
                fault_point("publish.pointer")
        finally:
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
        logger.info("published model %s (metric %s)%s", version, meta.get("metric"),
                    " and made it current" if make_current or previous is None else f"; {previous} stays current")
        return version

    def meta(self, version: str) -> dict:
        """A version's sidecar metadata ({} for the shipped model or a missing sidecar)."""
        if version == SHIPPED:
            return {}
        return read_json(self.path(version).with_suffix(".json"), {}) or {}

    def judge(self, version: str, promotion: dict, make_current: bool) -> None:
        """Record the decision on a version published as ``pending`` (its sidecar's ``promotion``) and serve it
        when ``make_current``."""
        side_path = self.path(version).with_suffix(".json")
        with self._lock():
            side = read_json(side_path, {}) or {}
            side["promotion"] = promotion
            write_atomic(side_path, json.dumps(side, indent=2, default=str))
            if make_current:
                self.set_current(version)
        logger.info("model %s judged: %s", version, promotion.get("decision"))

    def rollback(self, version: str) -> dict:
        """Serve ``version`` again (any kept version, or 'shipped'); checks that it loads first."""
        path = self.path(version)
        if not path.is_file():
            raise UnknownVersionError(f"unknown model version {version!r}: known versions are "
                                      f"{[v['version'] for v in self.versions()]}")
        load_checkpoint(path)  # raises ModelNotReadyError for a corrupt file: never point at it
        with self._lock():
            previous = self.current()
            self.set_current(version)
        logger.info("model rolled back: %s -> %s", previous, version)
        return {"current": version, "previous": previous}

    # ------------------------------------------------------------------ training stats
    def write_stats(self, stats: dict) -> None:
        # a stop at the start of an epoch leaves it without a loss (NaN)
        write_atomic(self.stats_path, json.dumps(json_safe(stats), indent=2, default=str))

    def read_stats(self) -> dict:
        return read_json(self.stats_path, {}) or {}
