"""hybrid_ct.imaging.reader: every input kind on real data, and every bad input refused with a named problem."""

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from hybrid_ct.errors import InputError
from hybrid_ct.imaging.chest import MIN_LUNG_AIR_FRACTION, check_ct
from hybrid_ct.imaging.body import lung_air_fraction
from hybrid_ct.imaging.reader import read_image, read_label, write_image
from hybrid_ct.processing.grid import window


def _is_hu_volume(img, size=None):
    assert isinstance(img, sitk.Image)
    assert img.GetDimension() == 3
    assert img.GetPixelID() == sitk.sitkFloat32
    if size is not None:
        assert img.GetSize() == size


@pytest.fixture(scope="module")
def p001(shared_data):
    return read_image(shared_data / "volumes_covid_ct_md" / "P001")


# --- reading each input kind ------------------------------------------------------------------

def test_dicom_series_jpeg_lossless(p001):
    _is_hu_volume(p001, (512, 512, 148))
    assert p001.GetSpacing()[2] == pytest.approx(2.0, abs=0.01)
    a = sitk.GetArrayViewFromImage(p001)
    assert a.min() == pytest.approx(-1024, abs=30)  # rescale intercept applied: air, not 0
    assert 1000 < a.max() < 4000
    assert check_ct(p001) is p001
    assert lung_air_fraction(p001) > 3 * MIN_LUNG_AIR_FRACTION


def test_normal_series_passes_as_chest(shared_data):
    img = read_image(shared_data / "volumes_covid_ct_md" / "normal001")
    _is_hu_volume(img, (512, 512, 154))
    check_ct(img)


@pytest.mark.parametrize("case", ["id001", "id002"])
def test_nifti_volume(shared_data, case):
    path = shared_data / "lung3d_imlab" / f"{case}_image_hu.nii.gz"
    img = read_image(path)
    _is_hu_volume(img, (128, 128, 64))
    ref = nib.load(str(path)).get_fdata()
    # SimpleITK (z, y, x) vs. nibabel (x, y, z): same voxels
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(img).transpose(2, 1, 0), ref, atol=1e-3)
    check_ct(img)
    check_ct(path)  # a path is read first


def test_single_dicom_file(shared_data):
    img = read_image(shared_data / "dicom_misc" / "lidc_slice" / "0.dcm")
    _is_hu_volume(img, (512, 512, 1))
    assert sitk.GetArrayViewFromImage(img).min() < -900
    check_ct(img)  # one axial chest slice is still a chest
    with pytest.raises(InputError, match="slice"):
        check_ct(img, min_slices=8)


def test_folder_with_several_series_is_refused_naming_them(shared_data, tmp_path):
    import pydicom

    abdomen = sorted((shared_data / "dicom_misc" / "abdomen_series_not_chest").iterdir())
    for f in abdomen[:5]:
        os.symlink(f, tmp_path / f.name)
    os.symlink(shared_data / "dicom_misc" / "lidc_slice" / "0.dcm", tmp_path / "other.dcm")
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in (abdomen[0], tmp_path / "other.dcm")}
    with pytest.raises(InputError, match="holds 2 DICOM series, not one") as e:
        read_image(tmp_path)  # it used to take the largest one silently
    assert all(u in str(e.value) for u in uids) and "5 file(s)" in str(e.value)
    assert read_image(abdomen[:5]).GetSize() == (512, 512, 5)  # the files of one series, read as one volume


def test_mixed_synthetic_folder_names_both_series(small_phantom, tmp_path):
    import pydicom
    from server_fixture import write_dicom_series

    img = small_phantom[0]
    (tmp_path / "mixed").mkdir()
    for k, desc in ((1, "Chest 1.25 mm"), (2, "Chest 5 mm")):
        folder = write_dicom_series(img, tmp_path / f"s{k}")
        for f in sorted(folder.glob("*.dcm")):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.7.{k}"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SeriesInstanceUID}.{int(f.stem) + 1}"
            ds.SeriesDescription = desc
            ds.save_as(tmp_path / "mixed" / f"{k}_{f.name}")
    with pytest.raises(InputError) as e:
        read_image(tmp_path / "mixed")
    msg = str(e.value)
    assert "1.2.826.0.1.3680043.8.498.7.1" in msg and "1.2.826.0.1.3680043.8.498.7.2" in msg
    assert '"Chest 1.25 mm"' in msg and '"Chest 5 mm"' in msg and "hybrid-ct predict" in msg
    assert read_image(tmp_path / "s1").GetSize() == img.GetSize()  # one series per folder: read as before


