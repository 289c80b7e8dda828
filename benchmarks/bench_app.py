"""End-to-end benchmark of the MONAI Label app over HTTP (not a test).

1. ``/infer`` latency for a whole 512 x 512 x 150 chest phantom, exactly as Slicer asks for it
   (``POST /infer/hybrid_ct?image=<id>&output=all`` with ``result_extension=.nrrd``): the first
   request (model load included) and the median of the following ones, plus the server's own split
   (read / network / write).
2. Time from a label submitted (``PUT /datastore/label``) to the retrained model serving: the server
   runs with ``auto_train_after 1``, so the submission starts MONAI Label's background training; we
   poll ``GET /hybrid_ct/versions`` until a new version is current, then time the first inference
   answered by it.

The server is started like the tests do (``tests/server_fixture.py``: real ``monailabel start_server``
on 127.0.0.1, everything in a temp folder). Model: ``--model`` (default: the shipped
``hybrid_ct/net/models/pretrained.pt`` in the package, or ``$HYBRID_CT_MODEL``); without one, the production ``NetConfig()`` architecture is
trained here for ``--init-iters`` iterations on phantoms -- latency depends on the architecture, not
on how well it is trained, and the output says which weights were used.

    python benchmarks/bench_app.py                      # full run (the lead's numbers)
    python benchmarks/bench_app.py --quick              # smoke run: small volume, tiny training
    python benchmarks/bench_app.py --json out.json      # also write the numbers as JSON

Eager against compiled (issue 30, ``--compile-modes``): part 1 only, on ``--image`` (a CT the server reads as
a NIfTI copy in its studies folder, e.g. COVID-CT-MD P001), once per mode, each in a fresh server:
``eager``; ``compiled`` (conf ``infer_compile true``, inductor's cache in an empty ``--workdir``/compile_cache:
a cold compile at start-up, by the background loader); ``restart`` (the same server stopped and started
again on the now warm cache). Per mode: start-up to ``/info/``, start-up to the first ``/infer`` answered
(by the eager network while the compile runs), start-up to the compiled network serving, the compile time
the server logged, the warm requests (median, min–max) and the 1-minute load average at
each request; the compiled labels, call, burden and energy against the eager ones.

    python benchmarks/bench_app.py --image /work/shared/data/volumes_covid_ct_md/P001 \
        --compile-modes eager,compiled,restart --repeats 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import server_fixture as sf  # noqa: E402


def _shipped_model() -> Path | None:
    from hybrid_ct.errors import ModelNotReadyError
    from hybrid_ct.net.model_files import default_model_path

    try:
        path = default_model_path()
    except ModelNotReadyError:
        return None
    return path if path.is_file() else None


def build_model(path: Path, iters: int, net_overrides: dict) -> str:
    """The production architecture trained for a few iterations on phantoms (architecture-only weights)."""
    import torch

    from hybrid_ct.net.checkpoint import save_checkpoint
    from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig
    from hybrid_ct.data.phantom import make_phantom
    from hybrid_ct.data.slice_store import SliceSet, slices_from_volume
    from hybrid_ct.train.config import TrainConfig
    from hybrid_ct.train.trainer import fit

    torch.manual_seed(0)
    cfg = NetConfig(**net_overrides)
    data = SliceSet.empty(cfg.in_size)
    for i in range(2):
        img, lab, _ = make_phantom(500 + i, shape=(16, 128, 128), positive=i == 0)
        data = data.extend(slices_from_volume(img, lab, f"b{i}", size=cfg.in_size))
    model = HybridMultiTaskNet(cfg)
    fit(model, data, None, TrainConfig(epochs=1, batch_size=4, max_iters_per_epoch=iters, negative_fraction=1.0,
                                       augment=False), progress=False)
    save_checkpoint(path, model, {"version": f"bench-arch-{iters}-iters", "metric": None})
    return f"production NetConfig({net_overrides or ''}) trained {iters} iterations here (latency only)"


def replay_file(path: Path, model_path: Path, n: int) -> Path:
    """A replay sample (``training.save_replay``) of ``n`` 48-slice phantoms at the model's slice size."""
    from hybrid_ct.net.checkpoint import load_checkpoint
    from hybrid_ct.data.phantom import make_phantom
    from hybrid_ct.data.slice_store import SliceSet, save_replay, slices_from_volume

    size = load_checkpoint(model_path, "cpu")[0].cfg.in_size
    data = SliceSet.empty(size)
    for i in range(n):
        img, lab, _ = make_phantom(900 + i, shape=(48, 192, 192))
        data = data.extend(slices_from_volume(img, lab, f"replay{i}", size=size))
    save_replay(data, path)
    return path


