"""Fuzz: hundreds of malformed or odd inputs through ``prepare csv`` and inference; nothing lost, nothing leaked.

The test writes its own seed files (a DICOM whose every text element, date and UID carries a marker; 16-bit PNG;
NIfTI), derives mutated files from them (truncations, byte flips in header and pixel data, wrong dimensions, bad
VRs, bad pitches and windows, compressed syntax without a decoder, a deflate bomb, palette/RGB/16-bit PNGs, NaN
NIfTI, non-UTF-8 names, lossy conversions such as a complex NIfTI or a multi-page TIFF, ...), adds a good 16-bit
DICOM at the 100-Mpixel decode cap, and runs, each in a subprocess that measures its peak memory (VmHWM):

- ``python -m scripts.data.prepare csv --on-error skip`` over a CSV that lists every file;
- inference (``configs/inference.json``, tiny resnet18 ensemble) over the same CSV and over the folder.

It asserts that every file gets an OK or an error row, that the run completes (datalists, report, predictions),
that the untouched seed copies come out OK, that no marker appears in any output file or log, that no file takes
longer than :data:`PER_FILE_S`, and that peak memory stays under :data:`PEAK_MB`.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps

REPO = Path(__file__).resolve().parents[1]
MARKERS = (b"QZXMARK", b"19010203", b"3680043.8.498.77345")  # text, date, UID root planted in the seed DICOM
UID_ROOT = "1.2.826.0.1.3680043.8.498.77345."
PER_FILE_S = 5.0  # wall-clock bound for one file (read + checks + crop)
# peak resident memory of one run, with the 100-Mpixel image of the corpus (cap.dcm, 191 MB stored) among the inputs
PEAK_MB = {"prepare": 500, "inference": 1500}  # inference: torch + monai + the model (about 1 GB) + the largest image
N = 96  # seed image edge (px), pitch 0.1 mm; ROIs 64 px at 0.1 mm
CAP = 10000  # edge of the image at the decode cap: 10000 x 10000 = 100 Mpixel, the largest image accepted by default


# -- seed files -----------------------------------------------------------------------------------------------------


def _pixels(seed: int = 0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal((N, N)), 2.0)
    return np.round((x - x.min()) / (x.max() - x.min()) * 4000 + 50).astype(np.uint16)


def _marked_dataset(pixels: np.ndarray | None = None, **attrs):
    """A small MG dataset with a marker in every text element, date and UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    pixels = _pixels() if pixels is None else pixels
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID_ROOT + "1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = UID_ROOT + "1"
    ds.StudyInstanceUID = UID_ROOT + "2"
    ds.SeriesInstanceUID = UID_ROOT + "3"
    ds.FrameOfReferenceUID = UID_ROOT + "4"
    ds.PatientName = "QZXMARK^JANE"
    ds.PatientID = "QZXMARK-ID"
    ds.OtherPatientIDs = "QZXMARK-OTHER"
    ds.PatientBirthDate = ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "19010203"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "QZXMARK-ACC"
    ds.StudyID = "QZXMARK"
    ds.InstitutionName = "QZXMARK Hospital"
    ds.InstitutionAddress = "QZXMARK Street 1"
    ds.ReferringPhysicianName = "QZXMARK^DOC"
    ds.OperatorsName = "QZXMARK^OP"
    ds.StudyDescription = "QZXMARK study"
    ds.SeriesDescription = "QZXMARK series"
    ds.Modality = "MG"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.1, 0.1]
    ds.WindowCenter, ds.WindowWidth = 2048.0, 4096.0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        elif isinstance(v, str) or (isinstance(v, list) and any(isinstance(x, str) for x in v)):
            _raw(ds, k, "\\".join(map(str, v)) if isinstance(v, list) else v)
        else:
            setattr(ds, k, v)
    return ds


