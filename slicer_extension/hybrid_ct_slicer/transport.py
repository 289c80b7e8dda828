"""The transport under :mod:`.client`: errors for the user, multipart bodies and answers, TLS settings.

Split from client.py (which keeps the endpoints and the API calls); everything here is re-exported there.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import quote, urlsplit

#: bytes per read/write of an upload or download: few Python steps per MB (see download_image_to)
TRANSFER_CHUNK = 1 << 22
Progress = Callable[[int, str], None]

#: a CA bundle (PEM file or folder) for https with a hospital certificate authority, in this order
CA_BUNDLE_ENVS = ("HYBRID_CT_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


def tls_verify(verify_tls: bool = True, ca_bundle: str | None = None, environ: Mapping[str, str] | None = None):
    """What ``requests`` gets as ``verify``: False (never by default), the CA bundle given, else the first of
    :data:`CA_BUNDLE_ENVS` that is set, else True (the bundled certifi roots). The client's session does not
    read the environment (``trust_env`` is off so that no proxy is used), so the bundle is looked up here."""
    if not verify_tls:
        return False
    if ca_bundle:
        path = os.path.expanduser(ca_bundle)
        if not os.path.exists(path):
            raise ValueError(f"The CA bundle {ca_bundle!r} does not exist: give the PEM file of your hospital's "
                             f"certificate authority")
        return path
    env = os.environ if environ is None else environ
    for name in CA_BUNDLE_ENVS:
        value = (env.get(name) or "").strip()
        if value and os.path.exists(os.path.expanduser(value)):
            return os.path.expanduser(value)
    return True


def transport_warning(server_url: str, has_token: bool) -> str:
    """'' or why the connection leaks: an API token (or images) over plain http to another computer."""
    from .policy import is_local_host

    parts = urlsplit(server_url)
    if parts.scheme != "http" or is_local_host(parts.hostname):
        return ""
    if has_token:
        return (f"The API token is sent over plain http to {parts.hostname}: anyone on the network can read it "
                f"and use the server as you. Use https.")
    return f"The connection to {parts.hostname} is plain http: images and results cross the network unencrypted."


class ServerError(RuntimeError):
    """A failed exchange with the server; ``str(err)`` is a message for the user.

    ``kind`` is one of ``"unreachable"``, ``"timeout"``, ``"http"``, ``"protocol"``, ``"cancelled"``;
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


def _filename(headers: Mapping, default: str) -> str:
    """The file name of a ``Content-Disposition`` header (base name only), else ``default``."""
    msg = Message()
    msg["Content-Disposition"] = headers.get("Content-Disposition", "") or ""
    return os.path.basename(msg.get_filename() or "") or default


def _multipart_parts(body: bytes, content_type: str) -> list[Message]:
    """The parts of a multipart answer, binary safe (requests encodes multipart but does not decode it)."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise ServerError(f"The server's multipart answer cannot be read (Content-Type {content_type!r})",
                          kind="protocol")
    return list(msg.iter_parts())


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (requests -> urllib3 -> socket errors), outermost first."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]


class _Cancelled(OSError):
    """Raised from inside a streamed upload body when the job was cancelled."""


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _MultipartBody:
    """A multipart/form-data body read in big chunks, with progress and a cancel check between chunks."""

    def __init__(self, fields: Mapping[str, str], file_field: str, filename: str, data: bytes, *,
                 progress: Progress | None = None, cancelled: Callable[[], bool] | None = None):
        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                        for k, v in fields.items())
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode()
        self._parts = [head, memoryview(data), f"\r\n--{boundary}--\r\n".encode()]
        self._len = sum(len(p) for p in self._parts)
        self._sent = 0
        self._progress, self._cancelled = progress, cancelled

    def __len__(self) -> int:
        return self._len

    def read(self, size: int = -1) -> bytes:
        if self._cancelled is not None and self._cancelled():
            raise _Cancelled("cancelled")
        size = self._len if size is None or size < 0 else max(size, TRANSFER_CHUNK)
        out = bytearray()
        while self._parts and len(out) < size:
            part = self._parts[0]
            take = part[: size - len(out)]
            out += take
            if len(take) == len(part):
                self._parts.pop(0)
            else:
                self._parts[0] = part[len(take):]
        self._sent += len(out)
        if self._progress is not None and out:
            self._progress(int(100 * self._sent / self._len), f"Uploading {self._sent / 1e6:.0f}/{self._len / 1e6:.0f} MB")
        return bytes(out)


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


def _params(data: bytes | None, what: str) -> dict:
    try:
        params = json.loads((data or b"").decode("utf-8", errors="replace") or "{}")
    except ValueError as e:
        raise ServerError(f"{what} is not valid JSON: {e}", kind="protocol") from None
    return params if isinstance(params, dict) else {"value": params}
