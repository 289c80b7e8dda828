"""Issue 28 point 6: no Qt or MRML access off the main thread; the 50 ms timer stops when idle.

HybridCT.py itself (the widget, not a copy) is loaded with stand-ins for what only the Slicer application
provides (``qt``, ``ctk``, dialogs, ``slicer.util.loadVolume``); its widgets are a guard object that records
the thread of every access, and ``slicer.mrmlScene`` and the logic's scene are guarded the same way. The
buttons' flows then run against the REAL server (tests/server_fixture.py): Connect, the training-status
poll, Run, Submit, Next sample, model versions. Any access from a worker thread fails the test; a control
job that reads a combo box in its worker shows that the guard does catch it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
import time
import types
import unittest
from pathlib import Path

import pytest

try:
    import slicer  # noqa: F401  (slicer-core)

    from hybrid_ct_slicer import mrml
    SKIP_REASON = None
except Exception as exc:  # noqa: BLE001
    SKIP_REASON = f"slicer-core cannot be imported: {exc.__class__.__name__}: {exc}"

pytestmark = [pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""), pytest.mark.server]

from hybrid_ct_slicer.testdata import make_chest_volume  # noqa: E402

from server_fixture import server  # noqa: E402,F401  (the real app server)

MODULE_FILE = Path(__file__).resolve().parents[1] / "slicer_extension" / "HybridCT" / "HybridCT.py"


class Guard:
    """Records every access made from a thread other than the main (GUI) thread."""

    def __init__(self):
        self.off_main: list = []

    def touch(self, what: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.off_main.append((what, threading.current_thread().name))


class FakeWidget:
    """A Qt widget stand-in (line edit, label, combo box, node selector, progress bar, button, check box)."""

    def __init__(self, name, guard):
        d = object.__getattribute__(self, "__dict__")
        d.update(_name=name, _guard=guard, _items=[], _index=-1, _node=None, text="", checked=False, enabled=True,
                 toolTip="", style="", value=0)

    def __getattribute__(self, attr):
        d = object.__getattribute__(self, "__dict__")
        d["_guard"].touch(f"ui.{d['_name']}.{attr}")
        return object.__getattribute__(self, attr)

    def __setattr__(self, attr, value):
        self._guard.touch(f"ui.{self._name}.{attr} =")
        object.__setattr__(self, attr, value)

    # combo box
    def addItem(self, text):
        self._items.append(text)
        if self._index < 0:
            self._index = 0

    def clear(self):
        self._items.clear()
        self._index = -1

    @property
    def count(self):
        return len(self._items)

    @property
    def currentText(self):
        return self._items[self._index] if 0 <= self._index < len(self._items) else ""

    @property
    def currentIndex(self):
        return self._index

    def setCurrentIndex(self, i):
        self._index = i

    def blockSignals(self, _block):
        return False

    # node selector
    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        self._node = node

    # progress bar, labels
    def setValue(self, v):
        self.value = v

    def setFormat(self, _f):
        pass

    def setStyleSheet(self, s):
        self.style = s


class FakeUi:
    def __init__(self, guard):
        object.__setattr__(self, "_guard", guard)
        object.__setattr__(self, "_widgets", {})

    def __getattr__(self, name):
        self._guard.touch(f"ui.{name}")
        return self._widgets.setdefault(name, FakeWidget(name, self._guard))


class GuardedScene:
    """``slicer.mrmlScene`` for the widget: delegates to the real scene, records the thread."""

    def __init__(self, scene, guard):
        object.__setattr__(self, "_scene", scene)
        object.__setattr__(self, "_guard", guard)

    def __getattr__(self, name):
        self._guard.touch(f"slicer.mrmlScene.{name}")
        return getattr(self._scene, name)


class FakeTimer:
    def __init__(self):
        self.active, self.interval, self.started = False, None, 0

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, *_args):
        pass

    def start(self):
        self.active, self.started = True, self.started + 1

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


@pytest.fixture()
def harness(monkeypatch, tmp_path):
    guard, messages = Guard(), []
    scene = mrml.new_scene()
    qt = types.ModuleType("qt")

    class QSettings:
        store: dict = {}

        def value(self, key, default=None):
            guard.touch(f"QSettings.value({key})")
            return self.store.get(key, default)

        def setValue(self, key, value):
            guard.touch(f"QSettings.setValue({key})")
            self.store[key] = value

    qt.QSettings, qt.QTimer = QSettings, FakeTimer
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name, base in (("ScriptedLoadableModule", object), ("ScriptedLoadableModuleWidget", object),
                       ("ScriptedLoadableModuleLogic", object), ("ScriptedLoadableModuleTest", unittest.TestCase)):
        setattr(slm, name, type(name, (base,), {"__init__": (lambda self, *a, **k: None)} if base is object else {}))
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    for name in [m for m in sys.modules if m == "HybridCTLib" or m.startswith("HybridCTLib.")]:
        monkeypatch.delitem(sys.modules, name)  # import them afresh with these stand-ins
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", GuardedScene(scene, guard), raising=False)
    util = slicer.util
    monkeypatch.setattr(util, "WaitCursor", contextlib.nullcontext, raising=False)
    for name in ("errorDisplay", "warningDisplay"):
        monkeypatch.setattr(util, name, lambda text, **_k: messages.append(text), raising=False)
    monkeypatch.setattr(util, "confirmOkCancelDisplay", lambda text, **_k: messages.append(text) or True, raising=False)
    monkeypatch.setattr(util, "setSliceViewerLayers", lambda **_k: None, raising=False)

    def load_volume(path):  # slicer.util.loadVolume needs the application's IO manager
        from hybrid_ct_slicer.imageio import read_image

        array, geometry = read_image(path)
        return mrml.add_volume(scene, array, geometry, "loaded")

    monkeypatch.setattr(util, "loadVolume", load_volume, raising=False)
    monkeypatch.delenv("HYBRID_CT_API_TOKEN", raising=False)
    spec = importlib.util.spec_from_file_location("HybridCT_threads_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class GuardedLogic(module.HybridCTLogic):
        def __getattribute__(self, name):
            if name in ("scene", "segmentationsLogic", "parameterNode"):
                guard.touch(f"logic.{name}")
            return super().__getattribute__(name)

        def __setattr__(self, name, value):
            guard.touch(f"logic.{name} =")
            super().__setattr__(name, value)

    widget = module.HybridCTWidget()
    widget.ui = FakeUi(guard)
    widget.logic = GuardedLogic(scene=scene, workDir=str(tmp_path / "work"))
    widget._createJobs()
    return types.SimpleNamespace(widget=widget, guard=guard, scene=scene, messages=messages)


def _drive(widget, until, timeout=300):
    """What the QTimer does in Slicer: call _tick on the GUI (here: main) thread until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        widget._tick()
        if time.monotonic() > deadline:
            raise AssertionError("timed out driving the widget")
        time.sleep(0.01)
    widget._tick()


