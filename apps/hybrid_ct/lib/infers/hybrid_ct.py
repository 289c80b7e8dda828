"""Whole-volume inference: one label map (right lung 3, left lung 4, infection 2) in the image's own geometry + the report.

The core ``hybrid_ct.predict.predictor.Predictor`` owns every step (CT check, the MONAI transform chain of
``hybrid_ct.processing.transforms``, network, geometry back, burden, grade, energy), so this task runs no chain
of its own: it is a plain ``InferTask`` (declared ``segmentation``, so Slicer lists it) that reads the
volume, asks the served predictor, and writes the label as .nii.gz or, when the client asks
(``result_extension``), .nrrd. It lists no transforms of its own: the predictor builds the chain from the
served checkpoint's input definition (``NetConfig.input_spec()``), so a listed copy could only drift.

Model hot swap: :class:`ModelServer` checks the store's current version when a request RUNS (a stat of
one small file), not when it arrives: requests queue on one run lock (the predictor holds spiking state
and the CPU is busy anyway), and each re-resolves the current version once it holds the lock, so a
request waiting while a new version is published is answered by the new one. The request running at
the moment of a swap finishes with the model it started with; none fails.

Compiled network (conf ``infer_compile``, issue 30): the predictor runs a ``torch.compile``d copy of the
network (``hybrid_ct.net.compiled``), compiled when a version is loaded, with inductor's on-disk cache in
a folder per checkpoint sha256 under ``infer_compile_cache``. ``ModelServer.preload`` (started by the
server process, never by a training or scoring subprocess) loads, and so compiles, the current version
at start-up and re-checks the store every ``interval_s`` seconds, so a promoted version is compiled by it
and not inside a request. A version is served eagerly as soon as it is loaded (under a second), and runs
compiled from the first batch after its compile ends (the compiled network's outputs equal the eager
one's: tests/test_compiled.py, docs/benchmarks.md): no request waits for a compile.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import SimpleITK as sitk
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import device_list

from hybrid_ct.errors import InputError
from hybrid_ct.predict.predictor import Predictor
from hybrid_ct.imaging.reader import read_image
from hybrid_ct.net.device import choose_device
from hybrid_ct.files import jsonable

from ..recovery import temp_prefix
from ..store import ModelStore

logger = logging.getLogger(__name__)

RESULT_EXTENSIONS = (".nii.gz", ".nrrd", ".nii", ".mha")


def default_device(name: str | None = None) -> str:
    return choose_device(name, strict=False)  # a server keeps serving on the CPU


@dataclass
class Served:
    version: str
    key: tuple
    predictor: Predictor
    path: object = None  # the checkpoint
    compile_tried: bool = False


class ModelServer:
    """The currently served model, reloaded when the store's current version changes."""

    def __init__(self, store: ModelStore, device: str | None = None, batch_size: int = 8, amp: bool = False,
                 compile_net: bool = False, compile_cache: str | None = None):
        self.store = store
        self.device = default_device(device)
        self.batch_size = int(batch_size)
        self.amp = bool(amp)  # fp16 autocast on CUDA (Predictor ignores it on the CPU)
        self.compile_net = bool(compile_net)
        self.compile_cache = compile_cache or None  # root of the per-checkpoint cache folders (None: the default)
        self._preloader: threading.Thread | None = None
        self._served: Served | None = None
        self._swap_lock = threading.Lock()  # guards the reference
        self._load_lock = threading.Lock()  # one loader at a time
        self._run_lock = threading.Lock()  # one forward pass at a time, on the version current then

    @contextmanager
    def running(self):
        """Hold the run lock; yield (the version current NOW, the time it was looked up). Raises
        ModelNotReadyError when there is no model."""
        with self._run_lock:
            started = time.time()
            yield self.get(), started

    def get(self) -> Served:
        version, path, key = self.store.resolve()  # ModelNotReadyError when there is no model
        served = self._served
        if served is not None and served.key == key:
            return served
        with self._load_lock:
            served = self._served
            if served is not None and served.key == key:
                return served
            t0 = time.perf_counter()
            predictor = Predictor.from_checkpoint(path, device=self.device, batch_size=self.batch_size, amp=self.amp)
            predictor.meta.setdefault("trained_version", predictor.meta.get("version"))
            predictor.meta["version"] = version  # the report names the version the store knows
            fresh = Served(version, key, predictor, path)
            if self.compile_net and self._preloader is None:  # no background loader: compile here
                self.compile(fresh)
            with self._swap_lock:
                old, self._served = self._served, fresh
            logger.info("serving model %s (%s, loaded in %.2f s)%s", version, self.device,
                        time.perf_counter() - t0, f"; replaced {old.version}" if old else "")
            return fresh

    def compile(self, served: Served) -> bool:
        """Compile ``served``'s network (``Predictor.compile_network``), cache folder keyed by the checkpoint."""
        from hybrid_ct.files import file_sha256
        from hybrid_ct.net.compiled import compile_cache_dir

        ok = served.predictor.compile_network(compile_cache_dir(file_sha256(served.path), self.compile_cache))
        served.compile_tried = True
        if ok:
            logger.info("model %s now runs compiled (compile %.1f s)", served.version,
                        served.predictor.compiled.compile_s)
        return ok

    def peek(self) -> Served | None:
        return self._served

    def preload(self, interval_s: float = 10.0) -> threading.Thread:
        """Load the current version now and, with ``compile_net``, compile it, in a daemon thread that keeps
        checking the store every ``interval_s`` seconds: a new version is loaded and compiled when it is
        published, not by the first request after it. The eager network answers until the compiled one
        is ready. Idempotent."""
        if self._preloader is not None:
            return self._preloader

        def loop():
            while True:
                try:
                    served = self.get()  # fast: the eager network serves from now on
                    if self.compile_net and not served.compile_tried:
                        self.compile(served)  # minutes, beside the requests; they switch when it is ready
                except Exception as e:  # noqa: BLE001 - no model yet, or one that does not load: requests say why
                    logger.debug("preload: %s", e)
                time.sleep(interval_s)

        self._preloader = threading.Thread(target=loop, name="hybrid-ct-preload", daemon=True)
        self._preloader.start()
        return self._preloader


