"""Throughput of ``hybrid-ct predict``: one process against a local Dask cluster of 1 and 2 workers (issue 31,
point 7). Not a test.

The same phantom studies (``write_phantom_set``, written once to a temporary folder) go through the shipped
model once per configuration in this one run, each as a fresh ``hybrid-ct predict`` process into an empty output folder,
so that interpreter start, imports, model load and the cluster's start count as a user meets them:

    single      hybrid-ct --threads T predict STUDIES --out A                       (T = the cores)
    single      hybrid-ct --threads 1 predict STUDIES --out A1                      (what threads alone change)
    1 worker    hybrid-ct --threads T predict STUDIES --out B --workers 1           (T torch threads in it)
    2 workers   hybrid-ct --threads T/2 predict STUDIES --out C --workers 2         (T/2 each)

and reports wall time, scans per hour (studies / wall), the median per-case latency (``summary.csv``) and the
load average before and after each (other work on the machine shows there). The labels of all runs are
compared byte for byte.

    python benchmarks/bench_cluster.py --quick                                  # 4 studies 24 x 96 x 96
    nice python benchmarks/bench_cluster.py --n 12 --shape 48 192 192 --out docs/benchmarks.md

``--out`` replaces the section between ``<!-- bench_cluster:start -->`` and ``<!-- bench_cluster:end -->``
(appends it when the markers are absent).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_cluster:start -->", "<!-- bench_cluster:end -->"


def run(label: str, inputs: Path, out: Path, threads: int, extra=()) -> dict:
    cmd = [sys.executable, "-m", "hybrid_ct.cli", "-q", "--threads", str(threads), "predict", str(inputs),
           "--out", str(out), "--dashboard", "none", *extra]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lat = [float(r["latency_s"]) for r in rows if r["status"] == "ok"]
    return {"label": label, "threads": threads, "wall_s": wall, "n": len(rows), "per_hour": len(rows) / wall * 3600,
            "median_latency_s": statistics.median(lat), "load_before": load0, "load_after": os.getloadavg()[0],
            "command": " ".join(["hybrid-ct", *cmd[3:]])}


def same_labels(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*_label.nii.gz"))
    return bool(names) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def table(results: list, args, same: bool) -> str:
    cores = os.cpu_count()
    base = results[0]["per_hour"]
    lines = [f"## Batch prediction on a local Dask cluster (`benchmarks/bench_cluster.py`, issue 31)", "",
             START, "",
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
             f"{cores} cores, no GPU; {args.n} phantom studies {' x '.join(map(str, args.shape))} "
             f"(`write_phantom_set`), the shipped model, the same inputs in one run; each row a fresh "
             f"`hybrid-ct predict` process (start, imports, model load and cluster start included):", "",
             "```", f"python benchmarks/bench_cluster.py --n {args.n} --shape {' '.join(map(str, args.shape))}"
             + (f" --threads {args.threads}" if args.threads else ""), "```",
             "",
             "| run | torch threads | wall s | scans / hour | × single | median case latency s | load avg before → after |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['threads']} | {r['wall_s']:.1f} | {r['per_hour']:.0f} | "
                     f"{r['per_hour'] / base:.2f} | {r['median_latency_s']:.2f} | "
                     f"{r['load_before']:.1f} → {r['load_after']:.1f} |")
    lines += ["", f"Labels byte-identical across the runs: {'yes' if same else 'NO'}. A load average above "
              f"{cores} means other work shared the cores.", "", END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    doc = path.read_text(encoding="utf-8") if path.exists() else ""
    if START in doc and END in doc:
        head = doc[: doc.index(START)]
        head = head[: head.rstrip().rfind("\n## ")] + "\n" if "\n## " in head else head
        doc = head.rstrip() + "\n\n" + text + doc[doc.index(END) + len(END):].lstrip("\n")
    else:
        doc = doc.rstrip() + "\n\n" + text
    path.write_text(doc, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=12, help="studies")
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 192, 192], metavar=("D", "H", "W"))
    ap.add_argument("--quick", action="store_true", help="4 studies 24 x 96 x 96")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every process (default: the cores, shared among the workers; 1 on a "
                         "machine shared with other work, where extra threads only wait)")
    ap.add_argument("--out", default=None, help="Markdown file to write the section into (docs/benchmarks.md)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.shape = 4, [24, 96, 96]
    sys.path.insert(0, str(REPO / "lib"))
    from hybrid_ct.data.phantom import write_phantom_set

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        tmp = Path(tmp)
        write_phantom_set(tmp / "studies", n=args.n, seed=11, shape=tuple(args.shape), with_labels=False)
        t = args.threads
        results = [run("single process", tmp / "studies", tmp / "single", t or cores)]
        if cores > 1 and not t:  # what the threads alone change (on a machine shared with other work: a lot)
            results.append(run("single process", tmp / "studies", tmp / "single1", 1))
        results += [run("1 worker", tmp / "studies", tmp / "w1", t or cores, ("--workers", "1")),
                    run("2 workers", tmp / "studies", tmp / "w2", t or max(1, cores // 2), ("--workers", "2"))]
        same = all(same_labels(tmp / "single", tmp / d) for d in ("w1", "w2") + (("single1",) if len(results) > 3 else ()))
    text = table(results, args, same)
    print(text)
    for r in results:
        print(r["command"])
    if args.out:
        write_section(Path(args.out), text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