@pytest.mark.slow
def test_series_files_in_scan_order_read_as_the_folder(shared_data):
    from hybrid_ct.predict.batch import _ordered, _read_header, expand_inputs

    p001 = shared_data / "volumes_covid_ct_md" / "P001"
    (case,), _ = expand_inputs([p001])
    assert case.kind == "dicom" and not case.skipped and case.path == p001  # one series: the folder's case
    files = sorted(p001.glob("*.dcm"))[::-1]  # any order in: the scan sorts by position along the normal
    ordered = _ordered([(f, _read_header(f)) for f in files])
    a, b = read_image(ordered), read_image(p001)
    assert a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def test_8bit_jpg_maps_onto_the_window(shared_data):
    path = shared_data / "seg2d_medseg" / "images" / "0.jpg"
    img = read_image(path, intensity="8bit")
    _is_hu_volume(img)
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert img.GetSize() == (pixels.shape[1], pixels.shape[0], 1)
    back = window(sitk.GetArrayViewFromImage(img)[0]) * 255
    np.testing.assert_allclose(back, pixels, atol=1e-2)
    check_ct(img, require_chest=False)


@pytest.mark.parametrize("name", [
    "covid/ucsd_covidct__2020.02.19.20025023-p20-93%3.png",  # RGB PNG
    "covid/ucsd_covidct__2020.03.16.20035105-p6-64-2.png",  # a JPEG named .png
    "noncovid/mosmed_CT0__img0.jpg",
])
def test_cls2d_pictures_become_one_grey_slice(shared_data, name):
    path = shared_data / "cls2d" / name
    if not path.exists():
        pytest.skip(f"{path} not in this copy of the data")
    img = read_image(path, intensity="8bit")
    _is_hu_volume(img)
    assert img.GetSize()[2] == 1
    assert img.GetNumberOfComponentsPerPixel() == 1
    assert img.GetSpacing() == (1.0, 1.0, 1.0)


def test_npy_slices(shared_data):
    path = shared_data / "lung2d_majun" / "coronacases_001_image_slice_98.npy"
    img = read_image(path)
    _is_hu_volume(img, (512, 512, 1))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img)[0], np.load(path).astype(np.float32))
    check_ct(img)
    not_hu = read_image(shared_data / "lung2d_majun" / "radiopaedia_14_85914_0_image_slice_0.npy")
    with pytest.raises(InputError, match="not Hounsfield"):
        check_ct(not_hu)


def test_write_and_read_back(small_phantom, tmp_path):
    img, lab, _ = small_phantom
    for name in ("ct.nii.gz", "ct.nrrd", "ct.mha"):
        back = read_image(write_image(img, tmp_path / name))
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img))
        assert back.GetSpacing() == pytest.approx(img.GetSpacing())
        assert back.GetOrigin() == pytest.approx(img.GetOrigin())
    got = read_label(write_image(lab, tmp_path / "lab.nii.gz"), img)
    assert got.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(lab))
    with pytest.raises(InputError, match="use .nii"):
        write_image(img, tmp_path / "ct.txt")


# --- bad inputs --------------------------------------------------------------------------------

def test_unreadable_files(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="cannot read .*junk.nii.gz"):
        read_image(junk)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        read_image(empty)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InputError, match="cannot read"):
        read_image(text)
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path)
    with pytest.raises(InputError, match="not an image"):
        check_ct(np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match="intensity"):
        read_image(junk, intensity="raw")


def test_nan_and_inf(tmp_path):
    arr = np.full((4, 8, 8), -1000.0, np.float32)
    arr[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputError, match="NaN"):
        read_image(tmp_path / "nan.nii.gz")
    arr[1, 2, 3] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        check_ct(sitk.GetImageFromArray(arr), require_chest=False)


def test_empty_image():
    with pytest.raises(InputError, match="empty image"):
        check_ct(sitk.Image(0, 0, 0, sitk.sitkFloat32))


