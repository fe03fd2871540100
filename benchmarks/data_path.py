"""Data path: images/s from files to tensors, MONAI ``LoadImage`` against the bundle's loaders, with and without cache.

Files are written by the benchmark into a temporary folder: 16-bit PNG ROIs (the bundle's ROI format), DICOM ROIs
of the same size, and full-field images (16-bit PNG and DICOM, about 4000 x 3000, 12 bits stored). Readers:

* ``LoadImage``: MONAI's ``LoadImage`` with the reader pinned (``PILReader`` for PNG, ``PydicomReader`` for DICOM);
* ``LoadROId``: the bundle's training loader (read, scale to [0, 1], resize to ``image_size``, float32);
* ``read_roi_png`` / ``read_dicom``: the bundle's file readers (``scripts.data.imageio``, ``scripts.data.prepare.dicom_io``);
* ``pydicom``: ``dcmread(...).pixel_array`` alone, the floor for DICOM.

The cache section iterates the bundle's training preprocessing (``LoadROId`` + random augmentation) through a
``DataLoader`` (batch 16, no workers, as the config) over ``Dataset`` (no cache), ``CacheDataset`` (the config's
default) and ``PersistentDataset`` (first epoch writes the cache, later epochs read it). The last table compares
the cached epoch's images/s with the training throughput measured by ``train_throughput.py`` (its JSON, when
present) to say whether loading could limit an epoch.

    python -m benchmarks.data_path
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks._common import RESULTS, LoadMonitor, Run, base_parser, load1, setup, table

NAME = "data_path"
COLUMNS = ["file", "shape", "loader", "cache", "img_per_s", "ms_per_img", "foreign_cores"]
# measured on this kind of machine (../shared design notes) when no train_throughput.json is at hand
FALLBACK_TRAIN = {128: 17.0, 224: 12.6}


def texture(rng: Any, shape: Sequence[int], bits: int = 12) -> Any:
    """A smooth random background with noise, as unsigned integers of ``bits`` bits (compresses like an image)."""
    import numpy as np
    from scipy import ndimage

    h, w = shape
    coarse = rng.random((max(h // 32, 2), max(w // 32, 2)))
    smooth = ndimage.zoom(coarse, (h / coarse.shape[0], w / coarse.shape[1]), order=1)[:h, :w]
    img = 0.2 + 0.6 * smooth + rng.normal(0.0, 0.02, (h, w))
    return np.clip(img * (2**bits - 1), 0, 2**bits - 1).astype(np.uint16)


def write_files(root: Path, n_roi: int, roi_size: int, n_full: int, full_shape: Sequence[int]) -> dict[str, list]:
    """Write the benchmark's ROI and full-image files; returns ``{kind: [paths]}``."""
    import numpy as np
    from PIL import Image

    from scripts.data.prepare.dicom_writer import write_dicom

    rng = np.random.default_rng(0)
    files: dict[str, list] = {"png_roi": [], "dcm_roi": [], "png_full": [], "dcm_full": []}
    root.mkdir(parents=True, exist_ok=True)
    for kind, n, shape in (("roi", n_roi, (roi_size, roi_size)), ("full", n_full, tuple(full_shape))):
        for i in range(n):
            pix = texture(rng, shape)
            png = root / f"{kind}_{i:05d}.png"
            Image.fromarray((pix.astype(np.uint32) * 16).astype(np.uint16)).save(png)  # 12 -> 16 bits
            files[f"png_{kind}"].append(png)
            files[f"dcm_{kind}"].append(
                write_dicom(
                    root / f"{kind}_{i:05d}.dcm",
                    pix,
                    bits_stored=12,
                    window=(2048.0, 4096.0),
                    pixel_spacing=(0.07, 0.07),
                )
            )
    return files


def time_loader(fn: Callable[[Any], Any], paths: Sequence[Path], rounds: int) -> float:
    """Best-of-``rounds`` seconds per file for ``fn`` over ``paths`` (after one untimed call)."""
    fn(paths[0])
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, (time.perf_counter() - t0) / len(paths))
    return best


