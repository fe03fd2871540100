"""Scaling: time and peak memory of synthetic preparation and of a training epoch as the ROI count grows.

For each count N the benchmark (each step in its own subprocess, so that each peak is its own):

1. ``prep``: ``scripts.data.synthetic.generate_dataset`` writes N target ROIs (PNG + mask) and the datalist;
2. ``epoch (CacheDataset)``: the bundle's trainer (configs/train.json, every training ROI, validation moved out of
   the way) builds its in-memory cache and trains one epoch;
3. ``epoch (PersistentDataset)``: the same trainer with ``train#dataset`` replaced by a ``PersistentDataset``
   (preprocessed ROIs cached as files): the first epoch writes the cache, the second reads it.

Time should grow linearly with N; the in-memory cache's peak memory grows with N while the persistent cache's stays
flat. Peak memory (``process_peak_rss_mb``) is the step's subprocess's peak resident set (``VmHWM``) over its whole
life, imports included; ``growth_mb`` is that peak minus the resident
set after imports.

    python -m benchmarks.scaling                                  # 100, 1000, 5000 ROIs, 32 px, resnet18
    python -m benchmarks.scaling --counts 100 1000 10000          # about 16 minutes on 2 shared cores
    python -m benchmarks.scaling --counts 100 1000 --arch resnext50_32x4d
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks._common import (
    LoadMonitor,
    Run,
    base_parser,
    current_rss_mb,
    load1,
    run_json_subprocess,
    setup,
    table,
    train_workflow,
    vm_hwm_mb,
)

NAME = "scaling"
# what the memory columns measure (printed under the table)
MEMORY_NOTE = (
    "process_peak_rss_mb = peak resident set (VmHWM) of the step's whole subprocess, imports included; "
    "growth_mb = process_peak_rss_mb - resident set after imports"
)
COLUMNS = ["n_rois", "step", "seconds", "ms_per_roi", "process_peak_rss_mb", "growth_mb", "foreign_cores"]


def child_prep(n: int, root: Path, size: int, workers: int) -> dict:
    from scripts.data.synthetic import generate_dataset

    base = current_rss_mb()
    t0 = time.perf_counter()
    generate_dataset(root, "target", n_train=n, n_test=0, num_folds=2, image_size=size, seed=0, workers=workers)
    secs = time.perf_counter() - t0
    return {"step": "prep", "seconds": secs, "base_rss_mb": base, "process_peak_rss_mb": vm_hwm_mb()}


def child_epoch(n: int, root: Path, size: int, arch: str, batch: int, cache: str, device: str, epochs: int) -> dict:
    """Train ``epochs`` epochs of the bundle's trainer over all N ROIs; per-epoch seconds and peak RSS."""
    from ignite.engine import Events

    base = current_rss_mb()
    overrides: dict[str, Any] = {
        "train#dataset#data": "$scripts.data.schema.load_split(@datalist, 'training')",
        "validate#dataset#data": "$scripts.data.schema.load_split(@datalist, 'validation', @fold)[:2]",
        "train#trainer#max_epochs": epochs,
    }
    if cache == "persistent":
        overrides["train#dataset"] = {
            "_target_": "PersistentDataset",
            "data": "$scripts.data.schema.load_split(@datalist, 'training')",
            "transform": "@train#preprocessing",
            "cache_dir": str(root / "persistent_cache"),
        }
        del overrides["train#dataset#data"]
    t0 = time.perf_counter()
    wf = train_workflow(
        root,
        root / cache,
        size,
        arch,
        batch,
        device,
        **overrides,
    )
    trainer = wf.parser.get_parsed_content("train#trainer")
    setup_s = time.perf_counter() - t0  # includes the CacheDataset build
    marks: list[float] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda *_: marks.append(time.perf_counter()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda *_: marks.append(time.perf_counter()))
    trainer.run()
    epoch_s = [marks[i + 1] - marks[i] for i in range(0, len(marks) - 1, 2)]
    return {
        "setup_s": setup_s,
        "epoch_s": epoch_s,
        "n_train": len(trainer.data_loader.dataset),
        "base_rss_mb": base,
        "process_peak_rss_mb": vm_hwm_mb(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = base_parser(NAME, __doc__.split("\n\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--size", type=int, default=32, help="ROI side (px), also the network input")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="processes for synthetic preparation")
    ap.add_argument("--persistent-epochs", type=int, default=1, help="epochs with PersistentDataset (1st writes)")
    ap.add_argument("--skip-cache", action="store_true", help="skip the CacheDataset epoch")
    ap.add_argument("--in-process", action="store_true", help="no subprocesses (peaks then accumulate)")
    ap.add_argument("--child", default=None, help=__import__("argparse").SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.counts, args.size, args.batch, args.in_process = [8], 32, 4, True
    device = setup(args)
    warnings.filterwarnings("ignore")
    if args.child:
        kind, n, root, *rest = args.child.split(",")
        if kind == "prep":
            out = child_prep(int(n), Path(root), args.size, args.workers)
        else:
            out = child_epoch(int(n), Path(root), args.size, args.arch, args.batch, rest[0], device, int(rest[1]))
        print(json.dumps(out))
        return out

    def call(spec: str) -> dict:
        if args.in_process:
            kind, n, root, *rest = spec.split(",")
            if kind == "prep":
                return child_prep(int(n), Path(root), args.size, args.workers)
            return child_epoch(int(n), Path(root), args.size, args.arch, args.batch, rest[0], device, int(rest[1]))
        argv_child = [
            "-m",
            "benchmarks.scaling",
            "--child",
            spec,
            "--size",
            str(args.size),
            "--arch",
            args.arch,
            "--batch",
            str(args.batch),
            "--workers",
            str(args.workers),
            "--device",
            device,
            "--out",
            "/dev/null",
        ] + (["--threads", str(args.threads)] if args.threads else [])
        return run_json_subprocess(argv_child)

    with Run(NAME, args, device) as run, tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        for n in args.counts:
            root = Path(tmp) / f"n{n}"
            rows = []

            def add(step: str, secs: float, res: dict, fc: float | None, **kw: Any) -> None:
                rows.append(
                    {
                        "n_rois": n,
                        "step": step,
                        "seconds": secs,
                        "ms_per_roi": 1000.0 * secs / n,
                        "process_peak_rss_mb": round(res["process_peak_rss_mb"], 1),
                        "growth_mb": round(res["process_peak_rss_mb"] - res["base_rss_mb"], 1),
                        "foreign_cores": fc,
                        "load1": load1(),
                        **kw,
                    }
                )

            mon = LoadMonitor()
            mon.start()
            res = call(f"prep,{n},{root}")
            add("prep (synthetic)", res["seconds"], res, mon.stop()["foreign_cores"])
            if not args.skip_cache:
                mon.start()
                res = call(f"epoch,{n},{root},cache,1")
                fc = mon.stop()["foreign_cores"]
                add("CacheDataset: build", res["setup_s"], res, fc, note="build = config parse + network + cache")
                add("CacheDataset: epoch", res["epoch_s"][0], res, fc, n_train=res["n_train"])
            mon.start()
            res = call(f"epoch,{n},{root},persistent,{args.persistent_epochs}")
            fc = mon.stop()["foreign_cores"]
            for i, s in enumerate(res["epoch_s"]):
                add(f"PersistentDataset: epoch {i + 1}" + (" (writes)" if i == 0 else ""), s, res, fc)
            run.rows.extend(rows)
            print(table(rows, COLUMNS))
        print()
        print(table(run.rows, COLUMNS, f"Scaling ({args.arch}, {args.size} px, batch {args.batch}, {device})"))
        print(MEMORY_NOTE)
    return run.payload


if __name__ == "__main__":
    main()
