"""The batch of ``hybrid-ct predict`` on a Dask cluster: ``--workers N`` starts a local cluster of N worker
processes on this machine, ``--cluster tcp://scheduler:8786`` uses one that runs already (``dask scheduler`` /
``dask worker``, dask-jobqueue on SLURM, the Dask Kubernetes operator...).

The client (this process) walks the inputs, reads the manifest (``hybrid_ct.predict.manifest``: what is done and
valid is not sent) and sends one small task per case: the case's paths, never its voxels. Each worker loads the
model once, when it joins (``PredictorPlugin``: also a worker restarted after a crash), checks that its checkpoint
file has the client's sha256, reads the case from the shared storage, writes its outputs into the output folder
(shared too) and answers with the summary row and its files' sizes and sha256. Only the client writes the
manifest and summary.csv, so the files are the ones ``predict_batch`` writes in one process (byte for byte but
the timings in the JSON and summary.csv: ``tests/test_cluster.py``).

Faults: a case whose worker dies (killed, or over its memory limit) runs again on another worker; a case
that raises runs once more (``retries``); a case that fails twice (two exceptions, or two dead workers on a
local cluster: allowed-failures 1; an existing cluster keeps its own setting, 3 by default) is an "error" row
with the reason, and the batch goes on. The scheduler gone: ``ClusterError`` naming what is recorded; the
manifest has every finished case, the same command goes on from there (with or without a cluster).

    rows = predict_on_cluster(model_path, ["pacs_export/"], "results/", workers=2)
    rows = predict_on_cluster(model_path, ["/shared/pacs_export/"], "/shared/results/", address="tcp://sched:8786")
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import uuid
from pathlib import Path

from hybrid_ct.errors import InputError, ModelNotReadyError
from hybrid_ct.predict.batch import MIN_SERIES_SLICES
from hybrid_ct.predict.manifest import Manifest, file_sha256, settings_key
from hybrid_ct.predict.runner import CaseOptions, attempt, error_message, error_row, finish, plan_batch

log = logging.getLogger("hybrid_ct")

try:
    from distributed import WorkerPlugin
except ImportError:  # the extra is not installed: predict_on_cluster says so
    WorkerPlugin = object


class ClusterError(RuntimeError):
    """The cluster cannot be used or went away; what finished is in the manifest."""


class CaseFailed(Exception):
    """A case raised on a worker (the message is the original exception's class and text)."""


def _require_dask():
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise InputError("--workers / --cluster need Dask: pip install 'hybrid-ct[cluster]' (dask[distributed]) "
                         "on this machine and on every worker") from None


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class PredictorPlugin(WorkerPlugin):
    """Loads the model once per worker process (at start, and again after a restart) and keeps it; one case at a
    time per worker (a Predictor keeps spiking state between calls), whatever the worker's thread count."""

    def __init__(self, model_path: str, model_sha256: str, predictor_kw: dict, threads: int | None = None):
        self.model_path = str(model_path)
        self.model_sha256 = model_sha256
        self.predictor_kw = dict(predictor_kw)
        self.threads = threads
        self.predictor = None
        self.lock = None

    def setup(self, worker) -> None:
        import torch

        from hybrid_ct.predict.predictor import Predictor

        if self.threads:
            torch.set_num_threads(int(self.threads))
        if not os.path.isfile(self.model_path):
            raise ModelNotReadyError(f"worker {worker.address}: no model file {self.model_path} (the client's "
                                     "model must be on shared storage, at the same path, for every worker)")
        sha = file_sha256(self.model_path)
        if sha != self.model_sha256:
            raise ModelNotReadyError(f"worker {worker.address}: {self.model_path} has sha256 {sha[:12]}, the "
                                     f"client's has {self.model_sha256[:12]}: not the same model")
        kw = dict(self.predictor_kw)
        kw["device"] = _resolve_device(kw.get("device", "auto"))
        self.predictor = Predictor.from_checkpoint(self.model_path, **kw)
        self.lock = threading.Lock()

    def teardown(self, worker) -> None:
        self.predictor = None


def run_case(case, out_dir: str, opts: CaseOptions, plugin_name: str):
    """The task: one case on the worker that runs it -> (summary row, output facts)."""
    from distributed import get_worker

    plugin = get_worker().plugins.get(plugin_name)
    if plugin is None or plugin.predictor is None:
        raise CaseFailed(f"ModelNotReadyError: the model is not loaded on worker {get_worker().address}")
    with plugin.lock:
        if plugin.threads:  # OpenMP's thread count is per calling thread: set it in the one that runs the case
            import torch

            torch.set_num_threads(int(plugin.threads))
        try:
            return attempt(plugin.predictor, case, Path(out_dir), opts)
        except Exception as e:  # noqa: BLE001 - sent back as text: any exception, picklable or not
            raise CaseFailed(error_message(e)) from None
        finally:
            gc.collect()  # a big scan's arrays go before the next case comes


def _start(workers: int | None, address: str | None, memory_limit, dashboard, timeout: float):
    """-> (client, cluster or None)."""
    import dask
    from distributed import Client, LocalCluster

    # Dask's own INFO lines (workers joining, closing) are not the user's business; warnings and errors are
    logging.getLogger("distributed").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    if address:
        try:
            return Client(address, timeout=timeout, set_as_default=False), None
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"cannot reach the Dask scheduler at {address}: {e}") from None
    # MALLOC_TRIM_THRESHOLD_ (Dask's nanny sets 65536) turns off glibc's dynamic mmap threshold: every large
    # temporary array is then mapped and unmapped again; measured 1.8x slower per case, so workers start without it
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,  # a case that kills 2 workers: an error
                          "distributed.worker.daemon": False,
                          "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, host="127.0.0.1",
                               memory_limit=memory_limit, dashboard_address=dashboard,
                               silence_logs=logging.ERROR)
    return Client(cluster, set_as_default=False), cluster


