"""HTTP client for the Hybrid CT MONAI Label server, on ``requests`` (shipped with Slicer).

It speaks to a MONAI Label 0.8.5 server the way Slicer's MONAILabel plugin does (same endpoints,
same multipart field names, same query parameters), plus the two app-specific endpoints of
``apps/hybrid_ct`` for model versions. Identifiers coming from the server or the user (image ids,
model and strategy names, versions) are treated as data and always URL-quoted.
``monailabel.client.MONAILabelClient`` is not used: Slicer does not ship it (the MONAILabel extension
bundles its own copy), and it has neither these app endpoints nor these error messages.

Every failure surfaces as :class:`ServerError` with a message a radiologist can act on.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import tempfile
from typing import Any, Callable, Mapping
from urllib.parse import urlencode

import requests

from .settings import normalise_server_url
from .transport import (TRANSFER_CHUNK, InferResponse, Progress, ServerError, _Cancelled, _causes,  # noqa: F401
                        _detail_from_body, _filename, _multipart_parts, _MultipartBody, _params, _q, _remove,
                        file_extension, tls_verify, transport_warning)

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


API_TOKEN_ENV = "HYBRID_CT_API_TOKEN"


class HybridCTClient:
    """Client for the Hybrid CT MONAI Label app.

    ``timeout`` applies to quick calls; uploads, inference and label submission use
    ``long_timeout`` (default: the larger of ``timeout`` and 900 s).
    """

    def __init__(self, server_url: str, timeout: float = DEFAULT_TIMEOUT_S, *, long_timeout: float | None = None,
                 verify_tls: bool = True, client_id: str | None = None, use_env_proxy: bool = False,
                 api_token: str | None = None, ca_bundle: str | None = None):
        self.server_url = normalise_server_url(server_url)
        self.timeout = float(timeout)
        self.long_timeout = float(long_timeout) if long_timeout is not None else max(self.timeout,
                                                                                      DEFAULT_LONG_TIMEOUT_S)
        self.client_id = client_id
        self.session = requests.Session()
        # Like the MONAILabel plugin (http.client): talk to the server directly, never via an
        # http_proxy from the environment (a hospital proxy would not reach 127.0.0.1).
        self.session.trust_env = use_env_proxy
        # https with a hospital CA: ``ca_bundle``, else $HYBRID_CT_CA_BUNDLE / $REQUESTS_CA_BUNDLE / ... (tls_verify)
        self.session.verify = tls_verify(verify_tls, ca_bundle)
        self.ca_bundle, self.verify_tls = ca_bundle, verify_tls
        # the server's optional API token (docs/app.md): given, else $HYBRID_CT_API_TOKEN; never logged
        token = api_token if api_token is not None else os.environ.get(API_TOKEN_ENV, "")
        if token.strip():
            self.session.headers["Authorization"] = f"Bearer {token.strip()}"

    def transport_warning(self) -> str:
        """'' or the warning to show before talking to this server (an API token over plain http, ...)."""
        return transport_warning(self.server_url, "Authorization" in self.session.headers)

    # ---------------------------------------------------------------- transport
    def _url(self, path: str, query: dict | None = None) -> str:
        url = self.server_url + path
        if query:
            url += "?" + urlencode({k: ("true" if v is True else "false" if v is False else v)
                                    for k, v in query.items() if v is not None})
        return url

    def request(self, method: str, path: str, *, query: dict | None = None, timeout: float | None = None,
                ok: tuple[int, ...] = (200,), **kwargs) -> requests.Response:
        """Send one request (``kwargs`` as for ``requests``: ``files``, ``json``, ...); returns the
        response for statuses in ``ok``, raises ServerError else."""
        timeout = self.timeout if timeout is None else timeout
        url = self._url(path, query)
        where = f"{method} {path}"
        headers = {"Accept": "application/json, multipart/form-data, */*"}
        headers.update(kwargs.pop("headers", None) or {})
        try:
            resp = self.session.request(method, url, timeout=timeout, allow_redirects=method != "HEAD",
                                        headers=headers, **kwargs)
        except _Cancelled:
            raise ServerError("The upload was cancelled.", kind="cancelled", method=method, path=path,
                              url=url) from None
        except (requests.RequestException, OSError, http.client.HTTPException) as e:
            raise self._transport_error(e, method, path, url, timeout) from None
        if resp.status_code in ok:
            return resp
        detail = _detail_from_body(resp.content, resp.reason or "no detail")
        hint = " (an unhandled error: the server log has the details)" \
            if resp.status_code >= 500 and detail.strip().lower() == "internal server error" else ""
        if resp.status_code == 401:
            hint = f" (this server needs its API token: set {API_TOKEN_ENV} before starting Slicer)"
        resp.close()
        raise ServerError(
            f"The server at {self.server_url} answered HTTP {resp.status_code} to {where}: {detail}{hint}",
            kind="http", status=resp.status_code, detail=detail, method=method, path=path, url=url)

    def _transport_error(self, exc: BaseException, method: str, path: str, url: str, timeout: float) -> ServerError:
        where = f"{method} {path}"
        causes = list(_causes(exc))

        def found(*types):
            return next((c for c in causes if isinstance(c, types)), None)

        if found(requests.Timeout, TimeoutError, socket.timeout):
            return ServerError(
                f"The server at {self.server_url} did not answer within {timeout:g} s ({where}). It may be busy "
                f"(e.g. training on the CPU) or overloaded; try again or raise the timeout.",
                kind="timeout", method=method, path=path, url=url)
        tls = found(ssl.SSLError)
        if tls is not None:
            return ServerError(f"TLS/SSL error talking to {self.server_url}: {tls}",
                               kind="unreachable", method=method, path=path, url=url)
        dropped = found(http.client.RemoteDisconnected, ConnectionResetError, http.client.HTTPException)
        if dropped is not None:
            return ServerError(f"The server at {self.server_url} closed the connection during {where} "
                               f"({dropped.__class__.__name__}): it may have crashed or restarted.",
                               kind="unreachable", method=method, path=path, url=url)
        if found(socket.gaierror) is not None:
            why = f"host name not found ({found(socket.gaierror)})"
        elif found(ConnectionRefusedError) is not None:
            why = "connection refused"
        else:
            why = str(exc) or exc.__class__.__name__
        return ServerError(f"The MONAI Label server at {self.server_url} is not reachable: is it running? ({why})",
                           kind="unreachable", method=method, path=path, url=url)

    def _json(self, resp: requests.Response, what: str) -> Any:
        if not resp.content.strip():
            return None
        try:
            return json.loads(resp.content.decode("utf-8"))
        except ValueError as e:
            raise ServerError(f"The server's answer to {what} is not valid JSON: {e}", kind="protocol",
                              status=resp.status_code) from None

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

    def has_image(self, image_id: str, check_sum: str | None = None) -> bool:
        """``HEAD /datastore/image?image=<id>[&check_sum=SHA256:<hex>]``: True when the server's datastore
        holds the image (with ``check_sum``: holds exactly that file content)."""
        query = {"image": image_id}
        if check_sum:
            query["check_sum"] = check_sum if ":" in check_sum else f"SHA256:{check_sum}"
        resp = self.request("HEAD", API_DATASTORE_IMAGE, query=query, ok=(200, 404))
        return resp.status_code == 200

    def download_image_to(self, image_id: str, folder: str, *, progress: Progress | None = None,
                          cancelled: Callable[[], bool] | None = None) -> str:
        """Stream ``GET /datastore/image?image=<id>`` into a new file in ``folder`` (named after the
        server's file name); returns its path. Big chunks straight to disk: full speed even when the
        GUI thread holds the GIL most of the time. A cancelled or failed download leaves no file."""
        resp = self.request("GET", API_DATASTORE_IMAGE, query={"image": image_id}, timeout=self.long_timeout,
                            stream=True)
        name = _filename(resp.headers, f"{image_id}.nii.gz")
        ext = file_extension(name) or ".nii.gz"
        total = int(resp.headers.get("Content-Length") or 0)
        os.makedirs(folder, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="HybridCT_download_", suffix=ext, dir=folder)
        done = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for block in resp.iter_content(chunk_size=TRANSFER_CHUNK):
                    if cancelled is not None and cancelled():
                        raise ServerError("The download was cancelled.", kind="cancelled")
                    f.write(block)
                    done += len(block)
                    if progress is not None and total:
                        progress(int(100 * done / total), f"Downloading {done / 1e6:.0f}/{total / 1e6:.0f} MB")
        except (requests.RequestException, OSError, http.client.HTTPException) as e:
            _remove(path)
            raise self._transport_error(e, "GET", API_DATASTORE_IMAGE, resp.url, self.long_timeout) from None
        except BaseException:
            _remove(path)
            raise
        finally:
            resp.close()
        return path

    def download_image(self, image_id: str) -> tuple[bytes, str]:
        """``GET /datastore/image?image=<id>`` -> (file bytes, file name with its extension)."""
        resp = self.request("GET", API_DATASTORE_IMAGE, query={"image": image_id}, timeout=self.long_timeout)
        return resp.content, _filename(resp.headers, f"{image_id}.nii.gz")

    def upload_image(self, file: str | bytes, image_id: str, *, filename: str | None = None,
                     params: dict | None = None, progress: Progress | None = None,
                     cancelled: Callable[[], bool] | None = None) -> dict:
        """``PUT /datastore/?image=<id>`` with multipart fields ``file`` and ``params``.

        The file name's extension tells the server the format (``.nii.gz``, ``.nrrd``, ...).
        """
        if progress is None and cancelled is None:
            files = {"params": (None, json.dumps(self._with_client_id(params))),
                     "file": self._file_payload(file, filename)}
            resp = self.request("PUT", API_DATASTORE, query={"image": image_id}, files=files,
                                timeout=self.long_timeout)
            return self._json(resp, "PUT /datastore/") or {}
        name, data = self._file_payload(file, filename)
        body = _MultipartBody({"params": json.dumps(self._with_client_id(params))}, "file", name, data,
                              progress=progress, cancelled=cancelled)
        resp = self.request("PUT", API_DATASTORE, query={"image": image_id}, data=body,
                            headers={"Content-Type": body.content_type}, timeout=self.long_timeout)
        return self._json(resp, "PUT /datastore/") or {}

    def infer(self, model: str, image_id: str, params: dict | None = None, *, output: str = "all") -> InferResponse:
        """``POST /infer/<model>?image=<id>&output=<output>``.

        ``output="all"`` returns a multipart answer (label file + JSON params; both are parsed),
        ``"image"`` the label file only, ``"json"`` the params only.
        """
        if output not in ("all", "image", "json"):
            raise ValueError(f"output must be 'all', 'image' or 'json', not {output!r}")
        resp = self.request("POST", API_INFER.format(model=_q(model)), query={"image": image_id, "output": output},
                            files={"params": (None, json.dumps(self._with_client_id(params)))},
                            timeout=self.long_timeout)
        return self.parse_infer_response(resp.headers, resp.content)

    @staticmethod
    def parse_infer_response(headers: Mapping, body: bytes) -> InferResponse:
        """An infer answer (``headers``, ``body``): multipart (label file + params), JSON or a plain file."""
        headers = requests.structures.CaseInsensitiveDict(headers)
        ctype = headers.get("Content-Type", "") or ""
        if ctype.lower().lstrip().startswith("multipart/"):
            out = InferResponse()
            for part in _multipart_parts(body, ctype):
                if part.get_filename():
                    if out.label is None:
                        out.label, out.label_filename = part.get_payload(decode=True), part.get_filename()
                elif part.get_param("name", header="content-disposition") == "params":
                    out.params = _params(part.get_payload(decode=True), "The infer result's params part")
            return out
        if "json" in ctype.lower():
            # The server answers with JSON alone when it produced no label file.
            return InferResponse(params=_params(body, "The infer answer"))
        # output=image: a plain file response
        return InferResponse(params={}, label=body, label_filename=_filename(headers, "label.nii.gz"))

    def save_label(self, image_id: str, label: str | bytes, label_info: list[dict], *, filename: str | None = None,
                   tag: str = "final", params: dict | None = None) -> dict:
        """``PUT /datastore/label?image=<id>&tag=<tag>`` with fields ``label`` (file) and ``params``.

        ``params`` always carries ``label_info`` (``[{"name": "lung", "idx": 1}, ...]``), so the
        server knows what each value means whatever the segment order was in Slicer.
        """
        p = self._with_client_id(params)
        p["label_info"] = list(label_info)
        files = {"params": (None, json.dumps(p)), "label": self._file_payload(label, filename)}
        resp = self.request("PUT", API_DATASTORE_LABEL, query={"image": image_id, "tag": tag}, files=files,
                            timeout=self.long_timeout)
        return self._json(resp, "PUT /datastore/label") or {}

    def download_label(self, label_id: str, tag: str = "final") -> tuple[bytes, str]:
        """``GET /datastore/label?label=<id>&tag=<tag>`` -> (file bytes, file name)."""
        resp = self.request("GET", API_DATASTORE_LABEL, query={"label": label_id, "tag": tag},
                            timeout=self.long_timeout)
        return resp.content, _filename(resp.headers, f"{label_id}.nii.gz")

    def next_sample(self, strategy: str, params: dict | None = None) -> dict | None:
        """``POST /activelearning/<strategy>``; returns the image info (with ``"id"``) or None."""
        resp = self.request("POST", API_ACTIVELEARNING.format(strategy=_q(strategy)),
                            json=self._with_client_id(params))
        data = self._json(resp, "POST /activelearning/")
        if not data or not isinstance(data, dict) or not data.get("id"):
            return None
        return data

    def train_start(self, model: str, params: dict | None = None, *, run_sync: bool = False) -> dict:
        """``POST /train/<model>?run_sync=false`` with the train params as JSON body."""
        resp = self.request("POST", API_TRAIN_MODEL.format(model=_q(model)), query={"run_sync": run_sync},
                            json=self._with_client_id(params), timeout=self.long_timeout if run_sync else self.timeout)
        return self._json(resp, "POST /train/") or {}

    def train_stop(self) -> dict | None:
        """``DELETE /train/``: the stopped task, or None when nothing was running."""
        return self._json(self.request("DELETE", API_TRAIN), "DELETE /train/")

    def train_running(self) -> bool:
        """``GET /train/?check_if_running=true``: 200 while a training task runs, 404 otherwise."""
        resp = self.request("GET", API_TRAIN, query={"check_if_running": True}, ok=(200, 404))
        return resp.status_code == 200

    def train_status(self) -> dict | None:
        """``GET /train/``: the last training task (status, details, ...) or None when there was none."""
        resp = self.request("GET", API_TRAIN, ok=(200, 404))
        if resp.status_code == 404:
            return None
        return self._json(resp, "GET /train/")

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
        resp = self.request("POST", APP_ROLLBACK, query={"version": str(version)}, json={})
        return self._json(resp, f"POST {APP_ROLLBACK}") or {}
