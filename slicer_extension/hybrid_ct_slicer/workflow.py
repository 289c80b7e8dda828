"""The flows behind the module's buttons, free of Qt and MRML.

HybridCT.py calls these from its widget (in a worker thread for the slow ones) and the tests call
the very same functions against the real server:

connect -> run model (upload when needed, infer, read results) -> submit correction ->
next sample -> train / stop / status -> model versions / roll back.
"""

from __future__ import annotations

import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .client import HybridCTClient, InferResponse, ServerError
from .identity import ImageIdentity, file_sha256
from .imageio import Geometry, write_image
from .jobs import Cancelled
from .policy import temp_path
from .results import format_results, format_train_status, format_version_entry
from .segments import SegmentWarning, export_labelmap_by_name, server_label_info

Progress = Callable[[int, str], None]

PREFERRED_MODEL = "hybrid_ct"
#: Infer params sent with every run: a uint8 NRRD label (Slicer's native format) in the image geometry.
DEFAULT_INFER_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8"}


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
    file_sha256: str | None = None
    label_array: Any = None  # the label file read in the worker thread (then removed), see ModuleLogic.runVolume
    label_geometry: Any = None


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


def _never() -> bool:
    return False


class Workflow:
    """One radiologist's session with one server."""

    def __init__(self, client: HybridCTClient, work_dir: str | None = None, progress: Progress | None = None,
                 cancelled: Callable[[], bool] | None = None, sent: Callable[[str], None] | None = None):
        self.client = client
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="hybrid_ct_slicer_")
        self.progress = progress or _noop
        self.cancelled = cancelled or _never
        self.sent = sent or (lambda _what: None)  # told before each request that changes the server
        self.info: ServerInfo | None = None

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise Cancelled("cancelled")

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
    def ensure_image(self, image_id: str, image_file: str | None = None, *, check_sum: str | None = None,
                     force_upload: bool = False) -> bool:
        """Upload ``image_file`` as ``image_id`` unless the server holds EXACTLY that file (sha256 checked
        by the server; ``check_sum`` defaults to the file's). Returns True if the image was uploaded."""
        if image_file and not check_sum:
            check_sum = file_sha256(image_file)
        self.progress(5, f"Checking whether the server has {image_id} ...")
        if not force_upload and self.client.has_image(image_id, check_sum):
            return False
        if not image_file:
            raise ServerError(f"The server does not have image {image_id!r} and no file was given to upload.",
                              kind="protocol")
        self.check_cancelled()
        self.progress(10, "Uploading the volume ...")
        self.sent("saved the uploaded volume in its datastore")
        answer = self.client.upload_image(image_file, image_id, progress=self._upload_progress,
                                          cancelled=self.cancelled)
        return not (isinstance(answer, Mapping) and answer.get("unchanged"))

    def _upload_progress(self, percent: int, message: str) -> None:
        self.progress(10 + percent * 20 // 100, message)

    def upload_volume(self, identity: ImageIdentity, array: np.ndarray, geometry: Geometry) -> tuple[bool, str]:
        """Make sure the server holds ``identity``'s image: (uploaded?, sha256 of the server's file).

        A volume stamped with the sha256 of the file the server holds is only checked (no file written);
        otherwise a .nii.gz copy is written in the work folder, checked, uploaded if needed and removed."""
        if identity.file_sha256 and self.client.has_image(identity.image_id, identity.file_sha256):
            return False, identity.file_sha256
        self.check_cancelled()
        self.progress(3, "Writing the volume ...")
        with temp_path(self.work_dir, ".nii.gz") as path:
            write_image(path, array, geometry)
            sha = file_sha256(path)
            return self.ensure_image(identity.image_id, path, check_sum=sha), sha

    def run_model(self, image_id: str, image_file: str | None = None, *, model: str | None = None,
                  params: dict | None = None, force_upload: bool = False) -> InferResult:
        """Upload (when the server lacks this exact file), infer, save the label file and format the results."""
        model = self._model(model)
        uploaded = self.ensure_image(image_id, image_file, force_upload=force_upload) if image_file else False
        if not image_file and not self.client.has_image(image_id):
            raise ServerError(f"The server does not have image {image_id!r} and no file was given.", kind="protocol")
        return self._infer(image_id, model, params, uploaded)

    def run_volume(self, identity: ImageIdentity, array: np.ndarray, geometry: Geometry, *,
                   model: str | None = None, params: dict | None = None) -> InferResult:
        """Run the model on a volume (the module's Run): upload by identity, infer; temp files removed."""
        model = self._model(model)
        uploaded, sha = self.upload_volume(identity, array, geometry)
        result = self._infer(identity.image_id, model, params, uploaded)
        result.file_sha256 = sha
        return result

    def _infer(self, image_id: str, model: str, params: dict | None, uploaded: bool) -> InferResult:
        self.check_cancelled()
        self.progress(30, f"Running {model} on {image_id} (this can take minutes on a CPU server) ...")
        request = dict(DEFAULT_INFER_PARAMS)
        request.update(params or {})
        resp: InferResponse = self.client.infer(model, image_id, request)
        self.check_cancelled()
        self.progress(90, "Reading the result ...")
        # a unique name: a cancelled run's late file must never be confused with the next run's
        label_path = resp.save_label(self.work_dir, stem=f"HybridCT_{image_id}_{model}_{uuid.uuid4().hex[:8]}_label")
        if label_path is None:
            raise ServerError("The server returned no label map for this image.", kind="protocol")
        display = format_results(resp.params)
        self.progress(100, "Done")
        return InferResult(image_id, model, label_path, resp.params, display, uploaded)

    # ------------------------------------------------------------------ corrections
    def submit_labelmap(self, image_id: str, labelmap: np.ndarray, geometry: Geometry, *,
                        tag: str = "final", file_ext: str = ".nii.gz", params: dict | None = None) -> dict:
        with temp_path(self.work_dir, file_ext, prefix="HybridCT_correction_") as path:
            write_image(path, np.asarray(labelmap, dtype=np.uint8), geometry)
            self.check_cancelled()
            self.sent("saved the correction as the final label (and may retrain on it)")
            return self.client.save_label(image_id, path, server_label_info(), filename=f"label{file_ext}",
                                          tag=tag, params=params)

    def submit_volume_correction(self, identity: ImageIdentity, array: np.ndarray, geometry: Geometry,
                                 labelmap: np.ndarray, label_geometry: Geometry) -> tuple[dict, str]:
        """The module's Submit: make sure the server holds this exact image, then save the label."""
        _uploaded, sha = self.upload_volume(identity, array, geometry)
        self.progress(60, "Sending the correction ...")
        answer = self.submit_labelmap(identity.image_id, labelmap, label_geometry)
        self.progress(100, "Correction saved")
        return answer, sha

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
        """Download an image of the datastore into the work folder (streamed); returns the local path,
        which the caller removes once loaded."""
        return self.client.download_image_to(image_id, self.work_dir, progress=self.progress,
                                             cancelled=self.cancelled)

    # ------------------------------------------------------------------ training
    def start_training(self, model: str | None = None, params: dict | None = None) -> dict:
        if self.info is None:
            self.connect()
        trainer = self.info.default_trainer(model) if self.info else model
        if not trainer:
            raise ServerError("The server has no trainer for this model.", kind="protocol")
        self.sent("started the training")
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
        self.sent("switched the model version")
        return self.client.rollback(version)