def readers(image_size: int) -> dict[str, dict[str, Callable[[Any], Any]]]:
    """File kind -> {loader name: callable(path) -> tensor}."""
    import pydicom
    import torch
    from monai.transforms import LoadImage

    from scripts.data.imageio import read_roi_png
    from scripts.data.prepare.dicom_io import read_dicom
    from scripts.data.transforms import LoadROId

    pil = LoadImage(reader="PILReader", image_only=True, ensure_channel_first=True, reverse_indexing=False)
    dcm = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)
    roid = LoadROId("image", image_size=image_size)

    def bundle_png(p: Path) -> Any:
        return torch.from_numpy(read_roi_png(p))

    def bundle_dcm(p: Path) -> Any:
        return torch.from_numpy(read_dicom(p).pixels)

    def raw_pydicom(p: Path) -> Any:
        return torch.from_numpy(pydicom.dcmread(p).pixel_array.astype("float32"))

    return {
        "png_roi": {
            "LoadImage(PILReader)": pil,
            f"LoadROId({image_size})": lambda p: roid({"image": str(p)})["image"],
            "read_roi_png": bundle_png,
        },
        "dcm_roi": {"LoadImage(PydicomReader)": dcm, "read_dicom": bundle_dcm, "pydicom pixel_array": raw_pydicom},
        "png_full": {"LoadImage(PILReader)": pil, "read_roi_png": bundle_png},
        "dcm_full": {"LoadImage(PydicomReader)": dcm, "read_dicom": bundle_dcm, "pydicom pixel_array": raw_pydicom},
    }


def train_preprocessing(image_size: int, track_meta: bool = True) -> Any:
    """The bundle's training preprocessing (configs/train.json ``train#preprocessing``).

    ``track_meta=False`` appends ``EnsureTyped(track_meta=False)`` to the deterministic transforms, so that the
    cache holds plain tensors and the random transforms run on them.
    """
    from monai.bundle import ConfigParser

    from benchmarks._common import REPO

    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.json"))
    parser["image_size"] = image_size
    if not track_meta:
        det = parser["train"]["deterministic_transforms"]
        det.append({"_target_": "EnsureTyped", "keys": ["image"], "track_meta": False})
    return parser.get_parsed_content("train#preprocessing")


def epoch_rate(loader: Any, n: int) -> float:
    """Images/s of one pass over ``loader`` (``n`` images)."""
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return n / (time.perf_counter() - t0)


def cache_rows(paths: Sequence[Path], image_size: int, cache_dir: Path, batch: int) -> list[dict]:
    """Epoch images/s of the bundle's training preprocessing over the three dataset kinds."""
    from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset

    items = [{"image": str(p), "label": i % 2, "case": f"c{i}"} for i, p in enumerate(paths)]
    n = len(items)
    rows = []

    def row(cache: str, rate: float) -> None:
        rows.append({"file": "png_roi", "loader": "train preprocessing", "cache": cache, "img_per_s": rate})

    pre = train_preprocessing(image_size)
    mon = LoadMonitor()
    mon.start()
    row("none (Dataset)", epoch_rate(DataLoader(Dataset(items, pre), batch_size=batch, num_workers=0), n))
    t0 = time.perf_counter()
    cds = CacheDataset(items, pre, cache_rate=1.0, progress=False)
    row("CacheDataset: build", n / (time.perf_counter() - t0))
    dl = DataLoader(cds, batch_size=batch, shuffle=True, num_workers=0)
    epoch_rate(dl, n)
    row("CacheDataset: epoch", epoch_rate(dl, n))
    # metadata dropped after loading (one EnsureTyped(track_meta=False) appended to the deterministic transforms)
    dl = DataLoader(
        CacheDataset(items, train_preprocessing(image_size, track_meta=False), cache_rate=1.0, progress=False),
        batch_size=batch,
        shuffle=True,
        num_workers=0,
    )
    epoch_rate(dl, n)
    row("CacheDataset, track_meta=False: epoch", epoch_rate(dl, n))
    pds = PersistentDataset(items, pre, cache_dir=cache_dir)
    dl = DataLoader(pds, batch_size=batch, shuffle=True, num_workers=0)
    row("PersistentDataset: 1st epoch (writes)", epoch_rate(dl, n))
    row("PersistentDataset: later epoch", epoch_rate(dl, n))
    fc = mon.stop()["foreign_cores"]
    for r in rows:
        r.update(shape=f"{image_size}x{image_size}", ms_per_img=1000.0 / r["img_per_s"], foreign_cores=fc)
    return rows


