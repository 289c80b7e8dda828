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
from .segments import (ALL_LABEL_INFO, LABEL_BY_IDX, LABEL_INFO, SegmentError, color01, export_labelmap_by_name,
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
    """The node's own IJK -> RAS geometry (its parent transform NOT applied: see :func:`world_geometry`)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return Geometry.from_ijk_to_ras(_numpy_matrix(m))


def _numpy_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


class TransformError(ValueError):
    """A volume under a transform the module cannot account for (non-linear); the message says what to do."""


def world_geometry(node) -> Geometry:
    """Where the volume's voxels are shown: its geometry with its parent transforms applied ("hardened").

    Slicer's DICOM import puts tilted or irregular series under a linear transform; the image sent to the
    server, the overlay and the correction all use this geometry, so they line up with what is on screen.
    A non-linear transform would need resampling: refused with :class:`TransformError`."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return node_geometry(node)
    if not parent.IsTransformToWorldLinear():
        raise TransformError(
            f"Volume '{node.GetName()}' is under the non-linear transform '{parent.GetName()}': the model's "
            f"result and a correction could not be placed on it. Harden the transform first (Data module: "
            f"right-click the volume, 'Harden transform'), then run again.")
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return Geometry.from_ijk_to_ras(_numpy_matrix(to_world) @ node_geometry(node).ijk_to_ras())


def transform_name(node) -> str | None:
    """The name of the volume's parent transform, or None."""
    parent = node.GetParentTransformNode()
    return parent.GetName() if parent is not None else None


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
    """Name, colour and standard terminology of one of our segments. The name and colour are marked as
    chosen (not auto-generated), so picking another terminology in Slicer's dialog does not rename
    "Infection" to something the name-based export refuses."""
    segment.SetName(name)
    segment.SetColor(*color01(name))
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology_entry(name))
    if hasattr(segment, "SetNameAutoGenerated"):
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)


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
    "Right lung" (3), "Left lung" (4) and "Infection" (2) (and "Lung" (1) where the map holds lung without a
    side), named, coloured and coded; a predicted label absent from the map still gets an (empty) segment so
    the radiologist can paint it. Unknown values are refused.
    """
    logic = logic or segmentations_logic(scene)
    temp_node = None
    if isinstance(labelmap, np.ndarray):
        split_labelmap(labelmap)  # refuses unknown values with a clear message
        temp_node = add_volume(scene, labelmap.astype(np.uint8), world_geometry(reference_volume),
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
        seg_node.SetAndObserveTransformNodeID(None)  # world coordinates: the volume's transform is in the grid
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
    return label_array_to_segmentation(scene, array, geometry, reference_volume, segmentation_node=segmentation_node,
                                       name=name, logic=logic, show_3d=show_3d)


def label_array_to_segmentation(scene, array, geometry: Geometry, reference_volume, *, segmentation_node=None,
                                name: str = "Hybrid CT segmentation", logic=None, show_3d: bool = False):
    """A label map already read (in a worker thread) with its own geometry -> our segments."""
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
    temp = add_volume(scene, (np.asarray(mask) != 0).astype(np.uint8), world_geometry(reference_volume),
                      "__hybrid_ct_update__", labelmap=True)
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not logic.ImportLabelmapToSegmentationNode(temp, seg_node, ids):
            raise RuntimeError(f"Slicer could not update segment {segment_id!r}")
    finally:
        scene.RemoveNode(temp)


def order_segments(seg_node) -> None:
    """Our segments first, in the contract's order (display only: export never uses order)."""
    segmentation = seg_node.GetSegmentation()
    wanted_index = 0
    for info in ALL_LABEL_INFO:
        seg_id = segmentation.GetSegmentIdBySegmentName(info["name"])
        if seg_id:
            segmentation.SetSegmentIndex(seg_id, wanted_index)
            wanted_index += 1


