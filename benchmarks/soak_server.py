"""Soak the real Hybrid CT server with a mixed load (issue 32 point 1).

A few client threads at once for ``--minutes``: inference (``POST /infer``), uploads (a new image, then
deleted again, and the same bytes again: "unchanged"), final-label submissions (corrections of three soak
images, overwritten in turn), active-learning next (random / first / uncertainty), and info polling
(``/info/``, ``/datastore/``, ``/train/``, ``/hybrid_ct/versions``, image and label info); at half time a
retrain (``POST /train/hybrid_ct``, promotion forced, so the new version must be served afterwards).
Every ``--sample-s`` seconds the server's RSS (and its children's), open file descriptors and threads are
sampled. Reported: requests served, errors (a 5xx, a connection error, or any status other than the
expected ones), latency percentiles per kind and per minute, the samples, and the drift of RSS and fds
from the first sample after warm-up to the end.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/soak_server.py --minutes 30 --json soak.json

Exit status 1 when any request failed. ``soak(url, pid, minutes, ...)`` is what tests/test_server_soak.py calls.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# statuses that are not errors: 409 a training was already running; GET /train/ answers 404 (MONAI Label's
# "No Train Tasks Found") until the first training
EXPECTED = {"retrain": {200, 409}, "train_status": {200, 404}}


def _session():
    import requests

    s = requests.Session()
    s.trust_env = False
    return s


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.rows = []  # (t, kind, status, seconds)
        self.errors = []

    def call(self, kind: str, fn, ok=(200,)):
        t0 = time.time()
        try:
            r = fn()
            status = r.status_code
            text = r.text[:200] if status not in ok else ""
        except Exception as e:  # noqa: BLE001 - a connection error is an error
            status, text, r = 0, repr(e)[:200], None
        dt = time.time() - t0
        with self.lock:
            self.rows.append((t0, kind, status, dt))
            if status not in ok:
                self.errors.append({"t": round(t0, 1), "kind": kind, "status": status, "answer": text})
        return r if status in ok else None


def sample(pid: int) -> dict:
    import psutil

    p = psutil.Process(pid)
    kids = p.children(recursive=True)
    rss_kids = 0
    for k in kids:
        try:
            rss_kids += k.memory_info().rss
        except psutil.Error:
            pass
    return {"t": round(time.time(), 1), "rss_mb": round(p.memory_info().rss / 2 ** 20, 1),
            "children_rss_mb": round(rss_kids / 2 ** 20, 1), "children": len(kids), "fds": p.num_fds(),
            "threads": p.num_threads()}


def percentiles(values) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}


def soak(url: str, pid: int, minutes: float, sample_s: float = 60, seed: int = 1, images=None,
         log=print) -> dict:
    from server_fixture import phantom_files

    rng = random.Random(seed)
    rec = Recorder()
    stop = threading.Event()
    work = Path(tempfile.mkdtemp(prefix="soak_"))
    s = _session()
    ids = images or [o for o in s.get(f"{url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]]
    uploads = [phantom_files(work, seed=500 + i, name=f"up{i}")[:2] for i in range(3)]
    soak_ids = [f"soak_label_{i}" for i in range(3)]
    for i, sid in enumerate(soak_ids):  # the images whose final labels are corrected again and again
        rec.call("upload", lambda sid=sid, i=i: s.put(f"{url}/datastore/image", params={"image": sid},
                                                      files={"file": ("c.nii.gz", uploads[i][0].read_bytes())},
                                                      timeout=300))
        rec.call("label", lambda sid=sid, i=i: s.put(f"{url}/datastore/label", params={"image": sid, "tag": "final"},
                                                     files={"label": ("l.nii.gz", uploads[i][1].read_bytes())},
                                                     timeout=300))
    end = time.time() + minutes * 60

    def infer_client():
        c = _session()
        while not stop.is_set():
            image = rng.choice(ids)
            out = rng.choice(("json", "json", "all"))
            rec.call("infer", lambda: c.post(f"{url}/infer/hybrid_ct", params={"image": image, "output": out},
                                             files={"params": (None, "{}")}, timeout=600))

    def upload_client():
        c = _session()
        n = 0
        while not stop.is_set():
            n += 1
            img = uploads[n % 3][0].read_bytes()
            iid = f"soak_up_{seed}_{n}"
            rec.call("upload", lambda: c.put(f"{url}/datastore/image", params={"image": iid},
                                             files={"file": ("c.nii.gz", img)}, timeout=300))
            rec.call("upload_again", lambda: c.put(f"{url}/datastore/image", params={"image": iid},
                                                   files={"file": ("c.nii.gz", img)}, timeout=300))
            rec.call("delete_image", lambda: c.delete(f"{url}/datastore/image", params={"id": iid}, timeout=300))
            stop.wait(1.0)

    def label_client():
        c = _session()
        n = 0
        while not stop.is_set():
            n += 1
            k = n % 3
            rec.call("label", lambda: c.put(
                f"{url}/datastore/label", params={"image": soak_ids[k], "tag": "final"},
                files={"label": ("l.nii.gz", uploads[k][1].read_bytes()),
                       "params": (None, json.dumps({"label_info": [{"name": "lung", "idx": 1},
                                                                   {"name": "infection", "idx": 2}]}))},
                timeout=300))
            stop.wait(2.0)

    def poll_client():
        c = _session()
        while not stop.is_set():
            strategy = rng.choice(("random", "first", "uncertainty"))
            rec.call("next", lambda: c.post(f"{url}/activelearning/{strategy}", json={}, timeout=120))
            for kind, path, params in (("info", "/info/", None), ("datastore", "/datastore/", {"output": "stats"}),
                                       ("train_status", "/train/", None), ("versions", "/hybrid_ct/versions", None),
                                       ("image_info", "/datastore/image/info", {"image": rng.choice(ids)}),
                                       ("label_info", "/datastore/label/info",
                                        {"label": rng.choice(soak_ids), "tag": "final"})):
                rec.call(kind, lambda: c.get(url + path, params=params, timeout=120), ok=EXPECTED.get(kind, (200,)))
            stop.wait(0.5)

    samples = [sample(pid)]
    retrain = {}

    def sampler():
        half = time.time() + minutes * 30
        while not stop.wait(min(sample_s, max(0.1, end - time.time()))):
            samples.append(sample(pid))
            log(f"[soak] {len(rec.rows)} requests, {len(rec.errors)} errors, sample {samples[-1]}")
            if not retrain and time.time() >= half:
                retrain["before"] = s.get(f"{url}/hybrid_ct/versions", timeout=60).json()["current"]
                r = rec.call("retrain", lambda: s.post(f"{url}/train/hybrid_ct", timeout=120,
                                                       json={"max_epochs": 1, "force_promote": True}),
                             ok=EXPECTED["retrain"])
                retrain["started"] = time.time()
                retrain["status"] = r.status_code if r is not None else None
            if time.time() >= end:
                stop.set()

    threads = [threading.Thread(target=f, daemon=True, name=f.__name__)
               for f in (infer_client, infer_client, upload_client, label_client, poll_client, sampler)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(60.0, end - time.time() + 900))
    samples.append(sample(pid))
    if retrain:  # wait for the retrain to end, then the served version must be the new one
        from server_fixture import wait_until

        def done():
            st = s.get(f"{url}/train/", timeout=60).json()
            return st if st.get("status") not in ("SUBMITTED", "RUNNING") else None

        st = wait_until(done, "the soak's retrain to end", timeout_s=1800)
        retrain.update(train_status=st.get("status"),
                       after=s.get(f"{url}/hybrid_ct/versions", timeout=60).json()["current"],
                       seconds=round(time.time() - retrain["started"], 1))
        r = rec.call("infer", lambda: s.post(f"{url}/infer/hybrid_ct", params={"image": ids[0], "output": "json"},
                                             files={"params": (None, "{}")}, timeout=600))
        retrain["served_after"] = r.json().get("model_version") if r is not None else None
    t_start = min(r[0] for r in rec.rows)
    by_kind, by_minute = defaultdict(list), defaultdict(list)
    for t, kind, status, dt in rec.rows:
        by_kind[kind].append(dt)
        by_minute[int((t - t_start) // 60)].append(dt)
    warm = samples[min(1, len(samples) - 1)]
    drift_min = max((samples[-1]["t"] - warm["t"]) / 60, 1e-9)
    return {
        "minutes": minutes, "requests": len(rec.rows), "errors": len(rec.errors), "error_list": rec.errors[:50],
        "by_kind": {k: percentiles(v) for k, v in sorted(by_kind.items())},
        "by_minute": {m: percentiles(v) for m, v in sorted(by_minute.items())},
        "samples": samples, "retrain": retrain,
        "drift": {"rss_mb": round(samples[-1]["rss_mb"] - warm["rss_mb"], 1),
                  "rss_mb_per_min": round((samples[-1]["rss_mb"] - warm["rss_mb"]) / drift_min, 2),
                  "fds": samples[-1]["fds"] - warm["fds"], "threads": samples[-1]["threads"] - warm["threads"]},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--sample-s", type=float, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--url", help="a running server (default: start one in a temp folder)")
    ap.add_argument("--pid", type=int, help="the running server's PID (needed with --url)")
    ap.add_argument("--json", type=Path, help="write the full result here")
    args = ap.parse_args(argv)
    from server_fixture import start_server, stop_server

    server = None
    if not args.url:
        server = start_server(Path(tempfile.mkdtemp(prefix="soak_server_")), conf={"auto_train_after": "0"})
        args.url, args.pid = server.url, server.proc.pid
    try:
        res = soak(args.url, args.pid, args.minutes, args.sample_s, args.seed)
    finally:
        if server is not None:
            stop_server(server)
    short = {k: v for k, v in res.items() if k not in ("samples", "by_minute", "error_list")}
    print(json.dumps(short, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
