"""Hybrid CT: lung and infection segmentation and COVID-19 CT classification from a MONAI Label server.

A thin Slicer layer: every piece of logic that needs neither Qt nor the GUI lives in the Qt-free
package ``hybrid_ct_slicer`` (HTTP client, segment naming, result strings, file writers, the flows
behind the buttons) and in ``hybrid_ct_slicer.mrml`` (MRML helpers that also run headless).
"""

import logging
import os
import sys
import time
import traceback
import warnings

import ctk  # noqa: F401  (imported like every Slicer module; used by the .ui)
import qt
import slicer
import vtk
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

from hybrid_ct_slicer import mrml, selftest  # noqa: E402
from hybrid_ct_slicer.client import ServerError  # noqa: E402
from hybrid_ct_slicer.identity import CONTENT_ATTRIBUTE, ID_ATTRIBUTE, volume_stamp  # noqa: E402
from hybrid_ct_slicer.jobs import JobRunner, Poller  # noqa: E402
from hybrid_ct_slicer.logic import ModuleLogic  # noqa: E402
from hybrid_ct_slicer.policy import (SETTINGS_KEY_APPROVED_SERVERS, choose_volume, remember_approval,  # noqa: E402
                                     remove_quietly, upload_consent)
from hybrid_ct_slicer.results import NA  # noqa: E402
from hybrid_ct_slicer.segments import SegmentError, SegmentWarning  # noqa: E402
from hybrid_ct_slicer.settings import (DEFAULT_SERVER_URL, SETTINGS_KEY_MODEL, SETTINGS_KEY_SERVER_URL,  # noqa: E402
                                       SETTINGS_KEY_STRATEGY, normalise_server_url)

DELIVER_MS = 50  # results and progress reach the GUI thread this often
GIL_YIELD_S = 0.005  # per tick while jobs run: worker threads get the GIL even if Slicer holds it when idle
TRAIN_POLL_S = 5.0
IDLE_POLL_S = 30.0


#
# HybridCT
#


