"""Which HTTP routes the server answers: the app's guarded routes plus an allowlist of MONAI Label's, in one
place that fails closed.

MONAI Label 0.8.5 builds its FastAPI ``app`` with every stock router (``/session``, ``/batch``, WSI,
``/model`` upload and delete, ``/proxy``, ``/ohif``, ``/logs``, the dataset zip, ...) before it loads
this app. :func:`install` runs in ``HybridCTApp.on_init_complete`` (the server's start-up): it puts the
app's guarded routes (``lib/endpoints.py``) in front, then an ASGI middleware lets through ONLY the
(method, path) pairs of :data:`PRODUCT_ROUTES` (what 3D Slicer and the Hybrid CT extension use) and of
the optional groups the ``expose`` conf key turns on; every other path answers 404 (405 for a known
path with another method).
Anything unexpected -- an unknown group, a product route that is missing or still served by MONAI
Label where the app must guard it -- raises, so the server does not start rather than serve unguarded
routes. CORS: no header at all unless ``cors_origins`` lists origins; never credentials with ``*``.
"""
from __future__ import annotations

import hmac
import logging
import os
import re
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance
from starlette.responses import JSONResponse
from starlette.routing import Match, compile_path

from .endpoints import (ADMIN, ANNOTATOR, USER, add_image, download_image, download_label, in_thread, remove_image,
                        remove_label, rollback, run_inference, run_scoring, save_label, start_training,
                        stop_training, update_image_info, update_label_info, versions)

logger = logging.getLogger(__name__)

# (method, path) -> who uses it. Guarded by the app unless marked "stock" (read-only MONAI Label routes
# whose inputs are only looked up in dicts: status, info, image / label info).
PRODUCT_ROUTES = {
    ("GET", "/info/"): "stock: app, models, labels, train stats (Slicer: Connect)",
    ("POST", "/infer/{model}"): "run the model on a datastore image or an upload",
    ("GET", "/datastore/"): "stock: list / stats of images and labels",
    ("PUT", "/datastore/"): "upload an image (Slicer extension)",
    ("PUT", "/datastore/image"): "upload an image",
    ("DELETE", "/datastore/"): "remove an image (admin)",
    ("DELETE", "/datastore/image"): "remove an image (admin)",
    ("HEAD", "/datastore/image"): "does the server hold this image (and this checksum)",
    ("GET", "/datastore/image"): "download an image",
    ("GET", "/datastore/image/info"): "stock: image info",
    ("PUT", "/datastore/image/info"): "set image info (diagnosis)",
    ("PUT", "/datastore/label"): "submit a corrected label",
    ("DELETE", "/datastore/label"): "remove a label (admin)",
    ("HEAD", "/datastore/label"): "does a label exist",
    ("GET", "/datastore/label"): "download a label",
    ("GET", "/datastore/label/info"): "stock: label info",
    ("PUT", "/datastore/label/info"): "set label info",
    ("POST", "/activelearning/{strategy}"): "next image to label",
    ("GET", "/train/"): "stock: training status",
    ("POST", "/train/{model}"): "start a training (admin)",
    ("DELETE", "/train/"): "stop the training (admin)",
    ("GET", "/scoring/"): "stock: scoring status",
    ("POST", "/scoring/{method}"): "score the unlabelled images",
    ("DELETE", "/scoring/"): "stock: stop scoring",
    ("GET", "/hybrid_ct/versions"): "model versions",
    ("POST", "/hybrid_ct/rollback"): "serve an earlier version (admin)",
}
STOCK = {k for k, v in PRODUCT_ROUTES.items() if v.startswith("stock:")}
AUTH_ROUTES = {("GET", "/login/"), ("POST", "/login/token"), ("GET", "/login/token/valid")}
# Read-only groups an operator may turn on with --conf expose docs,logs,model_download.
OPTIONAL = {
    "docs": {("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/favicon.ico"),
             ("GET", "/static/{path:path}")},
    "logs": {("GET", "/logs/"), ("GET", "/logs/gpu")},
    "model_download": {("GET", "/model/{model}"), ("GET", "/model/info/{model}")},
}
# Never served: they write files or read server paths without the app's checks (see docs/app.md).
REFUSED = ("session", "batch_infer", "wsi", "model_upload", "model_delete", "proxy", "ohif", "dataset",
           "updatelabelinfo", "reload")


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

    async def api_train_stop(user: User = Depends(RBAC(ADMIN))):
        grace = float(getattr(app_instance(), "stop_grace_s", 60.0))
        return await in_thread(stop_training, grace)

    r.add_api_route("/train/{model}", api_train_model, methods=["POST"], tags=["Train"],
                    summary="Start training (409 while one runs)")
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

    async def api_scoring(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                          user: User = Depends(RBAC(ANNOTATOR))):
        return await in_thread(run_scoring, method, params, bool(run_sync))

    r.add_api_route("/scoring/{method}", api_scoring, methods=["POST"], tags=["Scoring"],
                    summary="Score the unlabelled images with a known scoring method (404 for an unknown one)")

    async def api_versions(user: User = Depends(RBAC(USER))):
        return await in_thread(versions)

    async def api_rollback(version: str = "", user: User = Depends(RBAC(ADMIN))):
        return await in_thread(rollback, version)

    r.add_api_route("/hybrid_ct/versions", api_versions, methods=["GET"], tags=["Hybrid CT"],
                    summary="Model versions: {current, versions: [{version, created, metric}]}")
    r.add_api_route("/hybrid_ct/rollback", api_rollback, methods=["POST"], tags=["Hybrid CT"],
                    summary="Serve an earlier model version")
    return r


