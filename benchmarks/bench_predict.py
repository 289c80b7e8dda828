"""Where the time goes in one ``Predictor.predict`` (issue 16, point 1: "a profile first"). Not a test.

Replays ``hybrid_ct.predict.predictor.Predictor.predict`` step by step with the same public functions and
times each stage, on the shipped model (``hybrid_ct.net.model_files.default_model_path()``):

    read          io.read_image (DICOM folder / .nii.gz)
    checks        imaging.chest.check_ct
    pre           transforms.pre_transforms, one transform at a time:
                    to tensor, reorient (LPS), body mask (BodyMaskd = io.body_mask on the canonical
                    volume), lung window, slice grid (pad + resample to the model size)
    network       Predictor.run_slices inside energy.EnergyMeter
    post          transforms.post_transforms, one transform at a time:
                    to MetaTensor, invert (resample back to the input grid), probabilities -> label,
                    keep_lung_components (3D components + body rule)
    anatomy       anatomy.plausible_lungs (the 3D anatomy rule)
    to image      preprocess.array_to_image
    report        Predictor._report (features, call, burden, energy summary)
    write         io.write_image to a temporary .nii.gz

At the end of each input the staged label is compared with ``Predictor.predict``'s label on the same
image (must be identical, so the profile measures the real path), and ``predict`` is timed once for
comparison with the sum of the stages. Inputs: COVID-CT-MD P001 (512 x 512 x 148 DICOM, read-only)
and a 512 x 512 x 150 phantom (``make_phantom(seed, shape=(150, 512, 512))``, written to a temporary
.nii.gz so that "read" reads a file). Each thread count (``torch.set_num_threads``) runs in a fresh
subprocess; on a machine with CUDA the same is also timed on the GPU.

    python benchmarks/bench_predict.py --quick                          # smoke: 64-slice phantom, 1 thread, 1 run
    python benchmarks/bench_predict.py --repeats 3 --threads 1,2 --out docs/benchmarks.md

``--compile-ab N`` (issue 30): one process, ``--threads`` threads, P001 (or the phantom): an eager ``Predictor``
and a compiled one (``compile_net=True``, inductor's cache in ``--compile-cache``), ``predict`` alternated N
times each (eager, compiled, eager, ...), so both see the same, possibly shared, machine; per run the time
and the 1-minute load; the compiled label, call, burden and energy against the eager ones.

``--out`` replaces the section between ``<!-- bench_predict:start -->`` and ``<!-- bench_predict:end -->``
in that Markdown file (appends it when the markers are absent).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
P001 = Path("/work/shared/data/volumes_covid_ct_md/P001")
START, END = "<!-- bench_predict:start -->", "<!-- bench_predict:end -->"
TARGET_S = 10.0  # issue 16: a 512^2 x 150 scan end to end in <= 10 s on 2 cores

# (key, label, level): level 0 = a stage (summed into the total), 1 = a part of the stage above
ROWS = [
    ("read", "read (`io.read_image`)", 0),
    ("checks", "checks (`imaging.chest.check_ct`)", 0),
    ("pre", "pre-transforms (`transforms.pre_transforms`)", 0),
    ("pre:SitkToTensord", "to tensor", 1),
    ("pre:OrientToCanonicald", "reorient (LPS)", 1),
    ("pre:BodyMaskd", "body mask (`imaging.body.body_mask`)", 1),
    ("pre:LungSlabd", "lung slab (`crop.lung_slab`)", 1),
    ("pre:LungWindowd", "lung window", 1),
    ("pre:ToSliceGridd", "slice grid (pad + resample to the model size)", 1),
    ("network", "network (`run_slices` in `EnergyMeter`)", 0),
    ("post", "post-transforms (`transforms.post_transforms`)", 0),
    ("post:EnsureTyped", "to MetaTensor", 1),
    ("post:Invertd", "invert (resample back to the input grid)", 1),
    ("post:ProbsToLabeld", "probabilities → label", 1),
    ("post:KeepLungComponentsd", "`keep_lung_components` (3D components + body rule)", 1),
    ("anatomy", "3D anatomy rule (`PlausibleLungsd`, the last post-transform)", 0),
    ("to_image", "label to image (`array_to_image`)", 0),
    ("report", "report (`Predictor._report`)", 0),
    ("write", "write label (`io.write_image`, .nii.gz)", 0),
]
STAGES = [k for k, _, lvl in ROWS if lvl == 0]


# ----------------------------------------------------------------------------------------------- worker
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def staged_predict(predictor, path: str, out_path: str, device: str) -> tuple[dict, "object"]:
    """``Predictor.predict`` on the file at ``path``, step by step -> ({stage: seconds}, label array)."""
    import numpy as np
    from monai.transforms import apply_transform

    from hybrid_ct.imaging import reader as io
    from hybrid_ct.imaging.chest import check_ct
    from hybrid_ct.net.energy import EnergyMeter
    from hybrid_ct.processing.grid import array_to_image, check_size
    from hybrid_ct.processing.transforms import post_transforms, pre_transforms

    t: dict[str, float] = {}

    def clock(key, fn, *a, **kw):
        _sync(device)
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        _sync(device)
        t[key] = t.get(key, 0.0) + time.perf_counter() - t0
        return r

    def chain(prefix, compose, data):  # a Compose, one transform at a time (what Compose.__call__ does)
        for tr in compose.transforms:
            data = clock(f"{prefix}:{type(tr).__name__}", apply_transform, tr, data)
        t[prefix] = sum(v for k, v in t.items() if k.startswith(prefix + ":"))
        return data

    image = clock("read", io.read_image, path)
    t_start = time.perf_counter()  # predict's own latency clock starts after the read
    clock("checks", check_ct, image, require_chest=predictor.require_chest)
    pre = pre_transforms(check_size(predictor.model.cfg.in_size), **predictor.model.cfg.input_spec())
    data = chain("pre", pre, {"image": image, "hu": image})

    def network():
        with EnergyMeter(predictor.model) as meter:
            if hasattr(predictor, "run_volume"):  # the lung slab (issue 16); a --baseline commit may predate it
                so = predictor.run_volume(data, meter)
            else:
                so = predictor.run_slices(data["image"].as_tensor().numpy(), meter)
        return so, meter

    so, meter = clock("network", network)
    data["pred"] = np.concatenate([so.lung, so.infection], axis=1)
    out = chain("post", post_transforms(pre), data)
    label_arr = out["label"]
    t["anatomy"] = t.get("post:PlausibleLungsd", 0.0)  # the 3D rules, the last step of the post chain
    t["post"] -= t["anatomy"]
    label = clock("to_image", array_to_image, label_arr, image)
    clock("report", predictor._report, label, label_arr, so, meter, time.perf_counter() - t_start)
    clock("write", io.write_image, label, out_path)
    t["total"] = sum(t[k] for k in STAGES)
    t["slices_run"] = int(so.ran.sum()) if getattr(so, "ran", None) is not None else len(so.positive_prob)
    return t, label_arr


def worker(args) -> None:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from tqdm import tqdm

    from hybrid_ct.imaging import reader as io
    from hybrid_ct.predict.predictor import Predictor
    from hybrid_ct.net.model_files import default_model_path
    from hybrid_ct.data.phantom import make_phantom

    import hybrid_ct

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model_path = default_model_path()
    predictor = Predictor.from_checkpoint(model_path, device=args.device)
    load_s = time.perf_counter() - t0
    result = {"threads": torch.get_num_threads(), "device": args.device, "model": str(model_path),
              "model_version": predictor.version, "load_s": load_s, "inputs": {}, "code": args.code,
              "library": str(Path(hybrid_ct.__file__).parent), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        inputs = []
        if not args.quick and P001.is_dir():
            inputs.append(("P001", str(P001)))
        shape = (64, 512, 512) if args.quick else (150, 512, 512)
        img, _, _ = make_phantom(0, shape=shape)
        ph_path = os.path.join(tmp, "phantom.nii.gz")
        io.write_image(img, ph_path)
        inputs.append((f"phantom {shape[2]}×{shape[1]}×{shape[0]}", ph_path))

        bar = tqdm(total=len(inputs) * (args.repeats + 1), desc=f"{args.device} {args.threads} thr",
                   unit="run", file=sys.stderr, disable=args.no_progress)
        for name, path in inputs:
            runs, label_arr = [], None
            for _ in range(args.repeats):
                times, label_arr = staged_predict(predictor, path, os.path.join(tmp, "label.nii.gz"), args.device)
                runs.append(times)
                bar.update()
            image = io.read_image(path)
            _sync(args.device)
            t1 = time.perf_counter()
            ref_label, report = predictor.predict(image)
            _sync(args.device)
            predict_s = time.perf_counter() - t1
            bar.update()
            ref = sitk.GetArrayFromImage(ref_label)
            same = bool(np.array_equal(ref, label_arr))
            if not same:
                raise AssertionError(f"{name}: the staged label differs from Predictor.predict's "
                                     f"({int((ref != label_arr).sum())} voxels)")
            result["inputs"][name] = {"size": list(image.GetSize()), "runs": runs, "predict_s": predict_s,
                                      "label_equal": same, "slices_to_network": runs[-1]["slices_run"],
                                      "label_sha": _digest(label_arr)}
        bar.close()
    result["load_after"] = os.getloadavg()
    print("@@RESULT@@" + json.dumps(result), flush=True)


def compile_ab(args) -> None:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from hybrid_ct.imaging import reader as io
    from hybrid_ct.net.model_files import default_model_path
    from hybrid_ct.predict.predictor import Predictor
    from hybrid_ct.data.phantom import make_phantom

    torch.set_num_threads(args.threads)
    path = default_model_path()
    eager = Predictor.from_checkpoint(path)
    t0 = time.perf_counter()
    comp = Predictor.from_checkpoint(path, compile_net=True, compile_cache=args.compile_cache)
    res = {"threads": torch.get_num_threads(), "compile_load_s": time.perf_counter() - t0,
           "compile_s": comp.compiled.compile_s if comp.compiled else None, "compile_error": comp.compile_error,
           "runs": []}
    image = io.read_image(str(P001)) if P001.is_dir() else make_phantom(0, shape=(150, 512, 512))[0]
    res["input"] = "P001" if P001.is_dir() else "phantom 512x512x150"
    out = {}
    for i in range(args.compile_ab):
        for name, pred in (("eager", eager), ("compiled", comp)):
            load = os.getloadavg()[0]
            t1 = time.perf_counter()
            lab, rep = pred.predict(image)
            res["runs"].append({"mode": name, "s": time.perf_counter() - t1, "load_1min": load})
            out[name] = (sitk.GetArrayFromImage(lab), rep)
            print(f"{name} run {i + 1}: {res['runs'][-1]['s']:.2f} s (load {load:.1f})", file=sys.stderr, flush=True)
    (a, ra), (b, rb) = out["eager"], out["compiled"]
    res["agreement"] = {
        "label_voxels_differ": int((a != b).sum()), "label_voxels": int(a.size),
        "call": [ra["classification"]["label"], rb["classification"]["label"]],
        "score": [ra["classification"].get("score"), rb["classification"].get("score")],
        "burden": [ra["burden"], rb["burden"]], "energy": [ra["energy"], rb["energy"]],
        "max_slice_probability_diff": float(np.max(np.abs(np.subtract(
            ra["classification"]["slice_probability"], rb["classification"]["slice_probability"])))),
    }
    print("@@RESULT@@" + json.dumps(res), flush=True)


def _digest(arr) -> str:
    import hashlib

    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- driver
def _load_line(results) -> str:
    """Whether other work shared the machine: the 1-minute load average when each worker started (the
    previous worker of this benchmark still counts in it for a minute)."""
    top = max(r["load_before"][0] for r in results)
    cores = os.cpu_count() or 1
    if top > 0.5 * cores + 1:
        return (f"Other work shared the machine while this ran (load average up to {top:.1f} on {cores} cores at "
                "a worker's start), so the timings are noisy.")
    return (f"No other work ran (load average at most {top:.1f} on {cores} cores at a worker's start, this "
            "benchmark's previous worker included).")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def baseline_lib(ref: str, tmp: str) -> str:
    """The library (``lib/``) of commit ``ref``, extracted to ``tmp``: the "before" of a comparison."""
    out = Path(tmp) / "baseline"
    out.mkdir()
    arc = subprocess.run(["git", "-C", str(REPO), "archive", ref, "lib"], stdout=subprocess.PIPE, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=arc, check=True)
    return str(out / "lib")


def run_config(threads: int, device: str, args, lib: str | None = None, code: str = "this tree") -> dict:
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--device", device,
           "--repeats", str(args.repeats), "--code", code] + (["--quick"] if args.quick else []) + \
          (["--no-progress"] if args.no_progress else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    lib = lib or str(REPO / "lib")  # this tree's library first, whatever the venv's editable install points at
    env["PYTHONPATH"] = os.pathsep.join([lib] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                 if p and not p.rstrip("/").endswith("/lib")])
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr (tqdm) passes through
    if p.returncode != 0:
        sys.stdout.write(p.stdout)
        raise SystemExit(f"worker ({device}, {threads} threads) failed with exit code {p.returncode}")
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("@@RESULT@@"))
    return json.loads(line[len("@@RESULT@@"):])


def _cell(values) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} ({min(values):.2f}–{max(values):.2f})"


def render(results: list, args, gpu_line: str, command: str) -> str:
    cols = []  # (header, runs, predict_s)
    for r in results:
        for name, d in r["inputs"].items():
            dev = "" if r["device"] == "cpu" else f", {r['device']}"
            code = f", {r['code']}" if args.baseline else ""
            cols.append((f"{name}, {r['threads']} thr{dev}{code}", d["runs"], d["predict_s"]))
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    r0 = results[0]
    lines = [
        "## Where the time goes in `predict` (`benchmarks/bench_predict.py`, issue 16)",
        "",
        f"{now}; {os.cpu_count()} cores (`nproc`), {_cpu_model()}; torch {_torch_version()}; model "
        f"`{Path(r0['model']).name}` ({r0['model_version']}). **{gpu_line}**. {_load_line(results)} Each "
        f"cell is the median of {args.repeats} runs with the spread (min–max) in brackets, never the best run. Each thread count "
        "ran in a fresh process (`torch.set_num_threads`, `OMP_NUM_THREADS`). Indented rows are parts of "
        "the stage above them; the total is the sum of the stages (the read included). The staged run's "
        "label equals `Predictor.predict`'s on every input (checked by the script); `predict` itself "
        "(without the read) was timed once per input for comparison.",
        "",
        "```",
        command,
        "```",
        "",
        "| stage (seconds) | " + " | ".join(h for h, _, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for key, label, level in ROWS + [("total", "**total**", 0), ("slices_run", "slices the network ran on", 0)]:
        name = ("&nbsp;&nbsp;&nbsp;↳ " + label) if level else label
        cells = []
        for _, runs, _ in cols:
            vals = [r.get(key, 0.0) for r in runs]
            cell = str(int(vals[-1])) if key == "slices_run" else _cell(vals)
            cells.append(f"**{cell}**" if key == "total" else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| `Predictor.predict` alone (1 run, no read) | " +
                 " | ".join(f"{p:.2f}" for _, _, p in cols) + " |")
    lines.append("| load average (1 min) at the worker's start → end | " + " | ".join(
        f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}" for r in results for _ in r["inputs"]) + " |")
    lines.append("")
    lines.append(summary_line(cols))
    if args.baseline:
        lines.append("")
        lines.append(compare_line(results))
    noisy = [h for h, runs, _ in cols if len(runs) > 1 and
             max(r["total"] for r in runs) > 1.5 * min(r["total"] for r in runs)]
    if noisy:
        lines.append("")
        lines.append("Contention: the total varied by more than 1.5× between runs in " + ", ".join(noisy) +
                     " (another process on the shared cores stalls the threads of the network); the "
                     "minimum there shows what the configuration reaches on an idle machine, the median "
                     "what it gets on this shared one.")
    return "\n".join(lines) + "\n"


def summary_line(cols) -> str:
    parts = []
    for header, runs, _ in cols:
        med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in STAGES + ["total"]}
        top = max(STAGES, key=lambda k: med[k])
        label = next(lab for k, lab, _ in ROWS if k == top)
        parts.append(f"{header}: {label} {med[top]:.1f} s of {med['total']:.1f} s ({100 * med[top] / med['total']:.0f} %)")
    line = "Dominant stage (median): " + "; ".join(parts) + "."
    two = [(h, statistics.median(r["total"] for r in runs)) for h, runs, _ in cols
           if ", 2 thr" in h and "cuda" not in h]
    if two:
        line += " Against the issue's target of ≤ 10 s on 2 cores: " + "; ".join(
            f"{h.split(',')[0]} {t:.1f} s, {t - TARGET_S:+.1f} s ({t / TARGET_S:.1f}× the target)" for h, t in two) + "."
    return line


def compare_line(results: list) -> str:
    """Before / after ratios of the median totals and network times, and whether the labels are equal."""
    base = {(r["threads"], r["device"], n): d for r in results if r["code"] != "this tree" for n, d in r["inputs"].items()}
    parts = []
    for r in results:
        if r["code"] != "this tree":
            continue
        for n, d in r["inputs"].items():
            b = base.get((r["threads"], r["device"], n))
            if b is None:
                continue
            med = {k: (statistics.median(x[k] for x in b["runs"]), statistics.median(x[k] for x in d["runs"]))
                   for k in ("total", "network", "post", "report")}
            same = "labels equal" if b["label_sha"] == d["label_sha"] else "**labels differ**"
            parts.append(f"{n}, {r['threads']} thr: total {med['total'][0]:.1f} → {med['total'][1]:.1f} s "
                         f"(×{med['total'][0] / med['total'][1]:.2f}), network {med['network'][0]:.1f} → "
                         f"{med['network'][1]:.1f} s, post {med['post'][0]:.2f} → {med['post'][1]:.2f} s, report "
                         f"{med['report'][0]:.2f} → {med['report'][1]:.2f} s, {b['slices_to_network']} → "
                         f"{d['slices_to_network']} slices, {same}")
    return "Before → after (median of each column, speed-up in brackets): " + "; ".join(parts) + "."


def _torch_version() -> str:
    import torch

    return torch.__version__


def write_section(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{START}\n{section}{END}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + (("\n" + tail) if tail else "")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    path.write_text(text, encoding="utf-8")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, help="staged runs per input and configuration (default 3; --quick: 1)")
    ap.add_argument("--threads", help="comma-separated torch thread counts, one process each (default 1,2; "
                    "--quick: 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: a 64-slice phantom only (< 1 min)")
    ap.add_argument("--out", type=Path, help="Markdown file whose bench_predict section is replaced (or appended)")
    ap.add_argument("--json", type=Path, help="also write the raw per-run times as JSON")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    ap.add_argument("--baseline", help="also time the library of this git commit (the 'before'), one worker "
                    "before each of this tree's, and compare")
    ap.add_argument("--compile-ab", type=int, default=0, metavar="N",
                    help="eager vs compiled predict alternated N times in one process (module doc); JSON to stdout")
    ap.add_argument("--compile-cache", default=None, help="--compile-ab: inductor's cache folder")
    ap.add_argument("--code", default="this tree", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.threads is None:
        args.threads = "1" if args.quick else "1,2"
    if args.worker:
        args.threads = int(args.threads)
        return worker(args)
    if args.compile_ab:
        args.threads = int(str(args.threads).split(",")[-1])
        return compile_ab(args)

    import torch

    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    if torch.cuda.is_available():
        gpu_line = f"GPU: {torch.cuda.get_device_name(0)} (timed with CUDA as well, {max(threads)} CPU threads)"
    else:
        gpu_line = "no GPU on this machine: CPU only"
    print(gpu_line, flush=True)
    if not args.quick and not P001.is_dir():
        print(f"note: {P001} not found; phantom only", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_predict_base_") as tmp:
        base = baseline_lib(args.baseline, tmp) if args.baseline else None
        for n in threads:
            if base:
                results.append(run_config(n, "cpu", args, base, code=f"before ({args.baseline})"))
            results.append(run_config(n, "cpu", args))
        if torch.cuda.is_available():
            if base:
                results.append(run_config(max(threads), "cuda", args, base, code=f"before ({args.baseline})"))
            results.append(run_config(max(threads), "cuda", args))
    command = "PYTHONUTF8=1 python benchmarks/bench_predict.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    section = render(results, args, gpu_line, command.strip())
    print(section)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    if args.out:
        write_section(args.out, section)
        print(f"written to {args.out} (between {START} and {END})")


if __name__ == "__main__":
    main()
