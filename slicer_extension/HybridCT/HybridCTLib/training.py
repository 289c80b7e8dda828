"""Training, status polling, model versions and roll back, for the Hybrid CT widget (Qt side).

The status poll reads the model name on the GUI thread (``Poller.prepare`` -> ``_statusModel``); its
worker (``_statusWork``) gets it as an argument and touches no widget.
"""

import slicer

from HybridCTLib.widgetjobs import IDLE_POLL_S, TRAIN_POLL_S


class TrainingMixin:
    """Mixed into the widget: Train / Stop / status / versions / roll back."""

    # ------------------------------------------------------------------ training
    def onTrain(self):
        model, logic = self.ui.modelComboBox.currentText or None, self.logic

        def done(result):
            self._setStatus("Training started on the server.")
            self._trainingActive = True
            self._startPolling()

        self._start("Start training", lambda job: logic.newWorkflow(job).start_training(model), done)

    def onStop(self):
        logic = self.logic

        def done(result):
            self._setStatus("Training stopped." if result else "No training was running.")
            self._startPolling()

        # not exclusive: Stop works while another job (an upload, a run) is in progress
        self._start("Stop training", lambda job: logic.newWorkflow(job).stop_training(), done, exclusive=False)

    def _statusModel(self):
        """GUI thread, when a status poll starts: the model whose training is followed."""
        return self.ui.modelComboBox.currentText or None

    def _statusWork(self, job, model):
        """Worker thread: only its arguments, never a widget."""
        return self.logic.newWorkflow(job, quick=True).training_status(model)

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
        logic = self.logic

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

        self.jobs.start("Model versions", lambda job: logic.newWorkflow(job, quick=True).versions(),
                        exclusive=False, tag=self._sceneGeneration, on_done=done, on_error=failed)
        self._scheduleTimer()

    def onRollback(self):
        index = self.ui.versionComboBox.currentIndex
        if index < 0 or index >= len(self._versionEntries):
            return
        version = str(self._versionEntries[index].get("version"))
        if not slicer.util.confirmOkCancelDisplay(f"Serve model version {version} from now on?", windowTitle="Hybrid CT"):
            return
        logic = self.logic

        def done(result):
            self._setStatus(f"The server now serves model version {version}.")
            self.onRefreshVersions()

        self._start("Roll back", lambda job: logic.newWorkflow(job).rollback(version), done)