def _raw(ds, keyword: str, text: str) -> None:
    """Store ``text`` as the attribute's raw bytes, unchecked (invalid numbers, stray text)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    tag = Tag(tag_for_keyword(keyword))
    data = text.encode("latin-1")
    data += b" " * (len(data) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(data), data, 0, False, True)


def _save(ds, path: Path) -> Path:
    import pydicom.config

    with pydicom.config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    return path


def _deflate_bomb(path: Path, n: int = 16000) -> None:
    """A ~0.5 MB deflated DICOM whose pixel data inflate to n x n x 16 bit (zeros), streamed (no big buffer)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID_ROOT + "9"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    ds = _marked_dataset()
    del ds.PixelData
    ds.Rows = ds.Columns = n
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    nbytes = n * n * 2
    comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    m = DicomBytesIO()
    m.is_little_endian, m.is_implicit_VR = True, False
    write_file_meta_info(m, meta, enforce_standard=True)
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM" + m.getvalue())
        f.write(comp.compress(body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + nbytes.to_bytes(4, "little")))
        zero = bytes(1 << 20)
        for _ in range(nbytes >> 20):
            f.write(comp.compress(zero))
        f.write(comp.compress(bytes(nbytes & ((1 << 20) - 1))))
        f.write(comp.flush())


def _flip(data: bytes, lo: int, hi: int, seed: int, n: int = 2) -> bytes:
    rng = np.random.default_rng(seed)
    b = bytearray(data)
    for pos in rng.integers(lo, max(hi, lo + 1), size=n):
        b[int(pos)] ^= int(rng.integers(1, 256))
    return bytes(b)


def _set_vr(data: bytes, tag: tuple[int, int], vr: bytes) -> bytes:
    key = tag[0].to_bytes(2, "little") + tag[1].to_bytes(2, "little")
    i = data.find(key, 132)
    assert i > 0, tag
    return data[: i + 4] + vr + data[i + 6 :]


