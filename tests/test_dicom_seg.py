"""DICOM-SEG output (``hybrid_ct.predict.dicom_seg``, ``hybrid-ct predict --format dicom-seg``): every file written
is checked with dciodvfy (no error, only the accepted warnings of ``orthanc_fixture.ACCEPTED_WARNINGS``)
and read back with pydicom-seg to the same label map."""
import json

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from orthanc_fixture import dciodvfy
from pydicom_seg.template import rgb_to_cielab
from server_fixture import write_dicom_series

from hybrid_ct.contract import CONTRACT
from hybrid_ct.predict.dicom_seg import read_dicom_seg, write_dicom_seg
from hybrid_ct.errors import InputError
from hybrid_ct.imaging.reader import read_image


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A synthetic CT DICOM series (12 slices 64x64, a positive phantom) and its label on the same grid."""
    from hybrid_ct.data.phantom import make_phantom

    img, lab, _ = make_phantom(3, shape=(12, 64, 64), positive=True)
    folder = write_dicom_series(img, tmp_path_factory.mktemp("dcm") / "series")
    src = read_image(str(folder))
    lab = sitk.Cast(lab, sitk.sitkUInt8)
    lab.CopyInformation(src)
    return folder, lab


def check_seg_file(path, source_dir, expected):
    """dciodvfy clean, the contract's segments, references to the right source instances, and the
    same label map read back."""
    errors, warnings, lines = dciodvfy(path)
    assert not errors, "\n".join(lines)
    assert not warnings, "\n".join(lines)
    back, ds = read_dicom_seg(path, source_dir)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(expected))
    assert np.allclose(back.GetOrigin(), expected.GetOrigin(), atol=1e-3)
    assert np.allclose(back.GetSpacing(), expected.GetSpacing(), atol=1e-4)

    sources = {}
    for f in sorted(source_dir.iterdir()):
        h = pydicom.dcmread(f, stop_before_pixels=True)
        sources[h.SOPInstanceUID] = h
    h0 = next(iter(sources.values()))
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.StudyInstanceUID == h0.StudyInstanceUID
    assert ds.SeriesInstanceUID != h0.SeriesInstanceUID
    if "FrameOfReferenceUID" in h0:
        assert ds.FrameOfReferenceUID == h0.FrameOfReferenceUID
    # segments: numbered 1..n in the contract's order (dciodvfy wants no gaps), name / codes / colour from it
    present = set(np.unique(sitk.GetArrayFromImage(expected)).tolist()) - {0}
    order = [d for d in CONTRACT["labels"] if d["value"] in present]
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == list(range(1, len(order) + 1))
    for s, d in zip(ds.SegmentSequence, order):
        assert s.SegmentLabel == d["segment"]
        cat, typ = s.SegmentedPropertyCategoryCodeSequence[0], s.SegmentedPropertyTypeCodeSequence[0]
        assert [cat.CodingSchemeDesignator, cat.CodeValue, cat.CodeMeaning] == d["category"]
        assert [typ.CodingSchemeDesignator, typ.CodeValue, typ.CodeMeaning] == d["type"]
        assert list(s.RecommendedDisplayCIELabValue) == rgb_to_cielab(d["color"])
        assert "SegmentedPropertyTypeModifierCodeSequence" not in s  # nested in the type's item, as the standard says
        mod = typ.get("SegmentedPropertyTypeModifierCodeSequence")
        assert ([mod[0].CodingSchemeDesignator, mod[0].CodeValue, mod[0].CodeMeaning] if mod else None) \
            == d.get("type_modifier")
        if d.get("anatomic_region"):
            a = s.AnatomicRegionSequence[0]
            assert [a.CodingSchemeDesignator, a.CodeValue, a.CodeMeaning] == d["anatomic_region"]
    # references: the source series, and per frame the source slice at the frame's position
    ref = ds.ReferencedSeriesSequence
    assert len(ref) == 1 and ref[0].SeriesInstanceUID == h0.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref[0].ReferencedInstanceSequence} <= set(sources)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        src_uids = [r.ReferencedSOPInstanceUID for r in frame.DerivationImageSequence[0].SourceImageSequence]
        assert len(src_uids) == 1, "each frame references exactly its source slice"
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in sources[src_uids[0]].ImagePositionPatient], atol=1e-3)
    assert int(ds.NumberOfFrames) == len(ds.PerFrameFunctionalGroupsSequence)
    return ds


def test_synthetic_series_round_trip(series, tmp_path):
    folder, lab = series
    path = write_dicom_seg(lab, folder, tmp_path / "seg.dcm", model_version="v-test")
    ds = check_seg_file(path, folder, lab)
    assert {int(s.SegmentNumber) for s in ds.SegmentSequence} == {1, 2}
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in ds.SegmentSequence)
    assert "model v-test" in list(ds.SoftwareVersions)
    assert not list(tmp_path.glob("*.part"))


def test_label_on_another_grid_is_put_on_the_source_grid(series, tmp_path):
    folder, lab = series
    flipped = sitk.DICOMOrient(lab, "RAI")  # same voxels, other index order / direction
    assert flipped.GetDirection() != lab.GetDirection()
    path = write_dicom_seg(flipped, folder, tmp_path / "seg.dcm", algorithm_type="SEMIAUTOMATIC")
    ds = check_seg_file(path, folder, lab)
    assert all(s.SegmentAlgorithmType == "SEMIAUTOMATIC" for s in ds.SegmentSequence)


def test_lung_only_label_has_one_segment(series, tmp_path):
    folder, lab = series
    lung = sitk.Cast(lab > 0, sitk.sitkUInt8)
    check_seg_file(write_dicom_seg(lung, folder, tmp_path / "seg.dcm"), folder, lung)
    infection = sitk.Cast(lab == 2, sitk.sitkUInt8) * 2  # one segment numbered 1 holding label value 2
    check_seg_file(write_dicom_seg(infection, folder, tmp_path / "inf.dcm"), folder, infection)


def test_sided_lungs_carry_their_laterality(series, tmp_path):
    """The derived head's right / left lung: two Lung segments told apart by the type modifier Right
    (SCT 24028007) / Left (SCT 7771000), read back from the file with pydicom and to the same label values."""
    from hybrid_ct.processing.sides import lung_sides

    folder, lab = series
    sided = sitk.GetImageFromArray(lung_sides(sitk.GetArrayFromImage(lab), lab))
    sided.CopyInformation(lab)
    assert set(np.unique(sitk.GetArrayFromImage(sided)).tolist()) == {0, 2, 3, 4}
    path = write_dicom_seg(sided, folder, tmp_path / "seg.dcm")
    check_seg_file(path, folder, sided)
    ds = pydicom.dcmread(path)
    codes = {s.SegmentLabel: (s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                              [m.CodeValue for m in s.SegmentedPropertyTypeCodeSequence[0].get(
                                  "SegmentedPropertyTypeModifierCodeSequence", [])])
             for s in ds.SegmentSequence}
    assert codes == {"Right lung": ("39607008", ["24028007"]), "Left lung": ("39607008", ["7771000"]),
                     "Infection": ("23583003", [])}
    # another writer's numbering still reads back as the contract's values, by the codes
    for s in ds.SegmentSequence:
        s.SegmentNumber = {1: 3, 2: 1, 3: 2}[int(s.SegmentNumber)]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        ref = frame.SegmentIdentificationSequence[0]
        ref.ReferencedSegmentNumber = {1: 3, 2: 1, 3: 2}[int(ref.ReferencedSegmentNumber)]
    ds.save_as(str(tmp_path / "renumbered.dcm"))
    back, _ = read_dicom_seg(tmp_path / "renumbered.dcm", folder)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(sided))


def test_empty_or_foreign_label_is_refused(series, tmp_path):
    folder, lab = series
    with pytest.raises(InputError, match="empty"):
        write_dicom_seg(lab * 0, folder, tmp_path / "empty.dcm")
    with pytest.raises(InputError, match="not in the label contract"):
        write_dicom_seg(lab * 5, folder, tmp_path / "foreign.dcm")
    with pytest.raises(InputError, match="DICOM"):
        write_dicom_seg(lab, [str(tmp_path)], tmp_path / "x.dcm")  # a folder given as a file
    assert not list(tmp_path.glob("*.dcm*"))


def test_real_p001_series(shared_data, tmp_path):
    folder = shared_data / "volumes_covid_ct_md" / "P001"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    img = read_image(str(folder))
    a = sitk.GetArrayFromImage(img)
    arr = np.zeros(a.shape, np.uint8)  # a crude but real-shaped label: aerated tissue 1, a band of it 2
    arr[(a > -1000) & (a < -400)] = 1
    arr[(arr == 1) & (a > -650) & (a < -500)] = 2
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(img)
    path = write_dicom_seg(lab, folder, tmp_path / "P001_seg.dcm")
    ds = check_seg_file(path, folder, lab)
    src = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    assert ds.PatientID == src.PatientID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID


def test_cli_predict_format_dicom_seg(series, tmp_path):
    from hybrid_ct.cli import main
    from hybrid_ct.data.phantom import make_phantom

    folder, _ = series
    img, _, _ = make_phantom(4, shape=(12, 64, 64), positive=False)
    nifti = tmp_path / "in" / "vol.nii.gz"
    nifti.parent.mkdir()
    sitk.WriteImage(img, str(nifti))
    out = tmp_path / "out"
    assert main(["-q", "predict", str(folder), str(nifti), "--out", str(out), "--format", "dicom-seg",
                 "--overlays", "0"]) == 0
    rep = json.loads((out / "series.json").read_text())
    assert rep["outputs"]["dicom_seg"] == "series_seg.dcm" and rep["outputs"]["dicom_seg_note"] == ""
    label = sitk.ReadImage(str(out / "series_label.nii.gz"))
    check_seg_file(out / "series_seg.dcm", folder, sitk.Cast(label, sitk.sitkUInt8))
    # a PACS list shows the call in the contract's words (the JSON's label decides which)
    from hybrid_ct.contract import REPORT

    call = rep["report"]["classification"]["label"] if "report" in rep else rep["classification"]["label"]
    seg = pydicom.dcmread(out / "series_seg.dcm", stop_before_pixels=True)
    assert seg.SeriesDescription == REPORT["call"]["series_description"][call] and len(seg.SeriesDescription) <= 64
    # a NIfTI input has no DICOM series to reference: NIfTI only, and the report says why
    rep = json.loads((out / "vol.json").read_text())
    assert rep["outputs"]["dicom_seg"] is None and "not a DICOM series" in rep["outputs"]["dicom_seg_note"]
    assert not (out / "vol_seg.dcm").exists()
