"""The handlers of the app's guarded HTTP routes (wired up, with the allowlist, in ``lib/routes.py``).

MONAI Label 0.8.5's stock endpoints hand client input straight to the datastore (``PUT
/datastore/?image=../x`` writes outside the studies folder; any bytes are stored as an "image"; a
label of any shape or value is stored) and answer most errors with HTTP 500. These handlers run the
app's checks (``lib/validation.py``, ``hybrid_ct.imaging.filecheck``) on temporary copies first: a refused
request never reaches the datastore, leaves the studies folder byte-for-byte unchanged and leaves no
temporary file; messages name the upload by its client-side file name and field, never a server path.

Errors: malformed id / tag / params 400, deleting a final label without the admin role 403, unknown
image / label / model / version / scoring method 404,
training already running (here or in a process left from before a restart) 409, content that is not a
whole chest CT volume / label map (truncated, corrupt, oversized, zero spacing, 2D) 422, no trained
model yet 503.

Blocking work (inference, validation of uploads, synchronous training) runs in a worker thread, so
the server keeps answering (``/info``, ``/train`` status) meanwhile.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from datetime import datetime
from typing import Optional

import SimpleITK as sitk
from fastapi import BackgroundTasks, HTTPException, UploadFile
from fastapi.responses import FileResponse
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.task import AsyncTask
from monailabel.utils.async_tasks.utils import processes, stop_background_task, tasks
from monailabel.utils.others.generic import file_checksum, get_mime_type, remove_file

from hybrid_ct.errors import InputError, ModelNotReadyError
from hybrid_ct.imaging.filecheck import DEFAULT_MAX_VOXELS
from hybrid_ct.imaging.reader import write_image

from .http_errors import in_thread, to_http  # noqa: F401  (in_thread, to_http: part of this module's API)
from .lifecycle import TrainingLock
from .recovery import temp_prefix
from .trainers.params import BOOLS, LISTS, PARAMS, validate_params
from .validation import (LABEL_EXT, MIN_SLICES, STORED_EXT, UPLOAD_EXT, BadRequest, Conflict, Forbidden, NotFound,
                         canonicalise_label, check_id, check_tag, check_upload_file, file_extension, load_upload,
                         normalise_diagnosis, parse_json_param, upload_name)

logger = logging.getLogger(__name__)

ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
USER = settings.MONAI_LABEL_AUTH_ROLE_USER

FINAL_DELETE = ("only an admin may delete it (the admin API token, --conf admin_token_file, or MONAI Label's "
                "admin role): final labels are training data")
_train_lock = threading.Lock()  # check-and-start of a training is atomic
_sync_training = threading.Event()  # a run_sync training is running in this process


def _save_upload(upload: UploadFile, suffix: str) -> str:
    fd, path = tempfile.mkstemp(prefix=temp_prefix("upload"), suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        shutil.copyfileobj(upload.file, f)
    return path


def _existing_image(ds, image_id: str) -> str:
    check_id(image_id)
    uri = ds.get_image_uri(image_id)
    if not uri or not os.path.exists(uri):
        raise NotFound(f"image {image_id!r} is not in the datastore")
    return uri


def same_image_content(stored: str, uploaded: str, tol_mm: float = 1e-4) -> bool:
    """Same size, spacing, origin, direction and voxel values, whatever the file bytes: SimpleITK 2.3 and 2.5
    write one NIfTI header byte differently. Headers first; voxels only when they match the
    stored (already checked) image, so an oversized upload is never decoded here."""
    import numpy as np

    try:
        a, b = (sitk.ImageFileReader() for _ in range(2))
        for reader, path in ((a, stored), (b, uploaded)):
            reader.SetFileName(path)
            reader.ReadImageInformation()
        return (a.GetSize() == b.GetSize() and a.GetNumberOfComponents() == b.GetNumberOfComponents()
                and all(np.allclose(getattr(a, g)(), getattr(b, g)(), rtol=0, atol=tol_mm)
                        for g in ("GetSpacing", "GetOrigin", "GetDirection"))
                and np.array_equal(sitk.GetArrayFromImage(a.Execute()), sitk.GetArrayFromImage(b.Execute())))
    except RuntimeError:  # not readable by SimpleITK (a DICOM zip, a corrupt file): not the same image
        return False


# ------------------------------------------------------------------------------------ datastore
def add_image(image: Optional[str], params: str, file: UploadFile, user: Optional[str]) -> dict:
    p = parse_json_param(params)
    if "diagnosis" in p:
        p["diagnosis"] = normalise_diagnosis(p["diagnosis"])
    ext = file_extension(file.filename)
    if image is None or image == "":  # the id comes from the file name, which must not be a path either
        stem = file.filename or ""
        image = stem[: -len(ext)] if ext and stem.lower().endswith(ext) else stem
    check_id(image)
    instance = app_instance()
    ds = instance.datastore()
    name = upload_name(file.filename, "file")
    if ext not in UPLOAD_EXT:
        raise InputError(f"{name}: unsupported file type {ext or '(none)'!r}: upload a chest CT as {', '.join(UPLOAD_EXT)}")
    tmp = _save_upload(file, ext)
    tmp_nii = None
    try:
        if os.path.getsize(tmp) == 0:
            raise InputError(f"{name} is empty (0 bytes)")
        uri = ds.get_image_uri(image)
        if uri and os.path.exists(uri):
            if os.path.isfile(uri) and ((file_extension(uri) == ext and file_checksum(uri) == file_checksum(tmp))
                                        or same_image_content(uri, tmp)):
                return {"image": image, "unchanged": True}
            raise Conflict(f"image id {image!r} already exists in the datastore with other content: "
                           "choose another id (or delete the image first)")
        # InputError (422): truncated / oversized / not a chest CT volume in HU
        img = load_upload(tmp, ext, name, **upload_limits(instance))
        src = tmp
        if ext not in STORED_EXT:  # .mha / DICOM / zip of a DICOM series -> stored as NIfTI
            fd, tmp_nii = tempfile.mkstemp(prefix=temp_prefix("upload"), suffix=".nii.gz")
            os.close(fd)
            src = write_image(img, tmp_nii)
        info = dict(p)
        info.update(size=list(img.GetSize()), spacing=[round(s, 6) for s in img.GetSpacing()])
        if user:
            info["user"] = user
        image_id = ds.add_image(image, src, info)
        return {"image": image_id}
    finally:
        remove_file(tmp)
        if tmp_nii:
            remove_file(tmp_nii)


def save_label(image: str, params: str, tag: str, label: UploadFile, user: Optional[str]) -> dict:
    instance = app_instance()
    ds = instance.datastore()
    tag = check_tag(tag or DefaultLabelTag.FINAL.value)
    uri = _existing_image(ds, image)
    p = parse_json_param(params)
    ext = file_extension(label.filename) or ".nii.gz"
    if ext not in LABEL_EXT + (".seg.nrrd",):
        raise InputError(f"unsupported label file type {ext!r}: send a label map as {', '.join(LABEL_EXT)}")
    name = upload_name(label.filename, "label")
    tmp = _save_upload(label, ".nrrd" if ext == ".seg.nrrd" else ext)
    fd, canon_path = tempfile.mkstemp(prefix=temp_prefix("label"), suffix=".nii.gz")
    os.close(fd)
    try:
        if os.path.getsize(tmp) == 0:
            raise InputError(f"{name} is empty (0 bytes)")
        canon, canon_info, warnings = canonicalise_label(tmp, uri, p.get("label_info"), name)
        sitk.WriteImage(canon, canon_path, useCompression=True)
        info = {k: v for k, v in p.items() if k != "label_info"}
        info["label_info"] = canon_info
        if p.get("label_info") is not None:
            info["submitted_label_info"] = p["label_info"]
        if user:
            info["user"] = user
        label_id = ds.save_label(image, canon_path, tag, info)
    finally:
        remove_file(tmp)
        remove_file(canon_path)
    res = instance.on_save_label(image, label_id) if tag == DefaultLabelTag.FINAL.value else None
    res = dict(res or {})
    res.update(image=image, label=label_id, tag=tag, label_info=canon_info, warnings=warnings)
    if hasattr(ds, "pending"):  # a PACS datastore: say whether the PACS took the DICOM-SEG
        state = ds.get_label_info(image, tag) if hasattr(ds, "get_label_info") else {}
        res["pacs"] = {"state": state.get("pacs", "unknown"), "error": state.get("pacs_error", "")}
        if res["pacs"]["state"] != "stored":
            res["warnings"] = list(warnings) + [f"the PACS has not taken the corrected label yet "
                                                f"({res['pacs']['error'] or res['pacs']['state']}): it is kept on the "
                                                "server and sent again later"]
    return res


def remove_image(id: str, may_delete_final: bool = False) -> dict:
    ds = app_instance().datastore()
    _existing_image(ds, id)
    if not may_delete_final and ds.get_label_uri(id, DefaultLabelTag.FINAL.value):
        raise Forbidden(f"image {id!r} has a final label: {FINAL_DELETE}")
    ds.remove_image(id)
    return {}


def remove_label(id: str, tag: str, may_delete_final: bool = False) -> dict:
    ds = app_instance().datastore()
    check_id(id, "label id")
    check_tag(tag)
    uri = ds.get_label_uri(id, tag)
    if not uri or not os.path.exists(uri):
        raise NotFound(f"no {tag!r} label for {id!r}")
    if tag == DefaultLabelTag.FINAL.value and not may_delete_final:
        raise Forbidden(f"the final label of {id!r}: {FINAL_DELETE}")
    ds.remove_label(id, tag)
    return {}


def update_image_info(image: str, info: str, user: Optional[str]) -> dict:
    ds = app_instance().datastore()
    _existing_image(ds, image)
    i = parse_json_param(info, "info")
    if "diagnosis" in i:
        i["diagnosis"] = normalise_diagnosis(i["diagnosis"])
    if user:
        i["user"] = user
    ds.update_image_info(image, i)
    return {}


def update_label_info(label: str, tag: str, info: str, user: Optional[str]) -> dict:
    ds = app_instance().datastore()
    check_id(label, "label id")
    check_tag(tag)
    if not ds.get_label_uri(label, tag):
        raise NotFound(f"no {tag!r} label for {label!r}")
    i = parse_json_param(info, "info")
    if user:
        i["user"] = user
    ds.update_label_info(label, tag, i)
    return {}


def download_image(image: str, check_only: bool = False, check_sum: Optional[str] = None):
    uri = _existing_image(app_instance().datastore(), image)
    if not os.path.isfile(uri):
        raise NotFound(f"image {image!r} is a DICOM series folder on the server: it cannot be downloaded as one file")
    if check_only:
        if check_sum:  # "SHA256:<hex>" (or a bare hex digest): does the server hold exactly this file?
            algo, _, digest = check_sum.rpartition(":")
            algo = (algo or "SHA256").upper()
            if algo not in ("SHA256", "SHA512", "MD5"):
                raise BadRequest(f"check_sum {check_sum[:80]!r}: use SHA256:<hex> (or SHA512 / MD5)")
            if file_checksum(uri, algo=algo) != f"{algo}:{digest.strip().lower()}":
                raise NotFound(f"image {image!r} has other content (checksum differs)")
        return {}
    return FileResponse(uri, media_type=get_mime_type(uri), filename=os.path.basename(uri))


def download_label(label: str, tag: str, check_only: bool = False):
    check_id(label, "label id")
    check_tag(tag)
    uri = app_instance().datastore().get_label_uri(label, tag)
    if not uri or not os.path.isfile(uri):
        raise NotFound(f"no {tag!r} label for {label!r}")
    if check_only:
        return {}
    return FileResponse(uri, media_type=get_mime_type(uri), filename=os.path.basename(uri))


# ------------------------------------------------------------------------------------ infer
def run_inference(background_tasks: BackgroundTasks, model: str, image: str, session_id: str, params: str,
                  file: Optional[UploadFile], output: Optional[ResultType]):
    instance = app_instance()
    if model not in instance._infers:
        raise NotFound(f"there is no model {model!r}; available: {sorted(instance._infers)}")
    p = parse_json_param(params)
    if p.get("label_tag") not in (None, DefaultLabelTag.ORIGINAL.value):
        raise BadRequest("inference results can only be saved as 'original' labels")
    seg_source = dicom_seg_source(instance.datastore(), image, file, session_id) \
        if output == ResultType.dicom_seg else None
    request = {"model": model}
    request.update(instance.info().get("config", {}).get("infer", {}))
    request.update(p)
    path = None
    if file is not None and file.filename:
        ext = file_extension(file.filename)
        name = upload_name(file.filename, "file")
        if ext not in STORED_EXT + (".mha",):
            raise InputError(f"{name}: unsupported file type {ext!r}: send the CT as {', '.join(STORED_EXT)}")
        path = _save_upload(file, ext)
        try:
            check_upload_file(path, ext, name, upload_limits(instance)["max_voxels"])
        except BaseException:
            remove_file(path)
            raise
        background_tasks.add_task(remove_file, path)
        request["image"] = path
    elif session_id:
        session = instance.sessions().get_session(session_id) if instance.sessions() else None
        if not session:
            raise NotFound(f"session {session_id!r} not found (expired?)")
        request["image"] = session.image
        request["session"] = session.to_json()
    elif image:
        # the datastore's own absolute path: an id is never resolved against the server's folders
        request["image"] = _existing_image(instance.datastore(), image)
        request["image_id"] = image
    else:
        raise BadRequest("give an image id of the datastore (?image=<id>) or upload a file")
    try:
        result = instance.infer(request)
    except BaseException:
        if path:
            remove_file(path)
        raise
    if result is None:
        raise HTTPException(500, "inference returned nothing")
    if seg_source:
        result["dicom_seg"] = _dicom_seg_of(result, seg_source, background_tasks)
    return send_response(instance.datastore(), result, output, background_tasks)


def dicom_seg_source(ds, image: str, file, session_id: str) -> str:
    """The DICOM series folder that ``output=dicom_seg`` references (400 when the image has none)."""
    from .dicomweb import dicom_source_dir

    if (file is not None and file.filename) or session_id or not image:
        raise BadRequest("output=dicom_seg needs an image of the datastore that came from DICOM (a PACS series, "
                         "or a DICOM folder of the studies folder): uploads and sessions get 'image', 'json' or 'all'")
    _existing_image(ds, image)
    folder = dicom_source_dir(ds, image)
    if not folder:
        raise BadRequest(f"output=dicom_seg: image {image!r} did not come from a DICOM series, so a DICOM-SEG "
                         "cannot reference it: use 'image', 'json' or 'all'")
    return folder


def _dicom_seg_of(result: dict, source: str, background_tasks: BackgroundTasks) -> str:
    from hybrid_ct.predict.dicom_seg import write_dicom_seg

    label = result.get("file") or result.get("label")
    fd, path = tempfile.mkstemp(prefix=temp_prefix("seg"), suffix=".dcm")
    os.close(fd)
    try:
        write_dicom_seg(sitk.ReadImage(label), source, path,
                        model_version=str((result.get("params") or {}).get("model_version") or "") or None)
    except BaseException:
        remove_file(path)
        if label and os.path.isfile(label):
            remove_file(label)
        raise
    background_tasks.add_task(remove_file, path)
    return path


# ------------------------------------------------------------------------------------ scoring
def run_scoring(method: str, params: Optional[dict], run_sync: bool = False):
    instance = app_instance()
    scorer = instance._scoring_methods.get(method)
    if scorer is None:
        raise NotFound(f"there is no scoring method {method!r}; available: {sorted(instance._scoring_methods)}")
    params = scorer.validate_params(params or {}) if hasattr(scorer, "validate_params") else dict(params or {})
    res, detail = AsyncTask.run("scoring", request={"method": method}, params=params, force_sync=run_sync)
    if res is None:
        raise Conflict(detail or "a scoring task is already running")
    return res


# ------------------------------------------------------------------------------------ train
def training_active() -> Optional[dict]:
    """The running / submitted training task (or a marker for a synchronous one), else None."""
    if _sync_training.is_set():
        return {"id": "sync", "status": "RUNNING"}
    running = processes("train")
    for t in reversed(tasks("train")):
        if t.get("status") in ("SUBMITTED", "RUNNING") or t.get("id") in running:
            return t
    return None


def _stop_file(instance) -> Optional[str]:
    trainer = next(iter(instance._trainers.values()), None)
    return getattr(trainer, "stop_file", None)


def check_param_names(params: dict) -> None:
    """A key the trainer does not know is a typo (``epochs`` for ``max_epochs``): 400, never a default run."""
    if not isinstance(params, dict):
        raise BadRequest(f"train params must be a JSON object, got {type(params).__name__}")
    known = set(PARAMS) | set(BOOLS) | set(LISTS) | {"device", "gpus"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadRequest(f"unknown train parameter(s) {unknown}: accepted are {sorted(known)}")


def _locked_by_other_process(instance) -> Optional[dict]:
    """A training still running in a process this server did not start (e.g. before a restart)."""
    owner = TrainingLock(instance.model_dir).owner() if hasattr(instance, "model_dir") else None
    if owner and int(owner["pid"]) != os.getpid():
        return {"id": f"pid {owner['pid']}", "status": "RUNNING", "start_ts": owner.get("started")}
    return None


def upload_limits(instance) -> dict:
    return {"max_voxels": int(getattr(instance, "max_image_voxels", DEFAULT_MAX_VOXELS)),
            "min_slices": int(getattr(instance, "min_slices", MIN_SLICES))}


def start_training(model: str, params: Optional[dict], run_sync: bool = False, source: str = "request"):
    instance = app_instance()
    if model not in instance._trainers:
        raise NotFound(f"there is no trainer {model!r}; available: {sorted(instance._trainers)}")
    check_param_names(params or {})
    params = validate_params(params or {})
    if not instance.datastore().get_labeled_images():
        raise BadRequest("no labelled image yet: submit final labels before training")
    with _train_lock:
        active = training_active() or _locked_by_other_process(instance)
        if active:
            raise Conflict(f"a training is already running (task {active.get('id')}, {active.get('status')}, "
                           f"since {active.get('start_ts', '?')}): wait for it or stop it with DELETE /train/")
        stop_file = _stop_file(instance)
        if stop_file:
            remove_file(stop_file)
        if not run_sync:
            res, detail = AsyncTask.run("train", request={"model": model}, params=params, enqueue=False)
            if res is None:
                raise Conflict(detail or "a training is already running")
            logger.info("training started (%s): %s", source, res.get("id"))
            return res
        _sync_training.set()
    try:
        res, _ = AsyncTask.run("train", request={"model": model}, params=params, force_sync=True)
        return res
    finally:
        _sync_training.clear()


def stop_training(grace_s: float = 60.0):
    """Graceful stop: the trainer sees the stop file at its next iteration and publishes the best model
    so far; a process still alive after ``grace_s`` is killed (MONAI Label's own stop)."""
    instance = app_instance()
    active = training_active()
    if active is None:
        return None
    stop_file = _stop_file(instance)
    if stop_file:
        with open(stop_file, "w") as f:
            f.write(datetime.now().isoformat())
    if active.get("id") == "sync":
        return {"id": "sync", "status": "STOPPED", "end_ts": datetime.today().strftime("%Y-%m-%d %H:%M:%S")}
    task_id = active.get("id")
    active["status"] = "STOPPED"
    active["end_ts"] = datetime.today().strftime("%Y-%m-%d %H:%M:%S")

    def watchdog():
        deadline = time.time() + grace_s
        while time.time() < deadline:
            if task_id not in processes("train"):
                return
            time.sleep(0.5)
        if task_id in processes("train"):
            logger.warning("training %s did not stop within %.0f s: killing it", task_id, grace_s)
            stop_background_task("train")
            active["status"] = "STOPPED"

    if stop_file:
        threading.Thread(target=watchdog, name="train-stop-watchdog", daemon=True).start()
    else:
        stop_background_task("train")
    return dict(active, details=list(active.get("details") or []))


# ------------------------------------------------------------------------------------ versions
def _store():
    instance = app_instance()
    store = getattr(instance, "model_store", None)
    if store is None:
        raise NotFound("this app has no model store")
    return instance, store


def versions() -> dict:
    _, store = _store()
    return {"current": store.current(), "versions": store.versions(), "skipped": store.skipped()}


def rollback(version: str) -> dict:
    instance, store = _store()
    if not version:
        raise BadRequest("give the version to roll back to: ?version=<v>")
    try:
        res = store.rollback(version)
    except ModelNotReadyError as e:
        raise InputError(f"version {version!r} cannot be served: {e}") from None
    if hasattr(instance, "on_model_changed"):
        instance.on_model_changed(res["current"])
    return res
