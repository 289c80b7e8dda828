"""The module's parameter node is read back, not only saved (issue 28 point 9).

``settings.ModuleParameters`` is the Qt-free layer (what ``parameterNodeWrapper`` gives in Slicer >= 5.4):
saved into a real ``vtkMRMLScriptedModuleNode`` of a slicer-core scene, the scene written to a .mrml file,
read into a new scene, and loaded back with the same values and node references.
"""

from __future__ import annotations

import pytest

try:
    import slicer  # noqa: F401  (slicer-core)

    from hybrid_ct_slicer import mrml
    from hybrid_ct_slicer.logic import ModuleLogic
    SKIP_REASON = None
except Exception as exc:  # noqa: BLE001
    SKIP_REASON = f"slicer-core cannot be imported: {exc.__class__.__name__}: {exc}"

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

from hybrid_ct_slicer.settings import ModuleParameters  # noqa: E402
from hybrid_ct_slicer.testdata import make_chest_volume  # noqa: E402


def test_defaults_when_there_is_no_node():
    assert ModuleParameters.load(None) == ModuleParameters()


def test_parameters_round_trip_through_a_saved_scene(tmp_path):
    scene = mrml.new_scene()
    ct, _label, geometry = make_chest_volume(shape=(6, 24, 24))
    volume = mrml.add_volume(scene, ct, geometry, "CT")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT Hybrid CT")
    logic = ModuleLogic(scene)
    logic.parameterNode = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "HybridCT")
    params = ModuleParameters(server_url="https://ct-ai.hospital.org", model="hybrid_ct", strategy="random",
                              ignore_extra_segments=True, input_volume_id=volume.GetID(),
                              segmentation_id=seg.GetID(), results_volume_id=volume.GetID())
    logic.saveParameters(params)
    assert logic.loadParameters() == params
    logic.saveSelection(None, seg)  # the selector changed: only the selection changes
    assert logic.loadParameters().input_volume_id is None and logic.loadParameters().model == "hybrid_ct"
    logic.saveParameters(params)

    path = str(tmp_path / "scene.mrml")
    scene.SetURL(path)
    assert scene.Commit()
    again = slicer.vtkMRMLScene()
    again.SetURL(path)
    assert again.Connect()
    nodes = [again.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
             for i in range(again.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode"))]
    node = next(n for n in nodes if n.GetName() == "HybridCT")
    loaded = ModuleParameters.load(node)
    assert loaded.as_dict() | {"input_volume_id": None, "segmentation_id": None, "results_volume_id": None} == \
        params.as_dict() | {"input_volume_id": None, "segmentation_id": None, "results_volume_id": None}
    assert again.GetNodeByID(loaded.input_volume_id).GetName() == "CT"
    assert again.GetNodeByID(loaded.segmentation_id).GetName() == "CT Hybrid CT"
    assert loaded.results_volume_id == loaded.input_volume_id
