"""Install the route table of ``lib/routes.py`` in the running server: the app's handlers in front, an allowlist
and the API token as ASGI middleware, CORS. Fails closed.

:func:`install` runs in ``HybridCTApp.on_init_complete`` (the server's start-up): an ASGI middleware lets
through ONLY the (method, path) pairs of the route table and of the optional groups the ``expose`` conf
key turns on; every other path answers 404 (405 for a known path with another method). Anything
unexpected -- an unknown group, a table route with no handler, or one still served by MONAI Label where
the app must guard it -- raises, so the server does not start rather than serve unguarded routes.
CORS: no header at all unless ``cors_origins`` lists origins; never credentials with ``*``.

API tokens: ``--conf api_token_file`` ($HYBRID_CT_API_TOKEN) holds the annotators' token, ``--conf
admin_token_file`` ($HYBRID_CT_ADMIN_TOKEN) the admin's. With either configured, a request whose row
needs a token is answered 401 without a valid one, 403 when its row needs the admin token and it carries
the annotators'. The token's role is handed to the handlers (``lib/info.TOKEN_ROLE_STATE``).
"""
from __future__ import annotations

import hmac
import logging
import os
import re
from typing import Optional

from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from monailabel.config import settings
from starlette.responses import JSONResponse
from starlette.routing import Match, compile_path

from .info import TOKEN_ROLE_STATE
from .routes import ADMIN_TOKEN, PRODUCT_ROUTES, STOCK, allowed_routes, build_router, expose_groups, token_rule

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------ API tokens
TOKEN_ENV = "HYBRID_CT_API_TOKEN"
ADMIN_TOKEN_ENV = "HYBRID_CT_ADMIN_TOKEN"


def _token_from(conf: dict, key: str, env: str) -> Optional[str]:
    path = str((conf or {}).get(key) or "")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as e:
            raise ValueError(f"--conf {key} {path}: cannot read it ({e.strerror})") from None
        if not token:
            raise ValueError(f"--conf {key} {path} holds no token")
        return token
    return os.environ.get(env, "").strip() or None


def api_token(conf: dict) -> Optional[str]:
    """The annotators' API token: the first line of ``--conf api_token_file <path>``, else $HYBRID_CT_API_TOKEN,
    else None. A named file that is unreadable or empty stops the start-up."""
    return _token_from(conf, "api_token_file", TOKEN_ENV)


def admin_token(conf: dict) -> Optional[str]:
    """The admin's token (may also delete final labels): ``--conf admin_token_file``, else $HYBRID_CT_ADMIN_TOKEN."""
    return _token_from(conf, "admin_token_file", ADMIN_TOKEN_ENV)


def api_tokens(conf: dict) -> dict:
    """{token: role} of the configured tokens (role "annotator" or "admin"); {} when none (an open server)."""
    user, admin = api_token(conf), admin_token(conf)
    if user and admin and hmac.compare_digest(user, admin):
        raise ValueError("the API token and the admin token are the same: give the admin a token of its own")
    return {t: role for t, role in ((user, "annotator"), (admin, "admin")) if t}


class TokenMiddleware:
    """Pure ASGI: a request whose row needs a token (``routes.token_rule``) without ``Authorization: Bearer
    <token>`` is answered 401, one that needs the admin token with the annotators' 403. Tokens are compared
    in constant time and never logged or echoed."""

    def __init__(self, app, tokens: dict):
        self.app = app
        self._tokens = [(t.encode("utf-8"), role) for t, role in tokens.items()]

    def _role(self, scope) -> Optional[str]:
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        role = None
        for token, r in self._tokens:  # every token compared: the time does not say which one matched
            if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token):
                role = r
        return role

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rule = token_rule(scope["method"], _route_path(scope))
        role = self._role(scope)
        if role is not None:
            scope.setdefault("state", {})[TOKEN_ROLE_STATE] = role
        if rule and role is None:
            given = dict(scope.get("headers") or []).get(b"authorization")
            detail = ("this server requires an API token for writes and inference: send the header "
                      "'Authorization: Bearer <token>'" + (" (the token given is not valid)" if given else ""))
            return await JSONResponse({"detail": detail}, status_code=401,
                                      headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if rule == ADMIN_TOKEN and role != "admin":
            detail = (f"{scope['method']} {_route_path(scope)} needs the admin token: it deletes images or labels "
                      "(final labels are training data)")
            return await JSONResponse({"detail": detail}, status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


def token_middleware(conf: dict) -> list:
    """[TokenMiddleware] when a token is configured (see ``api_tokens``), else []."""
    tokens = api_tokens(conf)
    if not tokens:
        logger.warning("Hybrid CT: no API token (--conf api_token_file or $%s): anyone who reaches this server "
                       "can infer, upload, train and roll back (not delete final labels)", TOKEN_ENV)
        return []
    if settings.MONAI_LABEL_AUTH_ENABLE:
        raise ValueError("the API token and MONAI Label's own authentication both use the Authorization header: "
                         "turn one of them off")
    for role, key, env in (("annotator", "api_token_file", TOKEN_ENV), ("admin", "admin_token_file", ADMIN_TOKEN_ENV)):
        if role in tokens.values():
            source = f"--conf {key}" if (conf or {}).get(key) else f"${env}"
            logger.info("Hybrid CT: an API token (from %s) is required on writes and inference; role %s", source, role)
    return [Middleware(TokenMiddleware, tokens=tokens)]
