"""Fetch and prepare the public chest-CT data sets a user can download, into the layouts ``train`` reads.

``REGISTRY`` names each set, where its files live, what they must hash to (where known) and how they
are prepared:

- ``covid19-ct-seg``: COVID-19 CT Lung and Infection Segmentation Dataset (Ma Jun et al., zenodo record
  3757476, CC BY 4.0; the Radiopaedia cases CC BY-NC-SA): 20 CT volumes + lung and infection masks
  -> a MONAI Label datastore of HU volumes with 0/1/2 labels (``<case>.nii.gz``,
  ``labels/final/<case>.nii.gz``, ``dataset.csv``). The 10 Radiopaedia volumes are stored as 0..255
  (not HU, export window unknown); each is put on the HU scale by one calibration for the whole
  volume (``io.read_image(..., intensity="8bit-auto")``: its lung and soft-tissue grey levels).
- ``ucsd-covid-ct``: UCSD-AI4H COVID-CT slice pictures (GitHub) -> ``covid/``, ``noncovid/`` and a
  ``manifest.csv`` with class labels and group ids (research use; images belong to the publishers).
- ``medseg-covid19``, ``mosmed``, ``covid-ct-md``: no stable direct URL (Google Drive, registration,
  figshare viewer): ``download`` explains where to get them instead of guessing.

``--base-url`` replaces every file's base URL (a mirror, or a local copy served on 127.0.0.1 in tests).
"""
from __future__ import annotations

import csv
import logging
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from hybrid_ct.contract import LABELS
from hybrid_ct.errors import InputError
from hybrid_ct.files import file_sha256
from hybrid_ct.data.manifest import canonical_group
from hybrid_ct.imaging.reader import read_image

log = logging.getLogger(__name__)


class DownloadError(InputError):
    """A file could not be fetched, verified, unpacked or prepared."""


@dataclass
class RemoteFile:
    name: str
    sha256: str | None = None
    size: int | None = None
    required: bool = True  # optional files are fetched with include_optional=True only


@dataclass
class DatasetSpec:
    name: str
    title: str
    license: str
    commercial: bool
    homepage: str
    base_url: str | None = None
    files: list = field(default_factory=list)
    folder: str = ""  # output sub-folder of --dest
    manual: str = ""  # instructions when there is no stable URL

    def url(self, f: RemoteFile, base_url: str | None = None) -> str:
        base = (base_url or self.base_url or "").rstrip("/")
        return f"{base}/{f.name}"


REGISTRY = {
    "covid19-ct-seg": DatasetSpec(
        name="covid19-ct-seg",
        title="COVID-19 CT Lung and Infection Segmentation Dataset (20 cases, Ma Jun et al.)",
        license="CC BY 4.0 (Radiopaedia cases: CC BY-NC-SA, non-commercial)",
        commercial=False,
        homepage="https://zenodo.org/records/3757476",
        base_url="https://zenodo.org/records/3757476/files",
        files=[
            # SHA-256 as published by the torch-em data loaders for this record
            RemoteFile("COVID-19-CT-Seg_20cases.zip", "a5060480eff9315b069b086312dac4872777901fb80d268a5a83edd9f4e7b440"),
            RemoteFile("Lung_Mask.zip", "f060b0d0299939a6d95ddefdbfa281de1a779c4d230a5adbd32414711d6d8187"),
            RemoteFile("Infection_Mask.zip", "87901c73fdd2230260e61d2dbc57bf56026efc28264006b8ea2bf411453c1694"),
            RemoteFile("Lung_and_Infection_Mask.zip", "34f5a573cb8fb53cb15abe81868395d9addf436854826a6fd6e70c2b294f19c3",
                       required=False),
        ],
        folder="covid19_ct_seg",
    ),
    "ucsd-covid-ct": DatasetSpec(
        name="ucsd-covid-ct",
        title="UCSD-AI4H COVID-CT: 349 COVID-19 and 397 non-COVID CT slice pictures",
        license="research use; images belong to the publishers of the source papers (non-commercial)",
        commercial=False,
        homepage="https://github.com/UCSD-AI4H/COVID-CT",
        base_url="https://github.com/UCSD-AI4H/COVID-CT/raw/master/Images-processed",
        files=[RemoteFile("CT_COVID.zip"), RemoteFile("CT_NonCOVID.zip")],
        folder="ucsd_covid_ct",
    ),
    "medseg-covid19": DatasetSpec(
        name="medseg-covid19", title="MedSeg COVID-19 CT segmentation (100 slices + 9 volumes)",
        license="non-commercial (medicalsegmentation.com)", commercial=False,
        homepage="https://medicalsegmentation.com/covid19/",
        manual="files are hosted on Google Drive (no stable direct URL): download tr_im.nii.gz, tr_mask.nii.gz "
               "and tr_lungmasks_updated.nii.gz from https://medicalsegmentation.com/covid19/",
    ),
    "mosmed": DatasetSpec(
        name="mosmed", title="MosMedData: chest CT scans with COVID-19 related findings (CT-0..CT-4)",
        license="CC BY-NC-ND 3.0 (non-commercial, no derivatives)", commercial=False,
        homepage="https://mosmed.ai/datasets/covid19_1110/",
        manual="distributed by mosmed.ai after a request form / torrent (no stable direct URL)",
    ),
    "covid-ct-md": DatasetSpec(
        name="covid-ct-md", title="COVID-CT-MD (Afshar et al., Scientific Data 2021)",
        license="CC BY 4.0", commercial=True, homepage="https://github.com/ShahinSHH/COVID-CT-MD",
        manual="distributed through a figshare share link (tens of GB, no per-file URL): see the homepage",
    ),
}


