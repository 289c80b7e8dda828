"""Issue 28: the right patient on screen, no edit lost, corrections only for the scan they were drawn on.

Headless MRML from slicer-core and the REAL Hybrid CT server (tests/server_fixture.py), through the
module's own logic (``hybrid_ct_slicer.logic.ModuleLogic``) and job runner:

- patient switch: results cleared, the previous segmentation hidden and deselected, the Segment Editor
  pairing of A's segments with B's CT refused (point 1);
- a segmentation edited while a Run job is in flight -> "ask" when the result arrives (point 2);
- foreign segmentations (.seg.nrrd on another grid / out of the volume, drawn on another volume):
  refused or confirmed BEFORE anything is sent (point 3);
- a volume under a real vtkMRMLLinearTransformNode: overlay and correction in the geometry on screen,
  a non-linear transform refused (point 4);
- the segmentation references its volume and sits under the volume's study (point 8).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

try:
    import slicer  # noqa: F401  (slicer-core)
    import vtk

    from hybrid_ct_slicer import mrml
    from hybrid_ct_slicer.logic import ModuleLogic
    SKIP_REASON = None
except Exception as exc:  # noqa: BLE001
    SKIP_REASON = f"slicer-core cannot be imported: {exc.__class__.__name__}: {exc}"

pytestmark = [pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""), pytest.mark.server]

from hybrid_ct_slicer.imageio import Geometry  # noqa: E402
from hybrid_ct_slicer.jobs import JobRunner  # noqa: E402
from hybrid_ct_slicer.panel import RESEARCH_NOTICE  # noqa: E402
from hybrid_ct_slicer.testdata import make_chest_volume  # noqa: E402

from server_fixture import server  # noqa: E402,F401  (the real app server)

SHAPE = (12, 64, 64)


@pytest.fixture()
def scene():
    return mrml.new_scene()


@pytest.fixture()
def logic(scene, server, tmp_path):
    lg = ModuleLogic(scene, workDir=str(tmp_path / "work"))
    lg.connect(server.url)
    return lg


def _volume(scene, seed, name, geometry=None):
    ct, label, g = make_chest_volume(shape=SHAPE, seed=seed)
    return mrml.add_volume(scene, ct, geometry or g, name), label


def _run(logic, volume, target=None):
    identity, result = logic.runVolume(mrml.volume_snapshot(volume), "hybrid_ct")
    return logic.showResult(result, volume, target, identity=identity, show3D=False)


def _paint(logic, seg, volume, name="Infection"):
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:7, 20:30, 20:30] = 1
    seg_id = seg.GetSegmentation().GetSegmentIdBySegmentName(name)
    mrml.set_segment_from_array(logic.scene, seg, seg_id, mask, volume, logic=logic.segmentationsLogic)


def _no_final_label(server, image_id):
    from server_fixture import http

    r = http().get(f"{server.url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=30)
    assert r.status_code in (200, 404), r.text
    return r.status_code == 404


# ------------------------------------------------------------------------------ point 1
def test_patient_switch_clears_panel_hides_and_refuses_cross_editing(scene, logic):
    a, _ = _volume(scene, 1, "Patient A")
    b, _ = _volume(scene, 2, "Patient B")
    seg_a = _run(logic, a)
    assert seg_a.GetDisplayNode().GetVisibility()
    assert logic.storedResults(seg_a)["classification"] != "n/a"
    assert seg_a.GetAttribute("HybridCT.notice") == RESEARCH_NOTICE

    plan = logic.switchVolume(b, a.GetID(), seg_a)  # the red view now shows B
    assert plan.clear_results and plan.select is None
    assert seg_a.GetID() in plan.hide and not seg_a.GetDisplayNode().GetVisibility()
    refusal = logic.editCheck(seg_a, b)
    assert refusal and "made on volume 'Patient A', not on volume 'Patient B'" in refusal

    plan = logic.switchVolume(a, None, None)  # back to A: its own segmentation again, with its results
    assert plan.select == seg_a.GetID() and not plan.clear_results
    assert seg_a.GetDisplayNode().GetVisibility()
    assert logic.editCheck(seg_a, a) is None
    seg_b = _run(logic, b)
    plan = logic.switchVolume(b, a.GetID(), seg_a)
    assert plan.select == seg_b.GetID() and plan.clear_results and seg_a.GetID() in plan.hide


# ------------------------------------------------------------------------------ point 2
def _deliver(runner, job, timeout=300):
    deadline = time.monotonic() + timeout
    while not job.finished or runner.running:
        runner.deliver()
        if time.monotonic() > deadline:
            raise AssertionError("the Run job did not finish")
        time.sleep(0.02)
    runner.deliver()


@pytest.mark.parametrize("edit", [True, False])
def test_edit_during_run_asks_when_the_result_arrives(scene, logic, edit):
    a, _ = _volume(scene, 3, "A")
    seg = _run(logic, a)
    assert logic.replaceDecision(seg, a) == "replace"  # unedited: Run may replace it when pressed
    start = logic.runStarted(seg)
    snapshot = mrml.volume_snapshot(a)
    decisions = []
    runner = JobRunner()
    job = runner.start("Run model", lambda j: logic.runVolume(snapshot, "hybrid_ct", job=j),
                       on_done=lambda outcome: decisions.append((logic.arrivalDecision(seg, start), outcome)),
                       on_error=lambda exc: decisions.append(("error", exc)))
    if edit:
        _paint(logic, seg, a)  # the radiologist paints while the job runs (Edit stays enabled)
    _deliver(runner, job)
    assert [d[0] for d in decisions] == (["ask"] if edit else ["replace"])
    logic.discardResult(decisions[0][1])
    scene.RemoveNode(seg)
    assert logic.arrivalDecision(seg, start) == "new"  # deleted meanwhile: a new segmentation


# ------------------------------------------------------------------------------ point 3
def test_foreign_segmentations_checked_before_sending(scene, logic, server, tmp_path):
    a, label = _volume(scene, 4, "A")
    g = mrml.node_geometry(a)
    # (1) a .seg.nrrd drawn on another field of view: most of it lies outside A -> refused
    far = mrml.add_volume(scene, np.zeros(SHAPE, np.int16),
                          Geometry(g.spacing, tuple(o + 60.0 for o in g.origin), g.direction), "elsewhere")
    seg_far = mrml.labelmap_to_segmentation(scene, label, far)
    path = mrml.write_segmentation(scene, seg_far, str(tmp_path / "far.seg.nrrd"))
    loaded = mrml.read_segmentation(scene, path, "loaded far")
    check = logic.checkSubmit(loaded, a)
    assert check.refuse and "does not fit volume 'A'" in check.refuse and "nothing was sent" in check.refuse
    # (2) a .seg.nrrd on a finer grid over the same field of view -> resampled, and a question first
    fine_g = Geometry(tuple(s / 2 for s in g.spacing), tuple(o - s / 4 for o, s in zip(g.origin, g.spacing)),
                      g.direction)
    fine_label = np.repeat(np.repeat(np.repeat(label, 2, 0), 2, 1), 2, 2)
    fine = mrml.add_volume(scene, np.zeros(fine_label.shape, np.int16), fine_g, "fine")
    path = mrml.write_segmentation(scene, mrml.labelmap_to_segmentation(scene, fine_label, fine),
                                   str(tmp_path / "fine.seg.nrrd"))
    loaded = mrml.read_segmentation(scene, path, "loaded fine")
    check = logic.checkSubmit(loaded, a)
    assert check.refuse is None and "not made by Hybrid CT" in check.question and "resampled" in check.question
    labelmap, _info, _geo = logic.exportSegmentation(loaded, a)
    assert (labelmap == label).mean() > 0.97  # the resampled correction matches the drawing
    # (3) drawn by hand on volume B, then Submit with A in use -> refused, even with the same grid
    b, _ = _volume(scene, 5, "B")
    hand = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "hand drawn")
    hand.SetReferenceImageGeometryParameterFromVolumeNode(b)  # what the Segment Editor does
    hand.GetSegmentation().AddEmptySegment("Lung", "Lung")
    check = logic.checkSubmit(hand, a)
    assert check.refuse and "made on volume 'B', not on volume 'A'" in check.refuse
    # (4) the module's own unedited result on A: no question
    own = _run(logic, a)
    check = logic.checkSubmit(own, a)
    assert check.refuse is None and check.question is None
    # nothing above reached the server's labels
    assert _no_final_label(server, mrml.volume_identity(a).image_id)


# ------------------------------------------------------------------------------ point 4
def _transform(scene, volume, angle=0.3, shift=(12.0, -7.0, 3.0)):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "tilt")
    m = vtk.vtkMatrix4x4()
    c, s = np.cos(angle), np.sin(angle)
    for r, row in enumerate(((c, -s, 0, shift[0]), (s, c, 0, shift[1]), (0, 0, 1, shift[2]))):
        for col, v in enumerate(row):
            m.SetElement(r, col, v)
    node.SetMatrixTransformToParent(m)
    volume.SetAndObserveTransformNodeID(node.GetID())
    return node, m


def test_volume_under_a_linear_transform(scene, logic):
    a, label = _volume(scene, 6, "tilted")
    local = mrml.node_geometry(a)
    _node, m = _transform(scene, a)
    world = mrml.world_geometry(a)
    expected = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]) @ local.ijk_to_ras()
    assert np.allclose(world.ijk_to_ras(), expected, atol=1e-6)
    snapshot = mrml.volume_snapshot(a)
    assert snapshot["geometry"].almost_equal(world) and snapshot["transform"] == "tilt"  # uploaded as shown

    seg = mrml.labelmap_to_segmentation(scene, label, a)  # the overlay lies on the transformed CT
    for _name, seg_matrix, _extent in mrml.segment_grids(seg):
        assert np.allclose(seg_matrix, world.ijk_to_ras(), atol=1e-4)
    labelmap, _info, geometry = logic.exportSegmentation(seg, a)
    assert np.array_equal(labelmap, label) and geometry.almost_equal(world)  # the correction is not shifted
    check = logic.checkSubmit(seg, a)
    assert check.refuse is None and any("transform 'tilt'" in n for n in check.notes)

    result_seg = _run(logic, a)  # the real server's label comes back in the geometry on screen
    for _name, seg_matrix, _extent in mrml.segment_grids(result_seg):
        assert np.allclose(seg_matrix, world.ijk_to_ras(), atol=1e-3)


def test_non_linear_transform_is_refused_with_a_message(scene):
    a, _ = _volume(scene, 7, "warped")
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p in ((0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50), (30, 30, 30)):
        src.InsertNextPoint(*p)
        dst.InsertNextPoint(p[0] + (3 if p == (30, 30, 30) else 0), p[1], p[2])
    tps = vtk.vtkThinPlateSplineTransform()
    tps.SetSourceLandmarks(src)
    tps.SetTargetLandmarks(dst)
    tps.SetBasisToR()
    node.SetAndObserveTransformToParent(tps)
    a.SetAndObserveTransformNodeID(node.GetID())
    with pytest.raises(mrml.TransformError, match="non-linear transform 'warp'.*Harden"):
        mrml.volume_snapshot(a)


# ------------------------------------------------------------------------------ point 8
def test_segmentation_references_its_volume_under_the_study(scene, logic):
    a, _ = _volume(scene, 8, "CT")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Chest CT 2026-12-01")
    volume_item = sh.GetItemByDataNode(a) or sh.CreateItem(study, a)
    sh.SetItemParent(volume_item, study)
    seg = _run(logic, a)
    seg_item = sh.GetItemByDataNode(seg)
    assert seg_item and sh.GetItemParent(seg_item) == study
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == a.GetID()
    assert mrml.referenced_volume_id(seg) == a.GetID()
