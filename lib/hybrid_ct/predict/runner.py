"""One batch, resumable, whoever runs it: inputs -> cases (``batch.expand_inputs``) -> what is left to run
(``manifest.jsonl`` in the output folder, ``hybrid_ct.predict.manifest``) -> one row per case -> ``summary.csv``.

``predict_batch`` runs the cases in this process; ``hybrid_ct.predict.cluster`` runs the same plan on a Dask
cluster. Both write the same files, the same manifest and the same summary.csv (rows in input order: refused
inputs, skipped DICOM series, then the cases), so a batch started on one may be finished on the other.

    rows = predict_batch(Predictor.from_checkpoint(path), ["scan.nii.gz"], "results/", model_sha256=file_sha256(path))
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_ct.errors import InputError
from hybrid_ct.predict.batch import MIN_SERIES_SLICES, Case, expand_inputs, predict_case, write_summary
from hybrid_ct.predict.manifest import Manifest, input_fingerprint, output_facts, settings_key

log = logging.getLogger("hybrid_ct")

PACKAGE_VERSION = "0.1.0"  # pyproject.toml: outputs of another version of the code are made again


@dataclass(frozen=True)
class CaseOptions:
    """What ``predict_case`` is told besides the case (the same on every worker)."""
    intensity: str = "auto"
    overlays: int = 3
    formats: tuple = ("nifti",)

    def settings(self, require_chest: bool, amp: bool, z_step_mm: float | None = None) -> str:
        """The key of everything besides input and model that changes a case's outputs."""
        key = {"intensity": self.intensity, "overlays": int(self.overlays), "formats": sorted(set(self.formats)),
               "require_chest": bool(require_chest), "amp": bool(amp), "version": PACKAGE_VERSION}
        if z_step_mm:  # only when set: the manifests of earlier runs stay valid
            key["z_step_mm"] = float(z_step_mm)
        return settings_key(key)


@dataclass
class Plan:
    """A batch after the manifest was read: what runs and what is already done."""
    out_dir: Path
    model_sha256: str
    settings: str
    before: list = field(default_factory=list)  # rows never run: refused inputs, skipped DICOM series
    cases: list = field(default_factory=list)  # every case, in input order
    done: dict = field(default_factory=dict)  # case name -> its recorded row (done and valid)
    fingerprints: dict = field(default_factory=dict)  # case name -> input fingerprint

    @property
    def todo(self) -> list:
        return [c for c in self.cases if c.name not in self.done]

    def rows(self, results: dict) -> list:
        """summary.csv rows: refused and skipped first, then each case run or done (in input order)."""
        return self.before + [self.done.get(c.name) or results[c.name] for c in self.cases
                              if c.name in self.done or c.name in results]


