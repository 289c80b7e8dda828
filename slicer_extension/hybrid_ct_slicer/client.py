"""HTTP client for the Hybrid CT MONAI Label server, standard library only.

It speaks to a MONAI Label 0.8.5 server the way Slicer's MONAILabel plugin does (same endpoints,
same multipart field names, same query parameters), plus the two app-specific endpoints of
``apps/hybrid_ct`` for model versions. Identifiers coming from the server or the user (image ids,
model and strategy names, versions) are treated as data and always URL-quoted.

Every failure surfaces as :class:`ServerError` with a message a radiologist can act on.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import quote, urlencode

from .multipart import decode_multipart, encode_multipart, is_multipart
from .settings import normalise_server_url

# --------------------------------------------------------------------------------------------
# Endpoints. MONAI Label 0.8.5 core API:
API_INFO = "/info/"
API_DATASTORE = "/datastore/"  # GET ?output=stats|all|train; PUT ?image=<id> (upload, field "file")
API_DATASTORE_IMAGE = "/datastore/image"  # HEAD ?image=<id>: 200 when the server has the image
API_DATASTORE_LABEL = "/datastore/label"  # PUT ?image=<id>&tag=final (fields "label", "params")
API_INFER = "/infer/{model}"  # POST ?image=<id>&output=all|image|json (form field "params")
API_ACTIVELEARNING = "/activelearning/{strategy}"  # POST, JSON body
API_TRAIN = "/train/"  # GET status (?check_if_running=true), DELETE stop
API_TRAIN_MODEL = "/train/{model}"  # POST ?run_sync=false, JSON body = train params
# App-specific endpoints served by apps/hybrid_ct (model versions and roll back):
APP_VERSIONS = "/hybrid_ct/versions"  # GET -> {"current": str, "versions": [{"version","created","metric"}]}
APP_ROLLBACK = "/hybrid_ct/rollback"  # POST ?version=<v>

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_LONG_TIMEOUT_S = 900.0  # whole-volume inference on a CPU server takes minutes


class ServerError(RuntimeError):
    """A failed exchange with the server; ``str(err)`` is a message for the user.

    ``kind`` is one of ``"unreachable"``, ``"timeout"``, ``"http"``, ``"protocol"``;
    ``status`` is the HTTP status for ``"http"`` errors, ``detail`` the server's own text.
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None, detail: str | None = None,
                 method: str | None = None, path: str | None = None, url: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.detail = detail
        self.method = method
        self.path = path
        self.url = url


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "") or ""

    def json(self) -> Any:
        if not self.body.strip():
            return None
        return json.loads(self.body.decode("utf-8"))


@dataclass
class InferResponse:
    """What ``POST /infer/<model>`` returned: the result params and (usually) a label file."""

    params: dict = field(default_factory=dict)
    label: bytes | None = None
    label_filename: str | None = None

    def save_label(self, out_dir: str, stem: str = "label") -> str | None:
        """Write the label file into ``out_dir`` keeping its extension; returns the path."""
        if self.label is None:
            return None
        name = os.path.basename(self.label_filename or "") or f"{stem}.nii.gz"
        ext = file_extension(name) or ".nii.gz"
        safe_stem = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in stem) or "label"
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, safe_stem + ext)
        with open(path, "wb") as f:
            f.write(self.label)
        return path


def file_extension(name: str) -> str:
    """'.nii.gz', '.seg.nrrd', '.nrrd', ... of a file name (double extensions kept)."""
    lower = name.lower()
    for ext in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd", ".dcm"):
        if lower.endswith(ext):
            return name[-len(ext):]
    return os.path.splitext(name)[1]


def _q(value: Any) -> str:
    """Quote one path segment (ids are data: '/', '?', '#', '..' are all escaped)."""
    return quote(str(value), safe="")


def _detail_from_body(body: bytes, fallback: str) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return fallback
    try:
        data = json.loads(text)
    except ValueError:
        return text if len(text) <= 500 else text[:500] + " ..."
    if isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        if isinstance(detail, list):  # FastAPI validation errors
            items = []
            for d in detail:
                if isinstance(d, dict):
                    loc = ".".join(str(x) for x in d.get("loc", []) if x != "body")
                    items.append(f"{loc}: {d.get('msg', d)}" if loc else str(d.get("msg", d)))
                else:
                    items.append(str(d))
            return "; ".join(items) or fallback
        return str(detail)
    return text if len(text) <= 500 else text[:500] + " ..."


