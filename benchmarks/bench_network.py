"""Faster network, same output? (issue 16, point 3). Not a test: measures, does not change the product.

On the shipped model (BatchNorm folded, as ``Predictor`` runs it) and N model slices of a real or
phantom chest (``transforms.pre_transforms``), each variant in the same process, one after the other:

    plain           eager float32, the path ``Predictor`` ships
    channels_last   model and input in channels-last memory format
    compile         ``torch.compile`` (inductor); the first call's time is the compile time, reported
                    apart; inductor's on-disk cache makes a second process compile faster (``--cache``
                    reports that second process; ``--cache-dir`` puts inductor's cache there, so a
                    first run in an empty folder is a cold compile)
    served          what ``Predictor(compile_net=True)`` runs (``hybrid_ct.net.compiled.CompiledNet``):
                    the compiled copy that also returns its spike counts, batch padded to a fixed shape;
                    its energy report against the eager meter's on the same slices is printed
                    (``energy Δ``, relative difference of E_hybrid)
    T=2             the same weights run at 2 time steps instead of 4 (NOT validated: an agreement
                    figure only; a change of T needs the validation numbers of a retrained model)
    cnn twin        the same topology with ReLU and T = 1 (``model.cnn_twin``; the shipped weights,
                    so its outputs mean nothing: its time is the reference of "within 2x the CNN")
    onnxruntime     ``torch.onnx.export`` + ONNX Runtime, when both import (``--ort PATH`` adds a
                    folder to sys.path, e.g. a ``pip install --target`` of onnxruntime)

For each: seconds per slice (median of ``--repeats`` passes, spread in brackets), and the agreement
with ``plain``: the largest probability difference and the share of mask pixels (lung, infection at
0.5) and slice class calls that differ. Each thread count runs in a fresh process.

    python benchmarks/bench_network.py --threads 1,2 --slices 16 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

P001 = Path("/work/shared/data/volumes_covid_ct_md/P001")


def _slices(n: int, size: int):
    """N model slices (``size``², the model's own) from the middle of P001 (the phantom when P001 is absent)."""
    from hybrid_ct.imaging import reader as io
    from hybrid_ct.data.phantom import make_phantom
    from hybrid_ct.processing.transforms import pre_transforms, run

    img = io.read_image(str(P001)) if P001.is_dir() else make_phantom(0, shape=(150, 512, 512))[0]
    x = run(pre_transforms(size), {"image": img})["image"].as_tensor().numpy()
    mid = len(x) // 2
    return x[max(0, mid - n // 2): max(0, mid - n // 2) + n], ("P001" if P001.is_dir() else "phantom")


def _outputs(fn, x, batch: int):
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            o = fn(torch.from_numpy(x[i:i + batch]))
            outs.append({k: v.detach().float().numpy() for k, v in o.items() if torch.is_tensor(v)})
    return {k: __import__("numpy").concatenate([o[k] for o in outs]) for k in outs[0]}


def _timed(fn, x, batch: int, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = _outputs(fn, x, batch)
        times.append((time.perf_counter() - t0) / len(x))
    return times, out


def _agreement(ref: dict, out: dict) -> dict:
    import numpy as np

    def sig(v):
        return 1 / (1 + np.exp(-v))

    res = {}
    for h in ("lung", "infection"):
        if h in ref and h in out:
            a, b = sig(ref[h]), sig(out[h])
            res[f"{h}_max_dp"] = float(np.abs(a - b).max())
            res[f"{h}_px_differ"] = float(((a > 0.5) != (b > 0.5)).mean())
    if "cls_rates" in ref:
        ca = np.argmax(ref["cls_rates"] + 1e-3 * ref["cls_logits"], 1)
        cb = np.argmax(out["cls_rates"] + 1e-3 * out["cls_logits"], 1)
        res["class_differ"] = float((ca != cb).mean())
    return res


def _ort_session(model, x, batch: int, tmp: str):
    import numpy as np
    import onnxruntime as ort
    import torch

    path = os.path.join(tmp, "net.onnx")
    names = ["lung", "infection", "cls_rates", "cls_logits"]

    class Flat(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inp):
            o = self.m(inp)
            return tuple(o[k] for k in names)

    import hybrid_ct.net.network as hm

    def lif_functional(x_seq, tau, v_threshold):  # lif_inference's arithmetic without out= (not exportable)
        v, out = torch.zeros_like(x_seq[0]), []
        for t in range(x_seq.shape[0]):
            v = v + (x_seq[t] - v) / tau
            fired = (v >= v_threshold).to(x_seq.dtype)
            out.append(fired)
            v = v * (1.0 - fired)
        return torch.stack(out)

    t0 = time.perf_counter()
    saved, hm.lif_inference = hm.lif_inference, lif_functional
    try:
        with torch.no_grad():  # the inference LIF: the training one is a custom op ONNX lacks
            torch.onnx.export(Flat(model), (torch.from_numpy(x[:batch]),), path, input_names=["x"],
                              output_names=names,
                              dynamic_axes={"x": {0: "b"}}, dynamo=False)
    finally:
        hm.lif_inference = saved
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    export_s = time.perf_counter() - t0

    def fn(xb):
        outs = sess.run(None, {"x": xb.numpy().astype(np.float32)})
        return {k: torch.from_numpy(v) for k, v in zip(names, outs)}

    return fn, export_s


def worker(args) -> None:
    import tempfile
    from dataclasses import replace

    import torch

    from hybrid_ct.net.checkpoint import load_checkpoint
    from hybrid_ct.net.network import HybridMultiTaskNet, cnn_twin, fold_batchnorm
    from hybrid_ct.net.model_files import default_model_path

    torch.set_num_threads(args.threads)
    if args.cache_dir:  # before inductor reads it: the plain compile variant's cache
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.cache_dir) / "compile")
    if args.ort:
        sys.path.insert(0, args.ort)
    model, _ = load_checkpoint(default_model_path(), "cpu")
    plain = fold_batchnorm(model.eval())
    x, source = _slices(args.slices, model.cfg.in_size)
    want = set(args.variants.split(","))
    res = {"threads": torch.get_num_threads(), "slices": len(x), "source": source, "batch": args.batch,
           "load_before": os.getloadavg(), "variants": {}}
    _outputs(plain, x[: args.batch], args.batch)  # warm-up: one-time allocations are not the plain path's speed
    times, ref = _timed(plain, x, args.batch, args.repeats)
    res["variants"]["plain"] = {"s_per_slice": times}

    def add(name, fn, setup_s=None):
        first = None
        if setup_s is None:  # the first call (compile) is timed apart
            t0 = time.perf_counter()
            _outputs(fn, x[: args.batch], args.batch)
            first = time.perf_counter() - t0
        t, out = _timed(fn, x, args.batch, args.repeats)
        res["variants"][name] = {"s_per_slice": t, "first_call_s": first, "setup_s": setup_s,
                                 **_agreement(ref, out)}
        print(f"{name}: {statistics.median(t):.3f} s/slice", file=sys.stderr, flush=True)

    if "channels_last" in want:
        cl = fold_batchnorm(model.eval()).to(memory_format=torch.channels_last)
        add("channels_last", lambda xb: cl(xb.contiguous(memory_format=torch.channels_last)))
    if "compile" in want:
        comp = torch.compile(fold_batchnorm(model.eval()))
        add("compile", comp)
    if "served" in want:
        from hybrid_ct.net.compiled import CompiledNet
        from hybrid_ct.net.energy import EnergyMeter

        served = CompiledNet(plain, args.batch, cache_dir=Path(args.cache_dir) / "served" if args.cache_dir else None)
        add("served", lambda xb: served(xb)[0])
        with EnergyMeter(plain) as eager_meter:
            _outputs(plain, x, args.batch)
        counted = EnergyMeter(plain)
        with torch.no_grad():
            for i in range(0, len(x), args.batch):
                counted.add_counts(len(x[i:i + args.batch]), served(torch.from_numpy(x[i:i + args.batch]))[1])
        a, b = eager_meter.report(), counted.report()
        res["variants"]["served"].update(energy_rel_diff=(b.e_hybrid_pj - a.e_hybrid_pj) / a.e_hybrid_pj,
                                         rate_eager=a.mean_firing_rate, rate_served=b.mean_firing_rate)
    if "t2" in want:
        t2 = HybridMultiTaskNet(replace(model.cfg, time_steps=2))
        t2.load_state_dict(model.state_dict())
        t2 = fold_batchnorm(t2.eval())
        add("T=2", t2)
    if "twin" in want:
        twin = HybridMultiTaskNet(cnn_twin(model.cfg))
        twin.load_state_dict(model.state_dict())
        twin = fold_batchnorm(twin.eval())
        add("cnn twin", twin)
    if "ort" in want:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                fn, export_s = _ort_session(fold_batchnorm(model.eval()), x, args.batch, tmp)
                add("onnxruntime", fn, setup_s=export_s)
        except Exception as e:  # noqa: BLE001 - a measurement: say why it could not run
            res["variants"]["onnxruntime"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"onnxruntime: {res['variants']['onnxruntime']['error']}", file=sys.stderr, flush=True)
    res["load_after"] = os.getloadavg()
    print("@@RESULT@@" + json.dumps(res), flush=True)


def run(threads: int, args, variants: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--slices", str(args.slices),
           "--repeats", str(args.repeats), "--batch", str(args.batch), "--variants", variants] + \
          (["--ort", args.ort] if args.ort else []) + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        sys.stdout.write(p.stdout)
        raise SystemExit(f"worker ({threads} threads) failed with exit code {p.returncode}")
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("@@RESULT@@"))
    return json.loads(line[len("@@RESULT@@"):])


def render(results: list) -> str:
    lines = ["| threads | variant | s / slice, median (min–max) | × plain | first call / setup s | lung px differ | "
             "infection px differ | class calls differ | max Δp (lung) | load 1-min start → end |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    energy_notes = []
    for r in results:
        base = statistics.median(r["variants"]["plain"]["s_per_slice"])
        for name, v in r["variants"].items():
            load = f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}"
            if "error" in v:
                lines.append(f"| {r['threads']} | {name} | not run: {v['error']} | | | | | | | {load} |")
                continue
            t = v["s_per_slice"]
            med = statistics.median(t)
            first = v.get("setup_s") if v.get("setup_s") is not None else v.get("first_call_s")
            first_s = f"{first:.1f}" if first is not None else "—"

            def pct(k):
                return f"{100 * v[k]:.3f} %" if k in v else "—"

            lines.append(f"| {r['threads']} | {name} | {med:.3f} ({min(t):.3f}–{max(t):.3f}) | {base / med:.2f} | "
                         f"{first_s} | {pct('lung_px_differ')} | {pct('infection_px_differ')} | "
                         f"{pct('class_differ')} | {v.get('lung_max_dp', 0.0):.2g} | {load} |")
            if "energy_rel_diff" in v:
                energy_notes.append(f"{r['threads']} threads, {name}: E_hybrid {100 * v['energy_rel_diff']:+.4f} % "
                                    f"against the eager meter; mean firing rate {v['rate_served']:.6f} "
                                    f"(eager {v['rate_eager']:.6f})")
    return "\n".join(lines) + "\n" + "".join(f"\n- energy Δ, {n}" for n in energy_notes) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", default="channels_last,compile,t2,twin,ort")
    ap.add_argument("--cache", action="store_true", help="run the compile variant again in a second process "
                    "(inductor's on-disk cache warm) and report its first-call time")
    ap.add_argument("--cache-dir", help="inductor's on-disk caches under this folder (empty: a cold compile)")
    ap.add_argument("--ort", help="folder added to sys.path for onnxruntime / onnx")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.threads = int(args.threads)
        return worker(args)
    results = []
    for n in [int(t) for t in args.threads.split(",")]:
        results.append(run(n, args, args.variants))
        compiled = [v for v in ("compile", "served") if v in args.variants.split(",")]
        if args.cache and compiled:
            again = run(n, args, ",".join(compiled))
            results[-1]["variants"]["plain (2nd process)"] = again["variants"]["plain"]
            for v in compiled:
                results[-1]["variants"][f"{v} (2nd process, cache warm)"] = again["variants"][v]
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