def _lost(e: BaseException) -> bool:
    from distributed.comm.core import CommClosedError

    return isinstance(e, (OSError, CommClosedError, TimeoutError)) or (
        e.__class__.__name__ in ("FutureCancelledError", "CancelledError"))


def _run(client, plan, opts, manifest, plugin_name, progress, on_error, retries, address) -> dict:
    from distributed import KilledWorker, as_completed
    from tqdm import tqdm

    todo = plan.todo
    token = uuid.uuid4().hex[:8]
    futures = {client.submit(run_case, c, str(plan.out_dir), opts, plugin_name, key=f"hybrid-ct-{token}-{i}",
                             retries=retries, pure=False): c for i, c in enumerate(todo)}
    results, failed = {}, 0
    bar = tqdm(total=len(todo), desc="predict", unit="case", disable=not progress)
    try:
        for fut in as_completed(list(futures), loop=client.loop):
            case = futures[fut]
            try:
                row, outputs = fut.result()
            except CaseFailed as e:
                row, outputs = error_row(case, str(e)), {}
            except KilledWorker as e:
                row, outputs = error_row(case, f"KilledWorker: the worker running this case died each time it "
                                               f"tried (killed, or over its memory limit): {e}"), {}
            if row["status"] != "ok":
                failed += 1
                on_error(f"{case.path}: {row['error']}")
            manifest.record(case.name, str(case.path), plan.fingerprints[case.name], plan.model_sha256,
                            plan.settings, row, outputs)
            results[case.name] = row
            bar.update(1)
            bar.set_postfix_str(f"done {len(results) - failed}, failed {failed}")
    except Exception as e:
        if not _lost(e):
            raise
        why = "connection lost" if "Cancelled" in e.__class__.__name__ else error_message(e)
        raise ClusterError(f"lost the Dask scheduler{' at ' + address if address else ''} ({why}) after "
                           f"{len(results)} of {len(todo)} case(s) to run: those are recorded in {manifest.path}; "
                           "run the same command again to go on from there") from None
    finally:
        bar.close()
        for fut in futures:
            if not fut.done():
                fut.cancel()
    return results


