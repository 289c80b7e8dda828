"""Issue 17: the right patient every time, no lost edits, locked names (headless MRML from slicer-core).

Two volumes with the same node name and different content get different ids, the same content the
same id, DICOM UIDs name the image, and a segmentation made on A is refused for B before anything
is sent. Run against the mock server of the package (127.0.0.1, started here) through the module's logic.
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    import slicer  # noqa: F401  (slicer-core)
    from hybrid_ct_slicer import mrml
    from hybrid_ct_slicer.logic import ModuleLogic
    SKIP_REASON = None
except Exception as exc:  # noqa: BLE001
    SKIP_REASON = f"slicer-core cannot be imported: {exc.__class__.__name__}: {exc}"

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

from hybrid_ct_slicer.identity import (CONTENT_ATTRIBUTE, ID_ATTRIBUTE, IdentityError,  # noqa: E402
                                       check_segmentation_image, derive_image_id)
from hybrid_ct_slicer.mockserver import MockServer  # noqa: E402
from hybrid_ct_slicer.testdata import make_chest_volume  # noqa: E402


@pytest.fixture()
def scene():
    return mrml.new_scene()


@pytest.fixture()
def ct():
    return make_chest_volume(shape=(8, 32, 32))


def test_same_name_other_content_other_id(scene, ct):
    array, _label, geometry = ct
    a = mrml.add_volume(scene, array, geometry, "2: CT Chest")
    b = mrml.add_volume(scene, array + 1, geometry, "2: CT Chest")
    a_again = mrml.add_volume(scene, array.copy(), geometry, "another name")
    ia, ib, ia2 = (mrml.volume_identity(v) for v in (a, b, a_again))
    assert ia.image_id != ib.image_id and ia.content_hash != ib.content_hash
    assert ia.image_id == ia2.image_id and ia.image_id.startswith("ct-")
    moved = mrml.add_volume(scene, array, type(geometry)(geometry.spacing, (1, 2, 3), geometry.direction), "x")
    assert mrml.volume_identity(moved).image_id != ia.image_id  # geometry is part of the image


def test_dicom_uids_name_the_image(scene, ct):
    array, _label, geometry = ct
    a = mrml.add_volume(scene, array, geometry, "2: CT Chest")
    a.SetAttribute("DICOM.instanceUIDs", "1.2.3.2 1.2.3.1")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(a) or sh.CreateItem(sh.GetSceneItemID(), a)  # Slicer's SH plugins do this
    sh.SetItemUID(item, "DICOM", "1.2.3")
    assert mrml.dicom_uids(a) == ("1.2.3", "1.2.3.2 1.2.3.1")
    identity = mrml.volume_identity(a)
    assert identity.source == "dicom" and identity.image_id.startswith("dcm-")
    assert identity.image_id == derive_image_id(identity.content_hash, series_uid="1.2.3",
                                                instance_uids=["1.2.3.1", "1.2.3.2"])
    other_patient = derive_image_id(identity.content_hash, series_uid="9.9", instance_uids="9.9.1")
    assert other_patient != identity.image_id


def test_stamp_trusted_only_for_unchanged_voxels(scene, ct):
    array, _label, geometry = ct
    v = mrml.add_volume(scene, array, geometry, "sample")
    content = mrml.volume_identity(v).content_hash
    mrml.set_attributes(v, {ID_ATTRIBUTE: "server_case_7", CONTENT_ATTRIBUTE: content})
    assert mrml.volume_identity(v).image_id == "server_case_7"
    mrml.set_attributes(v, {CONTENT_ATTRIBUTE: "0" * 64})  # the voxels changed since the download
    assert mrml.volume_identity(v).image_id.startswith("ct-")


def _run_on_a(scene, ct, server, work, names):
    """The module's Run on volume A (through ModuleLogic and the mock server); B has other voxels."""
    array, _label, geometry = ct
    logic = ModuleLogic(scene, workDir=str(work))
    logic.connect(server.url)
    a = mrml.add_volume(scene, array, geometry, names[0])
    b = mrml.add_volume(scene, array + 5, geometry, names[1])
    identity, result = logic.runVolume(mrml.volume_snapshot(a), "hybrid_ct")
    return logic, a, b, identity, logic.showResult(result, a, identity=identity, show3D=False)


