"""The volume in use (the patient on screen) and the parameter node, for the Hybrid CT widget (Qt side).

The decisions are Qt-free: ``policy.choose_volume`` (which volume), ``ModuleLogic.switchVolume`` /
``panel.plan_volume_switch`` (another patient: results cleared, the other segmentation hidden and
deselected) and ``settings.ModuleParameters`` (the parameter node read back).
"""

import slicer
import vtk

from hybrid_ct_slicer.policy import choose_volume


class VolumeMixin:
    """Mixed into the widget: follows the red slice view and restores the parameter node."""

    def _restoreParameters(self):
        """The parameter node read back (``ModuleParameters``): selections, model, strategy, shown results."""
        params = self.logic.loadParameters()
        scene = slicer.mrmlScene
        if params.input_volume_id and scene.GetNodeByID(params.input_volume_id) is not None:
            self._pickedVolumeId = params.input_volume_id
        seg = scene.GetNodeByID(params.segmentation_id) if params.segmentation_id else None
        if seg is not None:
            self.ui.segmentationSelector.setCurrentNode(seg)
        self.ui.ignoreExtraSegmentsCheckBox.checked = params.ignore_extra_segments
        if params.results_volume_id and seg is not None and self.logic.storedResults(seg):
            self._resultsVolumeId = params.results_volume_id
            self._showResults(self.logic.storedResults(seg))

    def _saveParameters(self):
        params = self.logic.loadParameters()
        volume, seg = self.ui.inputVolumeSelector.currentNode(), self.ui.segmentationSelector.currentNode()
        params.input_volume_id = volume.GetID() if volume else None
        params.segmentation_id = seg.GetID() if seg else None
        params.results_volume_id = self._resultsVolumeId
        params.model, params.strategy = self.ui.modelComboBox.currentText, self.ui.strategyComboBox.currentText
        params.ignore_extra_segments = bool(self.ui.ignoreExtraSegmentsCheckBox.checked)
        params.server_url = self.logic.client.server_url if self.logic.client else ""
        self.logic.saveParameters(params)

    # ------------------------------------------------------------------ the volume in use (patient)
    def _observeRedView(self):
        composite = self._redComposite()
        if composite is not None and not self.hasObserver(composite, vtk.vtkCommand.ModifiedEvent, self._onViewChanged):
            self.addObserver(composite, vtk.vtkCommand.ModifiedEvent, self._onViewChanged)

    @staticmethod
    def _redComposite():
        layoutManager = slicer.app.layoutManager() if hasattr(slicer, "app") else None
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager else None
        return sliceWidget.sliceLogic().GetSliceCompositeNode() if sliceWidget else None

    def _onViewChanged(self, caller=None, event=None):
        composite = self._redComposite()
        viewId = composite.GetBackgroundVolumeID() if composite else None
        if viewId != self._viewVolumeId:
            self._viewVolumeId = viewId
            self._pickedVolumeId = None  # a new volume in view: follow it again
            self._followView()

    def _onVolumePicked(self, node):
        if not self._settingVolume:
            self._pickedVolumeId = node.GetID() if node else None
        self._followView()

    def _followView(self):
        """Select the volume Run/Submit use (``policy.choose_volume``), say which in the panel, and when it is
        another volume (patient) than before: clear the results and hide the other volume's segmentation."""
        composite = self._redComposite()
        self._viewVolumeId = composite.GetBackgroundVolumeID() if composite else None
        scene, cls = slicer.mrmlScene, "vtkMRMLScalarVolumeNode"
        existing = [scene.GetNthNodeByClass(i, cls).GetID() for i in range(scene.GetNumberOfNodesByClass(cls))]
        choice = choose_volume(self._viewVolumeId, self._pickedVolumeId, existing)
        node = slicer.mrmlScene.GetNodeByID(choice.volume_id) if choice.volume_id else None
        if node is not self.ui.inputVolumeSelector.currentNode():
            self._settingVolume = True
            try:
                self.ui.inputVolumeSelector.setCurrentNode(node)
            finally:
                self._settingVolume = False
        self.ui.volumeInUseLabel.text = (f"Volume in use: {node.GetName()} ({choice.reason})" if node
                                         else f"Volume in use: {choice.reason}")
        if (node.GetID() if node else None) != self._volumeInUseId:
            self._volumeInUseId = node.GetID() if node else None
            self._switchTo(node)
        self._onSelectionChanged()

    def _switchTo(self, volumeNode):
        plan = self.logic.switchVolume(volumeNode, self._resultsVolumeId, self.ui.segmentationSelector.currentNode())
        if plan.clear_results:
            self._clearResults()
            self._resultsVolumeId = None
        selected = slicer.mrmlScene.GetNodeByID(plan.select) if plan.select else None
        self.ui.segmentationSelector.setCurrentNode(selected)
        stored = self.logic.storedResults(selected)
        if stored and volumeNode is not None:
            self._showResults(stored)
            self._resultsVolumeId = volumeNode.GetID()