def test_unsupported_pixel_types(tmp_path):
    np.save(tmp_path / "mask.npy", np.zeros((8, 8), bool))
    with pytest.raises(InputError, match="unsupported pixel type bool"):
        read_image(tmp_path / "mask.npy")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.complex64), np.eye(4)), str(tmp_path / "c.nii.gz"))
    with pytest.raises(InputError, match="complex"):
        read_image(tmp_path / "c.nii.gz")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), str(tmp_path / "v.nrrd"))
    with pytest.raises(InputError, match="3 components"):
        read_image(tmp_path / "v.nrrd")
    with pytest.raises(InputError, match="components"):
        check_ct(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 2))


def test_broken_geometry(tmp_path):
    hdr = ("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = 0 1 1\n"
           "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    (tmp_path / "zero.mha").write_bytes(hdr.encode() + np.full(64, -1000, np.float32).tobytes())
    with pytest.raises(InputError, match="spacing"):
        read_image(tmp_path / "zero.mha")
    img = sitk.GetImageFromArray(np.full((4, 4, 4), -1000, np.float32))
    img.SetSpacing((float("nan"), 1.0, 1.0))
    with pytest.raises(InputError, match="spacing"):
        check_ct(img, require_chest=False)
    img = sitk.GetImageFromArray(np.full((4, 4, 4), -1000, np.float32))
    img.SetDirection((1, 0, 0, 0.5, 1, 0, 0, 0, 1))
    with pytest.raises(InputError, match="orthonormal"):
        check_ct(img, require_chest=False)


def test_8bit_picture_passed_as_hu(shared_data):
    img = read_image(shared_data / "seg2d_medseg" / "images" / "0.jpg")  # intensity="hu" by mistake
    with pytest.raises(InputError, match="not Hounsfield units.*8-bit"):
        check_ct(img, require_chest=False)
    with pytest.raises(InputError, match="not an 8-bit image"):
        read_image(shared_data / "lung3d_imlab" / "id001_image_hu.nii.gz", intensity="8bit")


def test_2d_refused_where_3d_is_needed(shared_data):
    img = read_image(shared_data / "seg2d_medseg" / "images" / "0.jpg", intensity="8bit")
    with pytest.raises(InputError, match="1 slice.*at least 3"):
        check_ct(img, require_chest=False, min_slices=3)


def test_non_ct_modality_refused(shared_data, tmp_path):
    import pydicom

    ds = pydicom.dcmread(shared_data / "dicom_misc" / "pydicom_ct_small" / "CT_small.dcm")
    ds.Modality = "MR"
    ds.save_as(tmp_path / "mr.dcm")
    with pytest.raises(InputError, match="modality 'MR'"):
        read_image(tmp_path / "mr.dcm")


@pytest.mark.parametrize("rel", ["dicom_misc/abdomen_series_not_chest",
                                 "dicom_misc/abdomen_nifti_not_chest/example_ct.nii.gz"])
def test_abdomen_refused_as_not_a_chest(shared_data, rel):
    img = read_image(shared_data / rel)
    assert lung_air_fraction(img) < MIN_LUNG_AIR_FRACTION / 2
    with pytest.raises(InputError, match="not a chest"):
        check_ct(img)
    check_ct(img, require_chest=False)  # otherwise a fine CT


def test_phantoms_pass_as_chest(small_phantom, small_negative_phantom):
    for img, _, _ in (small_phantom, small_negative_phantom):
        assert lung_air_fraction(img) > 2 * MIN_LUNG_AIR_FRACTION
        check_ct(img, min_slices=3)


def test_read_label_refuses_wrong_size_and_values(small_phantom, tmp_path):
    img, lab, _ = small_phantom
    arr = sitk.GetArrayFromImage(lab)
    small = sitk.GetImageFromArray(arr[:-1])
    with pytest.raises(InputError, match="size"):
        read_label(write_image(small, tmp_path / "short.nii.gz"), img)
    bad = arr.copy()
    bad[0, 0, 0] = 255
    bad_img = sitk.GetImageFromArray(bad)
    bad_img.CopyInformation(lab)
    with pytest.raises(InputError, match=r"unknown values \[255\]"):
        read_label(write_image(bad_img, tmp_path / "bad.nii.gz"), img)
    moved = sitk.Image(lab)
    moved.SetOrigin((100.0, 0.0, 0.0))
    with pytest.raises(InputError, match="not lie on the image grid"):
        read_label(write_image(moved, tmp_path / "moved.nii.gz"), img)


def _real_hu_slices(shared_data):
    out = []
    for f in sorted((shared_data / "lung3d_imlab").glob("*image*")):
        v = sitk.GetArrayFromImage(read_image(f))
        out += [v[z] for z in (20, 32, 44)]
    out += [np.load(f) for f in sorted((shared_data / "lung2d_majun").glob("coronacases*image*.npy"))]
    out.append(sitk.GetArrayFromImage(read_image(shared_data / "dicom_misc" / "lidc_slice" / "0.dcm"))[0])
    return out


def test_reference_levels_are_the_real_hu_medians(shared_data):
    from hybrid_ct.imaging.calibration import HU_LUNG, HU_TISSUE, anatomy_levels

    levels = np.array([anatomy_levels(a) for a in _real_hu_slices(shared_data)])
    assert len(levels) == 10
    lung, tissue = np.median(levels, axis=0)
    assert abs(lung - HU_LUNG) < 10 and abs(tissue - HU_TISSUE) < 10
    assert (levels[:, 0] < -650).all() and (np.abs(levels[:, 1]) < 100).all()


@pytest.mark.parametrize("width,level", [(1500, -600), (2000, -500), (1000, -700), (1200, -200)])
def test_calibration_undoes_an_unknown_window(shared_data, width, level):
    from hybrid_ct.imaging.calibration import anatomy_levels, calibrate_8bit

    hu = np.load(shared_data / "lung2d_majun" / "coronacases_001_image_slice_110.npy").astype(np.float32)
    g = np.round(np.clip((hu - (level - width / 2)) / width, 0, 1) * 255)  # an 8-bit picture of that window
    back = calibrate_8bit(g)
    lung_hu, tissue_hu = anatomy_levels(hu)
    lung_b, tissue_b = anatomy_levels(back)
    assert abs(lung_b - lung_hu) < 80 and abs(tissue_b - tissue_hu) < 80
    unsat = (g > 0) & (g < 255)
    assert np.median(np.abs(back - hu)[unsat]) < 120  # grey levels land near their HU


def test_an_8bit_volume_is_calibrated_with_one_map_for_all_slices(shared_data):
    from hybrid_ct.imaging.calibration import anatomy_levels, calibrate_8bit

    path = shared_data / "lung3d_imlab"
    vols = sorted(p for p in path.glob("*.nii.gz") if "mask" not in p.name)
    if not vols:
        pytest.skip(f"no HU volume in {path}")
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(vols[0]))).astype(np.float32)
    g = np.round(np.clip((hu + 1500) / 2000, 0, 1) * 255)  # exported with W2000 / L-500
    back = calibrate_8bit(g)
    slope, icpt = np.polyfit(g.ravel(), back.ravel(), 1)
    np.testing.assert_allclose(back, slope * g + icpt, atol=1e-2)  # one linear map, not one per slice
    mid = len(hu) // 2
    lung_hu, tissue_hu = anatomy_levels(hu[mid])
    lung_b, tissue_b = anatomy_levels(back[mid])
    assert abs(lung_b - lung_hu) < 80 and abs(tissue_b - tissue_hu) < 80


