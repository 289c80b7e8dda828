"""Server URL handling (the Qt side stores it with ``qt.QSettings``; this side only validates it) and the
module's parameter node (:class:`ModuleParameters`: saved with the scene AND read back when a scene is
loaded or the module is entered, the job ``parameterNodeWrapper`` does in Slicer >= 5.4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from urllib.parse import urlsplit, urlunsplit

#: QSettings key under which HybridCT.py remembers the server URL.
SETTINGS_KEY_SERVER_URL = "HybridCT/serverUrl"
#: QSettings keys for the last model and strategy chosen.
SETTINGS_KEY_MODEL = "HybridCT/model"
SETTINGS_KEY_STRATEGY = "HybridCT/strategy"
DEFAULT_SERVER_URL = "http://127.0.0.1:8000"


def normalise_server_url(url: str | None) -> str:
    """Return ``url`` as ``scheme://host[:port][/path]`` without a trailing slash.

    - surrounding white space is removed; a URL without a scheme gets ``http://``;
    - only ``http`` and ``https`` are accepted;
    - a host is required; the port, when given, must be 1-65535;
    - user names/passwords, queries and fragments are refused (they have no meaning here and a
      password would end up in the settings file in clear text).

    Raises ``ValueError`` with a message naming the problem.
    """
    if url is None or not str(url).strip():
        raise ValueError("the server URL is empty: enter e.g. http://127.0.0.1:8000")
    text = str(url).strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"the server URL must start with http:// or https://, not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError(f"the server URL {url!r} has no host name")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"the server URL {url!r} has an invalid port") from None
    if port is not None and not (1 <= port <= 65535):
        raise ValueError(f"the server URL {url!r} has an invalid port")
    if parts.username or parts.password:
        raise ValueError("the server URL must not contain a user name or password")
    if parts.query or parts.fragment:
        raise ValueError("the server URL must not contain '?' or '#' parts")
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    path = parts.path.rstrip("/")
    return urlunsplit((scheme, netloc, path, "", ""))


def is_valid_server_url(url: str | None) -> bool:
    try:
        normalise_server_url(url)
    except ValueError:
        return False
    return True


#: QSettings key of an optional CA bundle (PEM) for https with a hospital certificate authority
SETTINGS_KEY_CA_BUNDLE = "HybridCT/caBundle"


@dataclass
class ModuleParameters:
    """What the panel keeps in its parameter node (a ``vtkMRMLScriptedModuleNode``): plain values as node
    parameters, the selected nodes as node references. Read back with :meth:`load`."""
    server_url: str = ""
    model: str = ""
    strategy: str = ""
    ignore_extra_segments: bool = False
    input_volume_id: str | None = None  # node references
    segmentation_id: str | None = None
    results_volume_id: str | None = None  # the volume whose results the panel shows

    _REFERENCES = {"input_volume_id": "InputVolume", "segmentation_id": "Segmentation",
                   "results_volume_id": "ResultsVolume"}

    def save(self, node) -> None:
        """Write into a parameter node (any object with Set/GetParameter and Set/GetNodeReferenceID)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self._REFERENCES:
                node.SetNodeReferenceID(self._REFERENCES[f.name], value or None)
            elif isinstance(value, bool):
                node.SetParameter(f.name, "true" if value else "false")
            else:
                node.SetParameter(f.name, str(value or ""))

    @classmethod
    def load(cls, node) -> "ModuleParameters":
        """Read a parameter node back; missing values keep their defaults."""
        out = cls()
        if node is None:
            return out
        for f in fields(cls):
            if f.name in cls._REFERENCES:
                setattr(out, f.name, node.GetNodeReferenceID(cls._REFERENCES[f.name]) or None)
                continue
            text = node.GetParameter(f.name)
            if not text:
                continue
            setattr(out, f.name, text == "true" if isinstance(getattr(out, f.name), bool) else text)
        return out

    def as_dict(self) -> dict:
        return asdict(self)
