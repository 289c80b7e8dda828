"""The input checks (``hybrid_ct.imaging.reader.check_ct``: chest check, orientation) on every real picture in
../shared/data, on phantoms and on inputs that must be refused (abdominal/pelvic CT, non-axial slices,
synthetic non-CT pictures). Each input goes the way ``hybrid-ct predict`` takes it: ``read_image`` with
the intensity ``--intensity auto`` picks, then ``check_ct``. Prints a Markdown table (docs/pictures.md).

    .venv/bin/python benchmarks/chest_check.py                        # table
    .venv/bin/python benchmarks/chest_check.py --csv out.csv          # + one row per input (measures too)
    .venv/bin/python benchmarks/chest_check.py --data ../shared/data --only cls2d

Groups marked ``chest`` must pass, ``refuse`` must be refused. Abdominal NIfTI slices at or above its
lung bases (z >= ABDOMEN_NIFTI_LUNG_BASE, seen on the slices) show lung and are left out of the 2D sets.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1] / "lib"))  # after $PYTHONPATH: an older lib can be measured

ABDOMEN_NIFTI_LUNG_BASE = 104  # first LPS z (inferior first) of example_ct.nii.gz whose slice shows lung bases
NON_CT_SEED = 19
SBU_ABDOMEN = ("A027284",)  # its two "axial" NY-SBU slices show kidneys and bowel, no lung (seen on the slices)


def _window_u8(hu: np.ndarray) -> np.ndarray:
    from hybrid_ct.processing.grid import window

    return np.round(window(hu) * 255).astype(np.uint8)


def _save_png(arr: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


def _save_hu_slice(hu2d: np.ndarray, spacing, path: Path) -> Path:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(hu2d[None].astype(np.float32))
    img.SetSpacing((float(spacing[0]), float(spacing[1]), 1.0))
    sitk.WriteImage(img, str(path))
    return path


def _axial_slices(path):
    """HU volume -> (LPS array [z, y, x], in-plane spacing)."""
    import SimpleITK as sitk

    from hybrid_ct.imaging.reader import read_image

    img = sitk.DICOMOrient(read_image(path), "LPS")
    return sitk.GetArrayFromImage(img), img.GetSpacing()[:2]


def non_ct_pictures(folder: Path) -> dict:
    """Synthetic pictures that are not CT: blank, photo-like random textures, text-like pages."""
    from PIL import Image, ImageDraw, ImageFont
    from scipy import ndimage as ndi

    rng = np.random.default_rng(NON_CT_SEED)
    out = defaultdict(list)
    for v in (0, 40, 128, 255):
        out["non-CT: blank"].append(_save_png(np.full((512, 512), v, np.uint8), folder / f"blank_{v}.png"))
    flat = np.clip(128 + rng.normal(0, 2, (512, 512)), 0, 255).astype(np.uint8)
    out["non-CT: blank"].append(_save_png(flat, folder / "blank_noisy.png"))
    for k, sigma in enumerate((1, 3, 8, 16, 32, 64)):  # smooth colour noise at several scales
        for s in range(3):
            rgb = np.stack([ndi.gaussian_filter(rng.normal(size=(384, 512)), sigma) for _ in range(3)], -1)
            rgb = (rgb - rgb.min()) / (np.ptp(rgb) + 1e-9) * 255
            p = folder / f"texture_s{sigma}_{s}.png"
            Image.fromarray(rgb.astype(np.uint8), "RGB").save(p)
            out["non-CT: photo-like texture"].append(p)
    f = np.fft.fftfreq(512)
    for s in range(4):  # 1/f ("natural image") noise
        spec = (rng.normal(size=(512, 512)) + 1j * rng.normal(size=(512, 512))) / np.maximum(np.hypot(*np.meshgrid(f, f)), 1 / 512)
        g = np.real(np.fft.ifft2(spec))
        g = (g - g.min()) / np.ptp(g) * 255
        out["non-CT: photo-like texture"].append(_save_png(g.astype(np.uint8), folder / f"pink_{s}.png"))
    words = "Hybrid CT reads chest CT pictures and outlines lungs and infection in them " * 3
    for k, (size, ink, paper) in enumerate([(18, 0, 255), (32, 0, 255), (64, 0, 255), (18, 255, 0), (40, 255, 0),
                                            (90, 255, 0), (28, 30, 220), (60, 220, 30)]):
        pic = Image.new("L", (512, 512), paper)
        d = ImageDraw.Draw(pic)
        font = ImageFont.load_default(size=size)
        y, line = 8, 0
        while y < 500:
            d.text((8, y), words[line * 17:line * 17 + 60], fill=ink, font=font)
            y, line = y + int(size * 1.3), line + 1
        p = folder / f"text_{k}.{'jpg' if k % 2 else 'png'}"
        pic.save(p)
        out["non-CT: text-like page"].append(p)
    return out


def collect(data: Path, tmp: Path) -> list:
    """-> [(group, expected 'chest' | 'refuse', path)]."""
    items = []

    def add(group, expected, paths):
        items.extend((group, expected, Path(p)) for p in paths)

    add("seg2d_medseg/images (MedSeg, 8-bit JPG)", "chest", sorted((data / "seg2d_medseg" / "images").glob("*.jpg")))
    for label in ("covid", "noncovid"):
        by_source = defaultdict(list)
        for p in sorted((data / "cls2d" / label).iterdir()):
            by_source[p.name.split("__")[0].split("_CT")[0]].append(p)
        for src, paths in sorted(by_source.items()):
            add(f"cls2d/{label} {src}", "chest", paths)
    add("lung2d_majun (3 HU NPY, 1 uint8 NPY)", "chest", sorted((data / "lung2d_majun").glob("*image*.npy")))
    sbu = data / "dicom_misc" / "covid19_ny_sbu_slices"
    axial = sorted(sbu.glob("*/axial/*.dcm"))
    add("dicom_misc single axial chest DICOM (NY-SBU, LIDC, pydicom CT_small)", "chest",
        [p for p in axial if p.parent.parent.name not in SBU_ABDOMEN]
        + sorted((data / "dicom_misc" / "lidc_slice").glob("*.dcm")) + [data / "dicom_misc" / "pydicom_ct_small" / "CT_small.dcm"])
    add("dicom_misc NY-SBU axial slices at kidney level (abdomen)", "refuse",
        [p for p in axial if p.parent.parent.name in SBU_ABDOMEN])
    add("dicom_misc single coronal/sagittal DICOM (NY-SBU)", "refuse",
        sorted(sbu.glob("*/coronal/*.dcm")) + sorted(sbu.glob("*/sagittal/*.dcm")))
    vols = [data / "volumes_covid_ct_md" / "P001", data / "volumes_covid_ct_md" / "normal001",
            *sorted((data / "lung3d_imlab").glob("*_image_hu.nii.gz")), *sorted((data / "volumes_hu").glob("*/image_hu.nii.gz"))]
    add("chest HU volumes (COVID-CT-MD, imlab, volumes_hu)", "chest", [v for v in vols if v.exists()])
    abd = [data / "dicom_misc" / "abdomen_series_not_chest", data / "dicom_misc" / "abdomen_nifti_not_chest" / "example_ct.nii.gz"]
    add("abdominal/pelvic HU volumes (dicom_misc)", "refuse", abd)

    from hybrid_ct.imaging.reader import write_image
    from hybrid_ct.data.phantom import make_phantom

    (tmp / "phantoms").mkdir()
    ph_vols, ph_slices = [], []
    for seed in range(6):
        img, _, _ = make_phantom(seed, shape=(24, 160, 160), positive=seed % 2 == 0, table=seed % 3 == 0)
        ph_vols.append(write_image(img, tmp / "phantoms" / f"phantom_{seed}.nii.gz"))
        import SimpleITK as sitk

        a = sitk.GetArrayFromImage(img)
        for z in (8, 12, 16):
            ph_slices.append(_save_hu_slice(a[z], img.GetSpacing(), tmp / "phantoms" / f"phantom_{seed}_z{z}.nii.gz"))
            ph_slices.append(_save_png(_window_u8(a[z]), tmp / "phantoms" / f"phantom_{seed}_z{z}.png"))
    add("phantom volumes (make_phantom)", "chest", ph_vols)
    add("phantom single slices (HU NIfTI + 8-bit PNG)", "chest", ph_slices)

    (tmp / "abdomen").mkdir()
    hu_sl, pics = [], []
    for src, top in ((abd[0], None), (abd[1], ABDOMEN_NIFTI_LUNG_BASE)):
        a, sp = _axial_slices(src)
        for z in range(len(a) if top is None else top):
            stem = f"{src.name.split('.')[0]}_z{z:03d}"
            hu_sl.append(_save_hu_slice(a[z], sp, tmp / "abdomen" / f"{stem}.nii.gz"))
            pics.append(_save_png(_window_u8(a[z]), tmp / "abdomen" / f"{stem}.png"))
    add("abdominal/pelvic single HU slices (below the lung bases)", "refuse", hu_sl)
    add("abdominal/pelvic slices as 8-bit PNG (lung window)", "refuse", pics)

    (tmp / "non_ct").mkdir()
    for group, paths in non_ct_pictures(tmp / "non_ct").items():
        add(group, "refuse", paths)
    return items


def check_one(path: Path) -> dict:
    """One input the way ``hybrid-ct predict`` reads and checks it."""
    from hybrid_ct.predict.batch import Case, _file_kind, _intensity_for
    from hybrid_ct.errors import InputError
    from hybrid_ct.imaging.chest import check_ct
    from hybrid_ct.imaging.reader import read_image

    kind = "dicom" if path.is_dir() else (_file_kind(path) or "volume")
    t0 = time.perf_counter()
    try:
        img = read_image(path, intensity=_intensity_for(Case(path.stem, path, kind), "auto"))
        check_ct(img)
        status, reason = "passed", ""
    except InputError as e:
        status, reason = "refused", " ".join(str(e).split())
    return {"status": status, "reason": reason, "seconds": round(time.perf_counter() - t0, 4)}


def _kind_of_refusal(reason: str) -> str:
    low = reason.lower()
    if "not a chest" in low:
        return "not a chest"
    if "axial" in low or "thick" in low:
        return "not axial"
    return "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("HYBRID_CT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    ap.add_argument("--csv", default=None, help="write one row per input here")
    ap.add_argument("--only", default=None, help="groups containing this text")
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not (data / "MANIFEST.csv").is_file():
        print(f"no data at {data}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="chest_check_") as tmp:
        items = [it for it in collect(data, Path(tmp)) if not args.only or args.only in it[0]]
        rows = []
        for group, expected, path in items:
            r = check_one(path)
            rows.append({"group": group, "expected": expected, "input": str(path).replace(str(data) + "/", "")
                         .replace(tmp, "<synthetic>"), **r, "refusal": _kind_of_refusal(r["reason"]) if r["reason"] else ""})
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print("| inputs | must be | n | passed | refused: not a chest | refused: not axial | refused: other | wrong | slowest check |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    groups = defaultdict(list)
    for r in rows:
        groups[(r["group"], r["expected"])].append(r)
    wrong_total = 0
    for (group, expected), rs in groups.items():
        n_pass = sum(r["status"] == "passed" for r in rs)
        by = {k: sum(r["refusal"] == k for r in rs) for k in ("not a chest", "not axial", "other")}
        wrong = len(rs) - n_pass if expected == "chest" else n_pass
        wrong_total += wrong
        print(f"| {group} | {'passed' if expected == 'chest' else 'refused'} | {len(rs)} | {n_pass} | {by['not a chest']} | "
              f"{by['not axial']} | {by['other']} | **{wrong}** | {max(r['seconds'] for r in rs):.2f} s |")
    print(f"\n{wrong_total} wrong decision(s) on {len(rows)} inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
