"""Input memory: peak resident memory of preparing, and of inferring on, one large image, per case and format.

For each case the benchmark writes one image file (16-bit; a smooth pattern with 12 bits used) and runs, each in its
own subprocess so that each peak is its own:

- ``prepare``: ``python -m scripts.data.prepare csv`` over a two-row CSV (two ROIs of two patients on the image, so
  the image is decoded once and cropped twice; ``--max-megapixels`` at its default, the 100-Mpixel cap);
- ``inference``: the bundle's inference (``configs/inference.json`` through ``ConfigWorkflow``; a random 2-member
  resnet18 ensemble, 128 px) over an ``input_csv`` that names the same image and a ROI centre.

``process_peak_rss_mb`` is the subprocess's peak resident set (``VmHWM``) over its whole life, imports included;
``growth_mb`` is it minus the resident set after the imports (numpy, scipy, pydicom, PIL, nibabel; for inference
also torch, MONAI and the configuration's modules): what the image itself costs. The ``dicom-tiny`` case
(256 x 256) is the floor of each mode.

    python -m benchmarks.input_memory                                   # every case, both modes (about 4 minutes)
    python -m benchmarks.input_memory --cases dicom-8000 dicom-cap --modes prepare
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO,
    LoadMonitor,
    Run,
    base_parser,
    current_rss_mb,
    run_json_subprocess,
    setup,
    table,
    vm_hwm_mb,
)

NAME = "input_memory"
PITCH_MM = 0.07
# case -> (format, rows, cols)
CASES = {
    "dicom-tiny": ("dicom", 256, 256),
    "dicom-ordinary": ("dicom", 4096, 3328),  # a full-field digital mammogram (e.g. 0.07 mm)
    "dicom-8000": ("dicom", 8000, 8000),  # 64 Mpixel
    "dicom-cap": ("dicom", 10000, 10000),  # 100 Mpixel: the largest image the default cap accepts
    "png16-cap": ("png16", 10000, 10000),
    "nifti-cap": ("nifti", 10000, 10000),
}
MODES = ("prepare", "inference")
MEMORY_NOTE = (
    "process_peak_rss_mb = peak resident set (VmHWM) of the subprocess, imports included; "
    "growth_mb = process_peak_rss_mb - resident set after imports"
)
COLUMNS = ["case", "format", "mpixel", "file_mb", "mode", "process_peak_rss_mb", "growth_mb", "seconds", "status"]


def pattern(rows: int, cols: int) -> Any:
    """A non-constant 16-bit image with 12 bits used (a diagonal ramp with a ripple), built row block by row block."""
    import numpy as np

    out = np.empty((rows, cols), dtype=np.uint16)
    c = np.arange(cols, dtype=np.uint32)
    for r0 in range(0, rows, 1024):
        r = np.arange(r0, min(r0 + 1024, rows), dtype=np.uint32)[:, None]
        out[r0 : r0 + len(r)] = (r * 7 + c * 3 + (c % 64) * 11) % 4000 + 50
    return out


def write_case(folder: Path, case: str) -> Path:
    """Write the image of ``case`` into ``folder``; returns its path."""
    import numpy as np

    fmt, rows, cols = CASES[case]
    folder.mkdir(parents=True, exist_ok=True)
    pixels = pattern(rows, cols)
    if fmt == "dicom":
        from scripts.data.prepare.dicom_writer import write_dicom

        return write_dicom(folder / f"{case}.dcm", pixels, bits_stored=12, pixel_spacing=(PITCH_MM, PITCH_MM))
    if fmt == "png16":
        from PIL import Image

        path = folder / f"{case}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        return path
    import nibabel as nib

    path = folder / f"{case}.nii"  # uncompressed, int16 as stored; array axis 0 = columns (x)
    nib.save(nib.Nifti1Image(pixels.astype(np.int16).T, np.diag([PITCH_MM, PITCH_MM, 1.0, 1.0])), str(path))
    return path


def write_tables(folder: Path, image: Path, rows: int, cols: int) -> tuple[Path, Path]:
    """The two-ROI preparation CSV and the one-ROI inference CSV of ``image``."""
    spacing = "" if image.suffix in (".dcm", ".nii") else str(PITCH_MM)
    prep, infer = folder / "prepare.csv", folder / "infer.csv"
    with open(prep, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "patient", "x", "y", "spacing_mm"])
        w.writerow([image.name, 0, "a", cols // 3, rows // 3, spacing])
        w.writerow([image.name, 1, "b", 2 * cols // 3, 2 * rows // 3, spacing])
    with open(infer, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "spacing_mm", "case"])
        w.writerow([image.name, cols // 2, rows // 2, spacing, "c0"])
    return prep, infer


def _import_readers() -> None:
    import nibabel  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import pydicom  # noqa: F401
    import scipy.ndimage  # noqa: F401

    import scripts.data.prepare.__main__  # noqa: F401
    import scripts.data.prepare.csv_source  # noqa: F401


def child_prepare(csv_path: Path, out: Path) -> dict:
    """Prepare the CSV's ROIs (the command line's ``main``); peak and base resident set."""
    _import_readers()
    from scripts.data.prepare.__main__ import main

    base = current_rss_mb()
    t0 = time.perf_counter()
    rc = main(["csv", "--in", str(csv_path), "--out", str(out), "--folds", "2", "--test-fraction", "0.5"])
    secs = time.perf_counter() - t0
    status = "ok"
    report = out / "prepare_report.json"
    if rc != 0:
        status = f"rc {rc}"
    elif report.is_file():
        errors = json.loads(report.read_text())["errors"]
        status = "ok" if not errors else f"error: {errors[0]['reason'][:80]}"
    return {"seconds": secs, "base_rss_mb": base, "process_peak_rss_mb": vm_hwm_mb(), "status": status}


def child_inference(csv_path: Path, bundle: Path, out: Path) -> dict:
    """The bundle's inference over the CSV (one image); peak and base resident set."""
    _import_readers()
    import monai  # noqa: F401
    import torch  # noqa: F401
    from monai.bundle import ConfigWorkflow

    import scripts.data.inputs  # noqa: F401
    import scripts.engine.handlers  # noqa: F401
    import scripts.evaluation.handlers  # noqa: F401
    import scripts.model.network  # noqa: F401

    t0 = time.perf_counter()
    wf = ConfigWorkflow(
        config_file=str(REPO / "configs" / "inference.json"),
        meta_file=str(REPO / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(bundle),
        output_dir=str(out),
        arch="resnet18",
        num_members=2,
        image_size=128,
        roi_size=128,
        amp=False,
        batch_size=1,
        input_csv=str(csv_path),
    )
    wf.initialize()
    base = current_rss_mb()  # imports, the configuration and the loaded model
    wf.run()
    wf.finalize()
    secs = time.perf_counter() - t0
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    status = "ok" if rows and all(r["status"] == "ok" for r in rows) else f"error: {rows[0]['error'][:80]}"
    return {"seconds": secs, "base_rss_mb": base, "process_peak_rss_mb": vm_hwm_mb(), "status": status}


def make_bundle(root: Path) -> Path:
    """A bundle folder with a random 2-member resnet18 ensemble (memory, not accuracy, is measured)."""
    import torch

    from scripts.model.network import Ensemble

    torch.manual_seed(0)
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(Ensemble(2, "resnet18").eval().state_dict(), root / "models" / "model.pt")
    return root


def main(argv: list[str] | None = None) -> dict:
    ap = base_parser(NAME, __doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES), help="images to measure")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--child", nargs="+", default=None, help=__import__("argparse").SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        mode, *paths = args.child
        out = child_prepare(*map(Path, paths)) if mode == "prepare" else child_inference(*map(Path, paths))
        print(json.dumps(out))
        return out
    if args.smoke:
        args.cases = ["dicom-tiny"]
    device = setup(args)
    with Run(NAME, args, device) as run, tempfile.TemporaryDirectory(prefix="bench_input_memory_") as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(tmp / "bundle") if "inference" in args.modes else None
        for case in args.cases:
            fmt, rows, cols = CASES[case]
            folder = tmp / case
            t0 = time.perf_counter()
            image = write_case(folder, case)
            print(f"# {case}: {rows} x {cols} {fmt} written in {time.perf_counter() - t0:.1f} s", flush=True)
            prep_csv, infer_csv = write_tables(folder, image, rows, cols)
            for mode in args.modes:
                child = ["-m", "benchmarks.input_memory", "--child", mode]
                if mode == "prepare":
                    child += [str(prep_csv), str(folder / "prepared")]
                else:
                    child += [str(infer_csv), str(bundle), str(folder / "eval")]
                mon = LoadMonitor()
                mon.start()
                res = run_json_subprocess(child, timeout=900)
                row = {
                    "case": case,
                    "format": fmt,
                    "mpixel": round(rows * cols / 1e6, 1),
                    "file_mb": round(image.stat().st_size / 2**20, 1),
                    "mode": mode,
                    "process_peak_rss_mb": round(res["process_peak_rss_mb"], 1),
                    "growth_mb": round(res["process_peak_rss_mb"] - res["base_rss_mb"], 1),
                    "seconds": round(res["seconds"], 2),
                    "status": res["status"],
                    "foreign_cores": mon.stop()["foreign_cores"],
                }
                run.rows.append(row)
                print(table([row], COLUMNS), flush=True)
            image.unlink()  # keep at most one large file on disk
        print()
        print(table(run.rows, COLUMNS, "Peak memory per input image"))
        print(MEMORY_NOTE)
    return run.payload


if __name__ == "__main__":
    main()