def test_calibration_falls_back_to_the_lung_window_on_a_flat_picture():
    from hybrid_ct.imaging.calibration import calibrate_8bit

    g = np.full((32, 32), 100.0)
    np.testing.assert_allclose(window(calibrate_8bit(g)), 100 / 255, atol=1e-6)


def test_8bit_auto_puts_a_mosmed_picture_on_the_hu_scale(shared_data):
    from hybrid_ct.imaging.calibration import HU_LUNG, HU_TISSUE, anatomy_levels

    path = shared_data / "cls2d" / "noncovid" / "mosmed_CT0__img0.jpg"
    if not path.exists():
        pytest.skip(f"{path} not in this copy of the data")
    fixed = sitk.GetArrayFromImage(read_image(path, intensity="8bit"))[0]
    auto = sitk.GetArrayFromImage(read_image(path, intensity="8bit-auto"))[0]
    assert abs(anatomy_levels(auto)[0] - HU_LUNG) < 5
    lung, tissue = anatomy_levels(fixed)  # without calibration: denser lungs, soft tissue read as fat-and-air
    assert lung > HU_LUNG + 100 and tissue < HU_TISSUE - 200


# --- chest check of single axial slices (pictures) and non-axial inputs ---------------------------

@pytest.mark.parametrize("folder", ["seg2d_medseg/images", "lung2d_majun"])
def test_every_real_chest_picture_passes_the_chest_check(shared_data, folder):
    from hybrid_ct.predict.batch import Case, _intensity_for

    paths = sorted(p for p in (shared_data / folder).iterdir() if "mask" not in p.name)
    for p in paths:  # MedSeg crops (32 of 50 refused by the body-enclosed air rule) and a lung-base slice
        check_ct(read_image(p, intensity=_intensity_for(Case(p.stem, p, "2d"), "auto")))