def predict_on_cluster(model_path, inputs, out_dir, *, workers: int | None = None, address: str | None = None,
                       intensity: str = "auto", overlays: int = 3, formats=("nifti",),
                       min_slices: int = MIN_SERIES_SLICES, device: str = "auto", batch_size: int = 8,
                       require_chest: bool = True, amp: bool = False, z_step_mm: float | None = None,
                       threads: int | None = None,
                       memory_limit="auto", dashboard: str | None = ":8787", progress: bool = True, on_error=None,
                       resume: bool = True, retries: int = 1, timeout: float = 30.0) -> list:
    """``predict_batch`` on Dask: ``workers`` local worker processes, or the scheduler at ``address``. The same
    files, manifest, summary.csv and rows. ``threads``: torch threads per worker (default: this machine's cores
    shared among the local workers; on an existing cluster, the workers' own setting); ``memory_limit`` per
    local worker (Dask's: "auto" shares the machine's memory, or e.g. "6GB": a worker over it is restarted and
    its case runs again elsewhere); ``dashboard``: the local cluster's dashboard address (None: none)."""
    _require_dask()
    from hybrid_ct.net.checkpoint import load_checkpoint

    if workers is not None and int(workers) < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if bool(workers) == bool(address):
        raise InputError("give either a number of local workers or the address of a Dask scheduler")
    on_error = on_error or log.error
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if address:  # a remote worker has its own working folder: it gets absolute paths (shown so in the reports)
        inputs = [os.path.abspath(p) for p in inputs]
    model_path = Path(model_path).resolve()
    load_checkpoint(model_path)  # a broken model fails here, once, not on every worker
    model_sha256 = file_sha256(model_path)
    opts = CaseOptions(intensity, overlays, tuple(formats))
    settings = opts.settings(require_chest, bool(amp) and device != "cpu", z_step_mm)
    if workers and threads is None:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
    with Manifest(out_dir) as manifest:
        plan = plan_batch(inputs, manifest, model_sha256, settings, min_slices, on_error, resume)
        results = {}
        if plan.todo:
            client, cluster = _start(workers, address, memory_limit, dashboard, timeout)
            try:
                info = client.scheduler_info()
                n = len(info.get("workers", {}))
                if not n:
                    log.warning("the Dask scheduler at %s has no worker yet: the cases wait for workers to join",
                                address)
                log.info("Dask: %s, %d worker(s)%s", address or f"local cluster {client.scheduler.address}", n,
                         f"; dashboard {client.dashboard_link}" if dashboard or address else "")
                kw = {"device": device, "batch_size": batch_size, "require_chest": require_chest, "amp": amp,
                      "z_step_mm": z_step_mm}
                # one name per model and predictor settings: another batch on the same cluster keeps its own
                name = f"hybrid-ct-predictor-{model_sha256[:12]}-{settings_key({**kw, 'threads': threads})[:8]}"
                try:
                    client.register_plugin(PredictorPlugin(str(model_path), model_sha256, kw, threads), name=name)
                except ModelNotReadyError:
                    raise
                except Exception as e:  # noqa: BLE001
                    if _lost(e):
                        raise ClusterError(f"lost the Dask scheduler before any case ran: {error_message(e)}") \
                            from None
                    raise ModelNotReadyError(f"a worker could not load the model: {error_message(e)}") from None
                results = _run(client, plan, opts, manifest, name, progress, on_error, retries, address)
            finally:
                with contextlib.suppress(Exception):
                    client.close(timeout=10)
                if cluster is not None:
                    nanny = logging.getLogger("distributed.nanny")
                    level = nanny.level
                    nanny.setLevel(logging.ERROR)  # "worker process still alive after 4 s, killing": at the end
                    with contextlib.suppress(Exception):
                        cluster.close(timeout=30)
                    nanny.setLevel(level)
        return finish(plan, results, manifest)