def test_workers_never_touch_qt_or_mrml(harness, server):
    w, guard = harness.widget, harness.guard
    ct, _label, geometry = make_chest_volume(shape=(12, 64, 64), seed=31)
    volume = mrml.add_volume(harness.scene, ct, geometry, "Patient A")
    w._pickedVolumeId = volume.GetID()
    w._followView()
    assert w.ui.inputVolumeSelector.currentNode() is volume

    w.ui.serverUrlLineEdit.text = server.url
    w.onConnect()
    _drive(w, lambda: not w.jobs.busy)
    assert w.logic.info is not None and w.ui.modelComboBox.currentText
    _drive(w, lambda: w.ui.trainStatusLabel.text != "")  # the first training-status poll came back

    w.onRun()
    _drive(w, lambda: not w.jobs.busy)
    seg = w.ui.segmentationSelector.currentNode()
    assert seg is not None and w.ui.classificationValueLabel.text not in ("", "n/a"), harness.messages
    assert "not for diagnosis" in w.ui.statusLabel.text
    assert not list((Path(w.logic.workDir)).glob("*")), "the label file was left behind"

    w.onSubmit()
    _drive(w, lambda: not w.jobs.busy)
    assert "saved on the server as the final label" in w.ui.statusLabel.text, w.ui.statusLabel.text

    w.ui.strategyComboBox.setCurrentIndex(w.ui.strategyComboBox._items.index("random")
                                          if "random" in w.ui.strategyComboBox._items else 0)
    w.onNextSample()
    _drive(w, lambda: not w.jobs.busy)
    w.onRefreshVersions()
    _drive(w, lambda: not w.jobs.running)
    assert not harness.messages, harness.messages
    assert guard.off_main == [], f"workers touched Qt/MRML: {guard.off_main[:10]}"

    # the guard catches a worker that reads a widget (what the status poll did before)
    w._start("Control", lambda job: w.ui.modelComboBox.currentText, lambda _r: None)
    _drive(w, lambda: not w.jobs.busy)
    assert any(what.startswith("ui.modelComboBox") for what, _thread in guard.off_main)


