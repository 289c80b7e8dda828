"""Multi-task trainer over the datastore's final labels.

Built on MONAI Label's ``BasicTrainTask`` for what it provides around a run -- the request/config
merge, device choice, the multi-GPU path (``torch.multiprocessing.spawn`` of one DDP worker per GPU)
and ``train_stats`` -- while the loop itself is the core's one loop, ``hybrid_ct.train.trainer.Trainer`` (the
same as ``hybrid-ct train`` and ``torchrun -m hybrid_ct.train.distributed``), because the network is a multi-head
spiking model trained on 2D slices with per-head target masks, which the ignite ``SupervisedTrainer``
pipeline of ``BasicTrainTask.train`` does not express. A request becomes a ``TrainConfig``
(``train_config``; a request's defaults are TrainConfig's, the loss weights ``lambda_cls`` /
``lambda_lung`` / ``lambda_infection`` included); ``network`` / ``optimizer`` / ``loss_function`` /
``train_pre_transforms`` are implemented and used by that loop.

Data rules (docs/app.md):
- labels are remapped BY NAME from the label_info stored with them (``validation.canonicalise_label``);
- the slice class is "infection present" unless the image info carries a ``diagnosis``;
- the validation split is fixed per image: sha256(image id) < ``val_split`` (a retrain never moves
  an image between training and validation);
- negative slices are subsampled afresh each epoch (``negative_fraction``, seed 002: 20 %).
Retraining latency: a run fine-tunes the shipped model (``pretrained`` and ``from_shipped``, defaults; the served
version with ``from_shipped`` false, so that fine-tunes do not compound) on the
datastore's labels plus ``replay_slices`` slices of its original training data (``<model>.replay.npz``
beside the shipped checkpoint, written by ``hybrid-ct train``; ``training.save_replay``), so a few
corrected scans do not make it forget the rest; and it is bounded by ``max_minutes`` (default
``MAX_MINUTES``): training stops at ``TRAIN_SHARE`` of the budget (the current epoch is cut short and
validated), leaving the rest for validation, the promotion scoring and publishing.
The best epoch (validation score in [0, 1]) is published as a new model version at the end of the
run, or when the run is stopped through ``DELETE /train/`` (graceful stop file). It is made current only
if it is not worse than the model served when the run started (``promotion``): both are scored on the same
held-out slices (validation images, the replay's held-out share), on the ``promote_metrics`` (default
``score``) within ``promote_tolerance``. With nothing held out it is published ``pending`` and judged at the
start of the next run on the corrections neither model has trained on. ``force_promote`` makes it current
regardless. A kept version can still be served with a roll back. The learning rate's cosine follows the time
budget as well as the epochs, so a run the budget stops still ends at a low rate.
"""
from __future__ import annotations

import logging
import os
import random
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from monai.inferers import SimpleInferer
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context
from monailabel.utils.others.generic import device_list

from hybrid_ct.net.checkpoint import load_checkpoint
from hybrid_ct.errors import InputError, ModelNotReadyError
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig
from hybrid_ct.train.trainer import Trainer, build_loss, build_optimizer, init_distributed
from hybrid_ct.data.slice_store import SliceSet, load_replay, replay_path
from hybrid_ct.train.augment import augmentations
from hybrid_ct.net.device import choose_device

from ..store import ModelStore, UnknownVersionError
from .data import is_validation_image, slices_of, split_replay, weigh_new
from .params import DEFAULTS, public_params, train_config, validate_params
from .promotion import (PENDING, evenly, flat_metrics, gate_params, pending_candidate, promotion_decision,
                        promotion_scores, unseen_cases)

logger = logging.getLogger(__name__)

