"""Every HTTP route the server answers, declared once in :data:`ROUTES`.

One row per (method, path): who may call it (``role``, MONAI Label's RBAC role when its own
authentication is on), which API token it needs (``token``: ``""`` none, ``"any"`` any configured token,
``"admin"`` the admin token) and its ``handler`` (the app's guarded endpoint; ``None`` for MONAI Label's
stock read-only handler, whose inputs are only looked up in dicts). From this table come the allowlist
(:func:`allowed_routes`), the FastAPI router of the app's handlers (:func:`build_router`) and the token
rule (:func:`token_rule`); ``lib/guard.py`` installs them at start-up and fails closed.

MONAI Label 0.8.5 builds its FastAPI ``app`` with every stock router (``/session``, ``/batch``, WSI,
``/model`` upload and delete, ``/proxy``, ``/ohif``, ``/logs``, the dataset zip, ...) before it loads
this app: only the rows below and the optional groups of the ``expose`` conf key are reachable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, Query, Request, UploadFile
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User, get_current_user
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance
from pydantic import BaseModel
from starlette.routing import compile_path

from .endpoints import (ADMIN, ANNOTATOR, USER, add_image, download_image, download_label, remove_image,
                        remove_label, rollback, run_inference, run_scoring, save_label, start_training,
                        stop_training, update_image_info, update_label_info, versions)
from .http_errors import in_thread
from .info import get_image_info, get_label_info, may_delete_final

# ------------------------------------------------------------------------------ request parameters


class LabelQuery(BaseModel):
    """``?label=<image id>&tag=<tag>``: one label of the datastore."""
    label: str
    tag: str


class TrainQuery(BaseModel):
    run_sync: bool = False
    enqueue: bool = False  # accepted for MONAI Label's clients, ignored: never queued behind a running training


class ScoringQuery(BaseModel):
    run_sync: bool = False


Username = Annotated[User, Depends(get_current_user)]


# ------------------------------------------------------------------------------ the app's endpoints
async def api_add_image(user: Username, image: Optional[str] = None, params: str = Form("{}"),
                        file: UploadFile = File(...)):
    return await in_thread(add_image, image, params, file, user.username)


async def api_remove_image(request: Request, id: str):
    return await in_thread(remove_image, id, may_delete_final(request))


async def api_check_image(image: str, check_sum: Optional[str] = None):
    return await in_thread(download_image, image, True, check_sum)


async def api_download_image(image: str):
    return await in_thread(download_image, image)


async def api_get_image_info(image: str):
    return await in_thread(get_image_info, image)


async def api_put_image_info(user: Username, image: str, info: str = Form("{}")):
    return await in_thread(update_image_info, image, info, user.username)


async def api_save_label(user: Username, image: str, params: str = Form("{}"), tag: str = DefaultLabelTag.FINAL.value,
                         label: UploadFile = File(...)):
    return await in_thread(save_label, image, params, tag, label, user.username)


async def api_remove_label(request: Request, id: str, tag: str):
    return await in_thread(remove_label, id, tag, may_delete_final(request))


async def api_check_label(image: str, tag: str):
    return await in_thread(download_label, image, tag, True)


async def api_download_label(q: Annotated[LabelQuery, Query()]):
    return await in_thread(download_label, q.label, q.tag)


async def api_get_label_info(q: Annotated[LabelQuery, Query()]):
    return await in_thread(get_label_info, q.label, q.tag)


async def api_put_label_info(user: Username, q: Annotated[LabelQuery, Query()], info: str = Form("{}")):
    return await in_thread(update_label_info, q.label, q.tag, info, user.username)


async def api_run_inference(background_tasks: BackgroundTasks, model: str, image: str = "", session_id: str = "",
                            params: str = Form("{}"), file: UploadFile = File(None), label: UploadFile = File(None),
                            output: Optional[ResultType] = None):
    return await in_thread(run_inference, background_tasks, model, image, session_id, params, file, output)


async def api_train_model(model: str, q: Annotated[TrainQuery, Query()], params: Optional[dict] = None):
    return await in_thread(start_training, model, params, q.run_sync)


async def api_train_stop():
    grace = float(getattr(app_instance(), "stop_grace_s", 60.0))
    return await in_thread(stop_training, grace)


async def api_sample(user: Username, strategy: str, params: Optional[dict] = None):
    from monailabel.endpoints.activelearning import sample

    instance = app_instance()
    if strategy not in instance._strategies:
        raise HTTPException(404, f"there is no strategy {strategy!r}; available: {sorted(instance._strategies)}")
    return await in_thread(sample, strategy, params, user.username)


async def api_scoring(method: str, q: Annotated[ScoringQuery, Query()], params: Optional[dict] = None):
    return await in_thread(run_scoring, method, params, q.run_sync)


async def api_versions():
    return await in_thread(versions)


async def api_rollback(version: str = ""):
    return await in_thread(rollback, version)


# ------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Route:
    method: str
    path: str
    role: str  # RBAC role (MONAI Label's authentication); USER reads, ANNOTATOR writes, ADMIN deletes / trains
    token: str  # "" open, "any" any API token, "admin" the admin token (when tokens are configured)
    handler: Optional[Callable]  # the app's guarded endpoint; None: MONAI Label's stock read-only handler
    summary: str
    tag: str = "Datastore"
    in_schema: bool = True


ANY, ADMIN_TOKEN = "any", "admin"

ROUTES = (
    Route("GET", "/info/", USER, "", None, "app, models, labels, train stats (Slicer: Connect)", "AppService"),
    Route("POST", "/infer/{model}", USER, ANY, api_run_inference,
          "Run the model on a whole CT volume: label map + result params", "Infer"),
    Route("GET", "/datastore/", USER, "", None, "list / stats of images and labels"),
    Route("PUT", "/datastore/", ANNOTATOR, ANY, api_add_image, "upload an image", in_schema=False),
    Route("PUT", "/datastore/image", ANNOTATOR, ANY, api_add_image,
          "Upload a new image (checked: a chest CT in HU; NIfTI, NRRD, MHA, DICOM or zip)"),
    Route("DELETE", "/datastore/", ADMIN, ADMIN_TOKEN, api_remove_image, "remove an image", in_schema=False),
    Route("DELETE", "/datastore/image", ADMIN, ADMIN_TOKEN, api_remove_image,
          "Remove an image and its labels (admin: it removes its final label)"),
    Route("HEAD", "/datastore/image", USER, "", api_check_image, "Check if an image exists (and has this checksum)"),
    Route("GET", "/datastore/image", USER, "", api_download_image, "Download an image"),
    Route("GET", "/datastore/image/info", USER, "", api_get_image_info, "Image info (404 for an unknown image)"),
    Route("PUT", "/datastore/image/info", ANNOTATOR, ANY, api_put_image_info,
          "Update image info (e.g. {\"diagnosis\": \"negative\"})"),
    Route("PUT", "/datastore/label", ANNOTATOR, ANY, api_save_label,
          "Save a label map (checked against the image; values remapped by label_info names)"),
    Route("DELETE", "/datastore/label", ADMIN, ADMIN_TOKEN, api_remove_label,
          "Remove a label (admin: a final label is training data)"),
    Route("HEAD", "/datastore/label", USER, "", api_check_label, "Check if a label exists"),
    Route("GET", "/datastore/label", USER, "", api_download_label, "Download a label"),
    Route("GET", "/datastore/label/info", USER, "", api_get_label_info, "Label info (404 for an unknown label)"),
    Route("PUT", "/datastore/label/info", ANNOTATOR, ANY, api_put_label_info, "Update label info"),
    Route("POST", "/activelearning/{strategy}", USER, "", api_sample, "Next image to label by the chosen strategy",
          "ActiveLearning"),
    Route("GET", "/train/", USER, "", None, "training status", "Train"),
    Route("POST", "/train/{model}", ADMIN, ANY, api_train_model, "Start training (409 while one runs)", "Train"),
    Route("DELETE", "/train/", ADMIN, ANY, api_train_stop, "Stop training (the best model so far is published)",
          "Train"),
    Route("GET", "/scoring/", USER, "", None, "scoring status", "Scoring"),
    Route("POST", "/scoring/{method}", ANNOTATOR, ANY, api_scoring,
          "Score the unlabelled images with a known scoring method (404 for an unknown one)", "Scoring"),
    Route("DELETE", "/scoring/", ANNOTATOR, ANY, None, "stop scoring", "Scoring"),
    Route("GET", "/hybrid_ct/versions", USER, "", api_versions,
          "Model versions: {current, versions: [{version, created, metric}]}", "Hybrid CT"),
    Route("POST", "/hybrid_ct/rollback", ADMIN, ANY, api_rollback, "Serve an earlier model version", "Hybrid CT"),
)

PRODUCT_ROUTES = {(r.method, r.path): r.summary for r in ROUTES}
STOCK = {(r.method, r.path) for r in ROUTES if r.handler is None}
AUTH_ROUTES = {("GET", "/login/"), ("POST", "/login/token"), ("GET", "/login/token/valid")}
# Read-only groups an operator may turn on with --conf expose docs,logs,model_download (stock, no token).
OPTIONAL = {
    "docs": {("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/favicon.ico"),
             ("GET", "/static/{path:path}")},
    "logs": {("GET", "/logs/"), ("GET", "/logs/gpu")},
    "model_download": {("GET", "/model/{model}"), ("GET", "/model/info/{model}")},
}
# Never served: they write files or read server paths without the app's checks (see docs/app.md).
REFUSED = ("session", "batch_infer", "wsi", "model_upload", "model_delete", "proxy", "ohif", "dataset",
           "updatelabelinfo", "reload")

_PATTERNS = [(r.method, compile_path(r.path)[0], r.token) for r in ROUTES]


def expose_groups(conf: dict) -> set:
    raw = str((conf or {}).get("expose", "") or "")
    groups = {g.strip() for g in raw.split(",") if g.strip()}
    refused = sorted(g for g in groups if g in REFUSED)
    if refused:
        raise ValueError(f"--conf expose {refused}: not offered by this app (they write files or read server paths "
                         f"unchecked); groups that can be turned on: {sorted(OPTIONAL)}")
    unknown = sorted(groups - set(OPTIONAL))
    if unknown:
        raise ValueError(f"--conf expose: unknown group(s) {unknown}; known: {sorted(OPTIONAL)}")
    return groups


def allowed_routes(groups: set) -> set:
    allowed = set(PRODUCT_ROUTES)
    for g in groups:
        allowed |= OPTIONAL[g]
    if settings.MONAI_LABEL_AUTH_ENABLE:
        allowed |= AUTH_ROUTES
    return allowed


def token_rule(method: str, path: str) -> str:
    """The token a request needs: its row's ``token``; a (method, path) outside the table (the optional
    read-only groups, login) needs none if it only reads, any token otherwise."""
    for m, rx, token in _PATTERNS:
        if m == method and rx.match(path):
            return token
    if method in ("GET", "HEAD", "OPTIONS") or path.startswith("/login/"):
        return ""
    return ANY


def needs_token(method: str, path: str) -> bool:
    return bool(token_rule(method, path))


def build_router() -> APIRouter:
    """The app's handlers, each behind MONAI Label's RBAC dependency for its row's role."""
    r = APIRouter(prefix=settings.MONAI_LABEL_API_STR)
    for route in ROUTES:
        if route.handler is None:
            continue
        r.add_api_route(route.path, route.handler, methods=[route.method], tags=[route.tag],
                        summary=route.summary, include_in_schema=route.in_schema,
                        dependencies=[Depends(RBAC(route.role))])
    return r
