"""A tiny stand-in for the Hybrid CT server on 127.0.0.1, for the module's self-test and the headless tests.

It speaks the few endpoints the module's buttons use, with the same semantics as ``apps/hybrid_ct``:
``GET /info/``, ``HEAD /datastore/image`` (with ``check_sum=SHA256:<hex>``: 200 only for that exact
file), ``GET /datastore/image`` (the stored bytes), ``PUT /datastore/`` (stores; the same id with other
bytes -> 409), ``POST /infer/<model>`` (a multipart answer: params + a label map, lung = voxels below
-400 HU), ``GET /train/`` and ``PUT /datastore/label``. Python standard library + SimpleITK only.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import tempfile
import threading
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qs, urlsplit

from .segments import server_label_names

INFO = {"name": "Hybrid CT (mock)", "version": "0", "labels": server_label_names(),
        "models": {"hybrid_ct": {}}, "trainers": {"hybrid_ct": {}}, "strategies": {"random": {}},
        "train_stats": {}, "datastore": {"total": 0, "completed": 0}}


def _label_for(image_bytes: bytes, name: str) -> bytes:
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="hybrid_ct_mock_") as tmp:
        src = os.path.join(tmp, "image" + (".nii.gz" if name.endswith(".gz") else os.path.splitext(name)[1]))
        with open(src, "wb") as f:
            f.write(image_bytes)
        image = sitk.ReadImage(src)
        label = sitk.Cast(sitk.BinaryThreshold(image, -1100, -400, 1, 0), sitk.sitkUInt8)
        out = os.path.join(tmp, "label.nrrd")
        sitk.WriteImage(label, out, True)
        with open(out, "rb") as f:
            return f.read()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "MockServer"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data) -> None:
        self._send(status, json.dumps(data).encode())

    def _query(self):
        parts = urlsplit(self.path)
        return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}

    def _form(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        msg = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + self.headers.get("Content-Type", "").encode() + b"\r\n\r\n" + body)
        out = {}
        for part in msg.iter_parts():
            out[part.get_param("name", header="content-disposition")] = (part.get_filename(),
                                                                        part.get_payload(decode=True))
        return out

    def do_HEAD(self):
        path, q = self._query()
        stored = self.server.images.get(q.get("image", ""))
        ok = path == "/datastore/image" and stored is not None
        if ok and q.get("check_sum"):
            ok = q["check_sum"].split(":")[-1] == hashlib.sha256(stored[0]).hexdigest()
        self.server.heads += 1
        self._send(200 if ok else 404)

    def do_GET(self):
        path, q = self._query()
        if path == "/info/":
            return self._json(200, INFO)
        if path == "/datastore/image" and q.get("image") in self.server.images:
            data, name = self.server.images[q["image"]]
            return self._send(200, data, "application/octet-stream",
                              {"Content-Disposition": f'attachment; filename="{name}"'})
        if path == "/train/":
            return self._json(404, {"detail": "no training task"})
        return self._json(404, {"detail": f"not found: {path}"})

    def do_PUT(self):
        path, q = self._query()
        form = self._form()
        if path in ("/datastore/", "/datastore/image"):
            if self.server.fail_uploads:
                return self._json(500, {"detail": "mock: upload refused"})
            name, data = form["file"]
            old = self.server.images.get(q["image"])
            if old is not None and old[0] != data:
                return self._json(409, {"detail": f"image id {q['image']!r} already exists with other content"})
            self.server.images[q["image"]] = (data, name)
            self.server.uploads += 1
            return self._json(200, {"image": q["image"], "unchanged": True} if old else {"image": q["image"]})
        if path == "/datastore/label":
            self.server.labels[q["image"]] = form["label"][1]
            return self._json(200, {"image": q["image"], "label": q["image"]})
        return self._json(404, {"detail": "not found"})

    def do_POST(self):
        path, q = self._query()
        self._form()
        if path.startswith("/infer/"):
            stored = self.server.images.get(q.get("image", ""))
            if stored is None:
                return self._json(404, {"detail": f"image {q.get('image')!r} is not in the datastore"})
            label = _label_for(stored[0], stored[1])
            params = {"classification": {"label": "negative", "probability": 0.1}, "grade": "CT-0",
                      "model_version": "mock"}
            boundary = "mockboundary"
            body = (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
                    f"{json.dumps(params)}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                    f'filename="label.nrrd"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
            body += label + f"\r\n--{boundary}--\r\n".encode()
            return self._send(200, body, f"multipart/form-data; boundary={boundary}")
        return self._json(404, {"detail": "not found"})


class MockServer(http.server.ThreadingHTTPServer):
    """``with MockServer() as server: ... server.url``"""

    daemon_threads = True

    def __init__(self, *, fail_uploads: bool = False):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.images: dict[str, tuple[bytes, str]] = {}
        self.labels: dict[str, bytes] = {}
        self.fail_uploads = fail_uploads
        self.uploads = 0
        self.heads = 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, name="HybridCT mock server", daemon=True)

    def handle_error(self, request, client_address):  # a client that hung up (cancel): not an error here
        pass

    def __enter__(self) -> "MockServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
