"""The app's local datastore: MONAI Label's LocalDatastore with three changes.

1. Only CT volume formats are images (``*.nii.gz``, ``*.nii``, ``*.nrrd``); DICOM series folders found
   in the studies folder at start-up are imported once as NIfTI next to them (checked as chest CT).
2. Every id and tag is checked (``validation.check_id``): an id is a name, never a path, so nothing
   can be written outside the studies folder whoever calls the datastore.
3. Read-modify-write of ``datastore_v2.json`` happens under the file lock with a reload first. MONAI
   Label runs scoring and training in subprocesses that hold their own datastore object; without
   the reload, a scoring subprocess updating an image's info would write back its stale copy and
   drop labels the server saved meanwhile.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Dict

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from hybrid_ct.errors import InputError

from .recovery import fault_point, remove_stale_temps
from .store import write_atomic
from .validation import STORED_EXT, check_id, check_tag, file_extension

logger = logging.getLogger(__name__)

IMAGE_PATTERNS = [f"*{e}" for e in STORED_EXT]


class HybridCTDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, auto_reload: bool = True, read_only: bool = False,
                 import_dicom: bool = True):
        self._writable = not os.path.isdir(datastore_path) or os.access(datastore_path, os.W_OK)
        if not self._writable:  # a read-only mount: serve it, refuse writes (409), keep the lock file elsewhere
            logger.warning("the studies folder %s is read-only: serving it read-only (uploads and labels answer 409)",
                           datastore_path)
            read_only = True
        self._read_only = read_only
        if import_dicom and not read_only and os.path.isdir(datastore_path):
            import_dicom_series(datastore_path)
        super().__init__(datastore_path, extensions=IMAGE_PATTERNS, auto_reload=auto_reload, read_only=read_only)
        if getattr(self, "_handler", None) is not None:  # the index is replaced by a rename, not modified
            self._handler.on_moved = self._on_index_replaced

    @property
    def _lock_file(self) -> str:
        return self._lock_path

    @_lock_file.setter
    def _lock_file(self, path: str) -> None:  # set by LocalDatastore.__init__
        if not getattr(self, "_writable", True):
            digest = hashlib.sha256(os.path.realpath(self._datastore_path).encode()).hexdigest()[:12]
            path = os.path.join(tempfile.gettempdir(), f"hybrid-ct-readonly-{digest}.lock")
        self._lock_path = path

    def _on_index_replaced(self, event):
        if getattr(event, "dest_path", None) == self._datastore_config_path:
            self._init_from_datastore_file()  # reloads only when the file's mtime is not the one it wrote

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        self.refresh_if_changed()  # a scoring subprocess may have just written it
        return super().get_image_info(image_id)

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        self.refresh_if_changed()
        return super().get_label_info(label_id, label_tag)

    # ------------------------------------------------------------------ consistency
    def _reload_unlocked(self) -> None:
        """``_init_from_datastore_file`` without taking the lock (the caller holds it)."""
        path = self._datastore_config_path
        if not os.path.exists(path):
            return
        ts = os.stat(path).st_mtime
        if ts != self._config_ts:
            with open(path) as fp:
                model = LocalDatastoreModel.model_validate_json(fp.read())
            model.base_path = self._datastore_path
            self._datastore = model
            self._config_ts = ts

    def remove_stale_temps(self) -> list:
        """Part files and index temporaries of killed writers (see ``lib/recovery.py``)."""
        if self._read_only or not os.path.isdir(self._datastore_path):
            return []
        with FileLock(self._lock_file):
            removed = remove_stale_temps(self._datastore_path)
        if removed:
            logger.warning("removed temporary files left by killed writers in the studies folder: %s", removed)
        return removed

    def refresh_if_changed(self) -> None:
        """Pick up changes other processes (scoring) wrote to datastore_v2.json."""
        self._init_from_datastore_file()

    def _update_datastore_file(self, lock=True):
        """MONAI Label rewrites datastore_v2.json in place: a full disk or a kill mid-write left it truncated.
        Here it is written to a temporary file beside it, synced and renamed (atomic)."""
        if lock:
            with FileLock(self._lock_file):
                return self._update_datastore_file(lock=False)
        path = self._datastore_config_path
        write_atomic(path, json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
        self._config_ts = os.stat(path).st_mtime

    # ------------------------------------------------------------------ writes
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        ext = file_extension(image_filename)
        if not image_id:
            image_id = os.path.basename(image_filename)[: -len(ext)] if ext else os.path.basename(image_filename)
        check_id(image_id)
        if ext not in STORED_EXT:
            raise InputError(f"the datastore keeps images as {', '.join(STORED_EXT)}, not {ext!r}")
        name = self._filename(image_id, ext)
        dest = os.path.join(self._datastore.image_path(), name)
        with FileLock(self._lock_file):
            self._reload_unlocked()
            old = self._datastore.objects.get(image_id)
            _copy_atomic(image_filename, dest)
            if old is not None and old.image.ext != ext:  # same id re-uploaded in another format
                _remove_quietly(os.path.join(self._datastore.image_path(), self._filename(image_id, old.image.ext)))
            info = dict(image_info or {})
            info["ts"] = int(time.time())
            info["name"] = name
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        logger.info("added image %s (%s)", image_id, name)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        check_id(image_id)
        check_tag(label_tag)
        ext = file_extension(label_filename)
        if ext not in STORED_EXT:
            raise InputError(f"the datastore keeps labels as {', '.join(STORED_EXT)}, not {ext!r}")
        label_dir = self._datastore.label_path(label_tag)
        name = self._filename(image_id, ext)
        dest = os.path.join(label_dir, name)
        with FileLock(self._lock_file):
            self._reload_unlocked()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise ImageNotFoundException(f"Image {image_id} not found")
            os.makedirs(label_dir, exist_ok=True)
            _copy_atomic(label_filename, dest)
            old = obj.labels.get(label_tag)
            if old is not None and old.ext != ext:
                _remove_quietly(os.path.join(label_dir, self._filename(image_id, old.ext)))
            info = dict(label_info or {})
            info["ts"] = int(time.time())
            info["name"] = name
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        logger.info("saved label %s / %s (%s)", image_id, label_tag, name)
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Remove the file and its index entry at once (stock: the index kept it until the file watcher ran)."""
        check_id(label_id, "label id")
        check_tag(label_tag)
        with FileLock(self._lock_file):
            self._reload_unlocked()
            obj = self._datastore.objects.get(label_id)
            label = obj.labels.get(label_tag) if obj else None
            if label is None:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            _remove_quietly(os.path.join(self._datastore.label_path(label_tag), self._filename(label_id, label.ext)))
            obj.labels.pop(label_tag, None)  # the file watcher's reconcile may have dropped it meanwhile
            self._update_datastore_file(lock=False)
        logger.info("removed label %s / %s", label_id, label_tag)

    def remove_image(self, image_id: str) -> None:
        check_id(image_id)
        with FileLock(self._lock_file):
            self._reload_unlocked()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise ImageNotFoundException(f"Image {image_id} not found")
            for tag, label in list(obj.labels.items()):
                _remove_quietly(os.path.join(self._datastore.label_path(tag), self._filename(image_id, label.ext)))
            _remove_quietly(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext)))
            self._datastore.objects.pop(image_id, None)  # the file watcher's reconcile may have dropped it meanwhile
            self._update_datastore_file(lock=False)
        logger.info("removed image %s and its labels", image_id)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        with FileLock(self._lock_file):
            self._reload_unlocked()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            obj.image.info.update(info)
            self._update_datastore_file(lock=False)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        with FileLock(self._lock_file):
            self._reload_unlocked()
            label = self._datastore.label(label_id, label_tag)
            if not label:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            label.info.update(info)
            self._update_datastore_file(lock=False)

    # ------------------------------------------------------------------ reads used by training
    def final_labels(self) -> list:
        """[{id, image, label, label_info, image_info}] for every image with a final label."""
        self.refresh_if_changed()
        out = []
        tag = DefaultLabelTag.FINAL.value
        for image_id, obj in self._datastore.filter_by_tag(tag).items():
            lab = obj.labels[tag]
            out.append({
                "id": image_id,
                "image": os.path.realpath(os.path.join(self._datastore.image_path(),
                                                       self._filename(image_id, obj.image.ext))),
                "label": os.path.realpath(os.path.join(self._datastore.label_path(tag),
                                                       self._filename(image_id, lab.ext))),
                "label_info": dict(lab.info),
                "image_info": dict(obj.image.info),
            })
        return sorted(out, key=lambda d: d["id"])