def studies_writer(shape, n_train: int, train_shape):
    def write(studies: Path):
        import SimpleITK as sitk

        from hybrid_ct.data.phantom import make_phantom, write_phantom_set

        write_phantom_set(studies, n=n_train, seed=11, shape=train_shape)
        img, _, _ = make_phantom(99, shape=shape, positive=True)
        sitk.WriteImage(sitk.Cast(sitk.Clamp(img, sitk.sitkFloat32, -1024, 3071), sitk.sitkInt16),
                        str(studies / "bench_volume.nii.gz"))
    return write


def infer_with_label(live, image_id):
    """One /infer as Slicer sends it -> (wall seconds, the result params, the label file's bytes)."""
    s = sf.http()
    t0 = time.perf_counter()
    r = s.post(f"{live.url}/infer/hybrid_ct", params={"image": image_id, "output": "all"},
               files={"params": (None, json.dumps({"result_extension": ".nrrd", "result_dtype": "uint8"}))},
               timeout=3600)
    wall = time.perf_counter() - t0
    r.raise_for_status()
    params, data, _ = sf.parse_infer(r)
    return wall, params, data


def infer(live, image_id):
    """``infer_with_label`` -> (wall seconds, the result params, the label's size in bytes)."""
    wall, params, data = infer_with_label(live, image_id)
    return wall, params, len(data or b"")


def image_writer(image: Path):
    """A studies folder holding ``image`` (any CT ``hybrid_ct`` reads) as ``bench_volume.nii.gz``."""
    def write(studies: Path):
        import SimpleITK as sitk

        from hybrid_ct.imaging.reader import read_image

        studies.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(read_image(str(image)), str(studies / "bench_volume.nii.gz"))
    return write


def _label_array(data: bytes, tmp: Path):
    import SimpleITK as sitk

    p = tmp / "label.nrrd"
    p.write_bytes(data)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))