class AllowlistMiddleware:
    """Pure ASGI: a request whose (method, path) is not allowed is answered 404 (405 for an allowed path
    with another method) before FastAPI routes it. Independent of how FastAPI nests included routers."""

    def __init__(self, app, allowed: set):
        self.app = app
        self.patterns = [(m, compile_path(p)[0]) for m, p in sorted(allowed)]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = _route_path(scope), scope["method"]
        hits = {m for m, rx in self.patterns if rx.match(path)}
        if method in hits or (method == "OPTIONS" and hits):  # OPTIONS: CORS pre-flight, answered before us
            return await self.app(scope, receive, send)
        status = 405 if hits else 404
        detail = f"{method} is not allowed on {path}" if hits else f"{path} is not served by this app"
        return await JSONResponse({"detail": detail}, status_code=status,
                                  headers={"Allow": ", ".join(sorted(hits))} if hits else None)(scope, receive, send)


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _first_match(routes: list, method: str, path: str):
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "path_params": {},
             "query_string": b"", "headers": []}
    for rt in routes:
        match, _ = rt.matches(scope)
        if match == Match.FULL:
            return rt
    return None


def install(fastapi_app, conf: dict | None = None) -> list:
    """Guarded routes in front, the allowlist and CORS as middleware. Raises on any surprise: the caller
    (start-up) must not catch it. Returns the served (method, path) pairs."""
    if getattr(fastapi_app.state, "hybrid_ct_routes", None):
        return fastapi_app.state.hybrid_ct_routes
    allowed = allowed_routes(expose_groups(conf or {}))
    ours = [rt for rt in build_router().routes if isinstance(rt, APIRoute)]
    guarded = {(m, rt.path) for rt in ours for m in rt.methods}
    missing_guard = sorted(set(PRODUCT_ROUTES) - STOCK - guarded)
    if missing_guard:
        raise RuntimeError(f"Hybrid CT: no guarded handler for {missing_guard}: refusing to start")
    routes = ours + [rt for rt in fastapi_app.router.routes if rt not in ours]
    for method, template in sorted(allowed):
        sample = re.sub(r"{[^}:]+(:path)?}", "x", template)
        first = _first_match(routes, method, sample)
        if first is None:
            raise RuntimeError(f"Hybrid CT: no route serves {method} {template}: refusing to start")
        if (method, template) in guarded and first not in ours:
            raise RuntimeError(f"Hybrid CT: {method} {template} would be served unguarded: refusing to start")
    fastapi_app.router.routes[:] = routes
    fastapi_app.openapi_schema = None
    middleware = [m for m in fastapi_app.user_middleware
                  if m.cls not in (CORSMiddleware, AllowlistMiddleware, TokenMiddleware)]
    middleware.append(Middleware(AllowlistMiddleware, allowed=allowed))
    middleware += token_middleware(conf or {})
    fastapi_app.user_middleware = cors_middleware((conf or {}).get("cors_origins", "")) + middleware
    # the stack was built when the server started: rebuild it, later requests go through the new one
    fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    fastapi_app.state.hybrid_ct_routes = sorted(allowed)
    logger.info("Hybrid CT: serving %d routes (%d guarded by the app); every other path answers 404",
                len(allowed), len(guarded & allowed))
    return fastapi_app.state.hybrid_ct_routes


