"""Segment import/export against real MRML nodes (headless, with the ``slicer-core`` wheel).

Also loads slicer_extension/HybridCT/HybridCT.py itself (with stand-ins for the Qt-only pieces:
``qt``, ``ctk``, ``slicer.ScriptedLoadableModule``) and runs its logic and its Slicer self-test.

Skipped, with the reason, when slicer-core cannot be imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import unittest
import warnings
from pathlib import Path

import numpy as np
import pytest

try:
    import slicer  # noqa: E402  (slicer-core; imports every module of any folder named slicer/ on sys.path)

    if not hasattr(slicer, "vtkMRMLScene") or not hasattr(slicer, "vtkSlicerSegmentationsModuleLogic"):
        raise ImportError(f"'slicer' at {getattr(slicer, '__file__', '?')} has no MRML/segmentation classes "
                          "(not slicer-core?)")
    from hybrid_ct_slicer import mrml
    SKIP_REASON = None
except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
    SKIP_REASON = f"slicer-core cannot be imported: {exc.__class__.__name__}: {exc}"

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

from hybrid_ct_slicer.imageio import Geometry, read_image, write_image  # noqa: E402
from hybrid_ct_slicer.segments import (LABEL_INFO, SegmentError, SegmentWarning, color01,  # noqa: E402
                                       server_label_info)
from hybrid_ct_slicer.testdata import make_chest_volume  # noqa: E402

MODULE_FILE = Path(__file__).resolve().parents[1] / "slicer_extension" / "HybridCT" / "HybridCT.py"


def _rotated(geometry: Geometry) -> Geometry:
    th = 0.25
    rot = np.array([[np.cos(th), 0, np.sin(th)], [0, 1, 0], [-np.sin(th), 0, np.cos(th)]]) @ np.diag([-1, 1, 1])
    return Geometry(geometry.spacing, geometry.origin, tuple(rot.reshape(-1)))


@pytest.fixture(scope="module")
def phantom():
    ct, label, geometry = make_chest_volume(shape=(10, 40, 40))
    return ct, label, _rotated(geometry)


@pytest.fixture()
def scene():
    return mrml.new_scene()


@pytest.fixture()
def volume(scene, phantom):
    ct, _, geometry = phantom
    return mrml.add_volume(scene, ct, geometry, "CT")


def _names(seg_node):
    return mrml.segment_names(seg_node)


def test_volume_from_numpy_keeps_voxels_and_geometry(scene, phantom, volume):
    ct, _, geometry = phantom
    assert volume.IsA("vtkMRMLScalarVolumeNode")
    assert np.array_equal(mrml.array_from_volume(volume), ct)
    assert mrml.node_geometry(volume).almost_equal(geometry)
    assert np.array_equal(slicer.util.arrayFromVolume(volume), ct)  # Slicer's own [k, j, i] view agrees


def test_labelmap_import_named_coloured_coded(scene, phantom, volume):
    _, label, _ = phantom
    seg_node = mrml.labelmap_to_segmentation(scene, label, volume, show_3d=True)
    assert seg_node.IsA("vtkMRMLSegmentationNode")
    assert _names(seg_node) == ["Right lung", "Left lung", "Infection"]
    segmentation = seg_node.GetSegmentation()
    for info in LABEL_INFO:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(info["name"]))
        assert np.allclose(segment.GetColor(), color01(info["name"]))
        entry = mrml.segment_terminology(segment)
        assert f"SCT^{info['type'][1]}^{info['type'][2]}" in entry
        if info["type_modifier"]:  # the sided lungs: Lung + Right / Left
            assert f"SCT^{info['type'][1]}^{info['type'][2]}~SCT^{info['type_modifier'][1]}^" in entry
    assert segmentation.ContainsRepresentation("Closed surface")  # 3D view: converter rules registered
    assert seg_node.GetDisplayNode() is not None
    # temporary nodes are gone
    classes = {scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())}
    assert not any(name.startswith("__hybrid_ct") for name in classes)


def test_export_by_name_shuffled_with_extra_segment(scene, phantom, volume):
    _, label, geometry = phantom
    seg_node = mrml.labelmap_to_segmentation(scene, label, volume)
    segmentation = seg_node.GetSegmentation()
    heart_id = segmentation.AddEmptySegment("Heart", "Heart", (1.0, 0.0, 0.0))
    segmentation.SetSegmentIndex(heart_id, 0)
    segmentation.SetSegmentIndex(segmentation.GetSegmentIdBySegmentName("Infection"), 1)
    assert _names(seg_node) == ["Heart", "Infection", "Right lung", "Left lung"]

    with pytest.raises(SegmentError, match="'Heart'"):
        mrml.export_labelmap(scene, seg_node, volume)
    with pytest.warns(SegmentWarning, match="'Heart'"):
        out, label_info, out_geometry = mrml.export_labelmap(scene, seg_node, volume, ignore_extra=True)
    assert out.dtype == np.uint8
    assert np.array_equal(out, label)
    assert out_geometry.almost_equal(geometry)
    assert label_info == server_label_info()
    nodes_before = scene.GetNumberOfNodes()
    with pytest.warns(SegmentWarning):
        mrml.export_labelmap(scene, seg_node, volume, ignore_extra=True)
    assert scene.GetNumberOfNodes() == nodes_before  # the export leaves no node behind


def test_renamed_and_missing_segments(scene, phantom, volume):
    _, label, _ = phantom
    seg_node = mrml.labelmap_to_segmentation(scene, label, volume)
    segmentation = seg_node.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Right lung")).SetName("lung_right")
    out, _, _ = mrml.export_labelmap(scene, seg_node, volume)
    assert np.array_equal(out, label)
    segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName("Infection"))
    with pytest.raises(SegmentError, match="'Infection' is missing"):
        mrml.export_labelmap(scene, seg_node, volume)


def test_negative_scan_gets_empty_infection_segment(scene, phantom, volume):
    _, label, _ = phantom
    lung_only = (label > 0).astype(np.uint8)  # one lung without sides: its own segment, the others empty
    seg_node = mrml.labelmap_to_segmentation(scene, lung_only, volume)
    assert _names(seg_node) == ["Lung", "Right lung", "Left lung", "Infection"]
    out, _, _ = mrml.export_labelmap(scene, seg_node, volume)
    assert np.array_equal(out, lung_only)


def test_overlapping_segments_infection_wins(scene, phantom, volume):
    """Segments on separate layers may overlap (e.g. Right lung painted over the infection)."""
    _, label, _ = phantom
    seg_node = mrml.labelmap_to_segmentation(scene, label, volume)
    segmentation = seg_node.GetSegmentation()
    whole_lung = np.isin(label, (2, 3)).astype(np.uint8)
    lung_id = segmentation.GetSegmentIdBySegmentName("Right lung")
    # put Right lung on its own layer, then make it cover the infection too
    segmentation.SeparateSegmentLabelmap(lung_id)
    mrml.set_segment_from_array(scene, seg_node, lung_id, whole_lung, volume)
    arrays = mrml.segment_arrays(scene, seg_node, volume)
    assert np.array_equal(arrays["Right lung"], whole_lung)
    out, _, _ = mrml.export_labelmap(scene, seg_node, volume)
    assert np.array_equal(out, label)


def test_unknown_label_values_refused(scene, phantom, volume):
    _, label, _ = phantom
    bad = label.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(SegmentError, match=r"\[7\]"):
        mrml.labelmap_to_segmentation(scene, bad, volume)


def test_seg_nrrd_round_trip(scene, phantom, volume, tmp_path):
    _, label, _ = phantom
    seg_node = mrml.labelmap_to_segmentation(scene, label, volume)
    path = mrml.write_segmentation(scene, seg_node, str(tmp_path / "case.seg.nrrd"))
    assert os.path.getsize(path) > 0
    header = open(path, "rb").read(4000).decode("latin-1")
    assert "Segment0_Name:=Right lung" in header and "Segment2_Name:=Infection" in header
    assert "SCT^39607008^Lung~SCT^7771000^Left" in header

    other_scene = mrml.new_scene()
    other_volume = mrml.add_volume(other_scene, phantom[0], phantom[2], "CT")
    reread = mrml.read_segmentation(other_scene, path)
    assert _names(reread) == ["Right lung", "Left lung", "Infection"]
    out, _, _ = mrml.export_labelmap(other_scene, reread, other_volume)
    assert np.array_equal(out, label)


def test_server_label_file_to_segments_and_back(scene, phantom, volume, tmp_path):
    """The label file the server returns (.nii.gz in the image geometry) -> segments -> correction file."""
    sitk = pytest.importorskip("SimpleITK")
    _, label, geometry = phantom
    returned = write_image(str(tmp_path / "from_server.nii.gz"), label, geometry)
    seg_node = mrml.label_file_to_segmentation(scene, returned, volume)
    assert _names(seg_node) == ["Right lung", "Left lung", "Infection"]
    out, _, out_geometry = mrml.export_labelmap(scene, seg_node, volume)
    sent = write_image(str(tmp_path / "correction.nii.gz"), out, out_geometry)
    img = sitk.ReadImage(sent)
    assert np.array_equal(sitk.GetArrayFromImage(img), label)
    assert np.allclose(img.GetOrigin(), geometry.origin, atol=1e-4)
    assert np.allclose(img.GetDirection(), geometry.direction, atol=1e-5)
    arr, geom = read_image(sent)
    assert np.array_equal(arr, label) and geom.almost_equal(geometry)


# ---------------------------------------------------------------------------- the module file itself
@pytest.fixture()
def hybridct_module(monkeypatch):
    """Import HybridCT.py with stand-ins for what only the Slicer application provides."""
    qt = types.ModuleType("qt")

    class QSettings:
        store: dict = {}

        def value(self, key, default=None):
            return self.store.get(key, default)

        def setValue(self, key, value):
            self.store[key] = value

    qt.QSettings = QSettings
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    for name in [m for m in sys.modules if m == "HybridCTLib" or m.startswith("HybridCTLib.")]:
        monkeypatch.delitem(sys.modules, name)  # the module's Qt helpers, imported afresh with these stand-ins
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", mrml.new_scene(), raising=False)
    monkeypatch.delenv("HYBRID_CT_SERVER_URL", raising=False)
    spec = importlib.util.spec_from_file_location("HybridCT_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_self_test_runs_headless(hybridct_module):
    """The ScriptedLoadableModuleTest a user runs with "Reload and Test" (offline parts)."""
    test = hybridct_module.HybridCTTest("runTest")
    test.runTest()


def test_module_logic_round_trip(hybridct_module, phantom, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    ct, label, geometry = phantom
    logic = hybridct_module.HybridCTLogic(workDir=str(tmp_path / "work"))
    volume = mrml.add_volume(logic.scene, ct, geometry, "case 7/a")
    identity = mrml.volume_identity(volume)
    assert identity.image_id.startswith("ct-") and identity.source == "content"  # never from the node name
    snapshot = mrml.volume_snapshot(volume)
    assert np.array_equal(snapshot["array"], ct) and snapshot["geometry"].almost_equal(geometry)
    path = str(tmp_path / "written.nii.gz")
    from hybrid_ct_slicer.imageio import write_image
    img = sitk.ReadImage(write_image(path, snapshot["array"], snapshot["geometry"]))
    assert np.array_equal(sitk.GetArrayFromImage(img), ct)
    assert np.allclose(img.GetDirection(), geometry.direction, atol=1e-5)

    seg_node = logic.showLabelmap(label, volume)
    display = seg_node.GetDisplayNode()
    for name in ("Right lung", "Left lung"):
        lung_id = seg_node.GetSegmentation().GetSegmentIdBySegmentName(name)
        assert display.GetSegmentOpacity3D(lung_id) == pytest.approx(0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, info, geom = logic.exportSegmentation(seg_node, volume)
    assert np.array_equal(out, label) and geom.almost_equal(geometry)
