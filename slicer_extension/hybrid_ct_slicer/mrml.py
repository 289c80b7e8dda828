"""MRML helpers: volumes, labelmap <-> named segments, .seg.nrrd.

Needs Slicer or the ``slicer-core`` wheel (headless MRML). Nothing here uses ``slicer.app``,
``slicer.mrmlScene`` or ``slicer.modules``: the scene (and optionally the Segmentations module
logic) is passed in, so the same code runs inside Slicer (HybridCT.py passes ``slicer.mrmlScene``)
and headless in the tests.

Import this module only where ``import slicer`` gives MRML (not from the Qt-free modules).
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
import vtk.util.numpy_support as vtk_np

from .imageio import Geometry
from .segments import (LABEL_BY_IDX, LABEL_INFO, SegmentError, color01, export_labelmap_by_name,
                       split_labelmap, terminology_entry)

_RULES_REGISTERED = False


def in_slicer_application() -> bool:
    return hasattr(slicer, "app") and hasattr(slicer, "modules")


def register_converter_rules() -> None:
    """Register labelmap <-> closed surface converter rules (Slicer does it at start-up; slicer-core
    does not, and a closed-surface 3D display needs them)."""
    global _RULES_REGISTERED
    if _RULES_REGISTERED or in_slicer_application():
        return
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    _RULES_REGISTERED = True


def new_scene():
    """A fresh headless ``vtkMRMLScene`` (converter rules registered)."""
    register_converter_rules()
    return slicer.vtkMRMLScene()


def segmentations_logic(scene):
    """The Segmentations module logic: Slicer's own when running in Slicer, else a new one on ``scene``."""
    if in_slicer_application() and scene is getattr(slicer, "mrmlScene", None):
        return slicer.modules.segmentations.logic()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    return logic


# ----------------------------------------------------------------------------- volumes
def _vtk_matrix(m: np.ndarray):
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def set_node_geometry(node, geometry: Geometry) -> None:
    node.SetIJKToRASMatrix(_vtk_matrix(geometry.ijk_to_ras()))


def node_geometry(node) -> Geometry:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return Geometry.from_ijk_to_ras([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_volume(scene, array: np.ndarray, geometry: Geometry = Geometry(), name: str = "Volume", *,
               labelmap: bool = False):
    """Add a scalar (or labelmap) volume node from a ``[k, j, i]`` array with LPS ``geometry``."""
    arr = np.ascontiguousarray(array)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    image = vtk.vtkImageData()
    image.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    vtk_array = vtk_np.numpy_to_vtk(arr.reshape(-1), deep=True,
                                    array_type=vtk_np.get_vtk_array_type(arr.dtype))
    image.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image)
    set_node_geometry(node, geometry)
    return node


def array_from_volume(node) -> np.ndarray:
    """Copy of the voxels ``[k, j, i]``."""
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"volume {node.GetName()!r} has no image data")
    dims = image.GetDimensions()
    return vtk_np.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]).copy()


# ----------------------------------------------------------------------------- segments
def style_segment(segment, name: str) -> None:
    """Name, colour and standard terminology of one of our segments."""
    segment.SetName(name)
    segment.SetColor(*color01(name))
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology_entry(name))


def segment_terminology(segment) -> str:
    """The segment's terminology entry string ('' when none)."""
    if hasattr(segment, "GetTerminology"):  # Slicer >= 5.7
        return segment.GetTerminology() or ""
    value = vtk.reference("")
    segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value)
    return str(value)


def labelmap_to_segmentation(scene, labelmap, reference_volume, *, segmentation_node=None,
                             name: str = "Hybrid CT segmentation", logic=None, show_3d: bool = False):
    """Import a label map (node or ``[k, j, i]`` uint8 array on the reference grid) as segments
    "Lung" (1) and "Infection" (2), named, coloured and coded; a label absent from the map still gets
    an (empty) segment so the radiologist can paint it. Unknown values are refused.
    """
    logic = logic or segmentations_logic(scene)
    temp_node = None
    if isinstance(labelmap, np.ndarray):
        split_labelmap(labelmap)  # refuses unknown values with a clear message
        temp_node = add_volume(scene, labelmap.astype(np.uint8), node_geometry(reference_volume),
                               "__hybrid_ct_import__", labelmap=True)
        labelmap_node = temp_node
    else:
        labelmap_node = labelmap
        split_labelmap(array_from_volume(labelmap_node))
    try:
        seg_node = segmentation_node
        if seg_node is None:
            seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        else:
            seg_node.GetSegmentation().RemoveAllSegments()
        seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        if not logic.ImportLabelmapToSegmentationNode(labelmap_node, seg_node):
            raise RuntimeError("Slicer could not import the label map into the segmentation")
        segmentation = seg_node.GetSegmentation()
        present = set()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            info = LABEL_BY_IDX.get(segment.GetLabelValue())
            if info is None:  # cannot happen after split_labelmap, kept as a guard
                raise SegmentError(f"unexpected label value {segment.GetLabelValue()}")
            style_segment(segment, info["name"])
            present.add(info["name"])
        for info in LABEL_INFO:
            if info["name"] not in present:
                seg_id = segmentation.AddEmptySegment(info["name"], info["name"], color01(info["name"]))
                style_segment(segmentation.GetSegment(seg_id), info["name"])
        order_segments(seg_node)
        seg_node.CreateDefaultDisplayNodes()
        if show_3d:
            seg_node.CreateClosedSurfaceRepresentation()
        return seg_node
    finally:
        if temp_node is not None:
            scene.RemoveNode(temp_node)