MAX_MINUTES = 5.0  # default wall-clock budget of a retrain: label to serving within ~5 min on 2 cores
TRAIN_SHARE = 0.75  # share of the budget spent training; the rest validates, scores both models, publishes
REPLAY_SLICES = 256  # default slices of the original data replayed per run
# share of the replay file held out for the gate (never trained on by a retrain). Off by default: the replay is
# the shipped model's own training data, so it wins there; on the small campaign a quarter held out made the
# gate keep 42 of 45 retrains, 27 of which would have raised the test Dice (docs/active_learning_tiny.md)
GATE_REPLAY_SHARE = 0.0
# a retrain fine-tunes a trained model on a handful of scans: a tenth of the training rate (TrainConfig.lr 1e-3).
# At 1e-3 every shipped-network retrain of the 2026-12-07 campaign lowered the test Dice (a single plain phantom:
# 0.656 -> 0.581); on the development pool (benchmarks/retrain_ab.py, seed 9; docs/retrain_ab.md) 1e-4 was the
# only rate of three whose retrains all stayed above the shipped model
FINE_TUNE_LR = 1e-4
NEW_SHARE = 0.5  # share of a retrain's training slices that come from the corrected scans (repeated)


class StopFlag:
    """Graceful stop: a file the server touches on ``DELETE /train/`` (the Trainer all-reduces it across
    DDP ranks, so every rank stops at the same step)."""

    def __init__(self, path, started: float):
        self.path, self.started = path, started

    def __call__(self) -> bool:
        try:
            return os.path.getmtime(self.path) >= self.started - 1.0
        except OSError:
            return False


class Deadline:
    """``stop`` or the training share of a wall-clock budget spent (``minutes`` <= 0: no budget)."""

    def __init__(self, stop, started: float, minutes: float):
        self.stop, self.started = stop, started
        self.until = started + TRAIN_SHARE * minutes * 60.0 if minutes > 0 else None
        self.hit = False

    def spent(self) -> float:
        """Share of the training part of the budget used (0 with no budget): the learning-rate schedule's clock."""
        if self.until is None:
            return 0.0
        return (time.time() - self.started) / max(self.until - self.started, 1e-9)

    def __call__(self) -> bool:
        if self.until is not None and time.time() >= self.until:
            self.hit = True
            return True
        return self.stop()