def segment_names(seg_node) -> list[str]:
    s = seg_node.GetSegmentation()
    return [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())]


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def segment_arrays(scene, seg_node, reference_volume, *, logic=None) -> dict[str, np.ndarray]:
    """``{segment name: uint8 mask [k, j, i]}`` on the reference volume's grid, one export per
    segment (so overlapping segments keep their own voxels)."""
    logic = logic or segmentations_logic(scene)
    with hardened_reference(scene, reference_volume) as reference:
        return _segment_arrays(scene, seg_node, reference, logic)


def _segment_arrays(scene, seg_node, reference_volume, logic) -> dict[str, np.ndarray]:
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
    """Segments -> (uint8 label map [k, j, i], label_info, LPS geometry of the reference volume as shown,
    i.e. with its parent transform applied), BY NAME."""
    arrays = segment_arrays(scene, seg_node, reference_volume, logic=logic)
    labelmap, label_info = export_labelmap_by_name(arrays, ignore_extra=ignore_extra)
    return labelmap, label_info, world_geometry(reference_volume)


class hardened_reference:  # noqa: N801 - used as a context manager
    """``with hardened_reference(scene, volume) as ref``: the volume itself when it has no parent transform,
    else a temporary volume node (no voxels copied, one uint8 grid) on the volume's world grid, removed after."""

    def __init__(self, scene, volume):
        self.scene, self.volume, self.temp = scene, volume, None

    def __enter__(self):
        if self.volume.GetParentTransformNode() is None:
            return self.volume
        dims = self.volume.GetImageData().GetDimensions()
        self.temp = add_volume(self.scene, np.zeros((dims[2], dims[1], dims[0]), np.uint8),
                               world_geometry(self.volume), "__hybrid_ct_hardened__")
        return self.temp

    def __exit__(self, *exc):
        if self.temp is not None:
            self.scene.RemoveNode(self.temp)
        return False


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


# ----------------------------------------------------------------------------- identity and edits
def get_attributes(node, names) -> dict:
    return {name: node.GetAttribute(name) for name in names if node.GetAttribute(name)}


def set_attributes(node, attributes: dict) -> None:
    for name, value in attributes.items():
        node.SetAttribute(name, str(value))


def dicom_uids(volume_node) -> tuple[str | None, str]:
    """(Series Instance UID from the subject hierarchy or None, SOP Instance UIDs from ``DICOM.instanceUIDs``)."""
    from .identity import DICOM_INSTANCE_UIDS_ATTRIBUTE

    instance_uids = volume_node.GetAttribute(DICOM_INSTANCE_UIDS_ATTRIBUTE) or ""
    series_uid = None
    scene = volume_node.GetScene()
    if scene is not None and hasattr(slicer, "vtkMRMLSubjectHierarchyNode"):
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if sh is not None:
            item = sh.GetItemByDataNode(volume_node)
            if item:
                series_uid = sh.GetItemUID(item, "DICOM") or None
    return series_uid, instance_uids


def volume_snapshot(volume_node) -> dict:
    """What the worker thread needs to identify and upload a volume (a copy: no MRML in the thread)."""
    from .identity import CONTENT_ATTRIBUTE, FILE_SHA_ATTRIBUTE, ID_ATTRIBUTE

    series_uid, instance_uids = dicom_uids(volume_node)
    return {"array": array_from_volume(volume_node), "geometry": world_geometry(volume_node),
            "transform": transform_name(volume_node),
            "series_uid": series_uid, "instance_uids": instance_uids,
            "stamp": get_attributes(volume_node, (ID_ATTRIBUTE, CONTENT_ATTRIBUTE, FILE_SHA_ATTRIBUTE)),
            "name": volume_node.GetName(), "node_id": volume_node.GetID()}


def volume_identity(volume_node):
    """The :class:`~.identity.ImageIdentity` of a volume node (hashes its voxels: run it off the GUI
    thread for big volumes, on a :func:`volume_snapshot`)."""
    return snapshot_identity(volume_snapshot(volume_node))


