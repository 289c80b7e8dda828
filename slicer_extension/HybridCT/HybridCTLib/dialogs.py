"""The module's dialogs (Qt). What they ask is decided in ``hybrid_ct_slicer`` (panel.py, policy.py)."""

import logging

import qt
import slicer

from hybrid_ct_slicer.policy import SETTINGS_KEY_APPROVED_SERVERS, remember_approval, upload_consent


def consent_to_upload(server_url, set_status):
    """Ask once per non-local server before patient images leave this computer; warn on plain http."""
    settings = qt.QSettings()
    approved = str(settings.value(SETTINGS_KEY_APPROVED_SERVERS, "") or "").split("\n")
    consent = upload_consent(server_url, approved)
    if consent.ask:
        if not slicer.util.confirmOkCancelDisplay(consent.question, windowTitle="Hybrid CT: send images?"):
            set_status("Nothing was sent: the upload to this server was not confirmed.", True)
            return False
        settings.setValue(SETTINGS_KEY_APPROVED_SERVERS, "\n".join(remember_approval(approved, consent.server)))
    elif consent.warning:
        logging.warning(consent.warning)
    return True


def _three_way(text, first, second):
    """A question with two answers and Cancel: returns "first", "second" or "cancel"."""
    box = qt.QMessageBox(qt.QMessageBox.Question, "Hybrid CT", text, qt.QMessageBox.NoButton,
                         slicer.util.mainWindow())
    one = box.addButton(first, qt.QMessageBox.DestructiveRole)
    two = box.addButton(second, qt.QMessageBox.AcceptRole)
    box.addButton(qt.QMessageBox.Cancel)
    box.setDefaultButton(two)
    box.exec_()
    if box.clickedButton() == one:
        return "first"
    if box.clickedButton() == two:
        return "second"
    return "cancel"


def ask_replace_edited(name):
    """Run pressed on an edited result: "replace", "keep" (a new segmentation) or "cancel"."""
    answer = _three_way(f"'{name}' has been edited since the model made it.\n\nReplace the edited segments with a "
                        f"new result, or keep them and add a new segmentation?", "Replace", "Keep edits, add new")
    return {"first": "replace", "second": "keep"}.get(answer, "cancel")


def ask_result_arrived_after_edits(name):
    """A Run result arrived and '{name}' was edited while it ran: "replace", "keep" or "cancel" (drop it)."""
    answer = _three_way(f"'{name}' was edited while the model was running.\n\nReplace your edits with the new "
                        f"result, or keep them and show the result as a new segmentation? (Cancel drops the "
                        f"result.)", "Replace my edits", "Keep edits, add new")
    return {"first": "replace", "second": "keep"}.get(answer, "cancel")
