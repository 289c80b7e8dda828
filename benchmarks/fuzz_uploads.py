"""Seeded mutation fuzzing of image uploads against the real Hybrid CT server (issue 32 point 3).

From valid chest phantoms written as NIfTI (.nii.gz, .nii), NRRD, MHA and a zip of a DICOM series, each
case applies one to three seeded mutations -- header fields (dims, datatype, spacing, offsets, scaling,
NRRD / MHA keys), truncation, bit flips, appended or zeroed bytes, DICOM tag removal and odd transfer
syntaxes, dropped / duplicated slices, huge dimensions, wrong byte order (the header swapped, the data
not; or both swapped: a valid big-endian file) -- and uploads it with ``PUT /datastore/image``.

Every answer must be a 2xx whose stored volume equals what SimpleITK reads from the uploaded file (same
size, spacing within 1e-3, voxels within 0.5 HU), or a 4xx whose JSON ``detail`` is a message; a 5xx, a
timeout or a connection error is a crasher and is written to ``--out`` for the corpus. Accepted images are
deleted again. The server's RSS is sampled before, every 50 cases and after.

    python benchmarks/fuzz_uploads.py --n 2000 --seed 32            # starts its own server in a temp folder
    python benchmarks/fuzz_uploads.py --n 100 --url http://127.0.0.1:8000 --pid <server pid>

Exit status 1 when a case failed. ``run(url, n, seed)`` is what tests/test_server_fuzz.py calls.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
import struct
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPE = (8, 64, 64)  # the test server's phantoms (z, y, x)
FORMATS = ("nii.gz", "nii", "nrrd", "mha", "zip")
ODD_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70",
                "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.90", "1.2.3.4", "")
DICOM_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "PixelData", "RescaleSlope",
              "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient", "SeriesInstanceUID",
              "SOPInstanceUID", "Modality", "PixelSpacing", "SliceThickness", "SamplesPerPixel",
              "PhotometricInterpretation", "InstanceNumber", "StudyInstanceUID")
ODD_INTS = (0, 1, -1, 2, 3, 7, 255, 32767, -32768, 65535, 2 ** 31 - 1, -(2 ** 31))
ODD_FLOATS = (0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30, 1e9)


# ------------------------------------------------------------------------------ valid inputs
def seed_files(folder: Path) -> dict:
    """{format: bytes} of one valid chest phantom in every format."""
    import SimpleITK as sitk

    sys.path.insert(0, str(REPO / "tests"))
    from server_fixture import write_dicom_series

    from hybrid_ct.data.phantom import make_phantom

    img, _, _ = make_phantom(4242, shape=SHAPE, positive=True)
    img = sitk.Cast(img, sitk.sitkInt16)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for fmt in ("nii.gz", "nii", "nrrd", "mha"):
        p = folder / f"seed.{fmt}"
        sitk.WriteImage(img, str(p), useCompression=fmt in ("nii.gz", "nrrd", "mha"))
        out[fmt] = p.read_bytes()
    dcm = write_dicom_series(img, folder / "dicom")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(dcm.iterdir()):
            z.write(f, f"series/{f.name}")
    out["zip"] = buf.getvalue()
    return out


# ------------------------------------------------------------------------------ mutations
def bitflip(rng, data: bytes, region: int | None = None) -> tuple:
    b = bytearray(data)
    n = rng.choice((1, 1, 2, 4, 8, 32))
    hi = min(len(b), region) if region else len(b)
    for _ in range(n):
        i = rng.randrange(hi)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b), f"bitflip x{n}" + (f" in the first {hi} bytes" if region else "")


def truncate(rng, data: bytes) -> tuple:
    k = rng.choice((0, 1, 4, 100, 348, 352, len(data) // 2, len(data) - 1, rng.randrange(len(data))))
    return data[:k], f"truncate to {k}"


def append(rng, data: bytes) -> tuple:
    extra = bytes(rng.randrange(256) for _ in range(rng.choice((1, 17, 4096))))
    return data + extra, f"append {len(extra)} bytes"


def zero_block(rng, data: bytes) -> tuple:
    i = rng.randrange(len(data))
    k = rng.choice((4, 64, 1024))
    return data[:i] + b"\0" * min(k, len(data) - i) + data[i + k:], f"zero {k} bytes at {i}"


GENERIC = (bitflip, truncate, append, zero_block)

# NIfTI-1 header: (name, offset, struct format, count)
NIFTI_FIELDS = (("sizeof_hdr", 0, "i", 1), ("dim", 40, "h", 8), ("datatype", 70, "h", 1), ("bitpix", 72, "h", 1),
                ("pixdim", 76, "f", 8), ("vox_offset", 108, "f", 1), ("scl_slope", 112, "f", 1),
                ("scl_inter", 116, "f", 1), ("qform_code", 252, "h", 1), ("sform_code", 254, "h", 1),
                ("quatern", 256, "f", 6), ("srow", 280, "f", 12), ("magic", 344, "4s", 1))


def _nifti_swapped(raw: bytes, data_too: bool) -> bytes:
    """The header in big-endian byte order; the voxels too when ``data_too`` (then a valid file)."""
    import nibabel as nib

    hdr = np.frombuffer(raw[:348], dtype=nib.nifti1.header_dtype).copy()
    swapped = hdr.byteswap().view(hdr.dtype.newbyteorder())
    off = int(hdr["vox_offset"][0])
    body = raw[off:]
    if data_too:
        body = np.frombuffer(body, dtype="<i2").astype(">i2").tobytes()
    return swapped.tobytes() + raw[348:off] + body


def nifti_mutation(rng, raw: bytes) -> tuple:
    """One header mutation of an uncompressed NIfTI-1 file."""
    what = rng.choice(("field", "field", "field", "byteorder_header", "byteorder_both", "huge"))
    if what == "byteorder_header":
        return _nifti_swapped(raw, False), "header big-endian, data little-endian"
    if what == "byteorder_both":
        return _nifti_swapped(raw, True), "valid big-endian file (header and data)"
    b = bytearray(raw)
    if what == "huge":
        dims = [3, rng.choice((32767, 4096, 512)), rng.choice((32767, 4096, 512)), rng.choice((32767, 2048, 600))]
        struct.pack_into("<4h", b, 40, *dims)
        return bytes(b), f"huge dims {dims[1:]}"
    name, off, fmt, count = rng.choice(NIFTI_FIELDS)
    i = rng.randrange(count)
    if fmt == "4s":
        value = rng.choice((b"ni1\0", b"n+2\0", b"\0\0\0\0", b"XXXX"))
        b[off:off + 4] = value
    elif fmt in ("h", "i"):
        value = rng.choice(ODD_INTS + (rng.randrange(-40000, 40000),))
        lim = 2 ** 15 if fmt == "h" else 2 ** 31
        value = max(-lim, min(lim - 1, value))
        struct.pack_into("<" + fmt, b, off + i * struct.calcsize(fmt), value)
    else:
        value = rng.choice(ODD_FLOATS)
        struct.pack_into("<f", b, off + i * 4, value)
    return bytes(b), f"nifti {name}[{i}] = {value!r}"


def _text_header(data: bytes, sep: bytes) -> tuple:
    """(header lines, separator index or None, body) of an NRRD (blank line) / MHA (ElementDataFile) file."""
    if sep == b"\n\n":
        k = data.find(b"\n\n")
        return data[:k].split(b"\n"), data[k + 2:]
    m = re.search(rb"ElementDataFile *= *[^\n]*\n", data)
    k = m.end() if m else len(data)
    return data[:k].rstrip(b"\n").split(b"\n"), data[k:]


NRRD_VALUES = {b"type": (b"float", b"uchar", b"double", b"int64", b"block", b"nonsense"),
               b"dimension": (b"2", b"4", b"0", b"-1", b"99"),
               b"sizes": (b"64 64", b"64 64 8 2", b"100000 100000 100000", b"0 64 8", b"-1 64 8", b"64 64 800"),
               b"space directions": (b"(0,0,0) (0,1,0) (0,0,1)", b"(nan,0,0) (0,1,0) (0,0,1)", b"none",
                                     b"(-1,0,0) (0,-1,0) (0,0,-1)"),
               b"endian": (b"big",), b"encoding": (b"raw", b"bzip2", b"hex", b"ascii", b"nonsense"),
               b"space origin": (b"(nan,nan,nan)", b"(1e300,0,0)"),
               b"kinds": (b"domain domain", b"RGB-color domain domain"),
               b"data file": (b"/etc/passwd", b"LIST", b"../x.raw")}
MHA_VALUES = {b"NDims": (b"2", b"4", b"0"), b"DimSize": (b"64 64", b"100000 100000 1000", b"0 64 8", b"64 64 800"),
              b"ElementType": (b"MET_FLOAT", b"MET_UCHAR", b"MET_DOUBLE", b"MET_NONSENSE"),
              b"ElementSpacing": (b"0 0 0", b"-1 1 1", b"nan 1 1"),
              b"BinaryDataByteOrderMSB": (b"True",), b"CompressedData": (b"False", b"True"),
              b"CompressedDataSize": (b"1", b"99999999"), b"ElementDataFile": (b"/etc/passwd", b"LIST", b"x.raw"),
              b"TransformMatrix": (b"0 0 0 0 0 0 0 0 0", b"nan 0 0 0 1 0 0 0 1"),
              b"Offset": (b"nan nan nan",), b"ObjectType": (b"Mesh",)}


def text_header_mutation(rng, data: bytes, fmt: str) -> tuple:
    sep = b"\n\n" if fmt == "nrrd" else b"ElementDataFile"
    lines, body = _text_header(data, sep)
    values = NRRD_VALUES if fmt == "nrrd" else MHA_VALUES
    delim = b": " if fmt == "nrrd" else b" = "
    op = rng.choice(("set", "set", "set", "drop", "dup", "byteorder"))
    keyed = [(i, ln.split(delim.strip(), 1)[0].strip()) for i, ln in enumerate(lines) if delim.strip() in ln]
    if op == "byteorder":  # the header says big-endian, the voxels are little-endian
        key = b"endian" if fmt == "nrrd" else b"BinaryDataByteOrderMSB"
        val = b"big" if fmt == "nrrd" else b"True"
        lines = [ln for ln in lines if not ln.startswith(key)]
        lines.insert(max(1, len(lines) - 1), key + delim + val)
        what = f"{fmt} {key.decode()} = {val.decode()} (data unchanged)"
    elif op == "drop" and keyed:
        i, key = rng.choice(keyed)
        del lines[i]
        what = f"{fmt} drop {key.decode(errors='replace')!r}"
    elif op == "dup" and keyed:
        i, key = rng.choice(keyed)
        lines.insert(i, lines[i])
        what = f"{fmt} duplicate {key.decode(errors='replace')!r}"
    else:
        key = rng.choice(sorted(values))
        val = rng.choice(values[key])
        idx = next((i for i, k in keyed if k == key), None)
        line = key + delim + val
        if idx is None:
            lines.insert(max(1, len(lines) - 1), line)
        else:
            lines[idx] = line
        what = f"{fmt} {key.decode()} = {val.decode()}"
    if fmt == "mha":  # ElementDataFile must stay last
        last = [ln for ln in lines if ln.startswith(b"ElementDataFile")]
        lines = [ln for ln in lines if not ln.startswith(b"ElementDataFile")] + last[-1:]
        return b"\n".join(lines) + b"\n" + body, what
    return b"\n".join(lines) + b"\n\n" + body, what


def dicom_mutation(rng, data: bytes) -> tuple:
    import pydicom
    from pydicom.uid import UID

    zin = zipfile.ZipFile(io.BytesIO(data))
    files = [(n, zin.read(n)) for n in zin.namelist()]
    op = rng.choice(("remove_tag", "remove_tag", "syntax", "huge", "drop_slice", "dup_slice", "slice_bytes",
                     "value", "zip_bytes"))
    what = op
    if op == "zip_bytes":
        return rng.choice(GENERIC)(rng, data)
    if op in ("drop_slice", "dup_slice"):
        i = rng.randrange(len(files))
        files = files[:i] + files[i + 1:] if op == "drop_slice" else files + [(files[i][0] + ".copy.dcm", files[i][1])]
        what = f"dicom {op} {i}"
    elif op == "slice_bytes":
        i = rng.randrange(len(files))
        mutated, how = rng.choice(GENERIC)(rng, files[i][1])
        files[i] = (files[i][0], mutated)
        what = f"dicom slice {i}: {how}"
    else:
        which = list(range(len(files))) if rng.random() < 0.5 else [rng.randrange(len(files))]
        tag = rng.choice(DICOM_TAGS)
        syntax = rng.choice(ODD_SYNTAXES)
        value = rng.choice(ODD_INTS[:9])
        for i in which:
            ds = pydicom.dcmread(io.BytesIO(files[i][1]), force=True)
            if op == "remove_tag":
                if tag in ds:
                    delattr(ds, tag)
                what = f"dicom remove {tag} from {len(which)} slice(s)"
            elif op == "syntax":
                ds.file_meta.TransferSyntaxUID = UID(syntax)
                what = f"dicom transfer syntax {syntax!r} (pixels unchanged) on {len(which)} slice(s)"
            elif op == "huge":
                ds.Rows, ds.Columns = 65535, 65535
                ds.NumberOfFrames = rng.choice((1, 1000, 100000))
                what = f"dicom Rows=Columns=65535 frames={ds.NumberOfFrames} on {len(which)} slice(s)"
            else:
                key = rng.choice(("BitsAllocated", "PixelRepresentation", "SamplesPerPixel", "RescaleSlope",
                                  "PixelSpacing", "SliceThickness"))
                if key == "PixelSpacing":
                    ds.PixelSpacing = rng.choice((["0", "0"], ["-1", "-1"], ["nan", "1"]))
                elif key in ("RescaleSlope", "SliceThickness"):
                    setattr(ds, key, rng.choice(("0", "-1", "nan", "1e30")))
                else:
                    setattr(ds, key, max(0, min(65535, value)))
                what = f"dicom {key} odd value on {len(which)} slice(s)"
            buf = io.BytesIO()
            try:
                ds.save_as(buf, write_like_original=True)
            except Exception:  # noqa: BLE001 - pydicom refuses some combinations: keep the slice as it was
                continue
            files[i] = (files[i][0], buf.getvalue())
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for n, b in files:
            z.writestr(n, b)
    return out.getvalue(), what


def _specific(rng, fmt: str, data: bytes) -> tuple:
    if fmt in ("nii", "nii.gz"):
        raw = gzip.decompress(data) if fmt == "nii.gz" else data
        raw, what = nifti_mutation(rng, raw)
        return (gzip.compress(raw) if fmt == "nii.gz" else raw), what
    if fmt in ("nrrd", "mha"):
        return text_header_mutation(rng, data, fmt)
    return dicom_mutation(rng, data)


def mutate(rng, fmt: str, data: bytes) -> tuple:
    """-> (bytes, [descriptions]): one to three mutations of the seed file of ``fmt``; a format-specific one
    (header fields, tags) while the file still parses as its format, else a byte-level one."""
    how = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        what = None
        if rng.random() < (0.75 if fmt == "zip" else 0.6) and len(data) > 352:
            try:
                data, what = _specific(rng, fmt, data)
            except Exception:  # noqa: BLE001 - no longer parses as its format (an earlier mutation)
                what = None
        if what is None:
            data, what = rng.choice(GENERIC)(rng, data)
        how.append(what)
        if not data:
            break
    return data, how


# ------------------------------------------------------------------------------ checking an accepted upload
def _read_local(fmt: str, data: bytes):
    """The volume SimpleITK / the app's reader makes of the uploaded bytes, or None when it reads nothing."""
    from hybrid_ct.imaging.reader import read_image

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"x.{fmt}"
        p.write_bytes(data)
        try:
            if fmt == "zip":
                with zipfile.ZipFile(p) as z:
                    z.extractall(Path(d) / "x")
                folders = {f.parent for f in (Path(d) / "x").rglob("*") if f.is_file()}
                return read_image(str(next(iter(folders)))) if len(folders) == 1 else None
            return read_image(str(p))
        except Exception:  # noqa: BLE001 - unreadable here is a fact, not an error
            return None


