"""Speed and memory of the hybrid network (T = 1, 2, 4, 8) and its CNN twin, in one run.

Each measurement runs in a fresh subprocess so its peak RSS is its own. Prints a Markdown table
(paste into docs/benchmarks.md) and writes JSON with --json.

    .venv/bin/python benchmarks/bench_core.py                       # per-slice inference + training
    .venv/bin/python benchmarks/bench_core.py --volume              # + a 512x512x150 phantom volume
    .venv/bin/python benchmarks/bench_core.py --configs cnn,t4 --train-configs t4,t4-ckpt
    .venv/bin/python benchmarks/bench_core.py --lif --threads 1     # fused inference LIF vs spikingjelly's
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CONFIGS = {  # name -> NetConfig overrides (5 levels, base 16 channels, 256x256: the seed's embodiment)
    "cnn": dict(spiking=False),
    "t1": dict(time_steps=1),
    "t2": dict(time_steps=2),
    "t4": dict(time_steps=4),
    "t8": dict(time_steps=8),
    "t4-naive": dict(time_steps=4, reuse_static=False),
    "t4-ckpt": dict(time_steps=4, grad_checkpoint=True),
    "cnn-fold": dict(spiking=False),  # "-fold": BatchNorm folded into the convs (inference only)
    "t4-fold": dict(time_steps=4),
    "t4-sjlif": dict(time_steps=4),  # "-sjlif": spikingjelly's own multi-step LIF at inference, not the fused one
}
LIF_SHAPES = {  # [T, B, C, H, W] of a first-level LIF layer, batch 8
    "shipped 128², base 8": (4, 8, 8, 128, 128),
    "seed 256², base 16": (4, 8, 16, 256, 256),
}


def bench_lif(args) -> list:
    """Median time of one multi-step LIF call at inference (no autograd), fused vs spikingjelly, same input,
    the two interleaved so that a busy neighbour slows both alike."""
    import numpy as np
    import torch
    from spikingjelly.activation_based import functional, neuron

    from hybrid_ct.net.network import lif_inference

    torch.set_num_threads(args.threads)
    sj = neuron.LIFNode(tau=2.0, v_threshold=1.0, v_reset=0.0, detach_reset=True, step_mode="m").eval()
    rows = []
    for name, shape in LIF_SHAPES.items():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.8
        runs = {"fused": lambda: lif_inference(x, 2.0, 1.0), "spikingjelly": lambda: sj(x)}
        times = {k: [] for k in runs}
        with torch.no_grad():
            assert torch.equal(runs["fused"](), runs["spikingjelly"]())
            for _ in range(args.repeats):
                for k, fn in runs.items():
                    functional.reset_net(sj)
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"shape": name, "elements": int(np.prod(shape)), **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                     "speedup": med["spikingjelly"] / med["fused"]})
    return rows


def _child(kind: str, name: str, args) -> dict:
    import numpy as np
    import torch

    from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig, fold_batchnorm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = NetConfig(**CONFIGS[name])
    model = HybridMultiTaskNet(cfg)
    if name.endswith("-sjlif"):
        from spikingjelly.activation_based import neuron

        from hybrid_ct.net.network import LIF

        LIF.multi_step_forward = neuron.LIFNode.multi_step_forward
    if name.endswith("-fold"):
        model = fold_batchnorm(model.eval())
    if args.compile:
        model = torch.compile(model)
    x = torch.rand(args.batch, 1, 256, 256)
    res = {"config": name, "kind": kind, "T": cfg.time_steps, "batch": args.batch}
    if kind == "infer":
        model.eval()
        with torch.no_grad():
            model(x)  # warm-up (and compile)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        res["s_per_slice"] = float(np.median(times)) / args.batch
    elif kind == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            out = model(x)
            loss = out["lung"].mean() + out["infection"].mean() + out["cls_rates"].sum() + out["cls_logits"].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # the first iteration is warm-up
                times.append(time.perf_counter() - t0)
        res["s_per_slice"] = float(np.median(times)) / args.batch
    elif kind == "volume":
        from hybrid_ct.predict.predictor import Predictor
        from hybrid_ct.data.phantom import make_phantom

        image, _, _ = make_phantom(0, shape=(150, 512, 512))
        pred = Predictor(model.eval(), {"version": "bench"}, batch_size=args.batch)
        pred.predict(image[:, :, 70:78])  # warm-up on slices through the lungs
        t0 = time.perf_counter()
        _, report = pred.predict(image)
        res["s_per_volume"] = time.perf_counter() - t0
        res["energy_ratio"] = report["energy"]["ratio"]
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return res


def run(kind: str, name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, name, "--batch", str(args.batch), "--repeats",
           str(args.repeats), "--threads", str(args.threads)] + (["--compile"] if args.compile else [])
    # Large buffers straight from mmap: with glibc's adaptive threshold, freed multi-MB activations stay
    # in the heap and the process RSS measures fragmentation (7.2 GB instead of 3.3 GB for t4-ckpt).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576"))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"config": name, "kind": kind, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="cnn,t1,t2,t4,t8")
    ap.add_argument("--train-configs", default="cnn,t4,t4-ckpt")
    ap.add_argument("--volume", action="store_true", help="also time a 512x512x150 phantom volume (cnn, t4)")
    ap.add_argument("--volume-configs", default="cnn,t4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the network first")
    ap.add_argument("--lif", action="store_true", help="only the fused-vs-spikingjelly LIF micro-benchmark")
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args)))
        return
    if args.lif:
        rows = bench_lif(args)
        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch threads {args.threads}, median of {args.repeats}\n")
        print("| LIF layer [T, B, C, H, W] | elements | fused ms | spikingjelly ms | spikingjelly / fused |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shape']} | {r['elements']:,} | {r['fused_ms']:.1f} | {r['spikingjelly_ms']:.1f} | {r['speedup']:.2f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    from tqdm import tqdm

    jobs = [("infer", c) for c in args.configs.split(",") if c]
    jobs += [("train", c) for c in args.train_configs.split(",") if c]
    if args.volume:
        jobs += [("volume", c) for c in args.volume_configs.split(",") if c]
    results = [run(k, c, args) for k, c in tqdm(jobs, desc="benchmarks")]
    base = {r["kind"]: r for r in results if r["config"] == "cnn" and "error" not in r}
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {args.threads}, batch {args.batch}, compile {args.compile}\n")
    print("| what | config | T | s/slice (s/volume) | x CNN twin | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['kind']} | {r['config']} | | error: {r['error']} | | |")
            continue
        key = "s_per_volume" if r["kind"] == "volume" else "s_per_slice"
        ref = base.get(r["kind"], {}).get(key)
        ratio = f"{r[key] / ref:.2f}" if ref else ""
        print(f"| {r['kind']} | {r['config']} | {r['T']} | {r[key]:.3f} | {ratio} | {r['peak_rss_gb']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
