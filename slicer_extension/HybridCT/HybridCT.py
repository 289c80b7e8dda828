"""Hybrid CT: lung and infection segmentation and COVID-19 CT classification from a MONAI Label server.

Research use only, not for diagnosis. A thin Slicer layer: every piece of logic that needs neither Qt nor
the GUI lives in the Qt-free package ``hybrid_ct_slicer`` (HTTP client, segment naming, result strings,
file writers, the flows behind the buttons, the panel's decisions) and in ``hybrid_ct_slicer.mrml`` /
``hybrid_ct_slicer.logic`` (MRML, also headless); the widget's job plumbing and dialogs are in
``HybridCTLib`` beside this file.
"""

import logging
import os
import sys
import warnings

import ctk  # noqa: F401  (imported like every Slicer module; used by the .ui)
import qt
import slicer
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
    """Make ``hybrid_ct_slicer`` and ``HybridCTLib`` importable: the package sits beside this file once
    built/installed (qt-scripted-modules/hybrid_ct_slicer) and one folder up in the source tree
    (slicer_extension/hybrid_ct_slicer, when slicer_extension/HybridCT is an additional module path)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)  # HybridCTLib
    for candidate in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "hybrid_ct_slicer", "__init__.py")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return candidate
    return None


_add_package_path()

from HybridCTLib import dialogs  # noqa: E402
from HybridCTLib.training import TrainingMixin  # noqa: E402
from HybridCTLib.volumes import VolumeMixin  # noqa: E402
from HybridCTLib.widgetjobs import JobsMixin  # noqa: E402
from hybrid_ct_slicer import mrml, selftest  # noqa: E402
from hybrid_ct_slicer.identity import CONTENT_ATTRIBUTE, ID_ATTRIBUTE, volume_stamp  # noqa: E402
from hybrid_ct_slicer.jobs import JobRunner  # noqa: E402
from hybrid_ct_slicer.logic import ModuleLogic  # noqa: E402
from hybrid_ct_slicer.panel import RESEARCH_NOTICE  # noqa: E402
from hybrid_ct_slicer.policy import remove_quietly  # noqa: E402
from hybrid_ct_slicer.results import NA  # noqa: E402
from hybrid_ct_slicer.segments import SegmentWarning  # noqa: E402
from hybrid_ct_slicer.settings import (DEFAULT_SERVER_URL, SETTINGS_KEY_CA_BUNDLE, SETTINGS_KEY_MODEL,  # noqa: E402
                                       SETTINGS_KEY_SERVER_URL, SETTINGS_KEY_STRATEGY, normalise_server_url)

RESULT_KEYS = (("classification", "classification"), ("burden", "burden"), ("grade", "grade"), ("energy", "energy"),
               ("modelVersion", "model_version"), ("latency", "latency"))


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
        self.parent.contributors = ["Hybrid CT maintainers (Hybrid CT project)"]
        self.parent.helpText = _(
            "RESEARCH USE ONLY, NOT FOR DIAGNOSIS. "
            "Outlines the lungs and the infected regions of a chest CT, classifies the scan "
            "(positive/negative) and reports the infection burden, the CT-0..CT-4 severity grade and the "
            "energy ratio of the spiking network, using the Hybrid CT MONAI Label server. Correct the "
            "segments with the Segment Editor and submit them: they are matched by NAME (Right lung = 3, "
            "Left lung = 4, Infection = 2; one Lung = 1 for both sides is accepted), never by their position in the list. See docs/slicer.md of the project.")
        self.parent.acknowledgementText = _(
            "Built on MONAI Label and 3D Slicer. The network follows a hybrid spike-convolution multi-task "
            "design (shared encoder, classification and two segmentation heads).")


#
# HybridCTWidget
#


class HybridCTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin, JobsMixin, VolumeMixin, TrainingMixin):
    """The panel. Every server call is a background job (``hybrid_ct_slicer.jobs``); a QTimer on the GUI
    thread delivers progress and results (``HybridCTLib.widgetjobs``). Qt and MRML are touched only on the
    GUI thread: what a worker needs is read before it starts (volume snapshot, model name)."""

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
        self._volumeInUseId = None
        self._resultsVolumeId = None  # the volume whose results the panel shows
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
        self.ui.researchNoticeLabel.text = RESEARCH_NOTICE
        self.ui.resultsNoticeLabel.text = RESEARCH_NOTICE

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
                ("toggled(bool)", self.ui.ignoreExtraSegmentsCheckBox, self._rememberChoices),
                ("currentNodeChanged(vtkMRMLNode*)", self.ui.inputVolumeSelector, self._onVolumePicked),
                ("currentNodeChanged(vtkMRMLNode*)", self.ui.segmentationSelector, self._onSelectionChanged)):
            widget.connect(signal, slot)

        self._createJobs()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self._observeRedView()
        self._clearResults()
        self._restoreParameters()
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
        self._resultsVolumeId = None

    def onSceneEndClose(self, caller, event):
        self._clearResults()
        self._observeRedView()
        self._followView()

    def onSceneEndImport(self, caller, event):
        self._restoreParameters()  # a scene was loaded: read its parameter node back
        self._followView()

    def _onSelectionChanged(self, *_args):
        self.logic.saveSelection(self.ui.inputVolumeSelector.currentNode(), self.ui.segmentationSelector.currentNode())
        self._updateButtons()

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
        self.ui.editSegmentsButton.enabled = hasSegmentation  # edits during Run are asked about on arrival
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
        self._saveParameters()

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
        for key, _name in RESULT_KEYS:
            getattr(self.ui, f"{key}ValueLabel").text = NA
        self.ui.classificationValueLabel.setStyleSheet("")
        self.ui.progressBar.setValue(0)

    def _showResults(self, display):
        for key, name in RESULT_KEYS:
            getattr(self.ui, f"{key}ValueLabel").text = display[name]
        # a model's output, not a diagnosis: bold, no alarm colour (the notice stands next to it)
        self.ui.classificationValueLabel.setStyleSheet("font-weight: bold")

    def _consentToUpload(self):
        return dialogs.consent_to_upload(self.logic.client.server_url, self._setStatus)

    # ------------------------------------------------------------------ server
    def onConnect(self):
        if self.jobs.busy:
            self._setStatus(f"Busy with {self.jobs.exclusive.name}: press Cancel before reconnecting.", error=True)
            return
        try:
            url = normalise_server_url(self.ui.serverUrlLineEdit.text)
            settings = qt.QSettings()
            self.logic.setServer(url, caBundle=str(settings.value(SETTINGS_KEY_CA_BUNDLE, "") or "") or None)
        except ValueError as exc:
            self._error(exc, "Connect")
            return
        self.ui.serverUrlLineEdit.text = url
        settings.setValue(SETTINGS_KEY_SERVER_URL, url)
        warning = self.logic.client.transport_warning()
        if warning:
            logging.warning(warning)
            if "API token" in warning:
                slicer.util.warningDisplay(warning, windowTitle="Hybrid CT: unencrypted connection")
        self._poller.stop()

        def done(info):
            self.logic.setInfo(info)  # GUI thread: the worker only fetched it
            settings = qt.QSettings()
            self._fillCombo(self.ui.modelComboBox, info.models, settings.value(SETTINGS_KEY_MODEL, info.default_model()))
            self._fillCombo(self.ui.strategyComboBox, info.strategies, settings.value(SETTINGS_KEY_STRATEGY, ""))
            self.ui.serverStatusLabel.text = info.summary()
            self._setStatus(" ".join([info.summary()] + ([warning] if warning else [])), error=bool(warning))
            self.onRefreshVersions()
            self._startPolling()

        logic = self.logic
        self._start("Connect", lambda job: logic.fetchInfo(job), done)

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
        model, logic = self.ui.modelComboBox.currentText, self.logic
        try:
            with slicer.util.WaitCursor():
                snapshot = mrml.volume_snapshot(volumeNode)  # hardened geometry; a non-linear transform is refused
        except ValueError as exc:
            self._error(exc, "Run model")
            return
        fingerprint = self.logic.runStarted(target)  # edits made while the job runs are detected on arrival
        self._clearResults()

        def done(outcome):
            identity, result = outcome
            if slicer.mrmlScene.GetNodeByID(snapshot["node_id"]) is not volumeNode:
                self.logic.discardResult(outcome)
                self._setStatus("The volume was removed while the model ran: result dropped.", error=True)
                return
            into = target
            decision = self.logic.arrivalDecision(target, fingerprint)
            if decision == "ask":
                answer = dialogs.ask_result_arrived_after_edits(target.GetName())
                if answer == "cancel":
                    self._setStatus(f"Result dropped: your edits of '{target.GetName()}' were kept.")
                    return
                into = target if answer == "replace" else None
            elif decision == "new":
                into = None
            with slicer.util.WaitCursor():  # the label was read by the worker; segments and 3D are built here
                segNode = self.logic.showResult(result, volumeNode, into, identity=identity)
            self._resultsVolumeId = volumeNode.GetID()
            self.ui.segmentationSelector.setCurrentNode(segNode)
            self._showResults(result.display)
            note = " (volume uploaded)" if result.uploaded else ""
            self._setStatus(f"{result.model} finished on {volumeNode.GetName()} = {identity.describe()}{note}: "
                            f"{result.display['classification']}. {RESEARCH_NOTICE}")
            self._saveParameters()

        self._start("Run model", lambda job: logic.runVolume(snapshot, model, job=job), done,
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
        answer = dialogs.ask_replace_edited(previous.GetName())
        return {"replace": previous, "keep": None}.get(answer, False)

    # ------------------------------------------------------------------ correction
    def onEditSegments(self):
        segNode = self.ui.segmentationSelector.currentNode()
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        if segNode is None:
            return
        refusal = self.logic.editCheck(segNode, volumeNode)  # never A's segments over B's CT
        if refusal:
            self._setStatus(refusal, error=True)
            slicer.util.warningDisplay(refusal, windowTitle="Hybrid CT")
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segNode)
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
        try:  # before anything is sent: another volume's, misplaced or foreign segmentations
            check = self.logic.checkSubmit(segNode, volumeNode)
        except ValueError as exc:
            self._error(exc, "Submit correction")
            return
        if check.refuse:
            self._setStatus(check.refuse, error=True)
            slicer.util.errorDisplay(check.refuse, windowTitle="Hybrid CT: not sent")
            return
        if check.question and not slicer.util.confirmOkCancelDisplay(check.question, windowTitle="Hybrid CT"):
            self._setStatus("Nothing was sent: the correction was not confirmed.", error=True)
            return
        if not self._consentToUpload():
            return
        try:
            with slicer.util.WaitCursor(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SegmentWarning)
                labelmap, _labelInfo, geometry = self.logic.exportSegmentation(
                    segNode, volumeNode, ignoreExtra=self.ui.ignoreExtraSegmentsCheckBox.checked)
                snapshot = mrml.volume_snapshot(volumeNode)
            notes = [str(w.message) for w in caught if issubclass(w.category, SegmentWarning)] + check.notes
        except Exception as exc:  # noqa: BLE001
            self._error(exc, "Submit correction")
            return
        segAttributes = mrml.get_attributes(segNode, (ID_ATTRIBUTE, CONTENT_ATTRIBUTE))
        names = {"seg_name": f"Segmentation '{segNode.GetName()}'", "volume_name": f"volume '{volumeNode.GetName()}'"}
        logic = self.logic

        def work(job):
            return logic.submitCorrection(snapshot, segAttributes, labelmap, geometry, job=job, **names)

        def done(outcome):
            identity, _answer, fileSha, _note = outcome  # the note was asked about before sending
            if slicer.mrmlScene.GetNodeByID(snapshot["node_id"]) is volumeNode:
                mrml.set_attributes(volumeNode, volume_stamp(identity, fileSha))
            text = f"Correction for {identity.describe()} saved on the server as the final label."
            self._setStatus(" ".join([text] + notes))

        self._start("Submit correction", work, done)

    # ------------------------------------------------------------------ active learning
    def onNextSample(self):
        strategy, logic = self.ui.strategyComboBox.currentText, self.logic

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
            self._followView()
            self._setStatus(f"Loaded next sample {sample['id']}: press 'Run model on volume'.")

        self._start("Next sample", lambda job: logic.fetchSample(strategy, job=job), done,
                    onDiscard=lambda outcome: remove_quietly(outcome[1]))

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