# ----------------------------------------------------------------------------------------------------
# fetching, verifying, unpacking

def fetch(url: str, dest: Path, timeout: float = 60.0, progress: bool = True) -> Path:
    """Stream ``url`` to ``dest`` (via ``dest.part``, renamed when complete)."""
    import requests

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with requests.get(url, stream=True, timeout=timeout) as r:
            if r.status_code != 200:
                raise DownloadError(f"cannot download {url}: HTTP {r.status_code}")
            total = int(r.headers.get("content-length") or 0) or None
            with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                                            disable=not progress, leave=False) as bar:
                for block in r.iter_content(chunk_size=1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except requests.RequestException as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"cannot download {url}: {e.__class__.__name__}: {e}") from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return dest


def verify(path: Path, f: RemoteFile) -> None:
    if f.size is not None and path.stat().st_size != f.size:
        raise DownloadError(f"{path.name}: size {path.stat().st_size} bytes, expected {f.size}")
    if f.sha256:
        got = file_sha256(path)
        if got != f.sha256:
            raise DownloadError(f"{path.name}: SHA-256 {got[:16]}... does not match the published "
                                f"{f.sha256[:16]}... (corrupt or different file; --no-verify skips the check)")


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a zip into ``dest`` (members that would land outside it are refused)."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as z:
            bad = z.testzip()
            if bad is not None:
                raise DownloadError(f"{archive.name}: corrupt member {bad}")
            for m in z.infolist():
                target = (dest / m.filename).resolve()
                if root not in target.parents and target != root:
                    raise DownloadError(f"{archive.name}: unsafe member path {m.filename!r}")
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive.name} is not a valid zip archive: {e}") from e
    return dest


# ----------------------------------------------------------------------------------------------------
# preparation

def _nifti_files(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file() and re.search(r"\.nii(\.gz)?$", p.name)
                  and not p.name.startswith("._"))


def case_id(filename: str) -> str:
    """Ma Jun file names -> one case id shared by image and masks.

    ``coronacases_org_001.nii.gz`` / ``coronacases_001.nii.gz`` -> ``coronacases_001``;
    ``radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz`` / ``radiopaedia_10_85902_1.nii.gz``
    -> ``radiopaedia_10_85902_1``.
    """
    stem = re.sub(r"\.nii(\.gz)?$", "", Path(filename).name)
    m = re.search(r"coronacases_(?:org_)?(?:case)?0*(\d+)", stem) or re.fullmatch(r"case0*(\d+)", stem)
    if m:
        return f"coronacases_{int(m.group(1)):03d}"
    m = re.search(r"radiopaedia(?:_org_covid-19-pneumonia)?[-_](\d+_\d+_\d+)", stem)
    if m:
        return f"radiopaedia_{m.group(1)}"
    return stem


