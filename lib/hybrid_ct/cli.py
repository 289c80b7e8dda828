"""``hybrid-ct``: predict, train, evaluate, phantoms, download.

    hybrid-ct predict scan.nii.gz dicom_dir/ slice.png --out results/            # the shipped model
    hybrid-ct predict pacs_export/ --out results/ --workers 2                    # a local Dask cluster
    hybrid-ct predict /shared/pacs/ --out /shared/results/ --cluster tcp://scheduler:8786
    hybrid-ct train --recipe shipped --out lib/hybrid_ct/net/models/pretrained.pt --twin-out runs/twin.pt
    hybrid-ct evaluate --twin runs/twin.pt --out docs/results.md
    hybrid-ct evaluate --twin runs/twin.pt --loso runs/loso_*.pt     # + leave-one-source-out (scripts/loso.sh)
    hybrid-ct phantoms --out phantoms/ -n 20
    hybrid-ct download covid19-ct-seg --dest data/

Each command is a thin layer over one library call: ``runner.predict_batch`` (``cluster.predict_on_cluster``
with ``--workers`` / ``--cluster``), ``pipeline.train_recipe``,
``evaluation.evaluate_checkpoints`` + ``reporting.write_results``, ``phantom.write_phantom_set``,
``download.download``. The default model is ``model_files.default_model_path()`` ($HYBRID_CT_MODEL, else
the checkpoint shipped in the package); relative default paths are relative to the current folder.

Exit status: 0 success; 3 ``predict`` refused some inputs (not readable as a chest CT: listed in
summary.csv with status "refused" and the reason) and ran the others, or ran nothing because every DICOM
series it found was skipped; 1 some inputs failed unexpectedly (status "error"); 2 bad usage, no input,
no model, a failed command, or the Dask scheduler lost mid-run (what finished is in <out>/manifest.jsonl: the
same command goes on from there). DICOM series skipped in a folder (localizer, non-CT, too few slices,
unreadable: status "skipped") do not change the exit status when something else ran.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hybrid_ct.errors import InputError, ModelNotReadyError
from hybrid_ct.net.model_files import PACKAGED_MODEL
from hybrid_ct.train.recipe_files import HOLD_OUT_SOURCES, recipe_names

TWIN_OUT = Path("runs") / "twin.pt"
RESULTS_OUT = Path("docs") / "results.md"


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("PIL", "matplotlib", "urllib3", "distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _device(name: str) -> str:
    from hybrid_ct.net.device import choose_device

    return choose_device(name, strict=True)


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _model_arg(path):
    """``--model`` as given, else ``model_files.default_model_path()``."""
    from hybrid_ct.net.model_files import default_model_path

    return path or default_model_path()


def _command(args) -> str:
    return "hybrid-ct " + " ".join(args.argv)


# ----------------------------------------------------------------------------------------------------
# commands

def cmd_predict(args) -> int:
    if args.min_slices < 1:
        raise InputError(f"--min-slices must be at least 1, got {args.min_slices}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    formats = ("nifti", args.format) + (("report",) if args.report else ())
    if args.workers is not None or args.cluster:
        from hybrid_ct.predict.cluster import ClusterError, predict_on_cluster

        if args.workers is not None and args.cluster:
            raise InputError("--workers starts a local cluster, --cluster uses a running one: not both")
        if args.compile:
            raise InputError("--compile is for a local run (each cluster worker would compile on its own)")
        try:
            rows = predict_on_cluster(
                _model_arg(args.model), args.inputs, out_dir, workers=args.workers, address=args.cluster,
                intensity=args.intensity, overlays=args.overlays, formats=formats, min_slices=args.min_slices,
                device=args.device, batch_size=args.batch_size, require_chest=not args.no_chest_check, amp=args.amp,
                z_step_mm=args.z_step_mm, threads=args.threads, memory_limit=args.memory_limit,
                dashboard=None if args.dashboard == "none" else args.dashboard, progress=not args.quiet,
                on_error=_error, resume=not args.no_resume)
        except ClusterError as e:
            _error(str(e))
            return 2
    else:
        from hybrid_ct.predict.manifest import file_sha256
        from hybrid_ct.predict.predictor import Predictor
        from hybrid_ct.predict.runner import predict_batch

        model = _model_arg(args.model)
        predictor = Predictor.from_checkpoint(model, device=_device(args.device), batch_size=args.batch_size,
                                              require_chest=not args.no_chest_check, amp=args.amp,
                                              z_step_mm=args.z_step_mm, compile_net=args.compile)
        rows = predict_batch(predictor, args.inputs, out_dir, args.intensity, args.overlays, progress=not args.quiet,
                             on_error=_error, formats=formats, min_slices=args.min_slices,
                             model_sha256=file_sha256(model), resume=not args.no_resume)
    ok, refused, skipped, failed = (sum(r["status"] == s for r in rows) for s in ("ok", "refused", "skipped", "error"))
    print(f"{ok}/{len(rows) - skipped} case(s) predicted, {refused} refused, {skipped} DICOM series skipped; "
          f"summary: {out_dir / 'summary.csv'}")
    if not rows:
        return 2
    # skipped series (localizers, non-CT...) are listed, not failures; but a run where nothing ran is not a success
    return 1 if failed else 3 if refused or not ok else 0


def cmd_train(args) -> int:
    from hybrid_ct.train.build import train_recipe
    from hybrid_ct.train.recipes import resolve_recipe
    from hybrid_ct.evaluate.results_doc import training_card, update_model_card

    recipe = resolve_recipe(args.recipe, epochs=args.epochs, max_iters=args.max_iters, batch_size=args.batch_size,
                            seed=args.seed, phantoms=args.phantoms, limit=args.limit, sources=args.sources,
                            no_weak_lung=args.no_weak_lung, extra=args.extra, hold_out=args.hold_out_source,
                            in_size=args.in_size, fine_tune_epochs=args.fine_tune_epochs)
    if args.twin_only and args.model_card:
        raise InputError("--model-card describes the shipped hybrid model: not with --twin-only")
    out = Path(args.out)
    results, meta, total = train_recipe(recipe, args.data, out, args.twin_out, device=_device(args.device),
                                        no_twin=args.no_twin, progress=not args.quiet, command=_command(args),
                                        twin_only=args.twin_only, twin_from=args.twin_from)
    speeds = ", ".join(f"{k} {r['s_per_iter']:.2f} s/iteration" for k, r in results.items())
    held = f", {args.hold_out_source} held out" if args.hold_out_source else ""
    print(f"trained in {total / 60:.1f} min: {speeds}{held}; model {out}")
    if args.model_card:
        update_model_card(args.model_card, "training", training_card(results, meta, total, out))
    return 0


def cmd_replay(args) -> int:
    from hybrid_ct.train.replay import rebuild_replay

    path, n = rebuild_replay(args.model, args.data, args.out, progress=not args.quiet)
    print(f"{n} replay slices -> {path}")
    return 0


def cmd_evaluate(args) -> int:
    from hybrid_ct.evaluate.validation import evaluate_checkpoints
    from hybrid_ct.files import jsonable
    from hybrid_ct.evaluate.results_doc import metrics_card, scan_extras, smoke_note, update_model_card, write_results

    out = Path(args.out)
    img_dir = Path(args.img_dir) if args.img_dir else out.parent / "img"
    results, recipe, _, weak = evaluate_checkpoints(
        _model_arg(args.model), args.twin, data=args.data, limit=args.limit, skip_scan_check=args.skip_scan_check,
        min_lesion_mm2=args.min_lesion_mm2, img_dir=img_dir, progress=not args.quiet,
        orientation=not args.skip_orientation)
    loso = None
    if args.loso:
        from hybrid_ct.evaluate.pictures import loso_results

        loso = loso_results(args.loso, data=args.data, progress=not args.quiet)
    write_results(results, recipe, weak, out, img_dir, _command(args), args.min_lesion_mm2, loso=loso)
    extra = scan_extras(results, out, img_dir)
    if extra:
        out.write_text(out.read_text(encoding="utf-8").rstrip() + "\n\n" + extra, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(jsonable(results), indent=1), encoding="utf-8")
    print(f"wrote {out}")
    if args.model_card:
        update_model_card(args.model_card, "metrics", metrics_card(results, out, Path(args.model_card),
                                                                   smoke_note(results, recipe)))
    return 0


def cmd_phantoms(args) -> int:
    from hybrid_ct.data.phantom import write_phantom_set

    paths = write_phantom_set(args.out, n=args.n, seed=args.seed, shape=tuple(args.shape))
    print(f"wrote {len(paths)} phantoms to {args.out} (labels in labels/final, list in phantoms.csv)")
    return 0


def cmd_scan_check(args) -> int:
    from hybrid_ct.evaluate.scan_check import run_scan_check

    res = run_scan_check(_model_arg(args.model), args.out, args.data, args.phantoms, args.write_calibration,
                         command=_command(args))
    for r in res["held_out"]:
        print(f"{r['name']}: {r['label']} (P {r['probability']:.3f}, score {r['score']:.3f}), "
              f"infection {r['infection_ml']:.1f} mL -> {'found' if r['infection_found'] else 'none'}")
    print(f"wrote {args.out}" + (" and the calibration beside the model" if args.write_calibration else ""))
    return 0


def cmd_download(args) -> int:
    from hybrid_ct.data.download import REGISTRY, download

    if args.list or not args.name:
        for name, spec in REGISTRY.items():
            how = "manual" if spec.manual else "automatic"
            print(f"{name:16s} {how:9s} {spec.title} [{spec.license}]")
        return 0 if args.list else 2
    if not args.dest:
        raise InputError("--dest DIR is required")
    s = download(args.name, args.dest, base_url=args.base_url, verify_checksums=not args.no_verify,
                 include_optional=args.include_optional, keep_archives=args.keep_archives, progress=not args.quiet)
    print(f"prepared {args.name} in {s['path']} ({', '.join(f'{k} {v}' for k, v in s.items() if k in ('cases', 'pictures'))}); "
          f"license: {s['license']}; train on it with: hybrid-ct train --extra {s['path']} ...")
    return 0


# ----------------------------------------------------------------------------------------------------
# parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid-ct", description="Hybrid spiking multi-task network for chest CT: "
                                "lung + infection segmentation and COVID-19 classification.")
    p.add_argument("-v", "--verbose", action="count", default=1, help="more logging (-vv debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; "
                   "1 is faster on a machine shared with other jobs)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pr = sub.add_parser("predict", help="segment + classify NIfTI / DICOM / 2D PNG-JPG-NPY inputs",
                        description="Folders are walked, nested folders included (a PACS export: "
                                    "patient/study/series), for DICOM series by SeriesInstanceUID: each CT series "
                                    "is its own case, named patient_study_series_<UID suffix>, also when one folder "
                                    "holds several series; localizers / scouts, non-CT series, secondary captures, "
                                    "series with too few slices and unreadable files are listed in summary.csv as "
                                    "'skipped' with the reason, never run. A folder holding one series is one case "
                                    "named after the folder.",
                        epilog="exit status: 0 every input ran; 3 some inputs were refused (summary.csv: status "
                               "'refused' and why), the others ran, or nothing ran because every DICOM series found "
                               "was skipped; 1 some inputs failed unexpectedly; 2 bad usage, no input or no model, or the Dask "
                               "scheduler lost (rerun: finished cases are not run again). "
                               "Skipped DICOM series (status 'skipped') do not count when something else ran")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI file, DICOM file, DICOM folder or PACS export "
                    "tree (one case per CT series), PNG/JPG/NPY slice, or a folder of such files (each file is "
                    "one case)")
    pr.add_argument("--model", default=None, help="checkpoint (default: $HYBRID_CT_MODEL, else the shipped model)")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--intensity", choices=("auto", "hu", "8bit", "8bit-auto"), default="auto",
                    help="hu: Hounsfield units; 8bit: 0..255 pictures windowed W1500/L-600; 8bit-auto: 0..255 "
                         "pictures of unknown window, calibrated on their own lung and soft-tissue levels; "
                         "auto (default): 8bit-auto for PNG/JPG and uint8 NPY, hu otherwise")
    pr.add_argument("--overlays", type=int, default=3, help="overlay slices per case (0: none)")
    pr.add_argument("--format", choices=("nifti", "dicom-seg"), default="nifti",
                    help="dicom-seg: a DICOM input also gets <case>_seg.dcm, a DICOM-SEG referencing its series, "
                         "beside the NIfTI label (other inputs: NIfTI only)")
    pr.add_argument("--report", action="store_true",
                    help="also write <case>_report.pdf: one page with the call, burden, grade and 3 slices (+ .png)")
    pr.add_argument("--no-chest-check", action="store_true", help="skip the 'is this a chest CT' check")
    pr.add_argument("--min-slices", type=int, default=3, metavar="N",
                    help="DICOM series found in a folder with fewer slices are skipped (default 3; 1 runs "
                         "single-slice series too; a DICOM file given as input always runs)")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--device", default="auto", help="auto (default: cuda when available) | cpu | cuda[:N]")
    pr.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA (ignored on the CPU)")
    pr.add_argument("--compile", action="store_true",
                    help="torch.compile the network first (minutes once per model and torch version, then cached in "
                         "$HYBRID_CT_COMPILE_CACHE or ~/.cache/hybrid_ct/compile): pays off on many cases")
    pr.add_argument("--z-step-mm", type=float, default=None, metavar="MM",
                    help="on a series thinner than this, run the network on slices MM apart and interpolate "
                         "between them (default: every slice; docs/benchmarks.md, thin series)")
    pr.add_argument("--no-resume", action="store_true",
                    help="run every case again (default: cases that <out>/manifest.jsonl lists as done with the "
                         "same input files, model and settings, their outputs intact, are not run again)")
    cl = pr.add_argument_group("on a Dask cluster (pip install 'hybrid-ct[cluster]'; docs/cluster.md)")
    cl.add_argument("--workers", type=int, default=None, metavar="N",
                    help="start a local Dask cluster of N worker processes on this machine (each loads the model "
                         "once; torch threads per worker: --threads, default cores / N)")
    cl.add_argument("--cluster", default=None, metavar="ADDRESS",
                    help="use a running Dask scheduler, e.g. tcp://scheduler:8786; inputs, output folder and model "
                         "must be at the same paths on every worker (shared storage)")
    cl.add_argument("--memory-limit", default="auto", metavar="BYTES",
                    help="per local worker, e.g. 6GB (default auto: the machine's memory shared by the workers); "
                         "a worker over it is restarted and its case runs elsewhere (a 512x512x600 scan peaks "
                         "at about 4.7 GB, docs/cluster.md)")
    cl.add_argument("--dashboard", default=":8787", metavar="ADDRESS",
                    help="the local cluster's Dask dashboard (default :8787, another port when taken; none: off)")
    pr.set_defaults(func=cmd_predict)

    tr = sub.add_parser("train", help="train the hybrid network and its CNN twin by a recipe")
    tr.add_argument("--recipe", choices=recipe_names(), default="shipped")
    tr.add_argument("--out", default=str(PACKAGED_MODEL), help="hybrid checkpoint (default: the shipped model "
                    "inside the package, hybrid_ct/net/models/pretrained.pt)")
    tr.add_argument("--twin-out", default=str(TWIN_OUT), help="CNN twin checkpoint (default: runs/twin.pt)")
    tr.add_argument("--no-twin", action="store_true", help="train the hybrid network only")
    tr.add_argument("--twin-from", default=None, help="a complete CNN twin of this recipe and split: skip its "
                    "training, convert and fine-tune only (e.g. to redo the hybrid stage of a build)")
    tr.add_argument("--twin-only", action="store_true", help="train the CNN twin only, into --out (quick "
                    "experiments, e.g. scripts/loso.sh)")
    tr.add_argument("--hold-out-source", choices=HOLD_OUT_SOURCES, default=None,
                    help="leave this collection out of training: all its slices become validation "
                         "(leave-one-source-out; see hybrid-ct evaluate --loso)")
    tr.add_argument("--data", default=None, help="real data folder (default: $HYBRID_CT_DATA or ../shared/data)")
    tr.add_argument("--extra", action="append", help="prepared download folder to add (repeatable)")
    tr.add_argument("--sources", default=None, help="comma list of real sources (medseg,cls2d,imlab,majun)")
    tr.add_argument("--no-weak-lung", action="store_true", help="MedSeg lung unknown instead of weak masks")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--max-iters", type=int, help="iterations per epoch (cap)")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--phantoms", type=int, help="number of phantoms")
    tr.add_argument("--limit", type=int, help="slices per source (0: all)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--fine-tune-epochs", type=int, help="epochs of spiking fine-tuning after the conversion "
                    "(recipes that start from the twin)")
    tr.add_argument("--in-size", type=int, help="model grid in pixels (a multiple of 2^(levels-1); the grid study "
                    "of scripts/twin_study.sh)")
    tr.add_argument("--device", default="auto", help="auto | cpu | cuda")
    tr.add_argument("--model-card", default=None, help="model card to fill (e.g. docs/model_card.md)")
    tr.set_defaults(func=cmd_train)

    rp = sub.add_parser("replay", help="rebuild a checkpoint's replay sample (<model>.replay.npz, what the app's "
                        "retraining mixes with corrections) from its own recipe and the real data")
    rp.add_argument("--model", default=str(PACKAGED_MODEL), help="checkpoint (default: the shipped model)")
    rp.add_argument("--data", default=None, help="real data folder (default: $HYBRID_CT_DATA or ../shared/data)")
    rp.add_argument("--out", default=None, help="default: <model>.replay.npz beside the checkpoint")
    rp.set_defaults(func=cmd_replay)

    ev = sub.add_parser("evaluate", help="validation metrics, energy, scan-level check -> results.md + PNGs")
    ev.add_argument("--model", default=None, help="checkpoint (default: $HYBRID_CT_MODEL, else the shipped model)")
    ev.add_argument("--twin", default=None, help="CNN twin checkpoint for the side-by-side columns")
    ev.add_argument("--out", default=str(RESULTS_OUT), help="results file (default: docs/results.md)")
    ev.add_argument("--img-dir", default=None, help="PNG folder (default: <out folder>/img)")
    ev.add_argument("--data", default=None)
    ev.add_argument("--limit", type=int, help="override the recipe's slices per source (0: all)")
    ev.add_argument("--skip-scan-check", action="store_true")
    ev.add_argument("--min-lesion-mm2", type=float, default=50.0, help="per-slice infection call threshold (the "
                    "scan-level check and the slice call agreeing with the infection head, diagnosis.slice_call)")
    ev.add_argument("--skip-orientation", action="store_true",
                    help="skip the MedSeg validation pictures turned by 0/90/180/270 degrees")
    ev.add_argument("--loso", nargs="+", metavar="CHECKPOINT", default=None,
                    help="leave-one-source-out checkpoints (hybrid-ct train --hold-out-source, scripts/loso.sh): "
                         "each scored on the collection it never saw, as a table in the results")
    ev.add_argument("--model-card", default=None, help="model card to fill (e.g. docs/model_card.md)")
    ev.add_argument("--json", default=None, help="also write the numbers as JSON (python -m hybrid_ct.evaluate.seeds reads it)")
    ev.set_defaults(func=cmd_evaluate)

    sc = sub.add_parser("scan-check", help="whole-scan call leave-one-scan-out on phantoms + real HU scans; "
                                           "calibration, noise floor, reliability plot")
    sc.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    sc.add_argument("--data", default=None, help="data root (default ../shared/data)")
    sc.add_argument("--out", default="docs/scan_call.md", help="Markdown table; the plot goes beside it (.png)")
    sc.add_argument("--phantoms", type=int, default=24, help="validation phantoms (unseen seeds)")
    sc.add_argument("--write-calibration", action="store_true",
                    help="write <model>.calibration.json (fitted on all validation scans) beside the model")
    sc.set_defaults(func=cmd_scan_check)

    ph = sub.add_parser("phantoms", help="write synthetic chest-CT phantoms (MONAI Label datastore layout)")
    ph.add_argument("--out", required=True)
    ph.add_argument("-n", type=int, default=20)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--shape", type=int, nargs=3, default=[48, 192, 192], metavar=("D", "H", "W"))
    ph.set_defaults(func=cmd_phantoms)

    dl = sub.add_parser("download", help="fetch + prepare a public data set (see --list)")
    dl.add_argument("name", nargs="?", help="data set name")
    dl.add_argument("--dest", help="destination folder")
    dl.add_argument("--base-url", help="mirror / local copy replacing the publisher's base URL")
    dl.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check (e.g. a re-packed mirror)")
    dl.add_argument("--include-optional", action="store_true", help="also fetch optional files")
    dl.add_argument("--keep-archives", action="store_true")
    dl.add_argument("--list", action="store_true", help="list the known data sets")
    dl.set_defaults(func=cmd_download)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except (InputError, ModelNotReadyError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