def compile_modes(args, model_path: Path, workdir: Path) -> dict:
    """Part 1 for each of ``--compile-modes`` (see the module doc): -> {mode: numbers}, with the agreement."""
    import re

    import numpy as np

    out, ref = {}, None
    cache = workdir / "compile_cache"
    writer = image_writer(args.image) if args.image else studies_writer(tuple(args.shape), 1, (8, 64, 64))
    for mode in args.compile_modes.split(","):
        conf = {"auto_train_after": "0", "auto_scoring": "false"}
        if mode in ("compiled", "restart"):
            conf.update(infer_compile="true", infer_compile_cache=str(cache))
        wd = workdir / ("compiled" if mode == "restart" else mode)
        t0 = time.perf_counter()
        if mode == "restart":
            live = sf.launch_server(wd, {**conf}, startup_timeout_s=1200)
        else:
            live = sf.start_server(wd, conf=conf, model=model_path, startup_timeout_s=1200, studies_writer=writer)
        up = time.perf_counter() - t0
        try:
            first, params, _ = infer(live, "bench_volume")
            to_first = time.perf_counter() - t0
            if mode != "eager":  # the loader serves eagerly while it compiles: warm = compiled, so wait for it
                sf.wait_until(lambda: re.search(r"now runs compiled|torch.compile failed",
                                                (wd / "server.log").read_text(errors="replace")),
                              "the compile to end", timeout_s=1800, interval_s=1.0)
            to_compiled = time.perf_counter() - t0
            warm = []
            for _ in range(args.repeats):
                load = os.getloadavg()[0]
                w, p, data = infer_with_label(live, "bench_volume")
                warm.append({"s": round(w, 2), "load_1min": round(load, 2), "server": p.get("latencies")})
            label = _label_array(data, wd)
        finally:
            sf.stop_server(live)
        log = (wd / "server.log").read_text(errors="replace")
        comp = [float(x) for x in re.findall(r"compile ([0-9.]+) s\)", log)]
        ws = [w["s"] for w in warm]
        r = {"server_up_s": round(up, 1), "start_to_first_infer_s": round(to_first, 1),
             "start_to_compiled_s": round(to_compiled, 1) if mode != "eager" else None,
             "first_request_s": round(first, 2), "compile_s_logged": comp[-1:] or None,
             "warm_median_s": statistics.median(ws), "warm_min_s": min(ws), "warm_max_s": max(ws), "warm": warm,
             "classification": p["classification"]["label"], "burden": p["burden"], "energy": p["energy"],
             "slices_run": p.get("slices_run")}
        if ref is None:
            ref = (mode, label, p)
        else:
            r["vs"] = {"mode": ref[0], "label_voxels_differ": int((label != ref[1]).sum()),
                       "label_voxels": int(label.size), "same_call": p["classification"]["label"] ==
                       ref[2]["classification"]["label"],
                       "burden_max_abs_diff_pct": max(abs(p["burden"][k] - ref[2]["burden"][k]) for k in p["burden"]),
                       "energy_rel_diff": {k: (p["energy"][k] - ref[2]["energy"][k]) / ref[2]["energy"][k]
                                           for k in p["energy"] if ref[2]["energy"][k]},
                       "max_slice_probability_diff": float(np.max(np.abs(
                           np.subtract(p["classification"]["slice_probability"],
                                       ref[2]["classification"]["slice_probability"]))))}
        out[mode] = r
        print(f"{mode}: up {up:.1f} s, first /infer done {to_first:.1f} s after start, compile {comp[-1:]}, "
              f"warm median {r['warm_median_s']} s ({min(ws)}-{max(ws)}), loads {[w['load_1min'] for w in warm]}",
              flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(150, 512, 512), metavar=("D", "H", "W"))
    ap.add_argument("--repeats", type=int, default=3, help="inference requests after the first (default 3)")
    ap.add_argument("--model", type=Path, default=_shipped_model())
    ap.add_argument("--init-iters", type=int, default=3, help="iterations for the architecture-only model")
    ap.add_argument("--net", default="{}", help="JSON NetConfig overrides for the architecture-only model")
    ap.add_argument("--train", default='{"max_epochs": 1, "max_iters_per_epoch": 5}',
                    help="JSON train params of the retraining started by the label submission")
    ap.add_argument("--train-shape", type=int, nargs=3, default=(48, 192, 192))
    ap.add_argument("--train-images", type=int, default=4)
    ap.add_argument("--replay-phantoms", type=int, default=0, metavar="N",
                    help="give the retrain a replay file (conf replay) of N phantom volumes' slices, a stand-in "
                         "for the original training data's <model>.replay.npz (issue 16)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 16x128x128 volume, tiny network")
    ap.add_argument("--image", type=Path, default=None, help="--compile-modes: the CT to infer (default: a phantom)")
    ap.add_argument("--compile-modes", default=None, metavar="MODES",
                    help="comma list of eager, compiled, restart: part 1 per mode, no retrain (module doc)")
    args = ap.parse_args()

    net = json.loads(args.net)
    if args.quick:
        args.shape, args.repeats, args.train_shape, args.train_images = (16, 128, 128), 1, (8, 64, 64), 3
        net = net or dict(sf.TINY_NET)
        args.train = json.dumps({"max_epochs": 1, "max_iters_per_epoch": 2})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_app_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model is not None and not args.quick:
        model_path, weights = args.model, f"checkpoint {args.model}"
    else:
        model_path = workdir / "bench_model.pt"
        weights = build_model(model_path, args.init_iters, net)

    if args.compile_modes:
        res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "omp_threads": os.environ.get("OMP_NUM_THREADS"), "weights": weights,
               "image": str(args.image) if args.image else f"phantom {args.shape}",
               "modes": compile_modes(args, Path(model_path), workdir)}
        print(json.dumps(res, indent=2))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return

    conf = {"auto_train_after": "1", "auto_train_params": args.train, "auto_scoring": "false"}
    if args.replay_phantoms:
        conf["replay"] = str(replay_file(workdir / "replay.npz", model_path, args.replay_phantoms))
    t0 = time.perf_counter()
    live = sf.start_server(workdir / "server", conf=conf, model=model_path, startup_timeout_s=600,
                           studies_writer=studies_writer(tuple(args.shape), args.train_images, tuple(args.train_shape)))
    startup = time.perf_counter() - t0
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "torch_threads": None, "weights": weights, "volume_shape_zyx": list(args.shape),
              "server_start_s": round(startup, 1)}
    try:
        import torch
        result["torch_threads"] = torch.get_num_threads()
        # 1. /infer latency
        first, params, nbytes = infer(live, "bench_volume")
        warm = [infer(live, "bench_volume") for _ in range(args.repeats)]
        result["infer"] = {
            "first_request_s": round(first, 2),
            "warm_median_s": round(statistics.median(w for w, _, _ in warm), 2) if warm else None,
            "warm_all_s": [round(w, 2) for w, _, _ in warm],
            "server_split_s": (warm[-1][1] if warm else params).get("latencies"),
            "label_bytes": nbytes, "model_version": params.get("model_version"),
            "energy_ratio": params.get("energy", {}).get("ratio"),
        }
        print(f"infer {args.shape}: first {first:.1f} s, warm median {result['infer']['warm_median_s']} s",
              flush=True)

        # 2. label submit -> retrained model serving
        s = sf.http()
        before = s.get(f"{live.url}/hybrid_ct/versions", timeout=60).json()["current"]
        ip, lp, _, _ = sf.phantom_files(workdir / "submit", seed=4242, name="submitted")
        lp_bytes, ip_bytes = lp.read_bytes(), ip.read_bytes()
        s.put(f"{live.url}/datastore/", params={"image": "submitted case"},
              files={"file": (ip.name, ip_bytes), "params": (None, "{}")}, timeout=600).raise_for_status()
        t_submit = time.perf_counter()
        r = s.put(f"{live.url}/datastore/label", params={"image": "submitted case", "tag": "final"},
                  files={"label": (lp.name, lp_bytes), "params": (None, json.dumps(
                      {"label_info": [{"name": "lung", "idx": 1}, {"name": "infection", "idx": 2}]}))}, timeout=600)
        r.raise_for_status()
        auto = r.json().get("auto_train", {})
        if not auto.get("started"):
            raise RuntimeError(f"the label submission did not start a training: {auto}")
        def outcome():
            """The new version once it is current, or the promotion block when the training ended and the
            gate kept the served model (the retrain was worse: nothing new will be served)."""
            c = s.get(f"{live.url}/hybrid_ct/versions", timeout=60).json()["current"]
            if c != before:
                return {"current": c}
            if sf.training_idle(live):
                ts = s.get(f"{live.url}/info/", timeout=60).json().get("train_stats", {}).get("hybrid_ct", {})
                if (ts.get("promotion") or {}).get("decision") == "kept":
                    return {"kept": ts["promotion"]}
            return None

        end = sf.wait_until(outcome, "the retrained model to be published or kept", timeout_s=6 * 3600,
                            interval_s=1.0)
        t_published = time.perf_counter()
        stats = s.get(f"{live.url}/info/", timeout=60).json()["train_stats"]["hybrid_ct"]
        result["retrain"] = {
            "train_params": json.loads(args.train), "train_images": stats.get("train", {}),
            "best_metric": stats.get("best_metric"), "training_total_time": stats.get("total_time"),
            "replay": stats.get("replay"), "time_budget": stats.get("time_budget"), "epochs": stats.get("epoch"),
        }
        if "kept" in end:  # the promotion gate refused the retrain: time to that decision, nothing new serves
            result["retrain"].update({"new_version": None, "promotion": end["kept"].get("reason"),
                                      "submit_to_decision_s": round(t_published - t_submit, 1)})
            print(f"label submit -> retrain kept out by the promotion gate after {t_published - t_submit:.1f} s: "
                  f"{end['kept'].get('reason')}", flush=True)
        else:
            current = end["current"]
            _, p2, _ = infer(live, "phantom_000")
            t_serving = time.perf_counter()
            if p2.get("model_version") != current:
                raise RuntimeError(f"inference answered with {p2.get('model_version')}, expected {current}")
            result["retrain"].update({"new_version": current, "submit_to_published_s": round(t_published - t_submit, 1),
                                      "submit_to_serving_s": round(t_serving - t_submit, 1)})
            print(f"label submit -> new model {current} serving: {t_serving - t_submit:.1f} s", flush=True)
    finally:
        sf.stop_server(live)

    print(json.dumps(result, indent=2))
    inf, rt = result["infer"], result["retrain"]
    print("\n| measure | value |\n|---|---|")
    print(f"| machine | {result['machine']}, torch threads {result['torch_threads']} |")
    print(f"| weights | {result['weights']} |")
    print(f"| /infer, {'x'.join(map(str, args.shape[::-1]))} volume, first request (model load) | {inf['first_request_s']} s |")
    print(f"| /infer, warm, median of {args.repeats} | {inf['warm_median_s']} s (server: {inf['server_split_s']}) |")
    if rt.get("new_version"):
        print(f"| label submit -> retrained model published | {rt['submit_to_published_s']} s ({rt['train_params']}) |")
        print(f"| label submit -> first inference by the new model | {rt['submit_to_serving_s']} s |")
    else:
        print(f"| label submit -> retrain ended, kept out by the promotion gate | {rt['submit_to_decision_s']} s "
              f"({rt['train_params']}; {rt['promotion']}) |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
