"""The module's self-test ("Reload and Test"), run by HybridCT.py's ``HybridCTTest`` and headless by the
tests: ``test`` is a ``unittest.TestCase`` with ``delayDisplay`` and ``makeLogic(**kwargs)``.

It needs no server: the flow test starts :class:`.mockserver.MockServer` on 127.0.0.1 itself.
"""

import os
import tempfile
import warnings

import slicer

from . import mrml
from .identity import CONTENT_ATTRIBUTE, ID_ATTRIBUTE
from .results import NA, format_results
from .segments import LABEL_INFO, SegmentError, server_label_info
from .testdata import make_chest_volume


def phantom(logic, offset=0):
    ct, label, geometry = make_chest_volume(shape=(16, 48, 48))
    volume = mrml.add_volume(logic.scene, ct + offset, geometry, "HybridCTPhantom")
    return volume, label, geometry


def segment_round_trip(test):
    import numpy as np

    test.delayDisplay("Segment import/export round trip")
    logic = test.makeLogic()
    volume, label, geometry = phantom(logic)
    segNode = logic.showLabelmap(label, volume)
    segmentation = segNode.GetSegmentation()
    test.assertEqual(mrml.segment_names(segNode), [d["name"] for d in LABEL_INFO])  # Right lung, Left lung, Infection

    # reorder: Infection first; add a segment the model does not know
    segmentation.SetSegmentIndex(segmentation.GetSegmentIdBySegmentName("Infection"), 0)
    segmentation.AddEmptySegment("Heart", "Heart")
    with test.assertRaises(SegmentError):
        logic.exportSegmentation(segNode, volume)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        labelmap, labelInfo, exportGeometry = logic.exportSegmentation(segNode, volume, ignoreExtra=True)
    test.assertTrue(np.array_equal(labelmap, label))
    test.assertTrue(exportGeometry.almost_equal(geometry))
    test.assertEqual(labelInfo, server_label_info())

    # .seg.nrrd keeps names and content
    with tempfile.TemporaryDirectory(prefix="HybridCT_selftest_") as folder:
        path = os.path.join(folder, "phantom.seg.nrrd")
        mrml.write_segmentation(logic.scene, segNode, path)
        reread = mrml.read_segmentation(logic.scene, path)
    test.assertEqual(sorted(mrml.segment_names(reread)), sorted(["Heart", *(d["name"] for d in LABEL_INFO)]))
    if hasattr(slicer, "app"):  # show the phantom with its segments when run inside Slicer
        volume.CreateDefaultDisplayNodes()
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
    test.delayDisplay("Segment round trip passed")


def results_panel_strings(test):
    test.delayDisplay("Results panel strings")
    display = format_results({
        "classification": {"label": "positive", "probability": 0.91, "firing_rates": [0.1, 0.6]},
        "burden": {"total_pct": 12.5, "left_pct": 10.0, "right_pct": 15.0}, "grade": "CT-1",
        "energy": {"e_hybrid_uj": 1.0, "e_conv_uj": 6.0, "ratio": 0.1667, "mean_firing_rate": 0.05},
        "latency_s": 3.2, "model_version": "v3"})
    test.assertTrue(display["classification"].startswith("Positive"))
    test.assertIn("12.5 %", display["burden"])
    test.assertEqual(format_results({})["grade"], NA)
    test.delayDisplay("Results panel strings passed")


def mock_server_flow(test):
    """Run and Submit against a tiny mock server this test starts on 127.0.0.1 (no real server needed):
    upload by identity, no file left in the work folder, the second run skips the upload, and a
    segmentation is refused on another volume with the same name."""
    from hybrid_ct_slicer.identity import IdentityError
    from hybrid_ct_slicer.mockserver import MockServer

    test.delayDisplay("Run and Submit against a mock server on 127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="HybridCT_selftest_") as workDir, MockServer() as server:
        logic = test.makeLogic(workDir=workDir)
        info = logic.connect(server.url)
        test.assertIn("hybrid_ct", info.models)
        volume, _label, _geometry = phantom(logic)
        identity, result = logic.runVolume(mrml.volume_snapshot(volume), "hybrid_ct")
        test.assertTrue(result.uploaded)
        segNode = logic.showResult(result, volume, identity=identity, show3D=False)
        test.assertEqual(os.listdir(workDir), [], "patient files left in the work folder")
        _identity, again = logic.runVolume(mrml.volume_snapshot(volume), "hybrid_ct")
        logic.discardResult((_identity, again))
        test.assertFalse(again.uploaded)
        test.assertEqual(server.uploads, 1)
        test.assertEqual(logic.replaceDecision(segNode, volume), "replace")

        other, _, _ = phantom(logic, offset=50)  # same node name, other voxels
        labelmap, _info, geometry = logic.exportSegmentation(segNode, other)
        with test.assertRaises(IdentityError):
            logic.submitCorrection(mrml.volume_snapshot(other), mrml.get_attributes(
                segNode, (ID_ATTRIBUTE, CONTENT_ATTRIBUTE)), labelmap, geometry)
        test.assertEqual(server.labels, {})
        labelmap, _info, geometry = logic.exportSegmentation(segNode, volume)
        logic.submitCorrection(mrml.volume_snapshot(volume), mrml.get_attributes(
            segNode, (ID_ATTRIBUTE, CONTENT_ATTRIBUTE)), labelmap, geometry)
        test.assertEqual(list(server.labels), [identity.image_id])
        test.assertEqual(os.listdir(workDir), [])
    test.delayDisplay("Mock server flow passed")



def server_connection(test):
    """Only with HYBRID_CT_SERVER_URL set: connect to that real server and list its models."""
    from .client import ServerError

    url = os.environ.get("HYBRID_CT_SERVER_URL")
    if not url:
        test.delayDisplay("HYBRID_CT_SERVER_URL not set: the live server check is skipped "
                          "(the mock server test covers the flow)")
        return
    test.delayDisplay(f"Connecting to {url}")
    try:
        info = test.makeLogic().connect(url)
    except ServerError as exc:
        test.fail(f"Connection check failed: {exc}")
    test.assertTrue(info.models, "the server offers no model")
    test.delayDisplay(info.summary())
