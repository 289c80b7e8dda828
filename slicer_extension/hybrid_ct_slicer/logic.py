"""The module's logic, behind HybridCT.py's ``HybridCTLogic``: the MRML side of Run, Submit and Next
sample, and the flows handed to job threads. Needs MRML (Slicer or slicer-core) like :mod:`.mrml`; no Qt.

The methods marked "thread" run in a job's thread (``hybrid_ct_slicer.jobs``) and touch no MRML:
they get a :func:`.mrml.volume_snapshot` taken on the GUI thread.
"""

from __future__ import annotations

import os
import tempfile

from . import mrml
from .client import HybridCTClient, ServerError
from .identity import (CONTENT_ATTRIBUTE, FILE_SHA_ATTRIBUTE, ID_ATTRIBUTE, check_segmentation_image, content_hash,
                       file_sha256, segmentation_stamp, volume_stamp)
from .policy import remove_quietly, replace_decision
from .results import format_results
from .workflow import Workflow

RESULT_ATTRIBUTE_PREFIX = "HybridCT."
VOLUME_NODE_ATTRIBUTE = "HybridCT.VolumeNodeID"
FINGERPRINT_ATTRIBUTE = "HybridCT.ResultFingerprint"  # segments as the model made them (edits change it)


class ModuleLogic:
    """MRML side of the module; network flows are delegated to ``hybrid_ct_slicer.workflow``.

    Works on ``slicer.mrmlScene`` by default; the tests pass a headless scene and a temp folder.
    The methods marked "thread" run in a job's thread and touch no MRML.
    """

    def __init__(self, scene, segmentationsLogic=None, workDir=None):
        self.scene = scene
        self.segmentationsLogic = segmentationsLogic or mrml.segmentations_logic(self.scene)
        # patient images only go to this folder (Slicer's temp folder in Slicer), removed after use
        self.workDir = workDir or os.path.join(tempfile.gettempdir(), "HybridCT")
        self.client = None
        self.info = None
        self.parameterNode = None

    # ---------------------------------------------------------------- server
    def setServer(self, url, timeout=30.0, pollTimeout=5.0):
        self.client = HybridCTClient(url, timeout)
        self._timeouts = (timeout, pollTimeout)
        self.info = None

    def newWorkflow(self, job=None, quick=False):
        """A workflow with its own HTTP session (thread-safe), reporting to ``job``."""
        if self.client is None:
            raise ServerError("No server URL is set: press Connect.", kind="protocol")
        client = HybridCTClient(self.client.server_url, self._timeouts[1 if quick else 0])
        workflow = Workflow(client, work_dir=self.workDir, progress=job.progress if job else None,
                            cancelled=(lambda: job.cancelled) if job else None)
        workflow.info = self.info
        return workflow

    def connect(self, url=None, job=None):  # thread
        if url is not None:
            self.setServer(url)
        workflow = self.newWorkflow(job)
        self.info = workflow.connect()
        return self.info

    # ---------------------------------------------------------------- network (thread: no MRML)
    def runVolume(self, snapshot, model=None, job=None):  # thread
        identity = mrml.snapshot_identity(snapshot)
        result = self.newWorkflow(job).run_volume(identity, snapshot["array"], snapshot["geometry"], model=model or None)
        return identity, result

    def submitCorrection(self, snapshot, segAttributes, labelmap, geometry, job=None, seg_name="the segmentation",
                         volume_name="the volume"):  # thread
        """Refuses (IdentityError, before anything is sent) a segmentation made on another image."""
        identity = mrml.snapshot_identity(snapshot)
        note = check_segmentation_image(segAttributes, identity, seg_name=seg_name, volume_name=volume_name)
        answer, fileSha = self.newWorkflow(job).submit_volume_correction(identity, snapshot["array"],
                                                                         snapshot["geometry"], labelmap, geometry)
        return identity, answer, fileSha, note

    def fetchSample(self, strategy, job=None):  # thread
        workflow = self.newWorkflow(job)
        if job is not None:
            job.progress(10, f"Asking the server ({strategy}) ...")
        sample = workflow.next_sample(strategy)
        if not sample:
            return None, None, None
        path = workflow.fetch_image(sample["id"])
        return sample, path, file_sha256(path)

    @staticmethod
    def discardResult(outcome):
        remove_quietly(outcome[1].label_path)

    # ---------------------------------------------------------------- MRML
    def stampDownloaded(self, volumeNode, imageId, fileSha):
        """A volume loaded from the server keeps the server's id while its voxels stay unchanged."""
        content = content_hash(mrml.array_from_volume(volumeNode), mrml.node_geometry(volumeNode))
        mrml.set_attributes(volumeNode, {ID_ATTRIBUTE: imageId, CONTENT_ATTRIBUTE: content, FILE_SHA_ATTRIBUTE: fileSha})

    def replaceDecision(self, segNode, volumeNode):
        """``policy.replace_decision`` for the segmentation shown and the volume about to be run."""
        if segNode is None or volumeNode is None:
            return "new"
        sameImage = (segNode.GetAttribute(VOLUME_NODE_ATTRIBUTE) == volumeNode.GetID()
                     and segNode.GetAttribute(CONTENT_ATTRIBUTE) is not None
                     and segNode.GetAttribute(CONTENT_ATTRIBUTE) == volumeNode.GetAttribute(CONTENT_ATTRIBUTE))
        edited = segNode.GetAttribute(FINGERPRINT_ATTRIBUTE) != mrml.segmentation_fingerprint(segNode)
        return replace_decision(edited, sameImage)

    def saveSelection(self, volumeNode, segNode):
        """Keep the selections in the module's parameter node (saved with the scene)."""
        node = self.getParameterNode() if hasattr(self, "getParameterNode") else self.parameterNode
        if node is None or self.scene.GetNodeByID(node.GetID()) is None:
            return
        node.SetNodeReferenceID("InputVolume", volumeNode.GetID() if volumeNode else None)
        node.SetNodeReferenceID("Segmentation", segNode.GetID() if segNode else None)

    def showLabelmap(self, labelmap, volumeNode, segmentationNode=None, show3D=True):
        """Label map array (on the volume's grid) -> "Lung"/"Infection" segments shown in 2D and 3D."""
        segNode = mrml.labelmap_to_segmentation(self.scene, labelmap, volumeNode, segmentation_node=segmentationNode,
                                                name=f"{volumeNode.GetName()} Hybrid CT",
                                                logic=self.segmentationsLogic, show_3d=show3D)
        self._styleDisplay(segNode)
        return segNode

    def showResult(self, result, volumeNode, segmentationNode=None, show3D=True, identity=None):
        """Load the server's label file as segments (then remove the file), keep the results and the image
        identity as node attributes."""
        try:
            segNode = mrml.label_file_to_segmentation(self.scene, result.label_path, volumeNode,
                                                      segmentation_node=segmentationNode,
                                                      name=f"{volumeNode.GetName()} Hybrid CT",
                                                      logic=self.segmentationsLogic, show_3d=show3D)
        finally:
            remove_quietly(result.label_path)
        self._styleDisplay(segNode)
        for key, value in format_results(result.params).items():
            segNode.SetAttribute(RESULT_ATTRIBUTE_PREFIX + key, value)
        segNode.SetAttribute(ID_ATTRIBUTE, str(result.image_id))
        if identity is not None:
            mrml.set_attributes(segNode, segmentation_stamp(identity))
            mrml.set_attributes(volumeNode, volume_stamp(identity, result.file_sha256))
        segNode.SetAttribute(VOLUME_NODE_ATTRIBUTE, volumeNode.GetID())
        segNode.SetAttribute(FINGERPRINT_ATTRIBUTE, mrml.segmentation_fingerprint(segNode))
        return segNode

    @staticmethod
    def _styleDisplay(segNode):
        display = segNode.GetDisplayNode()
        if display is None:
            return
        segId = segNode.GetSegmentation().GetSegmentIdBySegmentName("Lung")
        if segId:
            display.SetSegmentOpacity3D(segId, 0.3)  # see the infection inside the lung in 3D

    def exportSegmentation(self, segmentationNode, volumeNode, ignoreExtra=False):
        """(uint8 label map, label_info, geometry): segments matched by NAME, whatever their order."""
        return mrml.export_labelmap(self.scene, segmentationNode, volumeNode, ignore_extra=ignoreExtra,
                                    logic=self.segmentationsLogic)
