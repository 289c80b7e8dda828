"""multipart/form-data encoding and decoding with the standard library only (binary safe)."""

from __future__ import annotations

import mimetypes
import uuid
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import collapse_rfc2231_value


@dataclass
class Part:
    """One part of a multipart body."""

    name: str | None
    data: bytes
    filename: str | None = None
    content_type: str | None = None

    def text(self, encoding: str = "utf-8") -> str:
        return self.data.decode(encoding, errors="replace")


def guess_content_type(filename: str) -> str:
    if filename.endswith(".nii.gz") or filename.endswith(".gz"):
        return "application/gzip"
    if filename.endswith(".nrrd"):
        return "application/octet-stream"
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def _quote_header_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


def encode_multipart(fields: dict[str, str] | None = None, files: dict[str, tuple[str, bytes]] | None = None,
                     boundary: str | None = None) -> tuple[bytes, str]:
    """Encode form ``fields`` (name -> text) and ``files`` (name -> (filename, bytes)).

    Returns ``(body, content_type_header)``.
    """
    boundary = boundary or ("hybridct-" + uuid.uuid4().hex)
    out = bytearray()
    for name, value in (fields or {}).items():
        out += f"--{boundary}\r\n".encode()
        out += f'Content-Disposition: form-data; name="{_quote_header_value(name)}"\r\n\r\n'.encode()
        out += (value if isinstance(value, bytes) else str(value).encode("utf-8"))
        out += b"\r\n"
    for name, (filename, data) in (files or {}).items():
        out += f"--{boundary}\r\n".encode()
        out += (f'Content-Disposition: form-data; name="{_quote_header_value(name)}"; '
                f'filename="{_quote_header_value(filename)}"\r\n').encode()
        out += f"Content-Type: {guess_content_type(filename)}\r\n\r\n".encode()
        out += data
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _header_message(content_type: str) -> Message:
    msg = Message()
    msg["Content-Type"] = content_type
    return msg


def is_multipart(content_type: str | None) -> bool:
    return bool(content_type) and content_type.lower().lstrip().startswith("multipart/")


def decode_multipart(body: bytes, content_type: str) -> list[Part]:
    """Split a multipart body into its parts (headers parsed with :mod:`email`, payload untouched)."""
    boundary = _header_message(content_type).get_param("boundary")
    if not boundary:
        raise ValueError(f"multipart response without a boundary: {content_type!r}")
    delimiter = b"--" + boundary.encode("latin-1")
    # Normalise so that every delimiter is preceded by CRLF, then split.
    data = b"\r\n" + body
    chunks = data.split(b"\r\n" + delimiter)
    parts: list[Part] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        # rest of the delimiter line (transport padding), then headers, blank line, payload
        line_end = chunk.find(b"\r\n")
        if line_end < 0:
            continue
        chunk = chunk[line_end + 2:]
        head_end = chunk.find(b"\r\n\r\n")
        if head_end < 0:
            raw_headers, payload = chunk, b""
        else:
            raw_headers, payload = chunk[:head_end], chunk[head_end + 4:]
        headers = BytesHeaderParser().parsebytes(raw_headers + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if name is not None:
            name = collapse_rfc2231_value(name)
        filename = headers.get_filename()
        parts.append(Part(name=name, data=payload, filename=filename,
                          content_type=headers.get_content_type() if headers.get("content-type") else None))
    return parts
