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
from .panel import (RESEARCH_NOTICE, SegRecord, arrival_decision, edit_pairing, grid_relation, plan_volume_switch,
                    submit_questions)
from .policy import remove_quietly, replace_decision
from .imageio import read_image
from .results import RESULT_FIELDS, format_results
from .segments import ALL_LABEL_INFO, LUNG_TYPE
from .settings import ModuleParameters
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
    def setServer(self, url, timeout=30.0, pollTimeout=5.0, caBundle=None):
        """GUI thread. ``caBundle``: a PEM file for https with a hospital CA (else $REQUESTS_CA_BUNDLE, ...)."""
        self.client = HybridCTClient(url, timeout, ca_bundle=caBundle or None)
        self._timeouts = (timeout, pollTimeout)
        self.info = None

    def newWorkflow(self, job=None, quick=False):
        """A workflow with its own HTTP session (thread-safe), reporting to ``job``."""
        if self.client is None:
            raise ServerError("No server URL is set: press Connect.", kind="protocol")
        client = HybridCTClient(self.client.server_url, self._timeouts[1 if quick else 0],
                                ca_bundle=self.client.ca_bundle, verify_tls=self.client.verify_tls)
        workflow = Workflow(client, work_dir=self.workDir, progress=job.progress if job else None,
                            cancelled=(lambda: job.cancelled) if job else None, sent=job.mark_sent if job else None)
        workflow.info = self.info
        return workflow

    def connect(self, url=None, job=None):
        """Synchronous connect (tests, self-test). The module uses :meth:`fetchInfo` in a job and
        :meth:`setInfo` on the GUI thread: a worker never writes the logic's state."""
        if url is not None:
            self.setServer(url)
        self.setInfo(self.fetchInfo(job))
        return self.info

    def fetchInfo(self, job=None):  # thread: returns the server info, changes nothing here
        return self.newWorkflow(job).connect()

    def setInfo(self, info):  # GUI thread
        self.info = info

    # ---------------------------------------------------------------- network (thread: no MRML)
    def runVolume(self, snapshot, model=None, job=None):  # thread
        identity = mrml.snapshot_identity(snapshot)
        result = self.newWorkflow(job).run_volume(identity, snapshot["array"], snapshot["geometry"], model=model or None)
        try:  # read the label file here, off the GUI thread; the GUI thread only builds the segments
            result.label_array, result.label_geometry = read_image(result.label_path)
        finally:
            remove_quietly(result.label_path)
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
        remove_quietly(outcome[1].label_path)  # (already removed when runVolume read it)

    # ---------------------------------------------------------------- MRML
    def stampDownloaded(self, volumeNode, imageId, fileSha):
        """A volume loaded from the server keeps the server's id while its voxels stay unchanged."""
        content = content_hash(mrml.array_from_volume(volumeNode), mrml.world_geometry(volumeNode))
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

    # ---------------------------------------------------------------- patients and edits
    def segmentationVolumeId(self, segNode):
        """The volume a segmentation belongs to: the one the module ran on, else the one it references."""
        return segNode.GetAttribute(VOLUME_NODE_ATTRIBUTE) or mrml.referenced_volume_id(segNode)

    def segmentationRecords(self):
        nodes = [self.scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
                 for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
        return [SegRecord(n.GetID(), self.segmentationVolumeId(n), bool(n.GetAttribute(FINGERPRINT_ATTRIBUTE)))
                for n in nodes]

    def switchVolume(self, volumeNode, resultsVolumeId, selectedSegNode):
        """The views switched to ``volumeNode``: hide the segmentations made on other volumes, pick the one made
        on this volume. Returns the :class:`~.panel.SwitchPlan` (``clear_results``: the panel must be cleared)."""
        plan = plan_volume_switch(volumeNode.GetID() if volumeNode else None, resultsVolumeId,
                                  selectedSegNode.GetID() if selectedSegNode else None, self.segmentationRecords())
        for nodeId, visible in [(i, False) for i in plan.hide] + [(i, True) for i in plan.show]:
            node = self.scene.GetNodeByID(nodeId)
            display = node.GetDisplayNode() if node is not None else None
            if display is not None:
                display.SetVisibility(visible)
        return plan

    def editCheck(self, segNode, volumeNode):
        """None when "Edit in Segment Editor" may pair ``segNode`` with ``volumeNode``, else why not."""
        segVolumeId = self.segmentationVolumeId(segNode) if segNode is not None else None
        other = self.scene.GetNodeByID(segVolumeId) if segVolumeId else None
        return edit_pairing(segVolumeId, volumeNode.GetID() if volumeNode else None,
                            seg_name=f"Segmentation '{segNode.GetName()}'" if segNode else "the segmentation",
                            volume_name=f"volume '{volumeNode.GetName()}'" if volumeNode else "the volume",
                            seg_volume_name=other.GetName() if other is not None else None)

    def runStarted(self, targetSegNode):
        """Call when Run is pressed: the fingerprint of the segmentation the result will go to (or None)."""
        return mrml.segmentation_fingerprint(targetSegNode) if targetSegNode is not None else None

    def arrivalDecision(self, targetSegNode, fingerprintAtStart):
        """The result arrived: ``"replace"``, ``"new"`` or ``"ask"`` (edited while the job ran)."""
        exists = targetSegNode is not None and self.scene.GetNodeByID(targetSegNode.GetID()) is targetSegNode
        now = mrml.segmentation_fingerprint(targetSegNode) if exists else None
        return arrival_decision(exists, fingerprintAtStart, now)

    def checkSubmit(self, segNode, volumeNode):
        """The :class:`~.panel.SubmitCheck` of Submit, before anything is sent: another volume's segmentation
        or one that does not fit the volume is refused; one the module did not make needs a confirmation."""
        segVolumeId = self.segmentationVolumeId(segNode)
        other = self.scene.GetNodeByID(segVolumeId) if segVolumeId else None
        volumeMatrix = mrml.world_geometry(volumeNode).ijk_to_ras()  # TransformError: non-linear, refused
        dims = mrml.volume_dims(volumeNode)
        relations = [grid_relation(m, extent, volumeMatrix, dims) for _name, m, extent in mrml.segment_grids(segNode)]
        return submit_questions(seg_name=f"Segmentation '{segNode.GetName()}'",
                                volume_name=f"volume '{volumeNode.GetName()}'",
                                made_by_module=bool(segNode.GetAttribute(ID_ATTRIBUTE)),
                                seg_volume_id=segVolumeId if other is not None else None,
                                volume_id=volumeNode.GetID(), seg_volume_name=other.GetName() if other else None,
                                relations=relations, transform=mrml.transform_name(volumeNode))

    @staticmethod
    def storedResults(segNode):
        """The results panel's strings stored on a segmentation by :meth:`showResult` (None: not one of ours)."""
        if segNode is None or not segNode.GetAttribute(RESULT_ATTRIBUTE_PREFIX + "classification"):
            return None
        return {key: segNode.GetAttribute(RESULT_ATTRIBUTE_PREFIX + key) or "n/a" for key, _label in RESULT_FIELDS}

    def _parameterNode(self):
        node = self.getParameterNode() if hasattr(self, "getParameterNode") else self.parameterNode
        return node if node is not None and self.scene.GetNodeByID(node.GetID()) is not None else None

    def saveSelection(self, volumeNode, segNode):
        """Keep the selections in the module's parameter node (saved with the scene)."""
        params = self.loadParameters()
        params.input_volume_id = volumeNode.GetID() if volumeNode else None
        params.segmentation_id = segNode.GetID() if segNode else None
        self.saveParameters(params)

    def saveParameters(self, params):
        node = self._parameterNode()
        if node is not None:
            params.save(node)

    def loadParameters(self):
        """The panel's :class:`~.settings.ModuleParameters` read back from the parameter node (a loaded scene)."""
        return ModuleParameters.load(self._parameterNode())

    def showLabelmap(self, labelmap, volumeNode, segmentationNode=None, show3D=True):
        """Label map array (on the volume's grid) -> "Right lung"/"Left lung"/"Infection" segments in 2D and 3D."""
        segNode = mrml.labelmap_to_segmentation(self.scene, labelmap, volumeNode, segmentation_node=segmentationNode,
                                                name=f"{volumeNode.GetName()} Hybrid CT",
                                                logic=self.segmentationsLogic, show_3d=show3D)
        self._styleDisplay(segNode)
        mrml.place_in_data_tree(segNode, volumeNode)
        return segNode

    def showResult(self, result, volumeNode, segmentationNode=None, show3D=True, identity=None):
        """Load the server's label file as segments (then remove the file), keep the results and the image
        identity as node attributes."""
        name = f"{volumeNode.GetName()} Hybrid CT"
        try:
            if getattr(result, "label_array", None) is not None:  # read by the worker (runVolume)
                segNode = mrml.label_array_to_segmentation(self.scene, result.label_array, result.label_geometry,
                                                           volumeNode, segmentation_node=segmentationNode, name=name,
                                                           logic=self.segmentationsLogic, show_3d=show3D)
            else:
                segNode = mrml.label_file_to_segmentation(self.scene, result.label_path, volumeNode,
                                                          segmentation_node=segmentationNode, name=name,
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
        segNode.SetAttribute(RESULT_ATTRIBUTE_PREFIX + "notice", RESEARCH_NOTICE)
        mrml.place_in_data_tree(segNode, volumeNode)
        segNode.SetAttribute(FINGERPRINT_ATTRIBUTE, mrml.segmentation_fingerprint(segNode))
        return segNode

    @staticmethod
    def _styleDisplay(segNode):
        display = segNode.GetDisplayNode()
        if display is None:
            return
        for info in ALL_LABEL_INFO:  # every lung segment, sided or not: see the infection inside it in 3D
            segId = segNode.GetSegmentation().GetSegmentIdBySegmentName(info["name"])
            if segId and info["type"] == LUNG_TYPE:
                display.SetSegmentOpacity3D(segId, 0.3)

    def exportSegmentation(self, segmentationNode, volumeNode, ignoreExtra=False):
        """(uint8 label map, label_info, geometry): segments matched by NAME, whatever their order."""
        return mrml.export_labelmap(self.scene, segmentationNode, volumeNode, ignore_extra=ignoreExtra,
                                    logic=self.segmentationsLogic)