def prepare_covid19_ct_seg(raw: Path, out: Path, progress: bool = True) -> dict:
    """Images + Lung_Mask (1/2 = the two lungs) + Infection_Mask (0/1) -> HU volumes with 0/1/2 labels."""

    images = {case_id(p.name): p for p in _nifti_files(raw / "COVID-19-CT-Seg_20cases")}
    lungs = {case_id(p.name): p for p in _nifti_files(raw / "Lung_Mask")}
    infs = {case_id(p.name): p for p in _nifti_files(raw / "Infection_Mask")}
    if not images:
        raise DownloadError(f"no NIfTI volumes found in {raw / 'COVID-19-CT-Seg_20cases'}")
    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    rows, problems = [], []
    for cid in tqdm(sorted(images), desc="prepare", unit="case", disable=not progress, leave=False):
        if cid not in lungs or cid not in infs:
            problems.append(f"{cid}: lung or infection mask missing")
            continue
        try:
            probe = sitk.GetArrayFromImage(sitk.ReadImage(str(images[cid])))
            intensity = "8bit-auto" if probe.min() >= 0 and probe.max() <= 255 else "hu"  # Radiopaedia: 0..255
            del probe
            img = read_image(images[cid], intensity=intensity)
            lung = sitk.GetArrayFromImage(sitk.ReadImage(str(lungs[cid])))
            inf = sitk.GetArrayFromImage(sitk.ReadImage(str(infs[cid])))
            if lung.shape != inf.shape or lung.shape != tuple(reversed(img.GetSize())):
                raise DownloadError(f"mask size {lung.shape[::-1]} / {inf.shape[::-1]} != image size {img.GetSize()}")
        except (InputError, RuntimeError) as e:
            problems.append(f"{cid}: {e}")
            continue
        label = np.zeros(lung.shape, np.uint8)
        label[lung > 0] = LABELS["lung"]
        label[inf > 0] = LABELS["infection"]
        lab_img = sitk.GetImageFromArray(label)
        lab_img.CopyInformation(img)
        hu = sitk.Cast(sitk.Round(sitk.Clamp(img, sitk.sitkFloat32, -1024, 3071)), sitk.sitkInt16)
        sitk.WriteImage(hu, str(out / f"{cid}.nii.gz"))
        sitk.WriteImage(lab_img, str(out / "labels" / "final" / f"{cid}.nii.gz"))
        rows.append({"id": cid, "image": f"{cid}.nii.gz", "label": f"labels/final/{cid}.nii.gz",
                     "group_id": canonical_group(cid), "intensity": "hu", "converted_from": intensity,
                     "source": "zenodo 3757476", "license": "CC BY-NC-SA" if cid.startswith("radiopaedia") else "CC BY 4.0"})
    if not rows:
        raise DownloadError("no case could be prepared: " + "; ".join(problems[:5]))
    with open(out / "dataset.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for p in problems:
        log.warning("covid19-ct-seg: %s", p)
    return {"cases": len(rows), "skipped": problems, "layout": "MONAI Label datastore + dataset.csv"}


PICTURES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _ucsd_group(name: str, positive: bool) -> str:
    stem = Path(name).stem
    if "%" in stem:  # 'PIIS0140673620303603%7' / '1%0': figure or patient before the '%'
        key = stem.split("%")[0]
    else:  # '2020.01.24.919183-p27-132': preprint id before '-p<page>'
        key = re.split(r"-p\d+", stem)[0]
    return f"ucsd_{'covid' if positive else 'non'}_{key}"


def prepare_ucsd_covid_ct(raw: Path, out: Path, progress: bool = True) -> dict:
    """CT_COVID / CT_NonCOVID pictures -> covid/, noncovid/ + manifest.csv (path, label, group_id)."""
    rows = []
    for zipname, cls, sub in (("CT_COVID", 1, "covid"), ("CT_NonCOVID", 0, "noncovid")):
        files = sorted(p for p in (raw / zipname).rglob("*") if p.suffix.lower() in PICTURES
                       and not p.name.startswith("._") and "__MACOSX" not in p.parts)
        (out / sub).mkdir(parents=True, exist_ok=True)
        for p in tqdm(files, desc=sub, unit="file", disable=not progress, leave=False):
            shutil.copy2(p, out / sub / p.name)
            rows.append({"path": f"{sub}/{p.name}", "label": cls, "group_id": _ucsd_group(p.name, bool(cls)),
                         "source": "UCSD-AI4H COVID-CT"})
    if not rows:
        raise DownloadError(f"no pictures found under {raw}")
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {"pictures": len(rows), "positive": sum(r["label"] for r in rows), "layout": "2D class set + manifest.csv"}


PREPARE = {"covid19-ct-seg": prepare_covid19_ct_seg, "ucsd-covid-ct": prepare_ucsd_covid_ct}


def download(name: str, dest, base_url: str | None = None, verify_checksums: bool = True,
             include_optional: bool = False, keep_archives: bool = False, progress: bool = True) -> dict:
    """Fetch, verify, unpack and prepare data set ``name`` under ``dest/<folder>``; return a summary
    whose ``path`` is the folder to pass to ``hybrid-ct train --extra``."""
    if name not in REGISTRY:
        raise DownloadError(f"unknown data set {name!r}: choose from {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    if spec.manual:
        raise DownloadError(f"{name} cannot be downloaded automatically: {spec.manual}")
    dest = Path(dest)
    out = dest / spec.folder
    raw = dest / f".{spec.folder}_raw"
    archives = dest / f".{spec.folder}_archives"
    files = [f for f in spec.files if f.required or include_optional]
    for f in files:
        target = archives / f.name
        if target.is_file() and (not verify_checksums or not f.sha256 or file_sha256(target) == f.sha256):
            log.info("%s: already downloaded", f.name)
        else:
            url = spec.url(f, base_url)
            log.info("downloading %s", url)
            fetch(url, target, progress=progress)
        if verify_checksums:
            verify(target, f)
        elif f.sha256:
            log.warning("%s: checksum not verified (--no-verify)", f.name)
        unpack(target, raw / Path(f.name).stem)
    summary = PREPARE[name](raw, out, progress=progress)
    if not keep_archives:
        shutil.rmtree(archives, ignore_errors=True)
    shutil.rmtree(raw, ignore_errors=True)
    summary.update({"name": name, "path": str(out), "license": spec.license, "commercial_use": spec.commercial})
    return summary


__all__ = ["REGISTRY", "DatasetSpec", "RemoteFile", "DownloadError", "download", "fetch", "verify", "unpack",
           "case_id", "prepare_covid19_ct_seg", "prepare_ucsd_covid_ct"]