class HybridCTClient:
    """Client for the Hybrid CT MONAI Label app.

    ``timeout`` applies to quick calls; uploads, inference and label submission use
    ``long_timeout`` (default: the larger of ``timeout`` and 900 s).
    """

    def __init__(self, server_url: str, timeout: float = DEFAULT_TIMEOUT_S, *, long_timeout: float | None = None,
                 verify_tls: bool = True, client_id: str | None = None, use_env_proxy: bool = False):
        self.server_url = normalise_server_url(server_url)
        self.timeout = float(timeout)
        self.long_timeout = float(long_timeout) if long_timeout is not None else max(self.timeout,
                                                                                      DEFAULT_LONG_TIMEOUT_S)
        self.client_id = client_id
        handlers: list[Any] = []
        if not use_env_proxy:
            # Like the MONAILabel plugin (http.client): talk to the server directly, never via
            # an http_proxy from the environment (a hospital proxy would not reach 127.0.0.1).
            handlers.append(urllib.request.ProxyHandler({}))
        if self.server_url.startswith("https://") and not verify_tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        self._opener = urllib.request.build_opener(*handlers)

    # ---------------------------------------------------------------- transport
    def _url(self, path: str, query: dict | None = None) -> str:
        url = self.server_url + path
        if query:
            url += "?" + urlencode({k: ("true" if v is True else "false" if v is False else v)
                                    for k, v in query.items() if v is not None})
        return url

    def request(self, method: str, path: str, *, query: dict | None = None, body: bytes | None = None,
                content_type: str | None = None, timeout: float | None = None,
                ok: tuple[int, ...] = (200,)) -> Response:
        """Send one request; returns the response for statuses in ``ok``, raises ServerError else."""
        timeout = self.timeout if timeout is None else timeout
        url = self._url(path, query)
        headers = {"Accept": "application/json, multipart/form-data, */*"}
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        where = f"{method} {path}"
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                status, msg, data = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            try:
                data = e.read() or b""
            except Exception:  # noqa: BLE001 - body unreadable: keep the status
                data = b""
            status, msg = e.code, e.headers if e.headers is not None else Message()
            if status in ok:
                return Response(status, msg, data)
            detail = _detail_from_body(data, e.reason if isinstance(e.reason, str) else "no detail")
            hint = " (an unhandled error: the server log has the details)" \
                if status >= 500 and detail.strip().lower() == "internal server error" else ""
            raise ServerError(
                f"The server at {self.server_url} answered HTTP {status} to {where}: {detail}{hint}",
                kind="http", status=status, detail=detail, method=method, path=path, url=url) from None
        except urllib.error.URLError as e:
            raise self._transport_error(e.reason, method, path, url, timeout) from None
        except (TimeoutError, socket.timeout, OSError, http.client.HTTPException) as e:
            raise self._transport_error(e, method, path, url, timeout) from None
        if status not in ok:
            detail = _detail_from_body(data, "unexpected status")
            raise ServerError(f"The server at {self.server_url} answered HTTP {status} to {where}: {detail}",
                              kind="http", status=status, detail=detail, method=method, path=path, url=url)
        return Response(status, msg, data)

    def _transport_error(self, reason: Any, method: str, path: str, url: str, timeout: float) -> ServerError:
        where = f"{method} {path}"
        if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason).lower():
            return ServerError(
                f"The server at {self.server_url} did not answer within {timeout:g} s ({where}). It may be busy "
                f"(e.g. training on the CPU) or overloaded; try again or raise the timeout.",
                kind="timeout", method=method, path=path, url=url)
        if isinstance(reason, ssl.SSLError):
            return ServerError(f"TLS/SSL error talking to {self.server_url}: {reason}",
                               kind="unreachable", method=method, path=path, url=url)
        if isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError, http.client.HTTPException)):
            return ServerError(f"The server at {self.server_url} closed the connection during {where} "
                               f"({reason.__class__.__name__}): it may have crashed or restarted.",
                               kind="unreachable", method=method, path=path, url=url)
        if isinstance(reason, socket.gaierror):
            why = f"host name not found ({reason})"
        elif isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        else:
            why = str(reason) or reason.__class__.__name__
        return ServerError(f"The MONAI Label server at {self.server_url} is not reachable: is it running? ({why})",
                           kind="unreachable", method=method, path=path, url=url)

    def _json(self, resp: Response, what: str) -> Any:
        try:
            return resp.json()
        except ValueError as e:
            raise ServerError(f"The server's answer to {what} is not valid JSON: {e}", kind="protocol",
                              status=resp.status) from None

    def _with_client_id(self, params: dict | None) -> dict:
        params = dict(params or {})
        if self.client_id and "client_id" not in params:
            params["client_id"] = self.client_id
        return params

    @staticmethod
    def _file_payload(file: str | bytes, filename: str | None) -> tuple[str, bytes]:
        if isinstance(file, (bytes, bytearray)):
            if not filename:
                raise ValueError("a filename (with its extension) is needed when uploading bytes")
            return filename, bytes(file)
        with open(file, "rb") as f:
            return filename or os.path.basename(file), f.read()

    # ---------------------------------------------------------------- MONAI Label API
    def info(self) -> dict:
        """``GET /info/``: app name, version, labels, models, trainers, strategies, train_stats."""
        data = self._json(self.request("GET", API_INFO), "GET /info/")
        if not isinstance(data, dict):
            raise ServerError("The server's /info/ answer is not an object: is this a MONAI Label server?",
                              kind="protocol")
        return data

    def datastore_stats(self) -> dict:
        """``GET /datastore/?output=stats``: ``{"total", "completed", "label_tags"}``."""
        return self._json(self.request("GET", API_DATASTORE, query={"output": "stats"}), "GET /datastore/") or {}

    def datastore_all(self) -> dict:
        """``GET /datastore/?output=all``: the full datastore description."""
        return self._json(self.request("GET", API_DATASTORE, query={"output": "all"}), "GET /datastore/") or {}

    def has_image(self, image_id: str) -> bool:
        """``HEAD /datastore/image?image=<id>``: True when the server's datastore holds the image."""
        resp = self.request("HEAD", API_DATASTORE_IMAGE, query={"image": image_id}, ok=(200, 404))
        return resp.status == 200

    def download_image(self, image_id: str) -> tuple[bytes, str]:
        """``GET /datastore/image?image=<id>`` -> (file bytes, file name with its extension)."""
        resp = self.request("GET", API_DATASTORE_IMAGE, query={"image": image_id}, timeout=self.long_timeout)
        msg = Message()
        msg["Content-Disposition"] = resp.headers.get("Content-Disposition", "")
        return resp.body, os.path.basename(msg.get_filename() or f"{image_id}.nii.gz")

    def upload_image(self, file: str | bytes, image_id: str, *, filename: str | None = None,
                     params: dict | None = None) -> dict:
        """``PUT /datastore/?image=<id>`` with multipart fields ``file`` and ``params``.

        The file name's extension tells the server the format (``.nii.gz``, ``.nrrd``, ...).
        """
        name, data = self._file_payload(file, filename)
        body, ctype = encode_multipart({"params": json.dumps(self._with_client_id(params))}, {"file": (name, data)})
        resp = self.request("PUT", API_DATASTORE, query={"image": image_id}, body=body, content_type=ctype,
                            timeout=self.long_timeout)
        return self._json(resp, "PUT /datastore/") or {}

    def infer(self, model: str, image_id: str, params: dict | None = None, *, output: str = "all") -> InferResponse:
        """``POST /infer/<model>?image=<id>&output=<output>``.

        ``output="all"`` returns a multipart answer (label file + JSON params; both are parsed),
        ``"image"`` the label file only, ``"json"`` the params only.
        """
        if output not in ("all", "image", "json"):
            raise ValueError(f"output must be 'all', 'image' or 'json', not {output!r}")
        body, ctype = encode_multipart({"params": json.dumps(self._with_client_id(params))})
        path = API_INFER.format(model=_q(model))
        resp = self.request("POST", path, query={"image": image_id, "output": output}, body=body,
                            content_type=ctype, timeout=self.long_timeout)
        return self.parse_infer_response(resp)

    @staticmethod
    def parse_infer_response(resp: Response) -> InferResponse:
        ctype = resp.content_type
        if is_multipart(ctype):
            out = InferResponse()
            for part in decode_multipart(resp.body, ctype):
                if part.filename:
                    if out.label is None:
                        out.label, out.label_filename = part.data, part.filename
                elif part.name == "params":
                    try:
                        params = json.loads(part.text() or "{}")
                    except ValueError as e:
                        raise ServerError(f"The infer result params are not valid JSON: {e}",
                                          kind="protocol") from None
                    out.params = params if isinstance(params, dict) else {"value": params}
            return out
        if "json" in ctype.lower():
            try:
                params = resp.json()
            except ValueError as e:
                raise ServerError(f"The infer answer is not valid JSON: {e}", kind="protocol") from None
            # The server answers with JSON alone when it produced no label file.
            return InferResponse(params=params if isinstance(params, dict) else {"value": params})
        # output=image: a plain file response
        msg = Message()
        msg["Content-Disposition"] = resp.headers.get("Content-Disposition", "")
        return InferResponse(params={}, label=resp.body, label_filename=msg.get_filename() or "label.nii.gz")

    def save_label(self, image_id: str, label: str | bytes, label_info: list[dict], *, filename: str | None = None,
                   tag: str = "final", params: dict | None = None) -> dict:
        """``PUT /datastore/label?image=<id>&tag=<tag>`` with fields ``label`` (file) and ``params``.

        ``params`` always carries ``label_info`` (``[{"name": "lung", "idx": 1}, ...]``), so the
        server knows what each value means whatever the segment order was in Slicer.
        """
        name, data = self._file_payload(label, filename)
        p = self._with_client_id(params)
        p["label_info"] = list(label_info)
        body, ctype = encode_multipart({"params": json.dumps(p)}, {"label": (name, data)})
        resp = self.request("PUT", API_DATASTORE_LABEL, query={"image": image_id, "tag": tag}, body=body,
                            content_type=ctype, timeout=self.long_timeout)
        return self._json(resp, "PUT /datastore/label") or {}

    def download_label(self, label_id: str, tag: str = "final") -> tuple[bytes, str]:
        """``GET /datastore/label?label=<id>&tag=<tag>`` -> (file bytes, file name)."""
        resp = self.request("GET", API_DATASTORE_LABEL, query={"label": label_id, "tag": tag},
                            timeout=self.long_timeout)
        msg = Message()
        msg["Content-Disposition"] = resp.headers.get("Content-Disposition", "")
        return resp.body, os.path.basename(msg.get_filename() or f"{label_id}.nii.gz")

    def next_sample(self, strategy: str, params: dict | None = None) -> dict | None:
        """``POST /activelearning/<strategy>``; returns the image info (with ``"id"``) or None."""
        body = json.dumps(self._with_client_id(params)).encode()
        resp = self.request("POST", API_ACTIVELEARNING.format(strategy=_q(strategy)), body=body,
                            content_type="application/json")
        data = self._json(resp, "POST /activelearning/")
        if not data or not isinstance(data, dict) or not data.get("id"):
            return None
        return data

    def train_start(self, model: str, params: dict | None = None, *, run_sync: bool = False) -> dict:
        """``POST /train/<model>?run_sync=false`` with the train params as JSON body."""
        body = json.dumps(self._with_client_id(params)).encode()
        resp = self.request("POST", API_TRAIN_MODEL.format(model=_q(model)), query={"run_sync": run_sync},
                            body=body, content_type="application/json",
                            timeout=self.long_timeout if run_sync else self.timeout)
        return self._json(resp, "POST /train/") or {}

    def train_stop(self) -> dict | None:
        """``DELETE /train/``: the stopped task, or None when nothing was running."""
        return self._json(self.request("DELETE", API_TRAIN), "DELETE /train/")

    def train_running(self) -> bool:
        """``GET /train/?check_if_running=true``: 200 while a training task runs, 404 otherwise."""
        resp = self.request("GET", API_TRAIN, query={"check_if_running": True}, ok=(200, 404))
        return resp.status == 200

    def train_status(self) -> dict | None:
        """``GET /train/``: the last training task (status, details, ...) or None when there was none."""
        resp = self.request("GET", API_TRAIN, ok=(200, 404))
        if resp.status == 404:
            return None
        return self._json(resp, "GET /train/")

    def train_stats(self, model: str | None = None) -> dict:
        """``train_stats`` from ``/info/`` (best_metric, epochs, ...), for one model or all."""
        stats = self.info().get("train_stats") or {}
        if model is None:
            return stats
        return stats.get(model) or {}

    # ---------------------------------------------------------------- app-specific
    def model_versions(self) -> dict:
        """``GET /hybrid_ct/versions`` -> ``{"current": str, "versions": [{"version","created","metric"}]}``."""
        data = self._json(self.request("GET", APP_VERSIONS), f"GET {APP_VERSIONS}") or {}
        if not isinstance(data, dict):
            raise ServerError(f"The answer to GET {APP_VERSIONS} is not an object", kind="protocol")
        data.setdefault("versions", [])
        data.setdefault("current", None)
        return data

    def rollback(self, version: str) -> dict:
        """``POST /hybrid_ct/rollback?version=<v>``: serve an earlier model version."""
        if not str(version).strip():
            raise ValueError("choose a model version to roll back to")
        resp = self.request("POST", APP_ROLLBACK, query={"version": str(version)}, body=b"{}",
                            content_type="application/json")
        return self._json(resp, f"POST {APP_ROLLBACK}") or {}