def snapshot_identity(snapshot: dict):
    from .identity import resolve_identity

    return resolve_identity(snapshot["array"], snapshot["geometry"], series_uid=snapshot["series_uid"],
                            instance_uids=snapshot["instance_uids"], stamp=snapshot["stamp"])


def segmentation_fingerprint(seg_node) -> str:
    """sha256 of the segments' names, label values and binary labelmap voxels: changes with any edit."""
    import hashlib

    rep = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    segmentation = seg_node.GetSegmentation()
    h = hashlib.sha256()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        h.update(f"|{segment.GetName()}|{segment.GetLabelValue()}|".encode())
        image = segment.GetRepresentation(rep)
        if image is None or image.GetPointData().GetScalars() is None:
            continue
        h.update(str(image.GetExtent()).encode())
        scalars = vtk_np.vtk_to_numpy(image.GetPointData().GetScalars())
        h.update(np.ascontiguousarray(scalars == segment.GetLabelValue()).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- data tree and grids
def referenced_volume_id(seg_node) -> str | None:
    """The volume a segmentation was made on: Slicer's reference-geometry node reference (set by
    ``SetReferenceImageGeometryParameterFromVolumeNode``, read by the DICOM SEG export)."""
    role = seg_node.GetReferenceImageGeometryReferenceRole()
    return seg_node.GetNodeReferenceID(role) or None


def place_in_data_tree(seg_node, volume_node) -> int:
    """Put the segmentation under the volume's study (its parent) in the subject hierarchy and reference
    the volume, so that Slicer's data tree and DICOM SEG export know which patient it belongs to.
    Returns the segmentation's subject hierarchy item (0 when the scene has no subject hierarchy)."""
    seg_node.SetNodeReferenceID(seg_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())
    scene = volume_node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene is not None else None
    if sh is None:
        return 0
    volume_item = sh.GetItemByDataNode(volume_node)
    parent = sh.GetItemParent(volume_item) if volume_item else sh.GetSceneItemID()
    seg_item = sh.GetItemByDataNode(seg_node)
    if not seg_item:
        seg_item = sh.CreateItem(parent, seg_node)
    elif sh.GetItemParent(seg_item) != parent:
        sh.SetItemParent(seg_item, parent)
    return seg_item


def segment_grids(seg_node) -> list[tuple[str, np.ndarray, tuple | None]]:
    """``[(segment name, 4x4 IJK->world of its labelmap, extent of its non-empty voxels or None)]``."""
    rep = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    to_world = np.eye(4)
    parent = seg_node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise TransformError(f"Segmentation '{seg_node.GetName()}' is under the non-linear transform "
                                 f"'{parent.GetName()}': harden it first.")
        m = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(m)
        to_world = _numpy_matrix(m)
    segmentation = seg_node.GetSegmentation()
    out = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        image = segment.GetRepresentation(rep)
        if image is None or image.GetPointData().GetScalars() is None:
            out.append((segment.GetName(), to_world, None))
            continue
        m = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(m)
        e = image.GetExtent()
        if e[1] < e[0] or e[3] < e[2] or e[5] < e[4]:
            out.append((segment.GetName(), to_world @ _numpy_matrix(m), None))
            continue
        dims = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
        mask = vtk_np.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims) == segment.GetLabelValue()
        if not mask.any():
            out.append((segment.GetName(), to_world @ _numpy_matrix(m), None))
            continue
        ks, js, is_ = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
        extent = (e[0] + is_[0], e[0] + is_[-1], e[2] + js[0], e[2] + js[-1], e[4] + ks[0], e[4] + ks[-1])
        out.append((segment.GetName(), to_world @ _numpy_matrix(m), tuple(int(v) for v in extent)))
    return out


def volume_dims(volume_node) -> tuple[int, int, int]:
    return tuple(volume_node.GetImageData().GetDimensions())
