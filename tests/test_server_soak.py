"""A 2-minute soak of the real server (benchmarks/soak_server.py; the 30-minute run is in docs/benchmarks.md):
inference, uploads, label corrections, active-learning next and info polling from a few clients at once, a
retrain in the middle; no request may fail, the retrained version is served afterwards, and the server's
open file descriptors and memory stay within bounds."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from server_fixture import start_server, stop_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
FD_GROWTH = 20  # open files of the server process, last sample vs the first after warm-up
RSS_GROWTH_MB = 300


def test_two_minute_soak(tmp_path):
    from soak_server import soak

    live = start_server(tmp_path / "srv", conf={"auto_train_after": "0"})
    try:
        res = soak(live.url, live.proc.pid, minutes=2, sample_s=20, log=lambda *_: None)
        assert live.alive()
    finally:
        stop_server(live)
    kinds_failed = sorted({(e["kind"], e["status"]) for e in res["error_list"]})
    assert res["errors"] == 0, (kinds_failed, res["error_list"][:5])
    kinds = res["by_kind"]
    for kind in ("infer", "upload", "upload_again", "delete_image", "label", "next", "info", "image_info",
                 "label_info", "versions", "retrain"):
        assert kinds.get(kind, {}).get("n", 0) >= 1, (kind, kinds)
    assert res["retrain"]["train_status"] == "DONE", res["retrain"]
    assert res["retrain"]["after"] != res["retrain"]["before"]
    assert res["retrain"]["served_after"] == res["retrain"]["after"]
    assert res["drift"]["fds"] <= FD_GROWTH, res["samples"]
    assert res["drift"]["rss_mb"] <= RSS_GROWTH_MB, res["samples"]