def result_extension(request: dict) -> str:
    ext = request.get("result_extension") or ".nii.gz"
    if isinstance(ext, (list, tuple)):
        ext = ext[0] if ext else ".nii.gz"
    ext = str(ext).lower()
    if not ext.startswith("."):
        ext = "." + ext
    if ext not in RESULT_EXTENSIONS:
        raise InputError(f"result_extension {ext!r} is not supported: use one of {', '.join(RESULT_EXTENSIONS)}")
    return ext


class HybridCTInfer(InferTask):
    def __init__(self, server: ModelServer, labels: dict, description: str, config: dict | None = None):
        super().__init__(type=InferType.SEGMENTATION, labels=dict(labels), dimension=3, description=description,
                         config={"device": device_list(), **(config or {})})
        self.server = server

    def is_valid(self) -> bool:
        # Always listed so that Slicer shows the model; until a trained model exists every request
        # is answered with "no trained model yet" (HTTP 503), never with untrained weights.
        return True

    def info(self):
        out = super().info()
        out["model"] = self.server.store.summary()
        return out

    def get_path(self, validate=True):
        try:
            return str(self.server.store.resolve()[1])
        except Exception:  # noqa: BLE001 - no model: MONAI Label expects None
            return None

    def __call__(self, request, callbacks=None):
        begin = time.perf_counter()
        req = dict(self._config)
        req.update(request)
        image = req.get("image")
        if not isinstance(image, str) or not image:
            raise InputError("no image given: send an image id of the datastore or upload a file")
        ext = result_extension(req)
        self.server.get()  # ModelNotReadyError -> HTTP 503 before the image is even read

        t0 = time.perf_counter()
        img = read_image(image)  # InputError for anything that is not a readable volume
        t_read = time.perf_counter() - t0

        with self.server.running() as (served, started):  # the version current when the request runs
            t0 = time.perf_counter()
            label, report = served.predictor.predict(img)
        t_predict = time.perf_counter() - t0

        t0 = time.perf_counter()
        label = sitk.Cast(label, sitk.sitkUInt8)
        fd, out_path = tempfile.mkstemp(prefix=temp_prefix("result"), suffix=ext)
        os.close(fd)
        sitk.WriteImage(label, out_path, useCompression=ext in (".nrrd", ".mha"))
        t_write = time.perf_counter() - t0

        params = jsonable(report)
        params["label_names"] = dict(self.labels)
        params["started_ts"] = round(started, 3)  # server clock when the network began on this request
        params["latencies"] = {"read": round(t_read, 3), "infer": round(t_predict, 3), "write": round(t_write, 3),
                               "total": round(time.perf_counter() - begin, 3)}
        logger.info("inferred %s with %s in %.2f s: %s, %s, burden %.1f %%", os.path.basename(image),
                    served.version, time.perf_counter() - begin, params["classification"]["label"], params["grade"],
                    params["burden"]["total_pct"])
        return out_path, params