def label_file_to_segmentation(scene, path: str, reference_volume, *, segmentation_node=None,
                               name: str = "Hybrid CT segmentation", logic=None, show_3d: bool = False):
    """Load a label file returned by the server (.nii.gz / .nrrd, its own geometry) as our segments."""
    from .imageio import read_image

    array, geometry = read_image(path)
    label_node = add_volume(scene, np.asarray(array).astype(np.uint8), geometry, "__hybrid_ct_label__",
                            labelmap=True)
    try:
        return labelmap_to_segmentation(scene, label_node, reference_volume, segmentation_node=segmentation_node,
                                        name=name, logic=logic, show_3d=show_3d)
    finally:
        scene.RemoveNode(label_node)


def set_segment_from_array(scene, seg_node, segment_id: str, mask: np.ndarray, reference_volume, *,
                           logic=None) -> None:
    """Replace one segment's voxels by ``mask`` (``[k, j, i]`` on the reference volume's grid)."""
    logic = logic or segmentations_logic(scene)
    temp = add_volume(scene, (np.asarray(mask) != 0).astype(np.uint8), node_geometry(reference_volume),
                      "__hybrid_ct_update__", labelmap=True)
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not logic.ImportLabelmapToSegmentationNode(temp, seg_node, ids):
            raise RuntimeError(f"Slicer could not update segment {segment_id!r}")
    finally:
        scene.RemoveNode(temp)


def order_segments(seg_node) -> None:
    """Put Lung first and Infection second in the list (display only: export never uses order)."""
    segmentation = seg_node.GetSegmentation()
    for wanted_index, info in enumerate(LABEL_INFO):
        seg_id = segmentation.GetSegmentIdBySegmentName(info["name"])
        if seg_id:
            segmentation.SetSegmentIndex(seg_id, wanted_index)


def segment_names(seg_node) -> list[str]:
    s = seg_node.GetSegmentation()
    return [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())]


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def segment_arrays(scene, seg_node, reference_volume, *, logic=None) -> dict[str, np.ndarray]:
    """``{segment name: uint8 mask [k, j, i]}`` on the reference volume's grid, one export per
    segment (so overlapping segments keep their own voxels)."""
    logic = logic or segmentations_logic(scene)
    segmentation = seg_node.GetSegmentation()
    out: dict[str, np.ndarray] = {}
    for i in range(segmentation.GetNumberOfSegments()):
        seg_id = segmentation.GetNthSegmentID(i)
        seg_name = segmentation.GetNthSegment(i).GetName()
        if seg_name in out:
            raise SegmentError(f"Two segments are both named {seg_name!r}: rename one before submitting.")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(seg_id)
        before = _node_ids(scene)
        temp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__hybrid_ct_export__")
        try:
            if not logic.ExportSegmentsToLabelmapNode(seg_node, ids, temp, reference_volume):
                raise RuntimeError(f"Slicer could not export segment {seg_name!r}")
            out[seg_name] = (array_from_volume(temp) != 0).astype(np.uint8)
        finally:
            # the export adds a display node and a colour table: remove everything it created
            for node_id in _node_ids(scene) - before:
                node = scene.GetNodeByID(node_id)
                if node is not None:
                    scene.RemoveNode(node)
    return out


def export_labelmap(scene, seg_node, reference_volume, *, ignore_extra: bool = False, logic=None):
    """Segments -> (uint8 label map [k, j, i], label_info, LPS geometry of the reference volume), BY NAME."""
    arrays = segment_arrays(scene, seg_node, reference_volume, logic=logic)
    labelmap, label_info = export_labelmap_by_name(arrays, ignore_extra=ignore_extra)
    return labelmap, label_info, node_geometry(reference_volume)


# ----------------------------------------------------------------------------- files
def write_segmentation(scene, seg_node, path: str) -> str:
    """Write a ``.seg.nrrd`` file (all segments with names, colours and terminology)."""
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(path)
        if not storage.WriteData(seg_node):
            raise RuntimeError(f"could not write {path}")
    finally:
        scene.RemoveNode(storage)
    return path


def read_segmentation(scene, path: str, name: str = "Segmentation"):
    """Read a ``.seg.nrrd`` file into a new segmentation node."""
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(path)
        if not storage.ReadData(seg_node):
            raise RuntimeError(f"could not read {path}")
    finally:
        scene.RemoveNode(storage)
    return seg_node