class HybridCT(ScriptedLoadableModule):
    """The module's description (ScriptedLoadableModule)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Hybrid CT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "SegmentEditor"]
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
    """The panel. Every server call is a background job (``hybrid_ct_slicer.jobs``); a QTimer on the GUI
    thread delivers progress and results. MRML is touched only on the GUI thread."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.jobs = JobRunner()
        self._timer = None
        self._poller = None
        self._versionEntries = []
        self._sceneGeneration = 0
        self._pickedVolumeId = None
        self._viewVolumeId = None
        self._settingVolume = False
        self._trainingActive = False

    # ------------------------------------------------------------------ set-up
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HybridCT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HybridCTLogic()

        self.ui.serverUrlLineEdit.text = qt.QSettings().value(SETTINGS_KEY_SERVER_URL, DEFAULT_SERVER_URL)
        self.ui.progressBar.setValue(0)
        for signal, widget, slot in (
                ("clicked(bool)", self.ui.connectButton, self.onConnect),
                ("returnPressed()", self.ui.serverUrlLineEdit, self.onConnect),
                ("clicked(bool)", self.ui.runButton, self.onRun),
                ("clicked(bool)", self.ui.cancelButton, self.onCancel),
                ("clicked(bool)", self.ui.editSegmentsButton, self.onEditSegments),
                ("clicked(bool)", self.ui.submitButton, self.onSubmit),
                ("clicked(bool)", self.ui.nextSampleButton, self.onNextSample),
                ("clicked(bool)", self.ui.trainButton, self.onTrain),
                ("clicked(bool)", self.ui.stopButton, self.onStop),
                ("clicked(bool)", self.ui.refreshVersionsButton, self.onRefreshVersions),
                ("clicked(bool)", self.ui.rollbackButton, self.onRollback),
                ("currentIndexChanged(int)", self.ui.modelComboBox, self._rememberChoices),
                ("currentIndexChanged(int)", self.ui.strategyComboBox, self._rememberChoices),
                ("currentNodeChanged(vtkMRMLNode*)", self.ui.inputVolumeSelector, self._onVolumePicked),
                ("currentNodeChanged(vtkMRMLNode*)", self.ui.segmentationSelector, self._onSelectionChanged)):
            widget.connect(signal, slot)

        self._timer = qt.QTimer()
        self._timer.setInterval(DELIVER_MS)
        self._timer.connect("timeout()", self._tick)
        self._timer.start()
        self._poller = Poller(self.jobs, "Training status", self._statusWork, TRAIN_POLL_S,
                              on_result=self._showTrainStatus, on_error=self._trainStatusFailed)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._observeRedView()
        self._clearResults()
        self._followView()

    def cleanup(self):
        self.removeObservers()
        if self._timer:
            self._timer.stop()
        self.jobs.shutdown()

    def enter(self):
        self._observeRedView()
        self._followView()

    def onSceneStartClose(self, caller, event):
        # results of jobs started on the closing scene would be built against removed nodes: drop them
        if self.jobs.drop_tag(self._sceneGeneration):
            self._setStatus("Scene closed: the running job was cancelled.")
        self._sceneGeneration += 1
        self._pickedVolumeId = None

    def onSceneEndClose(self, caller, event):
        self._clearResults()
        self._observeRedView()
        self._followView()

    # ------------------------------------------------------------------ jobs
    def _tick(self):
        self.jobs.deliver()
        if self._poller is not None:
            self._poller.tick()
        if self.jobs.running:
            time.sleep(GIL_YIELD_S)  # let worker threads run even while Slicer's GUI thread holds the GIL
        self._updateButtons()

    def _start(self, what, work, onDone, *, onDiscard=None, exclusive=True):
        """Run ``work(job)`` (network and files, no MRML) in a thread; ``onDone(result)`` later on the GUI thread."""
        job = self.jobs.start(what, work, exclusive=exclusive, tag=self._sceneGeneration,
                              on_done=lambda result: self._finished(what, onDone, result),
                              on_error=lambda exc: self._error(exc, what),
                              on_progress=self._progress if exclusive else None, on_discard=onDiscard)
        if job is None:
            self._setStatus(f"Busy with {self.jobs.exclusive.name}: wait or press Cancel.", error=True)
            return None
        if exclusive:
            self._setStatus(f"{what} ...")
            self._progress(0, what)
        self._updateButtons()
        return job

    def _finished(self, what, onDone, result):
        self.ui.progressBar.setFormat("%p%")
        try:
            onDone(result)
        except Exception as exc:  # noqa: BLE001
            self._error(exc, what)

    def _progress(self, percent, message):
        self.ui.progressBar.setValue(percent)
        self.ui.progressBar.setFormat(f"{message} %p%")

    def onCancel(self):
        job = self.jobs.exclusive
        if job is not None and self.jobs.cancel(job):
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.setFormat("%p%")
            self._setStatus(f"{job.name} cancelled.")

    # ------------------------------------------------------------------ helpers
    def _observeRedView(self):
        composite = self._redComposite()
        if composite is not None and not self.hasObserver(composite, vtk.vtkCommand.ModifiedEvent, self._onViewChanged):
            self.addObserver(composite, vtk.vtkCommand.ModifiedEvent, self._onViewChanged)

    @staticmethod
    def _redComposite():
        layoutManager = slicer.app.layoutManager()
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
        """Select the volume Run/Submit use (``policy.choose_volume``) and say which in the panel."""
        composite = self._redComposite()
        self._viewVolumeId = composite.GetBackgroundVolumeID() if composite else None
        existing = [n.GetID() for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")]
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
        self._onSelectionChanged()

    def _onSelectionChanged(self, *_args):
        self.logic.saveSelection(self.ui.inputVolumeSelector.currentNode(), self.ui.segmentationSelector.currentNode())
        self._updateButtons()

    def _setStatus(self, text, error=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b" if error else "")
        (logging.error if error else logging.info)(text)

    def _updateButtons(self, *_args):
        connected = self.logic is not None and self.logic.info is not None
        idle = not self.jobs.busy
        hasVolume = self.ui.inputVolumeSelector.currentNode() is not None
        hasSegmentation = self.ui.segmentationSelector.currentNode() is not None
        self.ui.connectButton.enabled = idle
        self.ui.serverUrlLineEdit.enabled = idle
        self.ui.cancelButton.enabled = not idle
        self.ui.runButton.enabled = idle and connected and hasVolume and self.ui.modelComboBox.count > 0
        self.ui.submitButton.enabled = idle and connected and hasVolume and hasSegmentation
        self.ui.editSegmentsButton.enabled = hasSegmentation
        self.ui.nextSampleButton.enabled = idle and connected and self.ui.strategyComboBox.count > 0
        self.ui.trainButton.enabled = idle and connected
        self.ui.stopButton.enabled = connected and self._trainingActive  # works during another job too
        self.ui.rollbackButton.enabled = idle and connected and self.ui.versionComboBox.count > 0
        self.ui.refreshVersionsButton.enabled = connected

    def _rememberChoices(self, *_args):
        settings = qt.QSettings()
        if self.ui.modelComboBox.currentText:
            settings.setValue(SETTINGS_KEY_MODEL, self.ui.modelComboBox.currentText)
        if self.ui.strategyComboBox.currentText:
            settings.setValue(SETTINGS_KEY_STRATEGY, self.ui.strategyComboBox.currentText)

    @staticmethod
    def _fillCombo(combo, items, preferred=None):
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
        for key, name in (("classification", "classification"), ("burden", "burden"), ("grade", "grade"),
                          ("energy", "energy"), ("modelVersion", "model_version"), ("latency", "latency")):
            getattr(self.ui, f"{key}ValueLabel").text = display[name]
        positive = display["classification"].lower().startswith("positive")
        self.ui.classificationValueLabel.setStyleSheet("font-weight: bold; color: #c0392b" if positive else
                                                       "font-weight: bold")

    def _error(self, exc, what):
        if isinstance(exc, (ServerError, SegmentError, ValueError)):
            message = str(exc)
        else:
            message = f"{exc.__class__.__name__}: {exc}"
            logging.error(traceback.format_exc())
        self.ui.progressBar.setFormat("%p%")
        self._setStatus(f"{what} failed: {message}", error=True)
        slicer.util.errorDisplay(f"{what} failed.\n\n{message}", windowTitle="Hybrid CT")

    def _consentToUpload(self):
        """Ask once per non-local server before patient images leave this computer; warn on plain http."""
        settings = qt.QSettings()
        approved = str(settings.value(SETTINGS_KEY_APPROVED_SERVERS, "") or "").split("\n")
        consent = upload_consent(self.logic.client.server_url, approved)
        if consent.ask:
            if not slicer.util.confirmOkCancelDisplay(consent.question, windowTitle="Hybrid CT: send images?"):
                self._setStatus("Nothing was sent: the upload to this server was not confirmed.", error=True)
                return False
            settings.setValue(SETTINGS_KEY_APPROVED_SERVERS, "\n".join(remember_approval(approved, consent.server)))
        elif consent.warning:
            logging.warning(consent.warning)
        return True

    # ------------------------------------------------------------------ server
    def onConnect(self):
        if self.jobs.busy:
            self._setStatus(f"Busy with {self.jobs.exclusive.name}: press Cancel before reconnecting.", error=True)
            return
        try:
            url = normalise_server_url(self.ui.serverUrlLineEdit.text)
        except ValueError as exc:
            self._error(exc, "Connect")
            return
        self.ui.serverUrlLineEdit.text = url
        qt.QSettings().setValue(SETTINGS_KEY_SERVER_URL, url)
        self.logic.setServer(url)
        self._poller.stop()

        def done(info):
            settings = qt.QSettings()
            self._fillCombo(self.ui.modelComboBox, info.models, settings.value(SETTINGS_KEY_MODEL, info.default_model()))
            self._fillCombo(self.ui.strategyComboBox, info.strategies, settings.value(SETTINGS_KEY_STRATEGY, ""))
            self.ui.serverStatusLabel.text = info.summary()
            self._setStatus(info.summary())
            self.onRefreshVersions()
            self._poller.start()

        self._start("Connect", lambda job: self.logic.connect(job=job), done)

    # ------------------------------------------------------------------ run
    def onRun(self):
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        if volumeNode is None:
            self._setStatus("Choose a CT volume first.", error=True)
            return
        if not self._consentToUpload():
            return
        target = self._targetSegmentation(volumeNode)
        if target is False:
            return
        model = self.ui.modelComboBox.currentText
        with slicer.util.WaitCursor():
            snapshot = mrml.volume_snapshot(volumeNode)
        self._clearResults()

        def done(outcome):
            identity, result = outcome
            if slicer.mrmlScene.GetNodeByID(snapshot["node_id"]) is not volumeNode:
                self.logic.discardResult(outcome)
                self._setStatus("The volume was removed while the model ran: result dropped.", error=True)
                return
            with slicer.util.WaitCursor():  # building the 3D surface stays on the GUI thread
                segNode = self.logic.showResult(result, volumeNode, target, identity=identity)
            self.ui.segmentationSelector.setCurrentNode(segNode)
            self._showResults(result.display)
            note = " (volume uploaded)" if result.uploaded else ""
            self._setStatus(f"{result.model} finished on {volumeNode.GetName()} = {identity.describe()}{note}: "
                            f"{result.display['classification']}")

        self._start("Run model", lambda job: self.logic.runVolume(snapshot, model, job=job), done,
                    onDiscard=self.logic.discardResult)

    def _targetSegmentation(self, volumeNode):
        """The segmentation Run fills: the previous result for this scan, or None (a new one); asks before
        replacing edited segments. False: the user cancelled."""
        previous = self.ui.segmentationSelector.currentNode()
        decision = self.logic.replaceDecision(previous, volumeNode)
        if decision == "new":
            return None
        if decision == "replace":
            return previous
        box = qt.QMessageBox(qt.QMessageBox.Question, "Hybrid CT",
                             f"'{previous.GetName()}' has been edited since the model made it.\n\nReplace the "
                             f"edited segments with a new result, or keep them and add a new segmentation?",
                             qt.QMessageBox.NoButton, slicer.util.mainWindow())
        replace = box.addButton("Replace", qt.QMessageBox.DestructiveRole)
        keep = box.addButton("Keep edits, add new", qt.QMessageBox.AcceptRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.setDefaultButton(keep)
        box.exec_()
        if box.clickedButton() == replace:
            return previous
        if box.clickedButton() == keep:
            return None
        return False

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
        if not self._consentToUpload():
            return
        try:
            with slicer.util.WaitCursor(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SegmentWarning)
                labelmap, _labelInfo, geometry = self.logic.exportSegmentation(
                    segNode, volumeNode, ignoreExtra=self.ui.ignoreExtraSegmentsCheckBox.checked)
                snapshot = mrml.volume_snapshot(volumeNode)
            notes = [str(w.message) for w in caught if issubclass(w.category, SegmentWarning)]
        except Exception as exc:  # noqa: BLE001
            self._error(exc, "Submit correction")
            return
        segAttributes = mrml.get_attributes(segNode, (ID_ATTRIBUTE, CONTENT_ATTRIBUTE))
        names = {"seg_name": f"Segmentation '{segNode.GetName()}'", "volume_name": f"volume '{volumeNode.GetName()}'"}

        def work(job):
            return self.logic.submitCorrection(snapshot, segAttributes, labelmap, geometry, job=job, **names)

        def done(outcome):
            identity, _answer, fileSha, note = outcome
            if slicer.mrmlScene.GetNodeByID(snapshot["node_id"]) is volumeNode:
                mrml.set_attributes(volumeNode, volume_stamp(identity, fileSha))
            text = f"Correction for {identity.describe()} saved on the server as the final label."
            self._setStatus(" ".join([text] + notes + ([note] if note else [])))

        self._start("Submit correction", work, done)

    # ------------------------------------------------------------------ active learning
    def onNextSample(self):
        strategy = self.ui.strategyComboBox.currentText

        def done(outcome):
            sample, path, fileSha = outcome
            if not sample:
                self._setStatus("The server has no unlabelled image left for this strategy.")
                return
            try:
                with slicer.util.WaitCursor():
                    volumeNode = slicer.util.loadVolume(path)
                    volumeNode.SetName(str(sample["id"]))
                    self.logic.stampDownloaded(volumeNode, str(sample["id"]), fileSha)
            finally:
                remove_quietly(path)
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)  # followed by the selector
            self._clearResults()
            self._setStatus(f"Loaded next sample {sample['id']}: press 'Run model on volume'.")

        self._start("Next sample", lambda job: self.logic.fetchSample(strategy, job=job), done,
                    onDiscard=lambda outcome: remove_quietly(outcome[1]))

    # ------------------------------------------------------------------ training
    def onTrain(self):
        model = self.ui.modelComboBox.currentText or None

        def done(result):
            self._setStatus("Training started on the server.")
            self._trainingActive = True
            self._poller.start()

        self._start("Start training", lambda job: self.logic.newWorkflow(job).start_training(model), done)

    def onStop(self):
        def done(result):
            self._setStatus("Training stopped." if result else "No training was running.")
            self._poller.start()

        # not exclusive: Stop works while another job (an upload, a run) is in progress
        self._start("Stop training", lambda job: self.logic.newWorkflow(job).stop_training(), done, exclusive=False)

    def _statusWork(self, job):
        return self.logic.newWorkflow(job, quick=True).training_status(self.ui.modelComboBox.currentText or None)

    def _showTrainStatus(self, status):
        wasActive = self._trainingActive
        self._trainingActive = status.active
        self.ui.trainStatusLabel.text = status.status_text
        self.ui.metricLabel.text = status.metric_text
        self._poller.interval_s = TRAIN_POLL_S if status.active else IDLE_POLL_S
        if wasActive and not status.active:
            self.onRefreshVersions()

    def _trainStatusFailed(self, exc):
        # keep polling: one timeout (a busy server) must not stop the status for good
        self.ui.trainStatusLabel.text = f"Training status unavailable (retrying): {exc}"

    # ------------------------------------------------------------------ versions
    def onRefreshVersions(self):
        if self.logic is None or self.logic.client is None:
            return

        def done(outcome):
            current, entries, labels = outcome
            self._versionEntries = entries
            self._fillCombo(self.ui.versionComboBox, labels)
            for i, entry in enumerate(entries):
                if str(entry.get("version")) == str(current):
                    self.ui.versionComboBox.setCurrentIndex(i)
            self._updateButtons()

        def failed(exc):
            self.ui.versionComboBox.clear()
            self._versionEntries = []
            self.ui.versionComboBox.toolTip = f"Model versions unavailable: {exc}"

        self.jobs.start("Model versions", lambda job: self.logic.newWorkflow(job, quick=True).versions(),
                        exclusive=False, tag=self._sceneGeneration, on_done=done, on_error=failed)

    def onRollback(self):
        index = self.ui.versionComboBox.currentIndex
        if index < 0 or index >= len(self._versionEntries):
            return
        version = str(self._versionEntries[index].get("version"))
        if not slicer.util.confirmOkCancelDisplay(f"Serve model version {version} from now on?", windowTitle="Hybrid CT"):
            return

        def done(result):
            self._setStatus(f"The server now serves model version {version}.")
            self.onRefreshVersions()

        self._start("Roll back", lambda job: self.logic.newWorkflow(job).rollback(version), done)


#
# HybridCTLogic
#


class HybridCTLogic(ScriptedLoadableModuleLogic, ModuleLogic):
    """``hybrid_ct_slicer.logic.ModuleLogic`` on ``slicer.mrmlScene`` (or the scene a test passes), with
    Slicer's temp folder as the only place patient images are written (and removed after use)."""

    def __init__(self, scene=None, segmentationsLogic=None, workDir=None):
        ScriptedLoadableModuleLogic.__init__(self)
        if workDir is None and hasattr(slicer, "app"):
            workDir = os.path.join(slicer.app.temporaryPath, "HybridCT")
        ModuleLogic.__init__(self, scene if scene is not None else slicer.mrmlScene, segmentationsLogic, workDir)


#
# HybridCTTest
#


class HybridCTTest(ScriptedLoadableModuleTest):
    """Run with "Reload and Test" (developer mode) or ``slicer.util.selfTest``.

    Offline: a phantom-like chest volume built with numpy, label map -> named segments -> label map
    with the segments reordered and an extra segment, .seg.nrrd round trip; Run and Submit against a
    mock server the test starts on 127.0.0.1. Online (only when HYBRID_CT_SERVER_URL is set): the
    connection check of a real server.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_SegmentRoundTrip, self.test_ResultsPanelStrings, self.test_MockServerFlow,
                     self.test_ServerConnection):
            self.setUp()
            test()

    def makeLogic(self, **kwargs):
        return HybridCTLogic(**kwargs)

    def test_SegmentRoundTrip(self):
        selftest.segment_round_trip(self)

    def test_ResultsPanelStrings(self):
        selftest.results_panel_strings(self)

    def test_MockServerFlow(self):
        selftest.mock_server_flow(self)

    def test_ServerConnection(self):
        selftest.server_connection(self)
