"""The Slicer extension's flows against the REAL Hybrid CT MONAI Label server.

The same Qt-free calls the module's buttons make (hybrid_ct_slicer.workflow), over HTTP on
127.0.0.1: connect, run the model (upload + infer), read the results, submit a correction by
segment name, next sample, train / status / stop, model versions and roll back. The ``server``
fixture (tests/server_fixture.py) starts ``monailabel`` with the app and phantom studies on a free port.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from hybrid_ct_slicer.client import HybridCTClient, ServerError, file_extension
from hybrid_ct_slicer.imageio import Geometry, read_image, write_image
from hybrid_ct_slicer.results import NA
from hybrid_ct_slicer.segments import split_labelmap
from hybrid_ct_slicer.workflow import Workflow

from server_fixture import server  # noqa: E402,F401  (the real app server, shared by the app tests)

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _base_url(server) -> str:
    for key in ("url", "base_url", "server_url"):
        if isinstance(server, dict) and server.get(key):
            return str(server[key])
        if getattr(server, key, None):
            return str(getattr(server, key))
    return str(server)


@pytest.fixture()
def live_url(server) -> str:
    return _base_url(server)


@pytest.fixture()
def workflow(live_url, tmp_path) -> Workflow:
    return Workflow(HybridCTClient(live_url, timeout=60, long_timeout=900), work_dir=str(tmp_path))


def _ct_file(tmp_path) -> tuple[str, np.ndarray, Geometry]:
    """A positive chest phantom written as .nii.gz, as the module writes the volume in view."""
    try:
        import SimpleITK as sitk
        from hybrid_ct.data.phantom import make_phantom

        img, _lab, _info = make_phantom(11, shape=(12, 96, 96), positive=True)
        ct = sitk.GetArrayFromImage(img).astype(np.int16)
        geometry = Geometry(img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    except ImportError:
        from hybrid_ct_slicer.testdata import make_chest_volume

        ct, _lab, geometry = make_chest_volume(shape=(12, 96, 96))
    path = str(tmp_path / "volume_in_view.nii.gz")
    write_image(path, ct, geometry)
    return path, ct, geometry


def test_connect_lists_model_labels_strategies(workflow):
    info = workflow.connect()
    assert info.default_model(), f"no model on the server: {info.raw.get('models')}"
    from hybrid_ct.contract import PREDICTED

    assert set(PREDICTED) <= {label.lower() for label in info.labels}  # right_lung, left_lung, infection
    assert info.strategies, "the server offers no active-learning strategy"
    assert info.default_trainer(), "the server offers no trainer"
    assert "Connected to" in info.summary()


def test_radiologist_flow(workflow, tmp_path):
    client = workflow.client
    info = workflow.connect()
    model = info.default_model()
    ct_path, ct, geometry = _ct_file(tmp_path)
    image_id = f"slicer flow {uuid.uuid4().hex[:8]}"  # an id with a character that needs quoting

    # --- Run model: the server lacks the image, so it is uploaded, then inferred
    result = workflow.run_model(image_id, ct_path, model=model)
    assert result.uploaded is True
    label, label_geometry = read_image(result.label_path)
    assert label.shape == ct.shape
    assert set(np.unique(label).tolist()) <= {0, 2, 3, 4}  # right lung 3, left lung 4, infection 2
    assert label_geometry.almost_equal(geometry, tol=1e-3), "label not in the image's own geometry"
    # --- Results panel
    assert result.display["classification"].split(" ")[0] in ("Positive", "Negative", "Indeterminate")
    for key in ("burden", "grade", "energy", "model_version"):
        assert result.display[key] != NA, f"{key} missing from the infer params: {result.params}"
    first_version = str(result.params.get("model_version"))
    # a second run finds the image on the server
    assert workflow.run_model(image_id, ct_path, model=model).uploaded is False

    # --- Submit correction: segments in another order, an extra one ignored, matched by NAME
    segments = split_labelmap(label)
    corrected_infection = segments["Infection"].copy()
    corrected_infection[: ct.shape[0] // 2] = False  # the radiologist erased half of the infection
    # sent as one lung without sides, as a segmentation drawn before the sides is: stored as lung 1
    lung = segments["Right lung"] | segments["Left lung"] | (segments["Infection"] & ~corrected_infection)
    shuffled = {"Ruler": np.zeros_like(lung), "infection": corrected_infection, "LUNG": lung}
    expected = lung.astype(np.uint8) + 2 * corrected_infection.astype(np.uint8)  # disjoint masks
    res = workflow.submit_correction(image_id, shuffled, label_geometry, ignore_extra=True)
    assert res["warnings"] and "'Ruler'" in res["warnings"][0]
    data, name = client.download_label(res.get("label") or image_id, "final")
    saved_path = tmp_path / ("saved" + (file_extension(name) or ".nii.gz"))
    saved_path.write_bytes(data)
    saved, saved_geometry = read_image(str(saved_path))
    assert np.array_equal(saved.astype(np.uint8), expected), "the server did not store the label by name"
    assert saved_geometry.almost_equal(geometry, tol=1e-3)
    assert client.datastore_stats().get("completed", 0) >= 1

    # --- Next sample
    strategy = "random" if "random" in info.strategies else info.strategies[0]
    sample = workflow.next_sample(strategy)
    if sample is not None:  # None only when every image is labelled
        path = workflow.fetch_image(sample["id"])
        arr, _ = read_image(path)
        assert arr.ndim == 3

    # --- Train (synchronously here: a short run), status, metric, new version
    current_before, entries_before, _ = workflow.versions()
    # force_promote: a 1-epoch retrain may score below the served model and would then be kept, not served
    client.train_start(info.default_trainer(model), {"max_epochs": 1, "force_promote": True}, run_sync=True)
    status = workflow.training_status(model)
    assert status.running is False
    assert status.best_metric is not None and 0.0 <= status.best_metric <= 1.0, status.stats
    assert status.metric_text.startswith("Best metric: ")
    current_after, entries_after, labels_after = workflow.versions()
    assert current_after is not None
    assert current_after != current_before or len(entries_after) > len(entries_before)
    assert any("[current]" in label for label in labels_after)
    after = workflow.run_model(image_id, model=model)
    assert str(after.params.get("model_version")) != first_version or current_before is None

    # --- Train asynchronously and stop (the Train / Stop buttons)
    workflow.start_training(model, {"max_epochs": 1})
    task = client.train_status()
    assert task is not None and task.get("status") in ("SUBMITTED", "RUNNING", "DONE", "STOPPED")
    stopped = workflow.stop_training()
    if stopped:
        assert stopped.get("status") == "STOPPED"
    assert workflow.training_status(model).status_text.startswith("Training: ")

    # --- Roll back to the version served before training
    if current_before is not None:
        workflow.rollback(current_before)
        assert workflow.versions()[0] == current_before
        rolled = workflow.run_model(image_id, model=model)
        assert str(current_before) in str(rolled.params.get("model_version"))


def test_server_errors_read_well(workflow):
    info = workflow.connect()
    client = workflow.client
    with pytest.raises(ServerError) as err:
        client.infer(info.default_model(), f"no-such-image-{uuid.uuid4().hex}")
    assert err.value.kind == "http" and 400 <= err.value.status < 600
    assert err.value.detail and f"answered HTTP {err.value.status}" in str(err.value)
    with pytest.raises(ServerError) as err:
        client.infer(f"no-such-model-{uuid.uuid4().hex[:6]}", "x")
    assert err.value.kind == "http" and err.value.detail
    try:  # an id trying to escape the datastore is data: quoted, and the server refuses or ignores it
        assert client.has_image("../../etc/passwd") is False
    except ServerError as exc:
        assert exc.kind == "http" and 400 <= exc.status < 500
    with pytest.raises(ServerError):
        workflow.rollback(f"no-such-version-{uuid.uuid4().hex[:6]}")


def test_identity_and_exact_image_check_on_the_real_server(workflow, tmp_path):
    """Issue 17: the module's Run path (Workflow.run_volume) with an id from the content, never the name;
    a volume with other voxels gets another id; the server is asked for the exact file before a skip."""
    import os

    from hybrid_ct_slicer.identity import resolve_identity

    ct_path, ct, geometry = _ct_file(tmp_path)
    os.remove(ct_path)
    work = tmp_path / "work"
    workflow.work_dir = str(work)
    model = workflow.connect().default_model()
    identity = resolve_identity(ct, geometry)
    other = resolve_identity(ct + 1, geometry)
    assert identity.image_id != other.image_id and identity.image_id.startswith("ct-")
    first = workflow.run_volume(identity, ct, geometry, model=model)
    assert first.uploaded is True and first.file_sha256
    again = workflow.run_volume(identity, ct, geometry, model=model)
    assert again.uploaded is False  # skipped, or re-sent and answered "unchanged": never a second copy
    assert workflow.client.has_image(identity.image_id) is True
    assert workflow.client.has_image(identity.image_id, "0" * 64) is False  # other content: not that image
    for result in (first, again):
        os.remove(result.label_path)
    assert os.listdir(work) == [], "a patient image was left in the work folder"


def test_server_confirms_the_exact_file_by_checksum(workflow, tmp_path):
    from hybrid_ct_slicer.identity import resolve_identity

    _ct_path, ct, geometry = _ct_file(tmp_path)
    workflow.work_dir = str(tmp_path / "work")
    identity = resolve_identity(ct + 7, geometry)
    uploaded, sha = workflow.upload_volume(identity, ct + 7, geometry)
    assert workflow.client.has_image(identity.image_id, f"SHA256:{sha}") is True
