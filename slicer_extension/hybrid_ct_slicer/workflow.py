"""The flows behind the module's buttons, free of Qt and MRML.

HybridCT.py calls these from its widget (in a worker thread for the slow ones) and the tests call
the very same functions against the real server:

connect -> run model (upload when needed, infer, read results) -> submit correction ->
next sample -> train / stop / status -> model versions / roll back.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .client import HybridCTClient, InferResponse, ServerError
from .imageio import Geometry, write_image
from .results import format_results, format_train_status, format_version_entry
from .segments import SegmentWarning, export_labelmap_by_name, server_label_info

Progress = Callable[[int, str], None]

PREFERRED_MODEL = "hybrid_ct"
#: Infer params sent with every run: a uint8 NRRD label (Slicer's native format) in the image geometry.
DEFAULT_INFER_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8"}


def make_image_id(name: str, fallback: str = "volume") -> str:
    """A datastore id for a volume WE upload, from its Slicer name: letters, digits, ' ', '.', '_', '-'
    kept, anything else (path separators, '?', '#', ...) -> '_', no leading dots or blanks.

    Ids that come FROM the server (next sample) are used unchanged and only URL-quoted.
    """
    safe = "".join(c if (c.isalnum() and c.isascii()) or c in " ._-" else "_" for c in str(name or ""))
    safe = safe.strip().lstrip(".").strip()
    return safe[:128] or fallback


def _names(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [str(k) for k in value.keys()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return []


@dataclass
class ServerInfo:
    name: str = ""
    version: str = ""
    models: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    strategies: list = field(default_factory=list)
    trainers: list = field(default_factory=list)
    train_stats: dict = field(default_factory=dict)
    datastore: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, info: Mapping) -> "ServerInfo":
        labels = info.get("labels")
        if isinstance(labels, Mapping):  # {"lung": 1, "infection": 2}
            labels = [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1])]
        return cls(
            name=str(info.get("name", "")), version=str(info.get("version", "")),
            models=_names(info.get("models")), labels=_names(labels), strategies=_names(info.get("strategies")),
            trainers=_names(info.get("trainers")),
            train_stats=dict(info.get("train_stats") or {}) if isinstance(info.get("train_stats"), Mapping) else {},
            datastore=dict(info.get("datastore") or {}) if isinstance(info.get("datastore"), Mapping) else {},
            raw=dict(info),
        )

    def default_model(self) -> str | None:
        if PREFERRED_MODEL in self.models:
            return PREFERRED_MODEL
        return self.models[0] if self.models else None

    def default_trainer(self, model: str | None = None) -> str | None:
        if model and model in self.trainers:
            return model
        if PREFERRED_MODEL in self.trainers:
            return PREFERRED_MODEL
        return self.trainers[0] if self.trainers else None

    def summary(self) -> str:
        ds = self.datastore
        text = f"Connected to {self.name or 'MONAI Label'} {self.version}".rstrip()
        text += f": {len(self.models)} model(s), {len(self.strategies)} strategy(ies)"
        if ds:
            text += f"; datastore {ds.get('completed', '?')}/{ds.get('total', '?')} labelled"
        return text


@dataclass
class InferResult:
    image_id: str
    model: str
    label_path: str | None
    params: dict
    display: dict
    uploaded: bool


@dataclass
class TrainStatus:
    running: bool
    task: dict | None
    stats: dict
    status_text: str
    metric_text: str

    @property
    def active(self) -> bool:
        """Running, or submitted and about to run (keep polling)."""
        state = str((self.task or {}).get("status", "")).upper()
        return self.running or state in ("SUBMITTED", "RUNNING")

    @property
    def best_metric(self) -> float | None:
        v = self.stats.get("best_metric")
        try:
            return None if v is None else float(v)
        except (TypeError, ValueError):
            return None


def _noop(_p: int, _m: str) -> None:
    pass


class Workflow:
    """One radiologist's session with one server."""

    def __init__(self, client: HybridCTClient, work_dir: str | None = None, progress: Progress | None = None):
        self.client = client
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="hybrid_ct_slicer_")
        self.progress = progress or _noop
        self.info: ServerInfo | None = None

    # ------------------------------------------------------------------ connect
    def connect(self) -> ServerInfo:
        self.info = ServerInfo.from_json(self.client.info())
        return self.info

    def _model(self, model: str | None) -> str:
        if model:
            return model
        if self.info is None:
            self.connect()
        m = self.info.default_model() if self.info else None
        if not m:
            raise ServerError("The server offers no model to run: check the app's configuration.", kind="protocol")
        return m

    # ------------------------------------------------------------------ run model
    def ensure_image(self, image_id: str, image_file: str | None = None, *, force_upload: bool = False) -> bool:
        """Upload ``image_file`` as ``image_id`` unless the server already has it. Returns True if uploaded."""
        if not force_upload and self.client.has_image(image_id):
            return False
        if not image_file:
            raise ServerError(f"The server does not have image {image_id!r} and no file was given to upload.",
                              kind="protocol")
        self.client.upload_image(image_file, image_id)
        return True

    def run_model(self, image_id: str, image_file: str | None = None, *, model: str | None = None,
                  params: dict | None = None, force_upload: bool = False) -> InferResult:
        """Upload (when needed), infer, save the label file and format the results."""
        model = self._model(model)
        self.progress(5, f"Checking whether the server has {image_id} ...")
        uploaded = False
        if force_upload or not self.client.has_image(image_id):
            if not image_file:
                raise ServerError(f"The server does not have image {image_id!r} and no file was given.",
                                  kind="protocol")
            self.progress(10, "Uploading the volume ...")
            self.client.upload_image(image_file, image_id)
            uploaded = True
        self.progress(30, f"Running {model} on {image_id} (this can take minutes on a CPU server) ...")
        request = dict(DEFAULT_INFER_PARAMS)
        request.update(params or {})
        resp: InferResponse = self.client.infer(model, image_id, request)
        self.progress(90, "Reading the result ...")
        label_path = resp.save_label(self.work_dir, stem=f"{image_id}_{model}_label")
        if label_path is None:
            raise ServerError("The server returned no label map for this image.", kind="protocol")
        display = format_results(resp.params)
        self.progress(100, "Done")
        return InferResult(image_id, model, label_path, resp.params, display, uploaded)

    # ------------------------------------------------------------------ corrections
    def submit_labelmap(self, image_id: str, labelmap: np.ndarray, geometry: Geometry, *,
                        tag: str = "final", file_ext: str = ".nii.gz", params: dict | None = None) -> dict:
        path = os.path.join(self.work_dir, f"correction{file_ext}")
        write_image(path, np.asarray(labelmap, dtype=np.uint8), geometry)
        return self.client.save_label(image_id, path, server_label_info(), filename=f"label{file_ext}", tag=tag,
                                      params=params)

    def submit_correction(self, image_id: str, segment_arrays: Mapping[str, np.ndarray], geometry: Geometry, *,
                          ignore_extra: bool = False, tag: str = "final", file_ext: str = ".nii.gz") -> dict:
        """Export the segments BY NAME to a label map and save it on the server with its label_info.

        Returns the server's answer plus ``"warnings"`` (e.g. ignored extra segments).
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SegmentWarning)
            labelmap, _ = export_labelmap_by_name(segment_arrays, ignore_extra=ignore_extra)
        msgs = [str(w.message) for w in caught if issubclass(w.category, SegmentWarning)]
        self.progress(50, "Sending the correction ...")
        res = dict(self.submit_labelmap(image_id, labelmap, geometry, tag=tag, file_ext=file_ext) or {})
        res["warnings"] = msgs
        self.progress(100, "Correction saved")
        return res

    # ------------------------------------------------------------------ active learning
    def next_sample(self, strategy: str) -> dict | None:
        """The next image chosen by ``strategy`` (server info dict with ``"id"``), or None."""
        return self.client.next_sample(strategy)

    def fetch_image(self, image_id: str) -> str:
        """Download an image of the datastore into the work folder; returns the local path."""
        data, name = self.client.download_image(image_id)
        ext = next((e for e in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd") if name.lower().endswith(e)),
                   os.path.splitext(name)[1] or ".nii.gz")
        safe = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in str(image_id)) or "image"
        path = os.path.join(self.work_dir, f"{safe}{ext}")
        with open(path, "wb") as f:
            f.write(data)
        return path

    # ------------------------------------------------------------------ training
    def start_training(self, model: str | None = None, params: dict | None = None) -> dict:
        if self.info is None:
            self.connect()
        trainer = self.info.default_trainer(model) if self.info else model
        if not trainer:
            raise ServerError("The server has no trainer for this model.", kind="protocol")
        return self.client.train_start(trainer, params or {})

    def stop_training(self) -> dict | None:
        return self.client.train_stop()

    def training_status(self, model: str | None = None) -> TrainStatus:
        running = self.client.train_running()
        task = self.client.train_status()
        info = ServerInfo.from_json(self.client.info())
        self.info = info
        trainer = info.default_trainer(model)
        stats = dict(info.train_stats.get(trainer) or {}) if trainer else {}
        status_text, metric_text = format_train_status(task, stats, running=running)
        return TrainStatus(running, task, stats, status_text, metric_text)

    # ------------------------------------------------------------------ versions
    def versions(self) -> tuple[str | None, list[dict], list[str]]:
        """(current version, version entries, display strings)."""
        data = self.client.model_versions()
        current = data.get("current")
        entries = [v if isinstance(v, dict) else {"version": str(v)} for v in data.get("versions") or []]
        return current, entries, [format_version_entry(v, current) for v in entries]

    def rollback(self, version: str) -> dict:
        return self.client.rollback(version)
