"""Hybrid CT: a MONAI Label app serving the hybrid spiking multi-task network for chest CT.

    monailabel start_server --app apps/hybrid_ct --studies <dir> --conf models hybrid_ct

Serves one segmentation model ``hybrid_ct`` (labels right lung 3, left lung 4, infection 2; result params with the
classification, infection burden, grade, energy and model version), its trainer, the active-learning
strategies ``random``, ``first`` and ``uncertainty`` (spike-based) with the ``uncertainty`` scoring
method, model versions with roll back, and automatic retraining after ``auto_train_after`` new
labels. Nothing is downloaded, at start-up or later: the app registers no SAM2 / zoo / bundle models
and never fetches the dcmqi tools. See docs/app.md for every conf key.
"""
from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Dict

import lib.configs
from lib.datastore import HybridCTDatastore
from lib.endpoints import check_param_names, start_training, training_active
from lib.lifecycle import (TrainingLock, die_with_parent, is_task_subprocess, mark_server_process,
                           shutdown_children_on_signals)
from lib.recovery import remove_stale_uploads
from lib.guard import install
from lib.routes import expose_groups
from lib.validation import MIN_SLICES, Conflict

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.class_utils import get_class_names
from monailabel.utils.others.generic import strtobool

from hybrid_ct.imaging.filecheck import DEFAULT_MAX_VOXELS

logger = logging.getLogger(__name__)

if is_task_subprocess():  # a train / scoring subprocess of the server: it must not outlive the server
    die_with_parent()

DEFAULT_MODEL = "hybrid_ct"
NO_DOWNLOAD_KEYS = ("sam2", "sam", "zoo", "bundles", "preload")


def _app_version() -> str:
    try:
        return version("hybrid-ct")
    except PackageNotFoundError:
        return "0.0.0"


class HybridCTApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = dict(conf or {})
        self.model_dir = os.path.realpath(conf.get("model_dir") or os.environ.get("HYBRID_CT_MODEL_DIR")
                                          or os.path.join(app_dir, "model"))
        for key in NO_DOWNLOAD_KEYS:
            if key in conf and strtobool(str(conf[key])):
                logger.warning("--conf %s %s ignored: this app serves only its own model and downloads nothing",
                               key, conf[key])

        configs = {}
        for c in get_class_names(lib.configs, "TaskConfig"):
            configs[c.split(".")[-2].lower()] = c
        wanted = [m.strip() for m in str(conf.get("models", DEFAULT_MODEL)).split(",") if m.strip()]
        if "all" in wanted:
            wanted = sorted(configs)
        unknown = [m for m in wanted if m not in configs]
        if unknown or not wanted:
            raise ValueError(f"unknown model(s) {unknown or wanted} in --conf models; available: {sorted(configs)}")

        self.planner = None
        self.models: Dict[str, TaskConfig] = {}
        for name in wanted:
            module_name, class_name = configs[name].rsplit(".", 1)
            cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
            task = cls()
            task.init(name, self.model_dir, conf, self.planner)
            self.models[name] = task
            logger.info("+++ model %s -> %s (model dir %s)", name, configs[name], self.model_dir)
        self.model_store = self.models[wanted[0]].store
        self.auto_train_after = int(conf.get("auto_train_after", 5))
        self.auto_train_params = lib.configs.hybrid_ct._json_conf(conf, "auto_train_params")
        self.stop_grace_s = float(conf.get("stop_grace_s", 60))
        self.max_image_voxels = int(conf.get("max_image_voxels", DEFAULT_MAX_VOXELS))
        self.min_slices = int(conf.get("min_slices", MIN_SLICES))
        if self.max_image_voxels < 1 or self.min_slices < 1:
            raise ValueError("--conf max_image_voxels and min_slices must be positive integers")
        expose_groups(conf)  # an unknown or refused route group stops the start here
        check_param_names(self.auto_train_params)  # a typo in a train default must not start default trainings
        for task in self.models.values():
            check_param_names(task.train_defaults)

        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="Hybrid CT",
                         description="Hybrid spiking multi-task network for chest CT: lung and infection "
                                     "segmentation, positive/negative classification, infection burden",
                         version=_app_version())
        self._auto_update_scoring = strtobool(str(conf.get("auto_scoring", settings.MONAI_LABEL_AUTO_UPDATE_SCORING)))

    # ------------------------------------------------------------------ tasks
    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
                return self.init_remote_datastore()  # as in MONAI Label
            from lib.dicomweb import dicomweb_datastore

            # a PACS over DICOMweb: final labels go back as DICOM-SEG (pydicom-seg, no dcmqi), see lib/dicomweb.py
            return dicomweb_datastore(self.studies, self.conf)
        logger.info("Init Hybrid CT datastore for: %s", self.studies)
        return HybridCTDatastore(self.studies, auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                 read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
                                 import_dicom=strtobool(str(self.conf.get("import_dicom", "true"))))

    def _download_dcmqi_tools(self):
        # MONAI Label downloads dcmqi for DICOM-SEG output with a DICOMweb datastore; this app never
        # downloads anything: put itkimage2segimage on PATH yourself if you need DICOM SEG.
        logger.info("dcmqi tools are not downloaded by this app: it writes DICOM-SEG with pydicom-seg")

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for name, task in self.models.items():
            i = task.infer()
            infers.update(i if isinstance(i, dict) else {name: i})
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        for name, task in self.models.items():
            t = task.trainer()
            if t:
                trainers.update(t if isinstance(t, dict) else {name: t})
        return trainers

    def init_strategies(self) -> Dict[str, Strategy]:
        strategies: Dict[str, Strategy] = {"random": Random(), "first": First()}
        for task in self.models.values():
            s = task.strategy()
            if s:
                strategies.update(s if isinstance(s, dict) else {type(s).__name__.lower(): s})
        return strategies

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        methods: Dict[str, ScoringMethod] = {}
        for task in self.models.values():
            m = task.scoring_method()
            if m:
                methods.update(m if isinstance(m, dict) else {type(m).__name__.lower(): m})
        return methods

    # ------------------------------------------------------------------ server hooks
    def info(self):
        meta = super().info()
        meta["hybrid_ct"] = {**self.model_store.summary(), "auto_train_after": self.auto_train_after}
        return meta

    def on_init_complete(self):
        from monailabel.app import app as fastapi_app  # the running server (only imported in server mode)

        # fails closed: an exception here stops the server's start-up (uvicorn exits), so it never
        # serves MONAI Label's unguarded routes
        install(fastapi_app, self.conf)
        self.recover_after_kill()
        mark_server_process()
        shutdown_children_on_signals()
        for task in self.models.values():  # compile the served network now, not in the first request
            server = getattr(task, "server", None)
            if server is not None and server.compile_net:
                server.preload()
        super().on_init_complete()

    def recover_after_kill(self) -> dict:
        """What a killed server or training left: stale temporary files (model store, studies folder, temp
        folder) removed, versions that do not load set aside, the pointer on a servable version. Logged."""
        out = {"model_store": self.model_store.recover(), "uploads": remove_stale_uploads()}
        if hasattr(self._datastore, "remove_stale_temps"):
            out["studies"] = self._datastore.remove_stale_temps()
        if out["uploads"]:
            logger.warning("removed %d temporary upload files left by killed servers", len(out["uploads"]))
        logger.info("start-up check of the stores: serving %s; skipped versions %s", out["model_store"]["current"],
                    [s["version"] for s in out["model_store"]["skipped"]] or "none")
        return out

    def train(self, request):
        # runs in the training subprocess: the lock file names it, so that a restarted server does not
        # start a second training beside a live one
        with TrainingLock(self.model_dir):
            return super().train(request)

    def on_save_label(self, image_id, label_id):
        super().on_save_label(image_id, label_id)
        return {"auto_train": self._maybe_auto_train()}

    def on_model_changed(self, version: str):
        logger.info("model version now served: %s", version)
        if self._auto_update_scoring:
            self.async_scoring(None)

    def _maybe_auto_train(self) -> dict:
        n = self.auto_train_after
        if n <= 0 or not self._trainers:
            return {"enabled": False}
        since = int(self.model_store.read_stats().get("start_ts") or 0)
        # labels submitted through the app (they carry label_info) since the last training started;
        # labels that came with the studies folder are not "new"
        new = [d for d in self._datastore.final_labels()
               if "label_info" in d["label_info"] and int(d["label_info"].get("ts", 0)) > since] \
            if hasattr(self._datastore, "final_labels") else []
        out = {"enabled": True, "new_labels": len(new), "threshold": n, "started": False}
        if len(new) < n or not self._server_mode:
            return out
        if training_active():
            out["note"] = "a training is already running"
            return out
        model = next(iter(self._trainers))
        try:
            task = start_training(model, self.auto_train_params, run_sync=False, source="auto")
        except Conflict as e:
            out["note"] = str(e)
            return out
        out.update(started=True, task=task.get("id"))
        logger.info("auto retraining after %d new labels: task %s", len(new), task.get("id"))
        return out