def make_fuzz_files(folder: Path, flips: int = 1) -> dict[str, list[str]]:
    """Write the seed files and their mutations into ``folder``; returns {mutation class: [file names]}.

    ``flips`` scales the number of random byte-flip variants (1: the default subset, 224 files; 4: 554)."""
    import nibabel as nib
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    classes: dict[str, list[str]] = {}

    def add(cls: str, name: str, data: bytes | None = None) -> Path:
        p = folder / name
        if data is not None:
            p.write_bytes(data)
        classes.setdefault(cls, []).append(name)
        return p

    # seeds (kept as good copies: they must come out OK)
    seed_dcm = _save(_marked_dataset(), add("seed", "seed.dcm"))
    dcm = seed_dcm.read_bytes()
    px_at = dcm.rfind(b"\xe0\x7f\x10\x00")
    png16 = folder / "seed16.png"
    Image.fromarray(_pixels(1) * 16).save(png16)
    add("seed", "seed16.png")
    nii = nib.Nifti1Image(_pixels(2).astype(np.float32).T, np.diag([0.1, 0.1, 1.0, 1.0]))
    nib.save(nii, str(add("seed", "seed.nii.gz")))
    nib.save(nii, str(add("seed", "seed_raw.nii")))
    add("seed", "seed8.png")
    Image.fromarray((_pixels(3) // 16).astype(np.uint8)).save(folder / "seed8.png")

    # DICOM: truncations
    for k, cut in enumerate([0, 1, 64, 128, 131, 132, 140, 200, 300, px_at - 10, px_at + 4, px_at + 12]):
        add("dicom-truncated", f"trunc_{k:02d}.dcm", dcm[:cut])
    for k, frac in enumerate(np.linspace(0.5, 0.999, 8)):
        add("dicom-truncated", f"trunc_px_{k:02d}.dcm", dcm[: px_at + 12 + int(frac * (len(dcm) - px_at - 12))])
    # DICOM: byte flips in the header and in the pixel data
    for k in range(60 * flips):
        add("dicom-flip-header", f"flip_hdr_{k:03d}.dcm", _flip(dcm, 132, px_at, seed=k, n=1 + k % 3))
    for k in range(20 * flips):
        add("dicom-flip-pixels", f"flip_px_{k:03d}.dcm", _flip(dcm, px_at + 12, len(dcm), seed=1000 + k, n=20))
    # DICOM: bad VRs (the case: the VR of TransferSyntaxUID becomes "5I")
    for k, (tag, vr) in enumerate(
        [
            ((0x0002, 0x0010), b"5I"),
            ((0x0010, 0x0010), b"XX"),
            ((0x0010, 0x0020), b"UL"),
            ((0x0028, 0x0030), b"US"),
            ((0x0028, 0x0010), b"DS"),
            ((0x0028, 0x0004), b"OB"),
            ((0x0008, 0x0080), b"SQ"),
            ((0x7FE0, 0x0010), b"UN"),
            ((0x0020, 0x000D), b"\x00\x00"),
        ]
    ):
        add("dicom-bad-vr", f"vr_{k:02d}.dcm", _set_vr(dcm, tag, vr))
    # DICOM: wrong dimensions
    for k, (rows, cols) in enumerate([(N + 1, N), (N, N * 2), (1, 1), (0, N), (N // 2, N), (65535, 65535)]):
        _save(_marked_dataset(Rows=rows, Columns=cols), add("dicom-dimensions", f"dims_{k:02d}.dcm"))
    # DICOM: bad pitches and magnification
    pitches = [
        {"PixelSpacing": [1e-7, 1e-7]},
        {"PixelSpacing": [1e-5, 1e-5]},
        {"PixelSpacing": [0.0, 0.0]},
        {"PixelSpacing": [-0.1, 0.1]},
        {"PixelSpacing": [1000.0, 1000.0]},
        {"PixelSpacing": "0.1"},
        {"PixelSpacing": ["nan", "nan"]},
        {"PixelSpacing": ["inf", "0.1"]},
        {"PixelSpacing": ["QZXMARK", "0.1"]},
        {"PixelSpacing": None, "ImagerPixelSpacing": [0.07, 0.07], "EstimatedRadiographicMagnificationFactor": 1e9},
        {"PixelSpacing": None, "ImagerPixelSpacing": [0.07, 0.07], "EstimatedRadiographicMagnificationFactor": 0},
        {"PixelSpacing": None, "ImagerPixelSpacing": [0.07, 0.07], "EstimatedRadiographicMagnificationFactor": -2},
        {"PixelSpacing": None, "ImagerPixelSpacing": [0.07, 0.07], "EstimatedRadiographicMagnificationFactor": 1.5},
        {"PixelSpacing": None},
    ]
    for k, attrs in enumerate(pitches):
        _save(_marked_dataset(**attrs), add("dicom-pitch", f"pitch_{k:02d}.dcm"))
    # DICOM: windows, rescale, photometric text, constant pixels
    header = [
        {"WindowCenter": "nan", "WindowWidth": "nan"},
        {"WindowWidth": 0.0},
        {"WindowWidth": -100.0},
        {"WindowCenter": "inf"},
        {"RescaleSlope": 0.0, "RescaleIntercept": 0.0},
        {"RescaleSlope": 1.0, "RescaleIntercept": "inf"},
        {"RescaleSlope": "nan", "RescaleIntercept": 0.0},
        {"VOILUTFunction": "QZXMARK"},
        {"PhotometricInterpretation": "QZXMARK^JANE"},
        {"PhotometricInterpretation": "RGB"},
        {"SamplesPerPixel": 3},
        {"NumberOfFrames": 4},
        {"WindowCenter": 1e7, "WindowWidth": 10.0},
    ]
    for k, attrs in enumerate(header):
        _save(_marked_dataset(**attrs), add("dicom-header-values", f"hdr_{k:02d}.dcm"))
    for k, value in enumerate([0, 4095]):
        _save(_marked_dataset(np.full((N, N), value, np.uint16)), add("blank", f"blank_{k}.dcm"))
    # DICOM: compressed transfer syntaxes (no decoder installed -> clear error; installed -> garbage codestream)
    for k, uid in enumerate(["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50"]):
        from scripts.data.prepare.dicom_writer import write_dicom

        write_dicom(folder / f"compressed_{k}.dcm", _pixels(), pixel_spacing=(0.1, 0.1), transfer_syntax=uid)
        classes.setdefault("compressed", []).append(f"compressed_{k}.dcm")
    _deflate_bomb(add("compressed", "deflate_bomb.dcm"))
    # PNG: modes, truncations, flips
    base = _pixels(4)
    gray8 = (base // 16).astype(np.uint8)
    Image.fromarray(gray8).convert("P").save(add("png-modes", "palette_gray.png"))
    pal = Image.fromarray(gray8, "P")
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, (i * 7) % 256)])
    pal.save(add("png-modes", "palette_colour.png"))
    Image.fromarray(np.stack([gray8] * 3, -1)).save(add("png-modes", "rgb.png"))
    Image.fromarray(np.stack([gray8] * 4, -1)).save(add("png-modes", "rgba.png"))
    Image.fromarray(gray8).convert("LA").save(add("png-modes", "la.png"))
    Image.fromarray(gray8 > 120).save(add("png-modes", "bilevel.png"))
    Image.fromarray(np.zeros((N, N), np.uint16)).save(add("blank", "blank16.png"))
    Image.fromarray(np.full((N, N), 255, np.uint8)).save(add("blank", "white8.png"))
    Image.fromarray(base[:, :1].copy()).save(add("png-modes", "one_column.png"))
    png = png16.read_bytes()
    for k, cut in enumerate([8, 16, 33, 60, len(png) // 2, len(png) - 12, len(png) - 1]):
        add("png-truncated", f"png_trunc_{k}.png", png[:cut])
    for k in range(20 * flips):
        add("png-flip", f"png_flip_{k:03d}.png", _flip(png, 8, len(png), seed=2000 + k, n=1 + k % 4))
    # NIfTI
    good = _pixels(5).astype(np.float32)
    variants = {
        "nan": good.copy(),
        "inf": good.copy(),
        "constant": np.full_like(good, 7.0),
        "pixdim0": good,
        "pixdim_tiny": good,
        "volume": np.stack([good] * 3, -1),
    }
    variants["nan"][10, 10] = np.nan
    variants["inf"][20, 20] = np.inf
    for name, arr in variants.items():
        aff = np.diag([0.1, 0.1, 1.0, 1.0])
        img = nib.Nifti1Image(arr.T if arr.ndim == 2 else arr.transpose(1, 0, 2), aff)
        if name == "pixdim_tiny":
            img = nib.Nifti1Image(arr.T, np.diag([1e-7, 1e-7, 1.0, 1.0]))
        path = add("nifti" if name not in ("constant",) else "blank", f"nii_{name}.nii")
        nib.save(img, str(path))
        if name == "pixdim0":  # pixdim[1:3] = 0 and no q/s-form, patched in the raw header (nibabel would fix it)
            b = bytearray(path.read_bytes())
            b[80:88] = np.zeros(2, "<f4").tobytes()
            b[252:256] = np.zeros(2, "<i2").tobytes()
            path.write_bytes(bytes(b))
    gz = (folder / "seed.nii.gz").read_bytes()
    for k, cut in enumerate([10, 100, len(gz) // 2, len(gz) - 4]):
        add("nifti-truncated", f"nii_trunc_{k}.nii.gz", gz[:cut])
    raw = (folder / "seed_raw.nii").read_bytes()
    for k in range(10 * flips):
        add("nifti-flip", f"nii_flip_{k:02d}.nii", _flip(raw, 0, 348, seed=3000 + k, n=2))
    # the largest image accepted (the 100-Mpixel cap), 16-bit, with the markers: read in bounded memory and time
    c = np.arange(CAP, dtype=np.uint32)
    cap = np.empty((CAP, CAP), dtype=np.uint16)
    for r0 in range(0, CAP, 1000):
        r = np.arange(r0, r0 + 1000, dtype=np.uint32)[:, None]
        cap[r0 : r0 + 1000] = (r * 7 + c * 3 + (c % 64) * 11) % 4000 + 50
    _save(_marked_dataset(cap), add("cap", "cap.dcm"))
    del cap
    # conversions that would lose information (complex, colour, multi-channel, multi-frame, negative values)
    from tests.test_prepare_conversions import write_lossy_files

    for name in write_lossy_files(folder):
        classes.setdefault("lossy", []).append(name)
    # odd names (copies of good seeds) and entries a folder scan leaves out
    for k, name in enumerate(["with space.dcm", "comma,quote'.dcm", "unicode_é.dcm", "-leading-dash.dcm"]):
        add("odd-names", name, dcm)
    odd = os.fsdecode(b"latin1_\xe9.dcm")
    (folder / odd).write_bytes(dcm)
    classes.setdefault("odd-names-folder-only", []).append(odd)
    (folder / "empty.dcm").write_bytes(b"")
    classes.setdefault("empty", []).append("empty.dcm")
    return classes


# -- the subprocess harness -----------------------------------------------------------------------------------------


def _peak_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM (Linux; ru_maxrss there keeps the parent's peak across
    exec), else ``resource.getrusage`` ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _harness_prepare(csv_path: str, out: str, result: str) -> None:
    import scripts.data.prepare.staging as pl
    from scripts.data.prepare.__main__ import main

    times: dict[str, float] = {}
    original = pl.run_cases

    def timed_run_cases(specs, out_folder, report):
        def timed_specs():
            for spec in specs:
                render = spec.render

                def timed(render=render, spec=spec):
                    t = time.perf_counter()
                    try:
                        return render()
                    finally:
                        times[spec.file] = time.perf_counter() - t

                spec.render = timed
                yield spec

        return original(timed_specs(), out_folder, report)

    pl.run_cases = timed_run_cases
    rc = main(["csv", "--in", csv_path, "--out", out, "--size", "64", "--on-error", "skip", "--folds", "2"])
    peak = _peak_mb()
    Path(result).write_text(json.dumps({"rc": rc, "times": times, "peak_mb": peak}))


def _harness_infer(bundle: str, out: str, result: str, mode: str, source: str) -> None:
    import logging

    from monai.bundle import ConfigWorkflow

    import scripts.data.inputs as inf

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    times: dict[str, float] = {}
    original = inf.LoadInputd.__call__

    def timed(self, data):
        t = time.perf_counter()
        out_ = original(self, data)
        times[str(out_["case"])] = time.perf_counter() - t
        return out_

    inf.LoadInputd.__call__ = timed
    wf = ConfigWorkflow(
        config_file=str(REPO / "configs" / "inference.json"),
        meta_file=str(REPO / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=bundle,
        output_dir=out,
        arch="resnet18",
        num_members=2,
        image_size=64,
        roi_size=64,
        amp=False,
        batch_size=16,
        **{mode: source},
    )
    wf.initialize()
    try:
        wf.run()
        rc = 0
    except Exception as e:  # recorded: the test asserts on it
        print(f"run failed: {type(e).__name__}", file=sys.stderr)
        rc = 1
    finally:
        wf.finalize()
    peak = _peak_mb()
    Path(result).write_text(json.dumps({"rc": rc, "times": times, "peak_mb": peak}))


def _run(args: list[str], cwd: Path, log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    t = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *args], cwd=cwd, env=env, stdout=f, stderr=f, timeout=600
        )
    assert proc.returncode == 0, f"harness {args[0]} crashed (rc {proc.returncode}); log: {log.read_text()[-3000:]}"
    result = json.loads(Path(args[3]).read_text())  # both harnesses take the result file as their third argument
    result["wall_s"] = time.perf_counter() - t
    return result


def _leaks(root: Path) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            found += [f"{p}: {m.decode()}" for m in MARKERS if m in data]
    return found


# -- the test -------------------------------------------------------------------------------------------------------


def _write_csvs(folder: Path, names: list[str]) -> tuple[Path, Path]:
    prep, infer = folder / "prepare.csv", folder / "infer.csv"
    with open(prep, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "patient", "x", "y", "spacing_mm"])
        for k, name in enumerate(names):
            spacing = "0.1" if name.endswith(".png") else ""
            w.writerow([name, k % 2, f"p{k:04d}", N // 2, N // 2, spacing])
    with open(infer, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "spacing_mm", "case"])
        for k, name in enumerate(names):
            spacing = "0.1" if name.endswith(".png") else ""
            w.writerow([name, N // 2, N // 2, spacing, f"f{k:04d}"])
    return prep, infer


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    import torch

    from scripts.model.network import Ensemble

    root = tmp_path_factory.mktemp("fuzz_bundle")
    torch.manual_seed(0)
    (root / "models").mkdir()
    torch.save(Ensemble(2, "resnet18").eval().state_dict(), root / "models" / "model.pt")
    return root


def _fuzz(tmp_path: Path, bundle: Path, flips: int) -> dict:
    folder = tmp_path / "inputs"
    classes = make_fuzz_files(folder, flips=flips)
    csv_names = sorted(n for c, ns in classes.items() if c != "odd-names-folder-only" for n in ns)
    assert len(csv_names) + 1 >= 200
    assert len(_leaks(folder)) > 100, "the marker detector does not see the planted markers"
    prep_csv, infer_csv = _write_csvs(folder, csv_names)
    (folder / "notes.txt").write_text("left out")
    (folder / "film.jpg").write_bytes(b"\xff\xd8\xff")
    (folder / "noext_empty").write_bytes(b"")
    os.symlink(folder / "missing-target.png", folder / "dangling.png")
    logs = tmp_path / "logs"
    logs.mkdir()

    # prepare: every CSV line is an item or an error; the run writes datalists and its report
    res_p = _run(
        ["prepare", str(prep_csv), str(tmp_path / "prep"), str(logs / "prep.json")], tmp_path, logs / "prepare.log"
    )
    assert res_p["rc"] == 0, (logs / "prepare.log").read_text()[-2000:]
    report = json.loads((tmp_path / "prep" / "prepare_report.json").read_text())
    assert report["status"] == "ok"
    prepared_lines = set()
    for task_file in (tmp_path / "prep").glob("datalist_*.json"):
        dl = json.loads(task_file.read_text())
        prepared_lines |= {it["csv_line"] for split in ("training", "test") for it in dl.get(split, [])}
    error_lines = {int(e["file"].split(" line ")[1].split(":")[0]) for e in report["errors"]}
    assert prepared_lines.isdisjoint(error_lines)
    assert prepared_lines | error_lines == set(range(2, len(csv_names) + 2)), "a CSV line has neither result"
    line_of = {name: k + 2 for k, name in enumerate(csv_names)}
    must_ok = (
        classes["seed"] + classes["odd-names"] + classes["cap"] + ["palette_gray.png", "bilevel.png", "pitch_12.dcm"]
    )
    must_fail = (
        classes["blank"] + classes["nifti"] + classes["dicom-pitch"][:12] + classes["dicom-header-values"]
        + classes["compressed"] + [n for n in classes["png-modes"] if n not in must_ok] + classes["empty"]
        + classes["lossy"]
    )  # fmt: skip
    assert {n for n in must_ok if line_of[n] in prepared_lines} == set(must_ok)
    failed_ok = [n for n in must_fail if line_of[n] not in error_lines]
    assert not failed_ok, f"passed prepare: {failed_ok}"

    # inference over the CSV and over the folder: one row per input, seeds OK, degenerate inputs are error rows
    res_c = _run(
        ["infer", str(bundle), str(tmp_path / "infer_csv"), str(logs / "infer_csv.json"), "input_csv", str(infer_csv)],
        tmp_path,
        logs / "infer_csv.log",
    )
    res_d = _run(
        ["infer", str(bundle), str(tmp_path / "infer_dir"), str(logs / "infer_dir.json"), "input_dir", str(folder)],
        tmp_path,
        logs / "infer_dir.log",
    )
    assert res_c["rc"] == 0 and res_d["rc"] == 0
    with open(tmp_path / "infer_csv" / "predictions.csv", newline="", encoding="utf-8") as f:
        rows_c = {r["case"]: r for r in csv.DictReader(f)}
    assert sorted(rows_c) == [f"f{k:04d}" for k in range(len(csv_names))]
    assert {r["status"] for r in rows_c.values()} <= {"ok", "error"}
    status_c = {name: rows_c[f"f{k:04d}"]["status"] for k, name in enumerate(csv_names)}
    for name in must_ok:
        assert status_c[name] == "ok", (name, rows_c[f"f{line_of[name] - 2:04d}"]["error"])
    for name in must_fail:
        assert status_c[name] == "error", f"{name} got a prediction"
    # one rule in both: a file prepare refuses gets an error row in inference, and the other way round
    disagree = [n for n in csv_names if (line_of[n] in prepared_lines) != (status_c[n] == "ok")]
    assert not disagree, f"prepare and inference disagree on {disagree[:10]}"
    with open(tmp_path / "infer_dir" / "predictions.csv", newline="", encoding="utf-8") as f:
        rows_d = {r["case"]: r for r in csv.DictReader(f)}
    assert "latin1_\\xe9" in rows_d and rows_d["latin1_\\xe9"]["status"] == "ok"
    assert rows_d["empty"]["status"] == "error"
    log_d = (logs / "infer_dir.log").read_text(errors="replace")
    for name, reason in [
        ("notes.txt", "unsupported suffix"),
        ("film.jpg", "unsupported suffix"),
        ("noext_empty", "empty file"),
        ("dangling.png", "dangling symbolic link"),
    ]:
        assert f"{name} left out: {reason}" in log_d, name

    # no marker in any output or log; per-file time and peak memory bounded
    leaks = _leaks(tmp_path / "prep") + _leaks(tmp_path / "infer_csv") + _leaks(tmp_path / "infer_dir") + _leaks(logs)
    assert not leaks, leaks[:5]
    for res, run in ((res_p, "prepare"), (res_c, "inference"), (res_d, "inference")):
        slow = {k: v for k, v in res["times"].items() if v > PER_FILE_S}
        assert not slow, slow
        assert res["peak_mb"] < PEAK_MB[run], (run, res["peak_mb"])
    figures = {
        "files": len(csv_names) + 1,
        "classes": {c: len(v) for c, v in classes.items()},
        "prepare": {"ok": len(prepared_lines), "error": len(error_lines), "peak_mb": round(res_p["peak_mb"])},
        "inference_csv": {
            "ok": sum(s == "ok" for s in status_c.values()),
            "error": sum(s == "error" for s in status_c.values()),
            "peak_mb": round(res_c["peak_mb"]),
        },
        "inference_dir": {
            "rows": len(rows_d),
            "ok": sum(r["status"] == "ok" for r in rows_d.values()),
            "peak_mb": round(res_d["peak_mb"]),
        },
        "max_file_s": round(max(max(r["times"].values()) for r in (res_p, res_c, res_d)), 3),
        "wall_s": [round(r["wall_s"], 1) for r in (res_p, res_c, res_d)],
    }
    print(json.dumps(figures))
    return figures


def test_fuzz_inputs_prepare_and_inference(tmp_path, bundle):
    """224 files, every mutation class and an image at the 100-Mpixel cap: nothing lost, nothing leaked, bounded
    time and memory."""
    _fuzz(tmp_path, bundle, flips=1)


@pytest.mark.exhaustive
def test_fuzz_inputs_more_byte_flips(tmp_path, bundle):
    """The same with four times the random byte-flip variants (554 files)."""
    _fuzz(tmp_path, bundle, flips=4)


# harness entry, as _run starts it: PYTHONPATH=<repository> python tests/test_fuzz_inputs.py {prepare,infer} ...
if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        _harness_prepare(*sys.argv[2:5])
    else:
        _harness_infer(*sys.argv[2:7])
