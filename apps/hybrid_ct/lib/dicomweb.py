"""The app's DICOMweb (PACS) datastore: ``--studies http(s)://host/dicom-web``.

MONAI Label's ``DICOMWebDatastore`` lists the PACS's CT series (QIDO-RS), downloads a series (WADO-RS)
when it is first used and saves final labels back as DICOM-SEG (STOW-RS) through dcmqi's
``itkimage2segimage``, which this app does not ship (and never downloads). This subclass keeps its
listing and adds the app's local datastore (``HybridCTDatastore``: checked ids, locked writes,
``final_labels`` for training), with these changes:

* an image id is a CT SeriesInstanceUID; its series is downloaded once into the cache
  (``<cache>/.dicom/<uid>/``), read and checked as CT (a non-CT series: ``InputError``, HTTP 422) and
  kept as ``<uid>.nii.gz``; an unknown id is 404, an unreachable PACS 503 with the PACS's URL;
* a final label is kept locally first, then written as DICOM-SEG with ``hybrid_ct.predict.dicom_seg``
  (pydicom-seg, segment algorithm SEMIAUTOMATIC) into the pending folder ``<cache>/.pending/`` and
  sent over STOW-RS; the file leaves the pending folder only once the PACS has taken it. A PACS that
  refuses it or cannot be reached leaves it there (the label info says ``pacs: pending`` and why);
  pending files are sent again at start-up, at every label save and whenever training reads the labels;
* training reads the PACS's DICOM-SEGs back: every SEG series whose ReferencedSeriesSequence names a
  listed CT series becomes that image's final label (the newest SEG, unless a local final label exists);
* the series list is cached for ``list_ttl_s`` seconds only (MONAI Label caches it for two hours).
"""
from __future__ import annotations

import glob
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time
import warnings
from typing import Any, Dict, List, Optional

import requests
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.utils.others.generic import md5_digest
from pydicom.dataset import Dataset

from hybrid_ct.errors import InputError

from .datastore import HybridCTDatastore
from .validation import check_id, check_tag

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
PACS_ERRORS = (requests.RequestException, OSError)
SERIES_UID, STUDY_UID = "0020000E", "0020000D"


class PACSUnavailable(HTTPException):
    """The PACS did not answer (HTTP 503 to the client; the message names the PACS, never a token)."""

    def __init__(self, url: str, error: Exception):
        super().__init__(503, f"the PACS at {url} is unreachable or refused the request: {_short(error)}")


class PACSRefused(requests.RequestException):
    """STOW-RS answered, but did not store the instance."""


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


class _TimeoutSession(requests.Session):
    """dicomweb-client sets no timeout: an unreachable PACS must not hang a request forever."""

    def __init__(self, timeout_s: float):
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", self.timeout_s)
        return super().request(*args, **kwargs)