def _copy_atomic(src: str, dest: str) -> None:
    """Copy to ``<dest>.<pid>.part``, sync, rename: a reader (or a restart after a kill or a full disk) sees
    the old file or the new one, never half of one; a failed copy leaves no part file."""
    tmp = f"{dest}.{os.getpid()}.part"
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        fault_point("datastore.part")
        os.replace(tmp, dest)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def import_dicom_series(studies: str) -> list:
    """Convert DICOM series folders directly under ``studies`` to ``<folder>.nii.gz`` (once; checked as
    chest CT, non-CT or unreadable folders are skipped with a warning). Returns the new image paths."""

    from hybrid_ct.imaging.chest import check_ct
    from hybrid_ct.imaging.reader import read_image, write_image

    made = []
    skipped_path = os.path.join(studies, ".dicom_import_skipped.json")
    try:
        with open(skipped_path) as f:
            skipped = json.load(f)
    except (OSError, ValueError):
        skipped = {}
    changed = False
    for entry in sorted(os.listdir(studies)):
        folder = os.path.join(studies, entry)
        if entry.startswith(".") or entry in ("labels",) or not os.path.isdir(folder):
            continue
        target = os.path.join(studies, entry + ".nii.gz")
        if os.path.exists(target):
            continue
        mtime = os.stat(folder).st_mtime
        if skipped.get(entry, {}).get("mtime") == mtime:  # refused before and unchanged since
            continue
        files = [f for f in os.listdir(folder) if not f.startswith(".")]
        if not files or not any(f.lower().endswith(".dcm") or "." not in f for f in files):
            continue
        try:
            check_id(entry, "DICOM folder name")
            img = check_ct(read_image(folder), require_chest=True)
        except InputError as e:
            logger.warning("DICOM import skipped %s: %s", folder, e)
            skipped[entry] = {"mtime": mtime, "reason": str(e)}
            changed = True
            continue
        tmp_dir = os.path.join(studies, ".importing")
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = write_image(img, os.path.join(tmp_dir, entry + ".nii.gz"))
        os.replace(tmp, target)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        made.append(target)
        logger.info("imported DICOM series %s as %s", folder, target)
    if changed:
        with open(skipped_path, "w") as f:
            json.dump(skipped, f, indent=2)
    return made