def model_identity(predictor, model_sha256: str | None = None) -> str:
    """The checkpoint file's sha256 when known, else a hash of the loaded weights (library callers)."""
    if model_sha256:
        return model_sha256
    h = hashlib.sha256(str(getattr(predictor, "meta", {}).get("version", "")).encode())
    for name, t in sorted(predictor.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return "weights:" + h.hexdigest()


def plan_batch(inputs, manifest: Manifest, model_sha256: str, settings: str, min_slices: int = MIN_SERIES_SLICES,
               on_error=None, resume: bool = True) -> Plan:
    """Expand the inputs (on this machine: folders are walked, DICOM headers read) and look each case up in
    the manifest; ``resume=False`` runs every case again."""
    on_error = on_error or log.error
    cases, problems = expand_inputs(inputs, min_slices)
    plan = Plan(manifest.out_dir, model_sha256, settings)
    for p, msg in problems:
        on_error(msg)
        plan.before.append({"case": Path(p).name, "input": p, "status": "refused", "error": msg})
    for case in (c for c in cases if c.skipped):
        log.warning("skipped %s (%s): %s", case.name, case.series or case.path, case.skipped)
        plan.before.append({"case": case.name, "input": str(case.path), "kind": case.kind, "status": "skipped",
                            "error": case.skipped, "series_uid": case.series_uid})
    plan.cases = [c for c in cases if not c.skipped]
    for c in plan.cases:
        plan.fingerprints[c.name] = input_fingerprint(c.path, c.files, c.kind, c.series_uid)
        row = manifest.done(c.name, plan.fingerprints[c.name], model_sha256, settings) if resume else None
        if row is not None:
            plan.done[c.name] = row
    if plan.done:
        log.info("%d of %d case(s) already done in %s (%s): not run again", len(plan.done), len(plan.cases),
                 manifest.out_dir, manifest.path.name)
    return plan


def case_outputs(out_dir, name: str) -> list:
    """The files a finished case wrote (its JSON report names them)."""
    out_dir = Path(out_dir)
    report = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
    names = [f"{name}.json"]
    for key, value in (report.get("outputs") or {}).items():
        if value and not key.endswith("_note"):
            names.append(str(value))
            if key == "report" and (out_dir / value).with_suffix(".png").is_file():
                names.append(Path(value).with_suffix(".png").name)
    return names


def refused_row(case: Case, msg: str) -> dict:
    return {"case": case.name, "input": str(case.path), "kind": case.kind, "status": "refused", "error": msg,
            "series_uid": case.series_uid}


def error_row(case: Case, msg: str) -> dict:
    return {"case": case.name, "input": str(case.path), "kind": case.kind, "status": "error", "error": msg,
            "series_uid": case.series_uid}


def error_message(e: BaseException) -> str:
    return f"{e.__class__.__name__}: {' '.join(str(e).split())}"


def attempt(predictor, case: Case, out_dir, opts: CaseOptions) -> tuple:
    """Run one case -> (row, output facts). The input's own problem (InputError: unreadable, not a chest...)
    is a "refused" row; any other exception is raised (the caller reports it, a cluster retries it first)."""
    out_dir = Path(out_dir)
    try:
        row = predict_case(predictor, case, out_dir, opts.intensity, opts.overlays, opts.formats)
    except InputError as e:
        msg = " ".join(str(e).split())
        if "not a chest" in msg:
            msg += " (--no-chest-check skips this check)"
        return refused_row(case, msg), {}
    log.info("%s: %s p=%.3f burden %.2f %% %s", case.name, row["class"], row["probability"],
             row["burden_total_pct"], row["grade"])
    return row, output_facts(out_dir, case_outputs(out_dir, case.name))


def finish(plan: Plan, results: dict, manifest: Manifest) -> list:
    """summary.csv of the whole batch (done before + run now), the manifest compacted -> rows."""
    rows = plan.rows(results)
    write_summary(rows, plan.out_dir / "summary.csv")
    manifest.compact()
    return rows


def predict_batch(predictor, inputs, out_dir, intensity: str = "auto", overlays: int = 3, progress: bool = True,
                  on_error=None, formats=("nifti",), min_slices: int = MIN_SERIES_SLICES,
                  model_sha256: str | None = None, resume: bool = True) -> list:
    """Predict every case of ``inputs`` (see ``expand_inputs``) into ``out_dir``; one bad case does not stop
    the batch. Writes ``summary.csv`` and returns its rows: ``status`` "ok", "refused" (the input cannot be
    read as a chest CT: ``io.read_image`` / ``io.check_ct`` raised InputError; ``error`` says why),
    "skipped" (a DICOM series found in a folder that is not a CT volume to run: localizer / scout,
    non-CT, too few slices, unreadable; ``error`` says which; not run) or "error" (an unexpected failure).
    ``on_error(message)`` is told about each refused or failed input (default: logged). Cases that
    ``out_dir/manifest.jsonl`` lists as done with this input, model (``model_sha256`` of the checkpoint
    file, else a hash of the weights) and settings, their outputs intact, are not run again
    (``resume=False``: all are)."""
    from tqdm import tqdm

    on_error = on_error or log.error
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = CaseOptions(intensity, overlays, tuple(formats))
    settings = opts.settings(predictor.require_chest, predictor.amp, getattr(predictor, "z_step_mm", None))
    with Manifest(out_dir) as manifest:
        plan = plan_batch(inputs, manifest, model_identity(predictor, model_sha256), settings, min_slices,
                          on_error, resume)
        results = {}
        todo = plan.todo
        for case in tqdm(todo, desc="predict", unit="case", disable=not progress or len(todo) < 2):
            try:
                row, outputs = attempt(predictor, case, out_dir, opts)
            except Exception as e:  # noqa: BLE001 - one bad case must not stop the batch
                log.debug("traceback", exc_info=True)
                row, outputs = error_row(case, error_message(e)), {}
            if row["status"] != "ok":
                on_error(f"{case.path}: {row['error']}")
            manifest.record(case.name, str(case.path), plan.fingerprints[case.name], plan.model_sha256,
                            plan.settings, row, outputs)
            results[case.name] = row
        return finish(plan, results, manifest)