def _non_ct_pictures():
    from PIL import ImageDraw
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    blank = np.full((256, 256), 120, np.uint8)
    noise = ndi.gaussian_filter(rng.normal(size=(256, 256)), 1.5)
    smooth = ndi.gaussian_filter(rng.normal(size=(256, 256)), 24)
    page = Image.new("L", (256, 256), 255)
    for y in range(4, 250, 14):
        ImageDraw.Draw(page).text((4, y), "Hybrid CT outlines lungs and infection " * 2, fill=0)
    to8 = lambda a: np.round((a - a.min()) / np.ptp(a) * 255).astype(np.uint8)  # noqa: E731
    return {"blank": blank, "noise": to8(noise), "smooth": to8(smooth), "text": np.asarray(page)}


@pytest.mark.parametrize("name", ["blank", "noise", "smooth", "text"])
def test_non_ct_pictures_are_refused(tmp_path, name):
    path = tmp_path / f"{name}.png"
    Image.fromarray(_non_ct_pictures()[name]).save(path)
    with pytest.raises(InputError, match="not a chest CT slice"):
        check_ct(read_image(path, intensity="8bit-auto"))


def test_single_pelvic_hu_slice_is_refused(shared_data):
    img = sitk.DICOMOrient(read_image(shared_data / "dicom_misc" / "abdomen_nifti_not_chest" / "example_ct.nii.gz"),
                           "LPS")
    one = img[:, :, 20:21]  # the pelvis (upper-abdominal slices with bowel gas pass: docs/pictures.md)
    with pytest.raises(InputError, match="not a chest CT slice"):
        check_ct(one)


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_single_coronal_or_sagittal_dicom_is_refused_at_once(shared_data, plane):
    import time

    files = sorted((shared_data / "dicom_misc" / "covid19_ny_sbu_slices").glob(f"*/{plane}/*.dcm"))
    assert len(files) == 10
    for f in files:
        t0 = time.perf_counter()
        with pytest.raises(InputError, match=f"not axial: a {plane} slice"):
            check_ct(read_image(f), require_chest=False)  # refused whatever the chest check says
        assert time.perf_counter() - t0 < 1.0  # it used to run for > 10 minutes as 512 thin axial slices


@pytest.mark.parametrize("shape,match", [((300, 1, 200), "coronal slice"), ((300, 200, 1), "sagittal slice"),
                                         ((40, 5, 200), "coronal slab"), ((300, 1, 1), "line of pixels")])
def test_one_pixel_thin_axial_plane_is_refused(shape, match):
    img = sitk.GetImageFromArray(np.full(shape, -800, np.float32))  # [z, y, x]: axial direction
    with pytest.raises(InputError, match=f"not axial: a {match}"):
        check_ct(img, require_chest=False)


def test_a_volume_stored_coronally_is_still_axial_enough(small_phantom):
    img, _, _ = small_phantom
    arr = sitk.GetArrayFromImage(img)  # [z, y, x]
    cor = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(1, 0, 2)))  # index axes: x, z, y
    cor.SetDirection((1, 0, 0, 0, 0, 1, 0, 1, 0))
    cor.SetSpacing(tuple(img.GetSpacing()[i] for i in (0, 2, 1)))
    check_ct(cor, min_slices=3)  # a many-slice coronal stack is a volume: reoriented, not refused