def dicomweb_datastore(url: str, conf: dict) -> "HybridCTDICOMwebDatastore":
    """The datastore for ``--studies <url>`` (conf: ``dicomweb_cache``, ``dicomweb_timeout_s``)."""
    session = _TimeoutSession(float(conf.get("dicomweb_timeout_s", 30)))
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session.auth = (settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    cache = (conf.get("dicomweb_cache") or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH
             or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
    return HybridCTDICOMwebDatastore(client, settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER, cache or None)


class HybridCTDICOMwebDatastore(DICOMWebDatastore, HybridCTDatastore):
    def __init__(self, client, search_filter: Optional[Dict[str, Any]] = None, cache_path: Optional[str] = None,
                 list_ttl_s: float = 10.0):
        self._client = client
        self._search_filter = dict(search_filter or {"Modality": "CT"})
        self._fetch_by_frame = False
        self._convert_to_nifti = True
        self.list_ttl_s = list_ttl_s
        self._queries: Dict[tuple, tuple] = {}
        self._seg_refs: Dict[str, str] = {}
        self._lock = threading.RLock()
        path = os.path.join(cache_path or os.path.join(pathlib.Path.home(), ".cache", "monailabel", "dicom"),
                            md5_digest(client.base_url))
        self.dicom_dir = os.path.join(path, ".dicom")
        self.pending_dir = os.path.join(path, ".pending")
        os.makedirs(self.dicom_dir, exist_ok=True)
        os.makedirs(self.pending_dir, exist_ok=True)
        logger.info("DICOMweb datastore %s (cache %s)", client.base_url, path)
        HybridCTDatastore.__init__(self, path, auto_reload=True, read_only=False, import_dicom=False)
        self.flush_pending()

    # ------------------------------------------------------------------ PACS queries
    def _series(self, **filters) -> List[dict]:
        key = tuple(sorted((k, str(v)) for k, v in filters.items()))
        hit = self._queries.get(key)
        if hit and time.monotonic() - hit[0] < self.list_ttl_s:
            return hit[1]
        found = self._client.search_for_series(search_filters=filters,
                                               fields=["SeriesDate", "SeriesTime", "Modality", "PatientID"])
        self._queries[key] = (time.monotonic(), found)
        return found

    def _forget_queries(self) -> None:
        self._queries.clear()

    def list_images(self) -> List[str]:
        try:
            return sorted({s[SERIES_UID]["Value"][0] for s in self._series(**self._search_filter)})
        except PACS_ERRORS as e:
            logger.warning("PACS %s unreachable (%s): listing the cached images only", self.name(), _short(e))
            return LocalDatastore.list_images(self)

    def _seg_reference(self, study_uid: str, seg_uid: str) -> str:
        if seg_uid not in self._seg_refs:
            with warnings.catch_warnings():  # the pixel data's bulk-data URI is not needed here
                warnings.simplefilter("ignore", UserWarning)
                meta = Dataset.from_json(self._client.retrieve_series_metadata(study_uid, seg_uid)[0])
            refs = meta.get("ReferencedSeriesSequence")
            self._seg_refs[seg_uid] = str(refs[0].SeriesInstanceUID) if refs else ""
        return self._seg_refs[seg_uid]

    def pacs_labels(self) -> Dict[str, dict]:
        """{CT series uid: {seg, study}} of the PACS's DICOM-SEGs (the newest per referenced series)."""
        segs = sorted(self._series(Modality="SEG"), reverse=True,
                      key=lambda s: tuple((s.get(t, {}).get("Value") or [""])[0] for t in ("00080021", "00080031")))
        out: Dict[str, dict] = {}
        for s in segs:
            seg_uid, study = s[SERIES_UID]["Value"][0], s[STUDY_UID]["Value"][0]
            ref = self._seg_reference(study, seg_uid)
            if ref and ref not in out:
                out[ref] = {"seg": seg_uid, "study": study}
        return out

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        local = set(LocalDatastore.get_labeled_images(self))
        try:
            images = set(self.list_images())
            return sorted(local | (set(self.pacs_labels()) & images))
        except PACS_ERRORS as e:
            logger.warning("PACS %s unreachable (%s): labelled images from the cache only", self.name(), _short(e))
            return sorted(local)

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images()))

    def json(self):
        """The cache's objects plus every listed PACS series not downloaded yet."""
        out = LocalDatastore.json(self)
        for uid in self.list_images():
            out["objects"].setdefault(uid, {"image": {"ext": "", "info": {"SeriesInstanceUID": uid,
                                                                          "source": "dicomweb"}}, "labels": {}})
        return out

    # ------------------------------------------------------------------ images
    def source_dicom_dir(self, image_id: str) -> str:
        """The downloaded DICOM series of ``image_id`` (downloaded now if needed)."""
        check_id(image_id)
        folder = os.path.join(self.dicom_dir, image_id)
        with self._lock:
            if os.path.isdir(folder) and os.listdir(folder):
                return folder
            try:
                found = [s for s in self._client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
                         if s[SERIES_UID]["Value"] == [image_id]]
                if not found:
                    raise ImageNotFoundException(f"series {image_id} is not in the PACS {self.name()}")
                study = found[0][STUDY_UID]["Value"][0]
                part = folder + ".part"
                shutil.rmtree(part, ignore_errors=True)
                os.makedirs(part)
                for ds in self._client.retrieve_series(study, image_id):
                    ds.save_as(os.path.join(part, f"{ds.SOPInstanceUID}.dcm"), write_like_original=False)
            except PACS_ERRORS as e:
                shutil.rmtree(folder + ".part", ignore_errors=True)
                raise PACSUnavailable(self.name(), e) from None
            os.replace(part, folder)
        return folder

    def get_image_uri(self, image_id: str) -> str:
        check_id(image_id)
        nii = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        if os.path.exists(nii):
            return nii
        from hybrid_ct.imaging.chest import check_ct
        from hybrid_ct.imaging.reader import read_image, write_image

        with self._lock:
            if os.path.exists(nii):
                return nii
            folder = self.source_dicom_dir(image_id)
            img = check_ct(read_image(folder), require_chest=False)  # a non-CT series: InputError (422)
            import pydicom

            head = pydicom.dcmread(next(iter(sorted(glob.glob(os.path.join(folder, "*.dcm"))))),
                                   stop_before_pixels=True)
            info = {"source": "dicomweb", "SeriesInstanceUID": image_id,
                    **{k: str(head.get(k, "")) for k in ("StudyInstanceUID", "PatientID", "Modality", "StudyDate")},
                    "size": list(img.GetSize()), "spacing": [round(s, 6) for s in img.GetSpacing()]}
            with tempfile.TemporaryDirectory(dir=self.dicom_dir) as tmp:
                HybridCTDatastore.add_image(self, image_id, write_image(img, os.path.join(tmp, "image.nii.gz")), info)
        return nii

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        return LocalDatastore.get_label_uri(self, label_id, label_tag)  # PACS labels are pulled by final_labels

    # ------------------------------------------------------------------ labels
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        check_id(image_id)
        check_tag(label_tag)
        self.get_image_uri(image_id)
        info = dict(label_info or {})
        if label_tag == FINAL:
            info.update(pacs="pending")
        label_id = HybridCTDatastore.save_label(self, image_id, label_filename, label_tag, info)  # nothing lost
        if label_tag != FINAL:
            return label_id
        import SimpleITK as sitk

        from hybrid_ct.predict.dicom_seg import write_dicom_seg

        try:
            write_dicom_seg(sitk.ReadImage(label_filename), self.source_dicom_dir(image_id),
                            os.path.join(self.pending_dir, f"{image_id}.dcm"), algorithm_type="SEMIAUTOMATIC")
        except InputError as e:  # an empty label has no DICOM-SEG: it stays local
            HybridCTDatastore.update_label_info(self, image_id, FINAL, {"pacs": "not sent", "pacs_error": str(e)})
            logger.warning("final label of %s kept locally only: %s", image_id, e)
            return label_id
        self.flush_pending()
        return label_id

    def pending(self) -> List[str]:
        """Image ids whose DICOM-SEG waits in the pending folder for the PACS."""
        return sorted(os.path.basename(p)[: -len(".dcm")] for p in glob.glob(os.path.join(self.pending_dir, "*.dcm")))

    def flush_pending(self) -> Dict[str, str]:
        """STOW-RS every pending DICOM-SEG; returns {image id: error} for those the PACS did not take."""
        import pydicom

        failed: Dict[str, str] = {}
        with self._lock:
            for image_id in self.pending():
                path = os.path.join(self.pending_dir, f"{image_id}.dcm")
                try:
                    ds = pydicom.dcmread(path)
                    self._stow(ds)
                except PACS_ERRORS as e:
                    failed[image_id] = _short(e)
                    logger.warning("the PACS %s did not take the DICOM-SEG of %s (kept in %s, sent again later): %s",
                                   self.name(), image_id, path, failed[image_id])
                    self._label_state(image_id, {"pacs": "pending", "pacs_error": failed[image_id]})
                    continue
                os.remove(path)
                self._seg_refs[str(ds.SeriesInstanceUID)] = image_id
                self._forget_queries()
                self._label_state(image_id, {"pacs": "stored", "pacs_error": "",
                                             "SeriesInstanceUID": str(ds.SeriesInstanceUID),
                                             "SOPInstanceUID": str(ds.SOPInstanceUID)})
                logger.info("DICOM-SEG of %s stored in the PACS %s (series %s)", image_id, self.name(),
                            ds.SeriesInstanceUID)
        return failed

    def _stow(self, ds) -> None:
        result = self._client.store_instances([ds])
        failed = result.get("FailedSOPSequence") if result is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise PACSRefused(f"STOW-RS refused SOP instance {ds.SOPInstanceUID} (failure reason {reason})")

    def _label_state(self, image_id: str, info: dict) -> None:
        if self._datastore.label(image_id, FINAL):
            HybridCTDatastore.update_label_info(self, image_id, FINAL, info)

    def pull_pacs_labels(self) -> List[str]:
        """Download the PACS's DICOM-SEGs of listed CT series without a local final label; returns their ids."""
        import SimpleITK as sitk

        from hybrid_ct.predict.dicom_seg import read_dicom_seg

        self.refresh_if_changed()
        images = set(self.list_images())
        new = []
        for image_id, seg in sorted(self.pacs_labels().items()):
            if image_id not in images or self._datastore.label(image_id, FINAL):
                continue
            try:
                self.get_image_uri(image_id)
                with tempfile.TemporaryDirectory(dir=self.dicom_dir) as tmp:
                    instances = self._client.retrieve_series(seg["study"], seg["seg"])
                    path = os.path.join(tmp, "seg.dcm")
                    instances[0].save_as(path, write_like_original=False)
                    label, _ = read_dicom_seg(path, self.source_dicom_dir(image_id))
                    nii = os.path.join(tmp, "label.nii.gz")
                    sitk.WriteImage(label, nii, useCompression=True)
                    HybridCTDatastore.save_label(self, image_id, nii, FINAL,
                                                 {"source": "pacs", "pacs": "stored", "SeriesInstanceUID": seg["seg"]})
            except InputError as e:
                logger.warning("DICOM-SEG %s of %s not used: %s", seg["seg"], image_id, e)
                continue
            new.append(image_id)
            logger.info("final label of %s read from the PACS (DICOM-SEG series %s)", image_id, seg["seg"])
        return new

    def final_labels(self) -> list:
        """Send pending labels, read the PACS's labels, then the local final labels (see HybridCTDatastore)."""
        self.flush_pending()
        try:
            self.pull_pacs_labels()
        except (PACS_ERRORS + (HTTPException,)) as e:
            logger.warning("PACS %s unreachable (%s): training on the cached labels only", self.name(), _short(e))
        return HybridCTDatastore.final_labels(self)

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        self.final_labels()
        return LocalDatastore.datalist(self, full_path)

    def status(self) -> Dict[str, Any]:
        out = LocalDatastore.status(self)
        out["pacs"] = {"url": self.name(), "pending": self.pending()}
        return out


def dicom_source_dir(ds, image_id: str) -> Optional[str]:
    """The DICOM series an image of ``ds`` came from, or None: the downloaded PACS series of a DICOMweb
    datastore, or the series folder a local studies folder imported (``<studies>/<id>/``)."""
    if hasattr(ds, "source_dicom_dir"):
        return ds.source_dicom_dir(image_id)
    folder = os.path.join(getattr(ds, "_datastore_path", ""), image_id)
    if not os.path.isdir(folder):
        return None
    from hybrid_ct.predict.batch import _is_dicom_folder

    return folder if _is_dicom_folder(pathlib.Path(folder)) else None


__all__ = ["HybridCTDICOMwebDatastore", "dicomweb_datastore", "dicom_source_dir", "PACSUnavailable"]
