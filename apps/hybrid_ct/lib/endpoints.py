"""The app's HTTP layer on top of MONAI Label's FastAPI server.

MONAI Label 0.8.5 builds its FastAPI ``app`` (``monailabel.app``) before it loads ours, and its
stock endpoints hand client input straight to the datastore (``PUT /datastore/?image=../x`` writes
outside the studies folder; any bytes are stored as an "image"; a label of any shape or value is
stored) and answer most errors with HTTP 500. When the server starts, :func:`install` puts the
routes below in FRONT of the stock ones (same paths, same parameters, same RBAC dependencies), so
every request first passes the app's checks (``lib/validation.py``) on temporary copies: a refused
request never reaches the datastore and leaves the studies folder byte-for-byte unchanged.

Errors: malformed id / tag / params 400, unknown image / label / model / version 404, training
already running 409, content that is not a chest CT / label map 422, no trained model yet 503.

Blocking work (inference, validation of uploads, synchronous training) runs in a worker thread, so
the server keeps answering (``/info``, ``/train`` status) meanwhile. App-specific endpoints:
``GET /hybrid_ct/versions`` and ``POST /hybrid_ct/rollback?version=<v>``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from datetime import datetime
from typing import Optional

import SimpleITK as sitk
from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import (ImageNotFoundException, LabelNotFoundException, MONAILabelError,
                                             MONAILabelException)
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.task import AsyncTask
from monailabel.utils.async_tasks.utils import processes, stop_background_task, tasks
from monailabel.utils.others.generic import file_checksum, get_mime_type, remove_file

from hybrid_ct.errors import InputError, ModelNotReadyError
from hybrid_ct.io import write_image

from .store import UnknownVersionError
from .trainers.hybrid_ct import validate_params
from .validation import (LABEL_EXT, STORED_EXT, BadRequest, Conflict, NotFound, canonicalise_label, check_id,
                         check_tag, file_extension, load_upload, normalise_diagnosis, parse_json_param)

logger = logging.getLogger(__name__)

ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
USER = settings.MONAI_LABEL_AUTH_ROLE_USER

_train_lock = threading.Lock()  # check-and-start of a training is atomic
_sync_training = threading.Event()  # a run_sync training is running in this process


# ------------------------------------------------------------------------------------ errors
def to_http(e: Exception) -> HTTPException:
    if isinstance(e, HTTPException):
        return e
    if isinstance(e, (NotFound, UnknownVersionError, ImageNotFoundException, LabelNotFoundException)):
        return HTTPException(404, _msg(e))
    if isinstance(e, Conflict):
        return HTTPException(409, _msg(e))
    if isinstance(e, BadRequest):
        return HTTPException(400, _msg(e))
    if isinstance(e, InputError):
        return HTTPException(422, _msg(e))
    if isinstance(e, ModelNotReadyError):
        return HTTPException(503, _msg(e))
    if isinstance(e, MONAILabelException):
        return HTTPException(400 if e.error == MONAILabelError.INVALID_INPUT else 500, _msg(e))
    raise e


def _msg(e: Exception) -> str:
    return getattr(e, "msg", None) or str(e) or type(e).__name__


def guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (InputError, ModelNotReadyError, MONAILabelException) as e:
        raise to_http(e) from None


async def in_thread(fn, *args, **kwargs):
    return await run_in_threadpool(guarded, fn, *args, **kwargs)


def _save_upload(upload: UploadFile, suffix: str) -> str:
    fd, path = tempfile.mkstemp(prefix="hybrid_ct_upload_", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        shutil.copyfileobj(upload.file, f)
    return path


def _existing_image(ds, image_id: str) -> str:
    check_id(image_id)
    uri = ds.get_image_uri(image_id)
    if not uri or not os.path.exists(uri):
        raise NotFound(f"image {image_id!r} is not in the datastore")
    return uri


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
    ds = app_instance().datastore()
    tmp = _save_upload(file, ext if ext else ".bin")
    tmp_nii = None
    try:
        if os.path.getsize(tmp) == 0:
            raise InputError("the uploaded file is empty (0 bytes)")
        uri = ds.get_image_uri(image)
        if uri and os.path.exists(uri):
            if os.path.isfile(uri) and file_extension(uri) == ext and file_checksum(uri) == file_checksum(tmp):
                return {"image": image, "unchanged": True}
            raise Conflict(f"image id {image!r} already exists in the datastore with other content: "
                           "choose another id (or delete the image first)")
        img = load_upload(tmp, ext)  # InputError (422) for anything that is not a chest CT in HU
        src = tmp
        if ext not in STORED_EXT:  # .mha / DICOM / zip of a DICOM series -> stored as NIfTI
            fd, tmp_nii = tempfile.mkstemp(prefix="hybrid_ct_upload_", suffix=".nii.gz")
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
    tmp = _save_upload(label, ".nrrd" if ext == ".seg.nrrd" else ext)
    fd, canon_path = tempfile.mkstemp(prefix="hybrid_ct_label_", suffix=".nii.gz")
    os.close(fd)
    try:
        if os.path.getsize(tmp) == 0:
            raise InputError("the uploaded label file is empty (0 bytes)")
        canon, canon_info, warnings = canonicalise_label(tmp, uri, p.get("label_info"))
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
    return res


def remove_image(id: str) -> dict:
    ds = app_instance().datastore()
    _existing_image(ds, id)
    ds.remove_image(id)
    return {}


def remove_label(id: str, tag: str) -> dict:
    ds = app_instance().datastore()
    check_id(id, "label id")
    check_tag(tag)
    uri = ds.get_label_uri(id, tag)
    if not uri or not os.path.exists(uri):
        raise NotFound(f"no {tag!r} label for {id!r}")
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
        if check_sum:
            algo, _, digest = check_sum.rpartition(":")
            if digest != file_checksum(uri, algo=algo or "SHA256"):
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
    if output == ResultType.dicom_seg:
        raise BadRequest("output=dicom_seg is not offered by this app: use 'image', 'json' or 'all'")
    request = {"model": model}
    request.update(instance.info().get("config", {}).get("infer", {}))
    request.update(p)
    if file is not None and file.filename:
        ext = file_extension(file.filename)
        if ext not in STORED_EXT + (".mha",):
            raise InputError(f"unsupported file type {ext!r}: send the CT as {', '.join(STORED_EXT)}")
        path = _save_upload(file, ext)
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
    result = instance.infer(request)
    if result is None:
        raise HTTPException(500, "inference returned nothing")
    return send_response(instance.datastore(), result, output, background_tasks)


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


def start_training(model: str, params: Optional[dict], run_sync: bool = False, source: str = "request"):
    instance = app_instance()
    if model not in instance._trainers:
        raise NotFound(f"there is no trainer {model!r}; available: {sorted(instance._trainers)}")
    params = validate_params(params or {})
    if not instance.datastore().get_labeled_images():
        raise BadRequest("no labelled image yet: submit final labels before training")
    with _train_lock:
        active = training_active()
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
    return {"current": store.current(), "versions": store.versions()}


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


# ------------------------------------------------------------------------------------ routes
def build_router() -> APIRouter:
    r = APIRouter(prefix=settings.MONAI_LABEL_API_STR)

    async def api_add_image(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
                            user: User = Depends(RBAC(ANNOTATOR))):
        return await in_thread(add_image, image, params, file, user.username)

    r.add_api_route("/datastore/", api_add_image, methods=["PUT"], tags=["Datastore"], include_in_schema=False)
    r.add_api_route("/datastore/image", api_add_image, methods=["PUT"], tags=["Datastore"],
                    summary="Upload a new image (checked: a chest CT in HU; NIfTI, NRRD, MHA, DICOM or zip)")

    async def api_remove_image(id: str, user: User = Depends(RBAC(ADMIN))):
        return await in_thread(remove_image, id)

    r.add_api_route("/datastore/", api_remove_image, methods=["DELETE"], tags=["Datastore"], include_in_schema=False)
    r.add_api_route("/datastore/image", api_remove_image, methods=["DELETE"], tags=["Datastore"],
                    summary="Remove an image and its labels")

    async def api_check_image(image: str, check_sum: Optional[str] = None, user: User = Depends(RBAC(USER))):
        return await in_thread(download_image, image, True, check_sum)

    async def api_download_image(image: str, user: User = Depends(RBAC(USER))):
        return await in_thread(download_image, image)

    r.add_api_route("/datastore/image", api_check_image, methods=["HEAD"], tags=["Datastore"],
                    summary="Check if an image exists")
    r.add_api_route("/datastore/image", api_download_image, methods=["GET"], tags=["Datastore"],
                    summary="Download an image")

    async def api_put_image_info(image: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
        return await in_thread(update_image_info, image, info, user.username)

    r.add_api_route("/datastore/image/info", api_put_image_info, methods=["PUT"], tags=["Datastore"],
                    summary="Update image info (e.g. {\"diagnosis\": \"negative\"})")

    async def api_save_label(image: str, params: str = Form("{}"), tag: str = DefaultLabelTag.FINAL.value,
                             label: UploadFile = File(...), user: User = Depends(RBAC(ANNOTATOR))):
        return await in_thread(save_label, image, params, tag, label, user.username)

    r.add_api_route("/datastore/label", api_save_label, methods=["PUT"], tags=["Datastore"],
                    summary="Save a label map (checked against the image; values remapped by label_info names)")

    async def api_remove_label(id: str, tag: str, user: User = Depends(RBAC(ADMIN))):
        return await in_thread(remove_label, id, tag)

    r.add_api_route("/datastore/label", api_remove_label, methods=["DELETE"], tags=["Datastore"],
                    summary="Remove a label")

    async def api_check_label(image: str, tag: str, user: User = Depends(RBAC(USER))):
        return await in_thread(download_label, image, tag, True)

    async def api_download_label(label: str, tag: str, user: User = Depends(RBAC(USER))):
        return await in_thread(download_label, label, tag)

    r.add_api_route("/datastore/label", api_check_label, methods=["HEAD"], tags=["Datastore"],
                    summary="Check if a label exists")
    r.add_api_route("/datastore/label", api_download_label, methods=["GET"], tags=["Datastore"],
                    summary="Download a label")

    async def api_put_label_info(label: str, tag: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
        return await in_thread(update_label_info, label, tag, info, user.username)

    r.add_api_route("/datastore/label/info", api_put_label_info, methods=["PUT"], tags=["Datastore"],
                    summary="Update label info")

    async def api_run_inference(background_tasks: BackgroundTasks, model: str, image: str = "",
                                session_id: str = "", params: str = Form("{}"), file: UploadFile = File(None),
                                label: UploadFile = File(None), output: Optional[ResultType] = None,
                                user: User = Depends(RBAC(USER))):
        return await in_thread(run_inference, background_tasks, model, image, session_id, params, file, output)

    r.add_api_route("/infer/{model}", api_run_inference, methods=["POST"], tags=["Infer"],
                    summary="Run the model on a whole CT volume: label map + result params")

    async def api_train_model(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                              enqueue: Optional[bool] = False, user: User = Depends(RBAC(ADMIN))):
        return await in_thread(start_training, model, params, bool(run_sync))

    async def api_train_all(params: Optional[dict] = None, run_sync: Optional[bool] = False,
                            user: User = Depends(RBAC(ADMIN))):
        instance = app_instance()
        out = {}
        for m in instance._trainers:
            mp = (params or {}).get(m) if isinstance((params or {}).get(m), dict) else (params or {})
            out[m] = {"result": await in_thread(start_training, m, mp, bool(run_sync)), "detail": None}
        return out

    async def api_train_stop(user: User = Depends(RBAC(ADMIN))):
        grace = float(getattr(app_instance(), "stop_grace_s", 60.0))
        return await in_thread(stop_training, grace)

    r.add_api_route("/train/{model}", api_train_model, methods=["POST"], tags=["Train"],
                    summary="Start training (409 while one runs)")
    r.add_api_route("/train/", api_train_all, methods=["POST"], tags=["Train"], include_in_schema=False)
    r.add_api_route("/train/", api_train_stop, methods=["DELETE"], tags=["Train"],
                    summary="Stop training (the best model so far is published)")

    async def api_sample(strategy: str, params: Optional[dict] = None, user: User = Depends(RBAC(USER))):
        from monailabel.endpoints.activelearning import sample

        instance = app_instance()
        if strategy not in instance._strategies:
            raise HTTPException(404, f"there is no strategy {strategy!r}; available: {sorted(instance._strategies)}")
        return await in_thread(sample, strategy, params, user.username)

    r.add_api_route("/activelearning/{strategy}", api_sample, methods=["POST"], tags=["ActiveLearning"],
                    summary="Next image to label by the chosen strategy")

    async def api_versions(user: User = Depends(RBAC(USER))):
        return await in_thread(versions)

    async def api_rollback(version: str = "", user: User = Depends(RBAC(ADMIN))):
        return await in_thread(rollback, version)

    r.add_api_route("/hybrid_ct/versions", api_versions, methods=["GET"], tags=["Hybrid CT"],
                    summary="Model versions: {current, versions: [{version, created, metric}]}")
    r.add_api_route("/hybrid_ct/rollback", api_rollback, methods=["POST"], tags=["Hybrid CT"],
                    summary="Serve an earlier model version")
    return r


def install(fastapi_app) -> int:
    """Put the app's routes in front of MONAI Label's (once); stock routes they replace are removed."""
    if getattr(fastapi_app.state, "hybrid_ct_routes", False):
        return 0
    new = [rt for rt in build_router().routes if isinstance(rt, APIRoute)]
    keys = {(rt.path, m) for rt in new for m in rt.methods}
    kept = [rt for rt in fastapi_app.router.routes
            if not (isinstance(rt, APIRoute) and any((rt.path, m) in keys for m in rt.methods))]
    fastapi_app.router.routes[:] = new + kept
    fastapi_app.openapi_schema = None
    fastapi_app.state.hybrid_ct_routes = True
    logger.info("Hybrid CT: %d guarded routes installed in front of MONAI Label's", len(new))
    return len(new)


def describe(obj) -> str:  # small helper for logs
    return json.dumps(obj, default=str)[:500]