def _same_volume(a, b) -> str:
    import SimpleITK as sitk

    if a.GetSize() != b.GetSize():
        return f"size {b.GetSize()} != {a.GetSize()}"
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-3):
        return f"spacing {b.GetSpacing()} != {a.GetSpacing()}"
    x, y = sitk.GetArrayViewFromImage(a).astype(np.float64), sitk.GetArrayViewFromImage(b).astype(np.float64)
    bad = ~np.isclose(x, y, atol=0.5)
    return f"{int(bad.sum())} voxels differ" if bad.any() else ""


# ------------------------------------------------------------------------------ the run
def _rss_mb(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        import psutil

        p = psutil.Process(pid)
        return round(sum(q.memory_info().rss for q in [p] + p.children(recursive=True)) / 2 ** 20, 1)
    except Exception:  # noqa: BLE001
        return None


def run(url: str, n: int = 100, seed: int = 32, out: Path | None = None, pid: int | None = None,
        timeout_s: float = 60, log=print) -> dict:
    import requests
    from server_fixture import read_image_bytes

    s = requests.Session()
    s.trust_env = False
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz_uploads_"))
    seeds = seed_files(work / "seeds")
    counts, statuses, failures, rss = Counter(), Counter(), [], [_rss_mb(pid)]
    t0 = time.time()
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)]
        data, how = mutate(rng, fmt, seeds[fmt])
        image_id = f"fuzz_{seed}_{i}"
        t = time.time()
        try:
            r = s.put(f"{url}/datastore/image", params={"image": image_id},
                      files={"file": (f"case.{fmt}", data)}, timeout=timeout_s)
            code, body = r.status_code, r.text
        except requests.RequestException as e:
            code, body = 0, repr(e)
        statuses[code] += 1
        verdict = ""
        if code == 0 or code >= 500:
            verdict = "crash" if code else "hang or connection error"
        elif 400 <= code < 500:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = None
            counts["4xx"] += 1
            if not detail or (isinstance(detail, str) and len(detail) < 10):
                verdict = f"4xx without a message: {body[:200]}"
        elif 200 <= code < 300:
            counts["2xx"] += 1
            if r.json().get("unchanged"):
                counts["2xx unchanged"] += 1
            g = s.get(f"{url}/datastore/image", params={"image": image_id}, timeout=timeout_s)
            stored = read_image_bytes(g.content, re.findall(r'filename="?([^";]+)', g.headers.get(
                "content-disposition", "x.nii.gz"))[0]) if g.status_code == 200 else None
            local = _read_local(fmt, data)
            if stored is None:
                verdict = f"accepted but not downloadable ({g.status_code})"
            elif local is None:
                counts["2xx, unreadable here"] += 1
            else:
                diff = _same_volume(local, stored)
                if diff:
                    verdict = f"accepted with another volume: {diff}"
            d = s.delete(f"{url}/datastore/image", params={"id": image_id}, timeout=timeout_s)
            if d.status_code != 200:
                verdict = verdict or f"could not delete the accepted image ({d.status_code})"
        if verdict:
            failures.append({"case": i, "format": fmt, "mutations": how, "status": code, "verdict": verdict,
                             "answer": body[:300], "seconds": round(time.time() - t, 2)})
            if out:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"crasher_{seed}_{i}.{fmt}").write_bytes(data)
                (out / f"crasher_{seed}_{i}.json").write_text(json.dumps(failures[-1], indent=2))
            log(f"FAIL case {i} {fmt} {how}: {verdict}")
            s = requests.Session()  # a failed request may have broken the pooled connection
            s.trust_env = False
        if (i + 1) % 50 == 0:
            rss.append(_rss_mb(pid))
            log(f"{i + 1}/{n} cases, {dict(statuses)}, {len(failures)} failures, server RSS {rss[-1]} MB")
    rss.append(_rss_mb(pid))
    return {"seed": seed, "n": n, "seconds": round(time.time() - t0, 1),
            "status_counts": dict(sorted(statuses.items())), "counts": dict(counts), "failures": failures, "rss_mb": rss}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="number of mutated uploads")
    ap.add_argument("--seed", type=int, default=32)
    ap.add_argument("--url", help="a running server (default: start one in a temp folder)")
    ap.add_argument("--pid", type=int, help="the running server's PID, for its RSS")
    ap.add_argument("--out", type=Path, default=Path("fuzz_crashers"), help="where crashers are written")
    ap.add_argument("--json", type=Path, help="write the summary here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from server_fixture import start_server, stop_server

    server = None
    if not args.url:
        server = start_server(Path(tempfile.mkdtemp(prefix="fuzz_server_")))
        args.url, args.pid = server.url, server.proc.pid
    try:
        res = run(args.url, args.n, args.seed, args.out, args.pid)
    finally:
        if server is not None:
            stop_server(server)
    summary = {k: v for k, v in res.items() if k != "failures"}
    summary["failures"] = len(res["failures"])
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