class HybridCTTrain(BasicTrainTask):
    def __init__(self, store: ModelStore, net_config: dict | None = None, description: str = "",
                 labels=None, config: dict | None = None, replay: str | None = None):
        super().__init__(model_dir=str(store.dir), description=description, amp=False,
                         stats_path=str(store.stats_path), labels=labels, tracking=None)
        self.store = store
        self.net_config = dict(net_config or {})
        self.stop_file = str(store.dir / "train.stop")
        self.replay = replay  # None: <shipped model>.replay.npz when it exists
        d = DEFAULTS
        self._config = {  # what Slicer shows as training options (and the defaults of a request)
            "max_epochs": d.epochs,
            "train_batch_size": d.batch_size,
            "val_batch_size": d.val_batch_size or d.batch_size,
            "learning_rate": FINE_TUNE_LR,  # send TrainConfig's 1e-3 with pretrained false (a fresh network)
            "weight_decay": d.weight_decay,
            "negative_fraction": d.negative_fraction,
            "val_split": 0.2,
            "max_iters_per_epoch": d.max_iters_per_epoch or 0,
            "pretrained": True,
            # every retrain fine-tunes the shipped model on all the corrections, not the served version: chained
            # fine-tunes compounded (served test Dice 0.656 -> 0.612 -> 0.581 -> 0.515 in 4 rounds, uncertainty seed 0);
            # on the development pool (benchmarks/retrain_ab.py, seed 9) the best of 3 variants
            "from_shipped": True,
            "augment": d.augment,
            "freeze_bn": d.freeze_bn,
            "seed": d.seed,
            "num_workers": d.num_workers,
            **{f"lambda_{head}": v for head, v in d.lambdas.items()},
            "max_minutes": MAX_MINUTES,
            "replay_slices": REPLAY_SLICES,
            "gate_replay_share": GATE_REPLAY_SHARE,
            "new_share": NEW_SHARE,
            "promote_metrics": "score",  # comma-separated PROMOTE_METRICS
            "promote_tolerance": 0.0,
            "force_promote": False,
            "device": device_list(),
            "multi_gpu": True,
            "gpus": "all",
        }
        self._config.update(config or {})

    # ------------------------------------------------------------------ BasicTrainTask hooks
    def network(self, context: Context):
        """Fine-tune the shipped model (``from_shipped``) or the served one (``pretrained``), else a fresh network."""
        req = context.request
        if req.get("pretrained", True):
            try:
                version, path, _ = self.store.resolve()
                if req.get("from_shipped", True) and self.store.has_shipped():
                    version, path = "shipped", self.store.shipped
                model, meta = load_checkpoint(path, "cpu")
                context.parent_version = version
                return model.train()
            except ModelNotReadyError:
                pass
        context.parent_version = None
        return HybridMultiTaskNet(NetConfig.from_dict(self.net_config))

    def replay_set(self, size: int, n: int, gate_share: float, seed: int):
        """-> (``n`` slices of the original training data to train on, the gate's fixed share of it
        (``split_replay``), the file); (None, None, file): no replay file, or a model of another size."""
        path = self.replay
        if not path and self.store.shipped:
            path = str(replay_path(self.store.shipped))
        if not n or not path or not os.path.isfile(path):
            return None, None, path
        data = load_replay(path)
        if data.images.shape[-1] != size:
            return None, None, path
        return (*split_replay(data, gate_share, n, seed), path)

    def optimizer(self, context: Context):
        return build_optimizer(context.network, context.loss, context.train_config)

    def loss_function(self, context: Context):
        return build_loss(context.train_config)

    def train_pre_transforms(self, context: Context):
        return augmentations()

    def train_post_transforms(self, context: Context):
        return []

    def val_inferer(self, context: Context):
        return SimpleInferer()

    def pre_process(self, request, datastore: Datastore):
        if hasattr(datastore, "final_labels"):
            return datastore.final_labels()
        return [{"id": os.path.basename(d["image"]).split(".")[0], "label_info": {}, "image_info": {}, **d}
                for d in datastore.datalist()]

    def cleanup(self, request):
        pass

    def stats(self):
        stats = self.store.read_stats()
        if isinstance(stats.get("history"), list) and len(stats["history"]) > 10:  # /info is polled often
            stats = dict(stats, history=stats["history"][-10:], history_truncated=True)
        return stats

    def config(self):
        return self._config

    # ------------------------------------------------------------------ run
    def __call__(self, request, datastore: Datastore):
        request = validate_params(request)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(random.randint(20000, 29999)))
        return super().__call__(request, datastore)

    def train(self, rank, world_size, request, datalist):
        start = time.time()
        req = validate_params(request)
        multi = bool(req.get("multi_gpu")) and world_size > 1
        context = Context()
        context.request, context.local_rank, context.world_size, context.multi_gpu = req, rank, world_size, multi
        context.run_id = req.get("run_id", time.strftime("%Y%m%d_%H%M%S"))
        if multi:
            device = torch.device("cpu")  # CPU processes with gloo (tests); MONAI Label itself spawns only for GPUs
            if torch.cuda.is_available():
                gpus = req.get("gpus", "all")
                ids = list(range(world_size)) if gpus in (None, "", "all") else [int(g) for g in str(gpus).split(",")]
                device = torch.device(f"cuda:{ids[rank]}")
            init_distributed(req.get("distributed_backend"), req.get("distributed_url", "env://"), rank, world_size,
                             device)
        else:
            device = torch.device(choose_device(req.get("device") or "cpu", strict=False))
        context.device = device
        lead = rank == 0
        stats = {"status": "RUNNING", "run_id": context.run_id, "start_ts": int(start), "epoch": 0,
                 "total_epochs": req["max_epochs"], "device": str(device), "world_size": max(world_size, 1) if multi else 1,
                 "best_metric": None, "best_metric_epoch": None, "history": []}
        if lead:
            self.store.write_stats(stats)
        try:
            result = {k: v for k, v in self._run(context, req, datalist, stats, start).items() if k != "history"}
        except Exception as e:
            if lead:
                stats.update(status="ERROR", error=f"{type(e).__name__}: {e}",
                             total_time=str(timedelta(seconds=int(time.time() - start))))
                self.store.write_stats(stats)
            raise
        finally:
            if multi and dist.is_initialized():
                dist.destroy_process_group()
        return result

    def _run(self, context: Context, req: dict, datalist: list, stats: dict, start: float) -> dict:
        rank, lead, device = context.local_rank, context.local_rank == 0, context.device
        context.train_config = cfg = train_config(req, device)
        torch.manual_seed(cfg.seed + rank)

        judged = self._judge_pending(datalist, req, device) if lead else None
        served_version = self.store.current() if lead else None  # what a retrain must not be worse than
        context.network = self.network(context)
        if not req.get("from_shipped", True):  # the gate compares with the served model, whatever the run started from
            served_version = getattr(context, "parent_version", None) or served_version
        grid = context.network.cfg.in_size, context.network.cfg.input_spec()
        is_val = [is_validation_image(case["id"], req["val_split"]) for case in datalist]
        train_set, train_cases, skipped = slices_of([c for c, v in zip(datalist, is_val) if not v], *grid)
        val_set, val_cases, skipped_val = slices_of([c for c, v in zip(datalist, is_val) if v], *grid)
        skipped += skipped_val
        n_train, n_val = len(train_cases), len(val_cases)
        if n_train == 0:
            raise InputError(f"nothing to train on: {len(datalist)} labelled image(s), none usable for training"
                             + (f" ({len(skipped)} skipped)" if skipped else "") + "; submit final labels first")
        n_new = len(train_set)
        replay, gate_replay, replay_from = self.replay_set(
            grid[0], int(req.get("replay_slices", REPLAY_SLICES) or 0),
            float(req.get("gate_replay_share", GATE_REPLAY_SHARE)), cfg.seed)
        n_replay = len(replay) if replay is not None else 0
        # the epoch picked on the training slices (each once), never on the gate's: picking the best of ten
        # epochs on the slices the gate then compares on would promote noise
        fit_set = train_set.extend(replay) if replay is not None else train_set
        # at most GATE_MAX_SLICES of them, evenly spaced: a whole scan + the replay is ~400 slices, whose pass
        # after every epoch took 40-250 s of a 5 min round with the shipped network (docs/active_learning_shipped.md)
        fit_set = evenly(fit_set)
        new_set, copies = weigh_new(train_set, n_replay, float(req.get("new_share", NEW_SHARE)))
        train_set = new_set.extend(replay) if replay is not None else new_set
        # the gate: held-out corrected images + the replay's fixed share; the training slices only when both
        # are missing (no replay file and no held-out image yet)
        gate_set = val_set.extend(gate_replay) if gate_replay is not None and len(gate_replay) else val_set
        val_on_train = len(gate_set) == 0
        if judged:
            stats["judged"] = judged
        stats.update(replay={"slices": n_replay, "gate_slices": len(gate_replay) if gate_replay is not None else 0,
                             "file": replay_from})
        stats.update(train={"images": n_train, "slices": len(train_set), "new_slices": n_new, "new_copies": copies},
                     val={"images": n_val, "slices": len(gate_set), "on_training_set": val_on_train},
                     skipped=skipped, parent_version=getattr(context, "parent_version", None))
        logger.info("training %s: %d train image(s) / %d slices, %d validation image(s) / %d slices, device %s",
                    context.run_id, n_train, len(train_set), n_val, len(val_set), device)

        context.network = context.network.to(device)
        context.loss = self.loss_function(context).to(device)
        context.optimizer = self.optimizer(context)
        clock = {"t0": time.perf_counter()}

        def on_epoch(epoch: int, st: dict, model) -> None:  # rank 0: train_stats and the progress line
            ev, score = st["val"], float(st["val"]["score"])
            best, best_epoch = trainer.best_score, trainer.best_epoch
            entry = {"epoch": epoch, "loss": round(float(st["loss"].get("total", float("nan"))), 5),
                     "score": round(score, 5), "seconds": round(time.perf_counter() - clock["t0"], 2),
                     "train_slices": st["train_slices"], **flat_metrics(ev)}
            clock["t0"] = time.perf_counter()
            stats["history"].append(entry)
            stats.update(epoch=epoch, best_metric=best, best_metric_epoch=best_epoch, loss=entry["loss"],
                         metrics=flat_metrics(ev), current_time=str(timedelta(seconds=int(time.time() - start))))
            self.store.write_stats(stats)
            print(f"[hybrid_ct] epoch {epoch}/{cfg.epochs} loss {entry['loss']:.4f} "
                  f"score {score:.4f} best {best:.4f} (epoch {best_epoch})", flush=True)

        budget = Deadline(StopFlag(self.stop_file, start), start, float(req.get("max_minutes", MAX_MINUTES) or 0))
        trainer = Trainer(context.network, cfg, train_set, fit_set,
                          loss_fn=context.loss, optimizer=context.optimizer, on_epoch=on_epoch, stop=budget,
                          spent=budget.spent if budget.until is not None else None)
        trainer.fit()
        if not lead:
            return {}
        stopped = trainer.stopped and not budget.hit  # the time budget ends a run normally
        stats["time_budget"] = {"max_minutes": float(req.get("max_minutes", MAX_MINUTES) or 0), "hit": budget.hit,
                                "train_s": round(time.time() - start, 1)}
        stats["total_time"] = str(timedelta(seconds=int(time.time() - start)))
        stats.pop("current_time", None)
        model = trainer.best_model()
        if model is None:
            stats.update(status="STOPPED" if stopped else "DONE", published_version=None,
                         note="stopped before the first epoch finished: nothing published")
            self.store.write_stats(stats)
            return stats
        meta = {"metric": trainer.best_score, "best_metric_epoch": trainer.best_epoch, "epochs": stats["epoch"],
                "train_images": n_train, "val_images": n_val, "val_on_training_set": val_on_train,
                "trained_ids": [c["id"] for c in train_cases],
                "run_id": context.run_id, "metrics": stats.get("metrics"), "params": public_params(req)}
        scored_on = (fit_set, train_cases) if val_on_train else (gate_set, val_cases or train_cases)
        version, promotion = self._publish(model.eval(), meta, served_version, *scored_on, val_on_train, req, device,
                                           gate={} if val_on_train else {"val_images": n_val,
                                                                         "val_replay_slices": len(gate_set) - len(val_set)})
        stats.update(status="STOPPED" if stopped else "DONE", published_version=version, promotion=promotion,
                     current_version=self.store.current())
        self.store.write_stats(stats)
        print(f"[hybrid_ct] published model {version} (best metric {trainer.best_score:.4f}, epoch "
              f"{trainer.best_epoch}): {promotion['decision']}, {promotion['reason']}", flush=True)
        return stats

    def _compare(self, model, served_version, data: SliceSet, cases: list, req: dict, device) -> tuple:
        """``model`` and ``served_version`` scored on the same slices -> (new, served or None, why not)."""
        batch_size = req.get("val_batch_size") or req["train_batch_size"]
        new, served, failed = promotion_scores(model, data, device, batch_size), None, ""
        if served_version is not None:
            try:
                old, _ = load_checkpoint(self.store.path(served_version), "cpu")
                same = (old.cfg.in_size, old.cfg.input_spec()) == (model.cfg.in_size, model.cfg.input_spec())
                served = promotion_scores(old, data if same else slices_of(cases, old.cfg.in_size, old.cfg.input_spec())[0],
                                          device, batch_size)
                del old
            except (ModelNotReadyError, UnknownVersionError) as e:  # unservable anyway: nothing to compare
                failed = f"the served model {served_version} does not load ({e}); "
        return new, served, failed

    def _judge_pending(self, datalist: list, req: dict, device) -> dict | None:
        """A retrain published ``pending`` judged against the served model on the corrections neither has
        trained on ("test, then train"); served when not worse. -> the judgement, or None (nothing pending)."""
        version = pending_candidate(self.store)
        if version is None:
            return None
        served_version = self.store.current()
        meta = self.store.meta(version)
        unseen = unseen_cases(datalist, meta, self.store.meta(served_version) if served_version else {})
        base = {"candidate": version, "served_version": served_version}
        if not unseen:
            return dict(base, ts=round(time.time(), 1), decision=PENDING, reason="no correction yet that neither model has trained on")
        try:
            model, _ = load_checkpoint(self.store.path(version), "cpu")
        except (ModelNotReadyError, UnknownVersionError) as e:
            return dict(base, ts=round(time.time(), 1), decision="kept", reason=f"the candidate does not load ({e})")
        data, cases, _ = slices_of(unseen, model.cfg.in_size, model.cfg.input_spec())
        if not len(data):
            return dict(base, ts=round(time.time(), 1), decision=PENDING, reason="the unseen corrections gave no usable slice")
        data = evenly(data)
        metrics, tolerance = gate_params(req)
        new, served, failed = self._compare(model.eval(), served_version, data, cases, req, device)
        decision, reason = promotion_decision(new, served, metrics, tolerance)
        judged = dict(base, decision=decision, reason=failed + reason + f"; judged on {len(cases)} correction(s) it "
                      "had not trained on", new=new, served=served, metrics=metrics, tolerance=tolerance,
                      judged_on=[c["id"] for c in cases], val_slices=len(data), ts=round(time.time(), 1))
        self.store.judge(version, dict(meta.get("promotion") or {}, **judged, published_as=PENDING),
                         make_current=decision == "promoted")
        print(f"[hybrid_ct] pending model {version}: {decision} ({reason})", flush=True)
        return judged

    def _publish(self, model, meta: dict, served_version, data: SliceSet, cases: list, on_train: bool,
                 req: dict, device, gate: dict | None = None) -> tuple:
        """Score ``model`` and the served model on the same held-out slices, publish ``model`` as a version, made
        current unless it is worse (``promotion_decision``) -> (version, the ``promotion`` block). With nothing
        held out (``on_train``) it is published ``pending``: judged by the next retrain (``_judge_pending``)."""
        (metrics, tolerance), force = gate_params(req), bool(req.get("force_promote"))
        new = served = None
        failed = ""
        if on_train and served_version is not None and not force:
            decision, reason = PENDING, ("nothing held out to judge it on: served only if, on the next correction(s), "
                                         "before any retrain trains on them, it is not worse than the served model")
        else:
            new, served, failed = self._compare(model, served_version, data, cases, req, device)
            decision, reason = promotion_decision(new, served, metrics, tolerance, force)
            if on_train:
                reason += "; scored on the training images (no validation image yet)"
        promotion = {"decision": decision, "reason": failed + reason, "new": new, "served": served,
                     "served_version": served_version, "metrics": metrics, "tolerance": tolerance,
                     "force_promote": force, "val_images": 0 if decision == PENDING else len(cases),
                     "val_slices": 0 if decision == PENDING else len(data),
                     "val_on_training_set": on_train, **(gate or {})}
        model.cpu()
        current = decision not in ("kept", PENDING)
        return self.store.publish(model, dict(meta, promotion=promotion), make_current=current), promotion
