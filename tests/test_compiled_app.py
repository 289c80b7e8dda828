"""The app's compiled path (conf ``infer_compile``, issue 30): the served version is loaded and compiled by the
background loader, not by a request, with its cache folder keyed by the checkpoint; a published version is
picked up the same way. Dynamo's ``eager`` backend (the graph capture without code generation) keeps it fast;
tests/test_compiled.py runs the real inductor path."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

pytest.importorskip("monailabel")

from lib.infers.hybrid_ct import ModelServer  # noqa: E402
from lib.store import ModelStore  # noqa: E402

from hybrid_ct.files import file_sha256  # noqa: E402
from hybrid_ct.net import compiled  # noqa: E402
from hybrid_ct.net.checkpoint import save_checkpoint  # noqa: E402
from hybrid_ct.net.network import HybridMultiTaskNet, NetConfig  # noqa: E402

TINY = dict(levels=2, base_channels=2, fc_hidden=4, time_steps=2, in_size=16)


def _net(seed=0):
    torch.manual_seed(seed)
    return HybridMultiTaskNet(NetConfig(**TINY))


def _wait(cond, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "the background loader did not load the model in time"
        time.sleep(0.1)


def test_preload_compiles_current_and_published_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    store = ModelStore(tmp_path / "model")
    save_checkpoint(store.shipped, _net(0), {"version": "release-1"})
    server = ModelServer(store, device="cpu", batch_size=4, compile_net=True, compile_cache=str(tmp_path / "cc"))
    assert server.peek() is None
    server.preload(interval_s=0.2)
    assert server.preload(interval_s=0.2) is server._preloader  # one loader
    _wait(lambda: server.peek() is not None and server.peek().predictor.compiled is not None)
    first = server.peek()
    assert first.predictor.compiled.compile_s is not None
    assert first.predictor.compiled.cache_dir == compiled.compile_cache_dir(file_sha256(store.shipped),
                                                                            tmp_path / "cc")
    v1 = store.publish(_net(1), {"metric": 0.6})
    _wait(lambda: server.peek().version == v1 and server.peek().predictor.compiled is not None)  # no request asked
    assert server.peek().predictor.compiled.cache_dir != first.predictor.compiled.cache_dir
    with server.running() as (served, _):
        assert served is server.peek()  # the request finds it loaded and compiled


def test_requests_do_not_wait_for_a_compile(tmp_path, monkeypatch):
    """While the background loader compiles, the version is already served by the eager network; the
    compiled one takes over when its warm-up ends."""
    import threading

    monkeypatch.setattr(compiled, "BACKEND", "eager")
    release = threading.Event()
    warm_up = compiled.CompiledNet.warm_up

    def slow_warm_up(self, *a, **kw):
        assert release.wait(60)
        return warm_up(self, *a, **kw)

    monkeypatch.setattr(compiled.CompiledNet, "warm_up", slow_warm_up)
    store = ModelStore(tmp_path / "model")
    save_checkpoint(store.shipped, _net(0), {"version": "release-1"})
    server = ModelServer(store, device="cpu", batch_size=4, compile_net=True, compile_cache=str(tmp_path / "cc"))
    server.preload(interval_s=0.2)
    _wait(lambda: server.peek() is not None)
    with server.running() as (served, _):  # the compile is blocked: the eager network answers
        assert served.predictor.compiled is None
        out = served.predictor.run_slices(np.random.rand(3, 1, 16, 16).astype(np.float32))
        assert out.lung.shape == (3, 1, 16, 16)
    release.set()
    _wait(lambda: server.peek().predictor.compiled is not None)


def test_a_failed_compile_serves_the_eager_network(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "no-such-backend")
    store = ModelStore(tmp_path / "model")
    save_checkpoint(store.shipped, _net(0), {"version": "release-1"})
    predictor = ModelServer(store, device="cpu", compile_net=True, compile_cache=str(tmp_path / "cc")).get().predictor
    assert predictor.compiled is None and "no-such-backend" in predictor.compile_error


def test_eager_server_has_no_compiled_network(tmp_path):
    store = ModelStore(tmp_path / "model")
    save_checkpoint(store.shipped, _net(0), {"version": "release-1"})
    served = ModelServer(store, device="cpu").get()
    assert served.predictor.compiled is None