def test_submit_of_a_segmentation_on_another_volume_is_refused(scene, ct, tmp_path):
    with MockServer() as server:
        logic, a, b, identity, seg = _run_on_a(scene, ct, server, tmp_path / "work", ("2: CT Chest", "2: CT Chest"))
        assert seg.GetAttribute(ID_ATTRIBUTE) == identity.image_id
        assert seg.GetAttribute(CONTENT_ATTRIBUTE) == identity.content_hash
        attrs = mrml.get_attributes(seg, (ID_ATTRIBUTE, CONTENT_ATTRIBUTE))
        labelmap, _info, label_geometry = logic.exportSegmentation(seg, b)
        uploads = server.uploads
        with pytest.raises(IdentityError, match="belongs to image .* not to volume '2: CT Chest'"):
            logic.submitCorrection(mrml.volume_snapshot(b), attrs, labelmap, label_geometry,
                                   volume_name="volume '2: CT Chest'")
        assert server.uploads == uploads and server.labels == {}, "something was sent for the wrong image"
        labelmap, _info, label_geometry = logic.exportSegmentation(seg, a)
        got, _answer, _sha, note = logic.submitCorrection(mrml.volume_snapshot(a), attrs, labelmap, label_geometry)
        assert got.image_id == identity.image_id and note is None
        assert list(server.labels) == [identity.image_id]
    # an unstamped (hand-made) segmentation is accepted with a note
    assert "not made by Hybrid CT" in check_segmentation_image({}, identity)


def test_run_again_asks_before_replacing_edits(scene, ct, tmp_path):
    array = ct[0]
    with MockServer() as server:
        logic, a, b, identity, seg = _run_on_a(scene, ct, server, tmp_path / "work", ("A", "B"))
        assert logic.replaceDecision(seg, a) == "replace"  # unedited result of the same scan
        assert logic.replaceDecision(seg, b) == "new"  # another scan: a new segmentation
        infection = seg.GetSegmentation().GetSegmentIdBySegmentName("Infection")
        mask = np.zeros(array.shape, np.uint8)
        mask[2:4, 10:14, 10:14] = 1
        mrml.set_segment_from_array(scene, seg, infection, mask, a, logic=logic.segmentationsLogic)
        assert logic.replaceDecision(seg, a) == "ask"  # the radiologist painted: ask first
        _identity, again = logic.runVolume(mrml.volume_snapshot(a), "hybrid_ct")
        assert again.uploaded is False and server.uploads == 1  # stamped volume: only a checksum check
        logic.discardResult((_identity, again))
    assert not list((tmp_path / "work").iterdir())


def test_segment_names_locked_against_the_terminology_dialog(scene, ct):
    array, label, geometry = ct
    v = mrml.add_volume(scene, array, geometry, "CT")
    seg = mrml.labelmap_to_segmentation(scene, label, v)
    for i in range(seg.GetSegmentation().GetNumberOfSegments()):
        segment = seg.GetSegmentation().GetNthSegment(i)
        assert segment.GetNameAutoGenerated() is False or segment.GetNameAutoGenerated() == 0
        assert not segment.GetColorAutoGenerated()
        assert "|" not in mrml.segment_terminology(segment)


def test_selection_kept_in_a_parameter_node(scene, ct):
    array, _label, geometry = ct
    logic = ModuleLogic(scene)
    logic.parameterNode = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "HybridCT")
    v = mrml.add_volume(scene, array, geometry, "CT")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S")
    logic.saveSelection(v, seg)
    assert logic.parameterNode.GetNodeReferenceID("InputVolume") == v.GetID()
    assert logic.parameterNode.GetNodeReferenceID("Segmentation") == seg.GetID()
