"""Hybrid CT: lung and infection segmentation and COVID-19 CT classification from a MONAI Label server.

A thin Slicer layer: every piece of logic that needs neither Qt nor the GUI lives in the Qt-free
package ``hybrid_ct_slicer`` (HTTP client, segment naming, result strings, file writers, the flows
behind the buttons) and in ``hybrid_ct_slicer.mrml`` (MRML helpers that also run headless).
"""

import logging
import os
import sys
import tempfile
import threading
import traceback
import warnings

import ctk  # noqa: F401  (imported like every Slicer module; used by the .ui)
import qt
import slicer
import vtk  # noqa: F401
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

    def translate(_context, text):
        return text


def _add_package_path():
    """Make ``hybrid_ct_slicer`` importable: it sits beside this file once built/installed
    (qt-scripted-modules/hybrid_ct_slicer) and one folder up in the source tree
    (slicer_extension/hybrid_ct_slicer, when slicer_extension/HybridCT is an additional module path)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "hybrid_ct_slicer", "__init__.py")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return candidate
    return None


_add_package_path()

from hybrid_ct_slicer import mrml  # noqa: E402
from hybrid_ct_slicer.client import HybridCTClient, ServerError  # noqa: E402
from hybrid_ct_slicer.imageio import write_image  # noqa: E402
from hybrid_ct_slicer.results import NA, format_results  # noqa: E402
from hybrid_ct_slicer.segments import LABEL_INFO, SegmentError, SegmentWarning  # noqa: E402
from hybrid_ct_slicer.settings import (DEFAULT_SERVER_URL, SETTINGS_KEY_MODEL, SETTINGS_KEY_SERVER_URL,  # noqa: E402
                                       SETTINGS_KEY_STRATEGY, normalise_server_url)
from hybrid_ct_slicer.testdata import make_chest_volume  # noqa: E402
from hybrid_ct_slicer.workflow import Workflow, make_image_id  # noqa: E402

IMAGE_ID_ATTRIBUTE = "HybridCT.ImageId"
RESULT_ATTRIBUTE_PREFIX = "HybridCT."
TRAIN_POLL_MS = 5000


#
# HybridCT
#


class HybridCT(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Hybrid CT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["Hybrid CT project contributors"]
        self.parent.helpText = _(
            "Outlines the lungs and the infected regions of a chest CT, classifies the scan "
            "(positive/negative) and reports the infection burden, the CT-0..CT-4 severity grade and the "
            "energy ratio of the spiking network, using the Hybrid CT MONAI Label server. Correct the "
            "segments with the Segment Editor and submit them: they are matched by NAME (Lung = 1, "
            "Infection = 2), never by their position in the list. See docs/slicer.md of the project.")
        self.parent.acknowledgementText = _(
            "Built on MONAI Label and 3D Slicer. The network follows a hybrid spike-convolution multi-task "
            "design (shared encoder, classification and two segmentation heads).")


#
# HybridCTWidget
#


class HybridCTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._busy = False
        self._timers = []
        self._versionEntries = []
        self._trainTimer = None

    # ------------------------------------------------------------------ set-up
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HybridCT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = HybridCTLogic()

        settings = qt.QSettings()
        self.ui.serverUrlLineEdit.text = settings.value(SETTINGS_KEY_SERVER_URL, DEFAULT_SERVER_URL)
        self.ui.progressBar.setValue(0)
        self.ui.stopButton.enabled = False

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.serverUrlLineEdit.connect("returnPressed()", self.onConnect)
        self.ui.runButton.connect("clicked(bool)", self.onRun)
        self.ui.editSegmentsButton.connect("clicked(bool)", self.onEditSegments)
        self.ui.submitButton.connect("clicked(bool)", self.onSubmit)
        self.ui.nextSampleButton.connect("clicked(bool)", self.onNextSample)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.refreshVersionsButton.connect("clicked(bool)", self.onRefreshVersions)
        self.ui.rollbackButton.connect("clicked(bool)", self.onRollback)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._rememberChoices)
        self.ui.strategyComboBox.connect("currentIndexChanged(int)", self._rememberChoices)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateButtons)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateButtons)

        self._trainTimer = qt.QTimer()
        self._trainTimer.setInterval(TRAIN_POLL_MS)
        self._trainTimer.connect("timeout()", self._pollTraining)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._selectVolumeInView()
        self._clearResults()
        self._updateButtons()

    def cleanup(self):
        self.removeObservers()
        if self._trainTimer:
            self._trainTimer.stop()
        for timer in self._timers:
            timer.stop()
        self._timers = []

    def enter(self):
        self._selectVolumeInView()

    def onSceneEndClose(self, caller, event):
        self._clearResults()

    # ------------------------------------------------------------------ helpers
    def _selectVolumeInView(self):
        if self.ui.inputVolumeSelector.currentNode():
            return
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        sliceWidget = layoutManager.sliceWidget("Red")
        if sliceWidget is None:
            return
        volumeId = sliceWidget.sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID()
        if volumeId:
            self.ui.inputVolumeSelector.setCurrentNode(slicer.mrmlScene.GetNodeByID(volumeId))

    def _setStatus(self, text, error=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b" if error else "")
        (logging.error if error else logging.info)(text)

    def _updateButtons(self, *_args):
        connected = self.logic is not None and self.logic.info is not None
        idle = not self._busy
        hasVolume = self.ui.inputVolumeSelector.currentNode() is not None
        hasSegmentation = self.ui.segmentationSelector.currentNode() is not None
        self.ui.connectButton.enabled = idle
        self.ui.runButton.enabled = idle and connected and hasVolume and self.ui.modelComboBox.count > 0
        self.ui.submitButton.enabled = idle and connected and hasVolume and hasSegmentation
        self.ui.editSegmentsButton.enabled = hasSegmentation
        self.ui.nextSampleButton.enabled = idle and connected and self.ui.strategyComboBox.count > 0
        self.ui.trainButton.enabled = idle and connected
        self.ui.rollbackButton.enabled = idle and connected and self.ui.versionComboBox.count > 0
        self.ui.refreshVersionsButton.enabled = idle and connected

    def _rememberChoices(self, *_args):
        settings = qt.QSettings()
        if self.ui.modelComboBox.currentText:
            settings.setValue(SETTINGS_KEY_MODEL, self.ui.modelComboBox.currentText)
        if self.ui.strategyComboBox.currentText:
            settings.setValue(SETTINGS_KEY_STRATEGY, self.ui.strategyComboBox.currentText)

    def _fillCombo(self, combo, items, preferred=None):
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for item in items:
            combo.addItem(item)
        if preferred and preferred in items:
            combo.setCurrentIndex(items.index(preferred))
        combo.blockSignals(wasBlocked)

    def _clearResults(self):
        for key in ("classification", "burden", "grade", "energy", "modelVersion", "latency"):
            getattr(self.ui, f"{key}ValueLabel").text = NA
        self.ui.progressBar.setValue(0)

    def _showResults(self, display):
        self.ui.classificationValueLabel.text = display["classification"]
        self.ui.burdenValueLabel.text = display["burden"]
        self.ui.gradeValueLabel.text = display["grade"]
        self.ui.energyValueLabel.text = display["energy"]
        self.ui.modelVersionValueLabel.text = display["model_version"]
        self.ui.latencyValueLabel.text = display["latency"]
        positive = display["classification"].lower().startswith("positive")
        self.ui.classificationValueLabel.setStyleSheet("font-weight: bold; color: #c0392b" if positive else
                                                       "font-weight: bold")

    def _error(self, exc, what):
        if isinstance(exc, (ServerError, SegmentError, ValueError)):
            message = str(exc)
        else:
            message = f"{exc.__class__.__name__}: {exc}"
            logging.error(traceback.format_exc())
        self._setStatus(f"{what} failed: {message}", error=True)
        slicer.util.errorDisplay(f"{what} failed.\n\n{message}", windowTitle="Hybrid CT")

    def _runInBackground(self, what, work, onDone):
        """Run ``work(progress)`` (network only, no MRML) in a thread; ``onDone(result)`` back in the GUI."""
        if self._busy:
            return
        self._busy = True
        self._updateButtons()
        self._setStatus(f"{what} ...")
        state = {"done": False, "result": None, "error": None, "progress": (0, what)}

        def progress(percent, message):
            state["progress"] = (int(percent), str(message))

        def target():
            try:
                state["result"] = work(progress)
            except Exception as exc:  # noqa: BLE001 - reported in the GUI thread
                state["error"] = exc
                state["trace"] = traceback.format_exc()
            finally:
                state["done"] = True

        thread = threading.Thread(target=target, name=f"HybridCT {what}", daemon=True)
        timer = qt.QTimer()
        timer.setInterval(150)

        def poll():
            percent, message = state["progress"]
            self.ui.progressBar.setValue(percent)
            self.ui.progressBar.setFormat(f"{message} %p%")
            if not state["done"]:
                return
            timer.stop()
            if timer in self._timers:
                self._timers.remove(timer)
            self._busy = False
            self.ui.progressBar.setFormat("%p%")
            try:
                if state["error"] is not None:
                    logging.debug(state.get("trace", ""))
                    self._error(state["error"], what)
                else:
                    onDone(state["result"])
            except Exception as exc:  # noqa: BLE001
                self._error(exc, what)
            finally:
                self._updateButtons()

        timer.connect("timeout()", poll)
        self._timers.append(timer)
        thread.start()
        timer.start()

    # ------------------------------------------------------------------ server
    def onConnect(self):
        try:
            url = normalise_server_url(self.ui.serverUrlLineEdit.text)
        except ValueError as exc:
            self._error(exc, "Connect")
            return
        self.ui.serverUrlLineEdit.text = url
        qt.QSettings().setValue(SETTINGS_KEY_SERVER_URL, url)
        self.logic.setServer(url)

        def done(info):
            settings = qt.QSettings()
            self._fillCombo(self.ui.modelComboBox, info.models,
                            settings.value(SETTINGS_KEY_MODEL, info.default_model()))
            self._fillCombo(self.ui.strategyComboBox, info.strategies, settings.value(SETTINGS_KEY_STRATEGY, ""))
            self.ui.serverStatusLabel.text = info.summary()
            self._setStatus(info.summary())
            self.onRefreshVersions()
            self._pollTraining()

        self._runInBackground("Connect", lambda progress: self.logic.connect(), done)

    # ------------------------------------------------------------------ run
    def onRun(self):
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        if volumeNode is None:
            self._setStatus("Choose a CT volume first.", error=True)
            return
        model = self.ui.modelComboBox.currentText
        try:
            imageId, imageFile = self.logic.prepareUpload(volumeNode)
        except Exception as exc:  # noqa: BLE001
            self._error(exc, "Preparing the volume")
            return
        self._clearResults()

        def work(progress):
            return self.logic.runModel(imageId, imageFile, model, progress)

        def done(result):
            # reuse the segmentation only when it holds an earlier result for the same scan
            previous = self.ui.segmentationSelector.currentNode()
            if previous is not None and previous.GetAttribute(IMAGE_ID_ATTRIBUTE) != str(result.image_id):
                previous = None
            segNode = self.logic.showResult(result, volumeNode, previous)
            self.ui.segmentationSelector.setCurrentNode(segNode)
            self._showResults(result.display)
            note = " (volume uploaded)" if result.uploaded else ""
            self._setStatus(f"{result.model} finished on {result.image_id}{note}: {result.display['classification']}")

        self._runInBackground("Run model", work, done)

    # ------------------------------------------------------------------ correction
    def onEditSegments(self):
        segNode = self.ui.segmentationSelector.currentNode()
        if segNode is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segNode)
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        if volumeNode is not None:
            if hasattr(editor, "setSourceVolumeNode"):  # Slicer >= 5.3
                editor.setSourceVolumeNode(volumeNode)
            else:
                editor.setMasterVolumeNode(volumeNode)

    def onSubmit(self):
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        segNode = self.ui.segmentationSelector.currentNode()
        if volumeNode is None or segNode is None:
            self._setStatus("Choose the CT volume and its segmentation first.", error=True)
            return
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SegmentWarning)
                labelmap, _labelInfo, geometry = self.logic.exportSegmentation(
                    segNode, volumeNode, ignoreExtra=self.ui.ignoreExtraSegmentsCheckBox.checked)
            notes = [str(w.message) for w in caught if issubclass(w.category, SegmentWarning)]
            imageId, imageFile = self.logic.prepareUpload(volumeNode)
        except Exception as exc:  # noqa: BLE001
            self._error(exc, "Submit correction")
            return

        def work(progress):
            return self.logic.submitLabelmap(imageId, imageFile, labelmap, geometry, progress)

        def done(response):
            text = f"Correction for {imageId} saved on the server as the final label."
            if notes:
                text += " " + " ".join(notes)
            self._setStatus(text)

        self._runInBackground("Submit correction", work, done)

    # ------------------------------------------------------------------ active learning
    def onNextSample(self):
        strategy = self.ui.strategyComboBox.currentText

        def work(progress):
            progress(10, f"Asking the server ({strategy}) ...")
            sample = self.logic.workflow.next_sample(strategy)
            if not sample:
                return None, None
            progress(40, f"Downloading {sample['id']} ...")
            return sample, self.logic.workflow.fetch_image(sample["id"])

        def done(result):
            sample, path = result
            if not sample:
                self._setStatus("The server has no unlabelled image left for this strategy.")
                return
            volumeNode = slicer.util.loadVolume(path)
            volumeNode.SetName(str(sample["id"]))
            volumeNode.SetAttribute(IMAGE_ID_ATTRIBUTE, str(sample["id"]))
            self.ui.inputVolumeSelector.setCurrentNode(volumeNode)
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
            self._clearResults()
            self._setStatus(f"Loaded next sample {sample['id']}: press 'Run model on volume'.")

        self._runInBackground("Next sample", work, done)

    # ------------------------------------------------------------------ training
    def onTrain(self):
        model = self.ui.modelComboBox.currentText or None

        def done(result):
            self._setStatus("Training started on the server.")
            self.ui.stopButton.enabled = True
            self._trainTimer.start()
            self._pollTraining()

        self._runInBackground("Start training", lambda progress: self.logic.workflow.start_training(model), done)

    def onStop(self):
        def done(result):
            self._setStatus("Training stopped." if result else "No training was running.")
            self._pollTraining()

        self._runInBackground("Stop training", lambda progress: self.logic.workflow.stop_training(), done)

    def _pollTraining(self):
        if self.logic is None or self.logic.quickWorkflow is None:
            return
        if self._busy:
            return
        model = self.ui.modelComboBox.currentText or None
        try:
            status = self.logic.quickWorkflow.training_status(model)
        except ServerError as exc:
            self.ui.trainStatusLabel.text = f"Training status unavailable: {exc}"
            self._trainTimer.stop()
            return
        self.ui.trainStatusLabel.text = status.status_text
        self.ui.metricLabel.text = status.metric_text
        self.ui.stopButton.enabled = status.active
        if status.active and not self._trainTimer.isActive():
            self._trainTimer.start()
        elif not status.active and self._trainTimer.isActive():
            self._trainTimer.stop()
            self.onRefreshVersions()

    # ------------------------------------------------------------------ versions
    def onRefreshVersions(self):
        if self.logic is None or self.logic.quickWorkflow is None:
            return
        try:
            current, entries, labels = self.logic.quickWorkflow.versions()
        except ServerError as exc:
            self.ui.versionComboBox.clear()
            self._versionEntries = []
            self.ui.versionComboBox.toolTip = f"Model versions unavailable: {exc}"
            self._updateButtons()
            return
        self._versionEntries = entries
        self._fillCombo(self.ui.versionComboBox, labels)
        for i, entry in enumerate(entries):
            if str(entry.get("version")) == str(current):
                self.ui.versionComboBox.setCurrentIndex(i)
        self._updateButtons()

    def onRollback(self):
        index = self.ui.versionComboBox.currentIndex
        if index < 0 or index >= len(self._versionEntries):
            return
        version = str(self._versionEntries[index].get("version"))
        if not slicer.util.confirmOkCancelDisplay(
                f"Serve model version {version} from now on?", windowTitle="Hybrid CT"):
            return

        def done(result):
            self._setStatus(f"The server now serves model version {version}.")
            self.onRefreshVersions()

        self._runInBackground("Roll back", lambda progress: self.logic.workflow.rollback(version), done)


#
# HybridCTLogic
#


class HybridCTLogic(ScriptedLoadableModuleLogic):
    """MRML side of the module; network flows are delegated to ``hybrid_ct_slicer.workflow``.

    Works on ``slicer.mrmlScene`` by default; the tests may pass a headless scene.
    """

    def __init__(self, scene=None, segmentationsLogic=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.segmentationsLogic = segmentationsLogic or mrml.segmentations_logic(self.scene)
        self.workDir = tempfile.mkdtemp(prefix="HybridCT_")
        self.client = None
        self.workflow = None
        self.quickWorkflow = None
        self.info = None

    # ---------------------------------------------------------------- server
    def setServer(self, url, timeout=30.0, pollTimeout=5.0):
        self.client = HybridCTClient(url, timeout)
        self.workflow = Workflow(self.client, work_dir=self.workDir)
        # status polls run in the GUI thread: a short timeout keeps Slicer responsive
        self.quickWorkflow = Workflow(HybridCTClient(url, pollTimeout), work_dir=self.workDir)
        self.info = None

    def connect(self, url=None):
        if url is not None:
            self.setServer(url)
        if self.workflow is None:
            raise ServerError("No server URL is set.", kind="protocol")
        self.info = self.workflow.connect()
        return self.info

    # ---------------------------------------------------------------- volumes
    @staticmethod
    def imageIdForVolume(volumeNode):
        """Datastore id of a volume: the id it was loaded with (Next sample), else made from its name."""
        imageId = volumeNode.GetAttribute(IMAGE_ID_ATTRIBUTE)
        return imageId if imageId else make_image_id(volumeNode.GetName())

    def prepareUpload(self, volumeNode):
        """(image id, path of a .nii.gz copy of the volume) - read in the GUI thread, sent later."""
        imageId = self.imageIdForVolume(volumeNode)
        safe = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in imageId) or "volume"
        path = os.path.join(self.workDir, f"{safe}.nii.gz")
        write_image(path, mrml.array_from_volume(volumeNode), mrml.node_geometry(volumeNode))
        return imageId, path

    # ---------------------------------------------------------------- network (thread-safe: no MRML)
    def runModel(self, imageId, imageFile, model=None, progress=None):
        if progress is not None:
            self.workflow.progress = progress
        return self.workflow.run_model(imageId, imageFile, model=model or None)

    def submitLabelmap(self, imageId, imageFile, labelmap, geometry, progress=None):
        if progress is not None:
            self.workflow.progress = progress
        self.workflow.ensure_image(imageId, imageFile)
        return self.workflow.submit_labelmap(imageId, labelmap, geometry)

    # ---------------------------------------------------------------- segmentation
    def showLabelmap(self, labelmap, volumeNode, segmentationNode=None, show3D=True):
        """Label map array (on the volume's grid) -> "Lung"/"Infection" segments shown in 2D and 3D."""
        segNode = mrml.labelmap_to_segmentation(self.scene, labelmap, volumeNode, segmentation_node=segmentationNode,
                                                name=f"{volumeNode.GetName()} Hybrid CT",
                                                logic=self.segmentationsLogic, show_3d=show3D)
        self._styleDisplay(segNode)
        return segNode

    def showResult(self, result, volumeNode, segmentationNode=None, show3D=True):
        """Load the server's label file as segments and keep the results as node attributes."""
        segNode = mrml.label_file_to_segmentation(self.scene, result.label_path, volumeNode,
                                                  segmentation_node=segmentationNode,
                                                  name=f"{volumeNode.GetName()} Hybrid CT",
                                                  logic=self.segmentationsLogic, show_3d=show3D)
        self._styleDisplay(segNode)
        for key, value in format_results(result.params).items():
            segNode.SetAttribute(RESULT_ATTRIBUTE_PREFIX + key, value)
        segNode.SetAttribute(IMAGE_ID_ATTRIBUTE, str(result.image_id))
        return segNode

    @staticmethod
    def _styleDisplay(segNode):
        display = segNode.GetDisplayNode()
        if display is None:
            return
        segmentation = segNode.GetSegmentation()
        for info in LABEL_INFO:
            segId = segmentation.GetSegmentIdBySegmentName(info["name"])
            if segId and info["name"] == "Lung":
                display.SetSegmentOpacity3D(segId, 0.3)  # see the infection inside the lung in 3D

    def exportSegmentation(self, segmentationNode, volumeNode, ignoreExtra=False):
        """(uint8 label map, label_info, geometry): segments matched by NAME, whatever their order."""
        return mrml.export_labelmap(self.scene, segmentationNode, volumeNode, ignore_extra=ignoreExtra,
                                    logic=self.segmentationsLogic)


#
# HybridCTTest
#


class HybridCTTest(ScriptedLoadableModuleTest):
    """Run with "Reload and Test" (developer mode) or ``slicer.util.selfTest``.

    Offline: a phantom-like chest volume built with numpy, label map -> named segments -> label map
    with the segments reordered and an extra segment, .seg.nrrd round trip. Online (only when a server
    URL is remembered in the module or set in HYBRID_CT_SERVER_URL): the connection check.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentRoundTrip()
        self.setUp()
        self.test_ResultsPanelStrings()
        self.setUp()
        self.test_ServerConnection()

    def _phantom(self, logic):
        ct, label, geometry = make_chest_volume(shape=(16, 48, 48))
        volume = mrml.add_volume(logic.scene, ct, geometry, "HybridCTPhantom")
        return volume, label, geometry

    def test_SegmentRoundTrip(self):
        import numpy as np

        self.delayDisplay("Segment import/export round trip")
        logic = HybridCTLogic()
        volume, label, geometry = self._phantom(logic)
        segNode = logic.showLabelmap(label, volume)
        segmentation = segNode.GetSegmentation()
        self.assertEqual(mrml.segment_names(segNode), ["Lung", "Infection"])

        # reorder: Infection first; add a segment the model does not know
        segmentation.SetSegmentIndex(segmentation.GetSegmentIdBySegmentName("Infection"), 0)
        segmentation.AddEmptySegment("Heart", "Heart")
        with self.assertRaises(SegmentError):
            logic.exportSegmentation(segNode, volume)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            labelmap, labelInfo, exportGeometry = logic.exportSegmentation(segNode, volume, ignoreExtra=True)
        self.assertTrue(np.array_equal(labelmap, label))
        self.assertTrue(exportGeometry.almost_equal(geometry))
        self.assertEqual(labelInfo, [{"name": "lung", "idx": 1}, {"name": "infection", "idx": 2}])

        # .seg.nrrd keeps names and content
        path = os.path.join(logic.workDir, "phantom.seg.nrrd")
        mrml.write_segmentation(logic.scene, segNode, path)
        reread = mrml.read_segmentation(logic.scene, path)
        self.assertEqual(sorted(mrml.segment_names(reread)), ["Heart", "Infection", "Lung"])
        if hasattr(slicer, "app"):  # show the phantom with its segments when run inside Slicer
            volume.CreateDefaultDisplayNodes()
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
        self.delayDisplay("Segment round trip passed")

    def test_ResultsPanelStrings(self):
        self.delayDisplay("Results panel strings")
        display = format_results({
            "classification": {"label": "positive", "probability": 0.91, "firing_rates": [0.1, 0.6]},
            "burden": {"total_pct": 12.5, "left_pct": 10.0, "right_pct": 15.0}, "grade": "CT-1",
            "energy": {"e_hybrid_uj": 1.0, "e_conv_uj": 6.0, "ratio": 0.1667, "mean_firing_rate": 0.05},
            "latency_s": 3.2, "model_version": "v3"})
        self.assertTrue(display["classification"].startswith("Positive"))
        self.assertIn("12.5 %", display["burden"])
        self.assertEqual(format_results({})["grade"], NA)
        self.delayDisplay("Results panel strings passed")

    def test_ServerConnection(self):
        url = os.environ.get("HYBRID_CT_SERVER_URL") or qt.QSettings().value(SETTINGS_KEY_SERVER_URL, "")
        if not url:
            self.delayDisplay("No server URL set: connection check skipped")
            return
        self.delayDisplay(f"Connecting to {url}")
        logic = HybridCTLogic()
        try:
            info = logic.connect(url)
        except ServerError as exc:
            self.fail(f"Connection check failed: {exc}")
        self.assertTrue(info.models, "the server offers no model")
        self.delayDisplay(info.summary())