def train_rates(path: Path) -> tuple[dict[int, float], str]:
    """Bundle training images/s per input size (fastest precision), from train_throughput's JSON if present."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return dict(FALLBACK_TRAIN), "design notes (resnext50_32x4d, 2 threads): no train_throughput.json"
    rates: dict[int, float] = {}
    for r in rows:
        if r.get("variant") == "bundle":
            rates[int(r["size"])] = max(rates.get(int(r["size"]), 0.0), float(r["img_per_s"]))
    return rates, str(path)


def main(argv: list[str] | None = None) -> dict:
    ap = base_parser(NAME, __doc__.split("\n\n")[0])
    ap.add_argument("--n-roi", type=int, default=200, help="ROI files per format")
    ap.add_argument("--roi-size", type=int, default=128, help="ROI side (px); also the network input size")
    ap.add_argument("--n-full", type=int, default=4, help="full-field images per format")
    ap.add_argument("--full-shape", type=int, nargs=2, default=[4000, 3000], help="rows cols of the full images")
    ap.add_argument("--rounds", type=int, default=2, help="best of this many passes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-json", default=str(RESULTS / "train_throughput.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.n_roi, args.roi_size, args.n_full, args.full_shape, args.rounds = 8, 32, 1, [256, 192], 1
    device = setup(args)
    with Run(NAME, args, device) as run, tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        files = write_files(tmp / "files", args.n_roi, args.roi_size, args.n_full, args.full_shape)
        print(f"# files written in {time.perf_counter() - t0:.1f} s")
        shapes = {
            "png_roi": f"{args.roi_size}x{args.roi_size}",
            "dcm_roi": f"{args.roi_size}x{args.roi_size}",
            "png_full": "x".join(map(str, args.full_shape)),
            "dcm_full": "x".join(map(str, args.full_shape)),
        }
        run.payload["file_bytes"] = {k: sum(p.stat().st_size for p in v) // max(len(v), 1) for k, v in files.items()}
        for kind, loaders in readers(args.roi_size).items():
            for name, fn in loaders.items():
                mon = LoadMonitor()
                mon.start()
                s = time_loader(fn, files[kind], args.rounds)
                run.rows.append(
                    {
                        "file": kind,
                        "shape": shapes[kind],
                        "loader": name,
                        "cache": "none",
                        "img_per_s": 1.0 / s,
                        "ms_per_img": 1000.0 * s,
                        "load1": load1(),
                        "foreign_cores": mon.stop()["foreign_cores"],
                    }
                )
        run.rows.extend(cache_rows(files["png_roi"], args.roi_size, tmp / "persistent", args.batch))
        print(table(run.rows, COLUMNS, "Files to tensors"))

        # could loading limit an epoch? with num_workers=0 loading and training run one after the other
        rates, source = train_rates(Path(args.train_json))
        cached = next(r["img_per_s"] for r in run.rows if r["cache"] == "CacheDataset: epoch")
        uncached = next(r["img_per_s"] for r in run.rows if r["cache"] == "none (Dataset)")
        verdict = []
        for size, train in sorted(rates.items()):
            for label, data in (("CacheDataset", cached), ("no cache", uncached)):
                share = (1 / data) / (1 / data + 1 / train)
                verdict.append(
                    {
                        "train_size": size,
                        "train_img_per_s": train,
                        "data_path": label,
                        "data_img_per_s": data,
                        "data_share_of_epoch": share,
                        "limits": "yes" if data < train else ("noticeable" if share > 0.05 else "no"),
                    }
                )
        run.payload["epoch_verdict"] = {"train_source": source, "rows": verdict}
        print()
        print(
            table(
                verdict,
                ["train_size", "train_img_per_s", "data_path", "data_img_per_s", "data_share_of_epoch", "limits"],
                f"Does loading limit an epoch? (data at {args.roi_size} px; training from {source})",
            )
        )
    return run.payload


if __name__ == "__main__":
    main()