def test_timer_ticks_fast_only_while_a_job_runs(harness, server):
    w = harness.widget
    timer = w._timer
    w._scheduleTimer()
    assert not timer.active  # nothing runs, nothing is polled: no 50 ms timer
    w.ui.serverUrlLineEdit.text = server.url
    w.onConnect()
    assert timer.active and timer.interval == 50
    _drive(w, lambda: not w.jobs.running and w.ui.trainStatusLabel.text != "")
    assert timer.active and timer.interval >= 1000  # idle: wakes only for the next status poll
    w._poller.stop()
    w._tick()
    assert not timer.active  # nothing left to do: the timer is stopped


def test_widget_switching_patient_clears_the_panel(harness, server):
    """Point 1 at the widget: the views switch from A to B -> results n/a, A's segmentation hidden and
    deselected, Edit refuses A's segments over B; back to A -> its segmentation and results again."""
    w = harness.widget
    a = mrml.add_volume(harness.scene, *_ct(41), "Patient A")
    b = mrml.add_volume(harness.scene, *_ct(42), "Patient B")
    w._pickedVolumeId = a.GetID()
    w._followView()
    w.ui.serverUrlLineEdit.text = server.url
    w.onConnect()
    _drive(w, lambda: not w.jobs.busy)
    w.onRun()
    _drive(w, lambda: not w.jobs.busy)
    seg_a = w.ui.segmentationSelector.currentNode()
    shown = w.ui.classificationValueLabel.text
    assert seg_a is not None and shown != "n/a" and seg_a.GetDisplayNode().GetVisibility()

    w._pickedVolumeId = b.GetID()  # what a new volume in the red view does
    w._followView()
    assert w.ui.classificationValueLabel.text == "n/a" and w.ui.gradeValueLabel.text == "n/a"
    assert w.ui.segmentationSelector.currentNode() is None
    assert not seg_a.GetDisplayNode().GetVisibility()
    w.ui.segmentationSelector.setCurrentNode(seg_a)  # picked by hand anyway
    w.onEditSegments()
    assert "made on volume 'Patient A', not on volume 'Patient B'" in w.ui.statusLabel.text
    assert harness.messages and "Patient A" in harness.messages[-1]

    w._pickedVolumeId = a.GetID()
    w._followView()
    assert w.ui.segmentationSelector.currentNode() is seg_a and w.ui.classificationValueLabel.text == shown
    assert seg_a.GetDisplayNode().GetVisibility()
    _drive(w, lambda: not w.jobs.running)


def _ct(seed):
    ct, _label, geometry = make_chest_volume(shape=(12, 64, 64), seed=seed)
    return ct, geometry