def cors_middleware(origins_conf) -> list:
    """MONAI Label allows any origin WITH credentials; here: no CORS at all unless ``cors_origins`` lists
    origins, and never credentials with the wildcard."""
    origins = [o.strip() for o in str(origins_conf or "").split(",") if o.strip()]
    if not origins:
        return []
    wildcard = "*" in origins
    return [Middleware(CORSMiddleware, allow_origins=["*"] if wildcard else origins, allow_credentials=not wildcard,
                       allow_methods=["GET", "POST", "PUT", "DELETE", "HEAD"], allow_headers=["*"])]


# ------------------------------------------------------------------------------ API token
TOKEN_ENV = "HYBRID_CT_API_TOKEN"
OPEN_POSTS = ("/activelearning/", "/login/")  # POSTs that only read (next sample) or log in


def api_token(conf: dict) -> Optional[str]:
    """The API token: the first line of ``--conf api_token_file <path>``, else $HYBRID_CT_API_TOKEN, else None
    (no token: the server is open to whoever reaches it). A named file that is unreadable or empty stops
    the start-up."""
    path = str((conf or {}).get("api_token_file") or "")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as e:
            raise ValueError(f"--conf api_token_file {path}: cannot read it ({e.strerror})") from None
        if not token:
            raise ValueError(f"--conf api_token_file {path} holds no token")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def needs_token(method: str, path: str) -> bool:
    """Every write (PUT, DELETE; POST: infer, train, scoring, rollback) needs the token; reads do not."""
    if method in ("PUT", "DELETE", "PATCH"):
        return True
    return method == "POST" and not path.startswith(OPEN_POSTS)


class TokenMiddleware:
    """Pure ASGI: a request that ``needs_token`` without ``Authorization: Bearer <token>`` is answered 401.
    The token is compared in constant time and never logged or echoed."""

    def __init__(self, app, token: str):
        self.app = app
        self._token = token.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and needs_token(scope["method"], _route_path(scope)):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
                detail = ("this server requires an API token for writes and inference: send the header "
                          "'Authorization: Bearer <token>'" + (" (the token given is not valid)" if auth else ""))
                return await JSONResponse({"detail": detail}, status_code=401,
                                          headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)


def token_middleware(conf: dict) -> list:
    """[TokenMiddleware] when a token is configured (see ``api_token``), else []."""
    token = api_token(conf)
    if not token:
        logger.warning("Hybrid CT: no API token (--conf api_token_file or $%s): anyone who reaches this server "
                       "can infer, upload, train and roll back", TOKEN_ENV)
        return []
    if settings.MONAI_LABEL_AUTH_ENABLE:
        raise ValueError("the API token and MONAI Label's own authentication both use the Authorization header: "
                         "turn one of them off")
    source = "--conf api_token_file" if (conf or {}).get("api_token_file") else f"${TOKEN_ENV}"
    logger.info("Hybrid CT: an API token (from %s) is required on writes and inference", source)
    return [Middleware(TokenMiddleware, token=token)]
