"""Inference and saliency latency per ROI: one member and the K-member ensemble, with and without Grad-CAM.

Each configuration runs in its own subprocess, so that its peak memory is its own: on CPU the peak resident set
(``VmHWM``, reset after the networks are built, so the figure is what answering one ROI adds on top of the loaded
model: ``peak_delta_mb``); on CUDA ``torch.cuda.max_memory_allocated``. Modes:

* ``predict``: the bundle's inference path, ``AutocastInferer`` (channels_last + bfloat16)
  under ``torch.inference_mode``, returning the ensemble's probabilities;
* ``predict_fp32``: the same in float32 (network and input still channels_last: ``amp: false``);
* ``predict_fp32_nocl``: float32 with the network and input in the default contiguous layout (``amp: false,
  channels_last: false``);
* ``cam``: ``scripts.saliency.EnsembleCAM`` (pytorch-grad-cam, frozen parameters, float32): the map of every
  member and the ensemble's probabilities in one call;
* ``cam_last``: ``EnsembleCAM(method="gradcam")`` at the last feature map (EfficientNet-Lite's ``bn2``), the default
  before HiResCAM at ``blocks.4``;
* ``cam_nofreeze``: the same with every parameter requiring gradients (the library's plain path; ``--compare-freeze``);
* ``cam_amp``: ``EnsembleCAM(amp=True)``, channels_last + bfloat16 forward, float32 maps (the saliency default for
  ResNets; EfficientNet-Lite's maps stay float32, ``scripts.model.inferers.saliency_amp``); the row reports the
  correlation of its ensemble map with ``cam``'s on the same ROI.

The three ``predict*`` modes compare the precisions the bundle can run inference in (``configs/inference.json``'s
``amp`` and ``channels_last``); after the per-configuration rows a precision table puts them side by side with the
fastest. Networks are randomly initialised (timings do not depend on the weights); the input is one ROI (batch 1).

    python -m benchmarks.inference_latency         # efficientnet_lite0, 128/224 px, K = 1 and 5 (~4 min, 2 cores)
    python -m benchmarks.inference_latency --arch resnext50_32x4d --sizes 224 512 --modes predict cam cam_amp
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

import torch

from benchmarks._common import (
    LoadMonitor,
    Run,
    base_parser,
    current_rss_mb,
    load1,
    median,
    reset_vm_hwm,
    run_json_subprocess,
    setup,
    sync,
    table,
    vm_hwm_mb,
)
from scripts.model.inferers import default_amp

NAME = "inference_latency"
MODES = ("predict", "predict_fp32", "predict_fp32_nocl", "cam", "cam_last", "cam_nofreeze", "cam_amp")
LAST_LAYER = {"efficientnet_lite0": "backbone.bn2", "efficientnet_lite1": "backbone.bn2"}  # cam_last (ResNets: default)
PREDICT_MODES = ("predict_fp32_nocl", "predict_fp32", "predict")
# mode -> (autocast dtype, memory format of the network and its input)
PRECISION = {
    "predict": ("bf16", "channels_last"),
    "predict_fp32": ("fp32", "channels_last"),
    "predict_fp32_nocl": ("fp32", "contiguous"),
    "cam": ("fp32", "channels_last net, contiguous input"),
    "cam_last": ("fp32", "channels_last net, contiguous input"),
    "cam_nofreeze": ("fp32", "channels_last net, contiguous input"),
    "cam_amp": ("bf16", "channels_last"),
}
# what the memory columns measure (printed under the table)
MEMORY_NOTE = (
    "model_rss_mb = resident set with the networks loaded; answer_peak_rss_mb = peak resident set (VmHWM) while "
    "answering, the counter reset after loading; peak_delta_mb = answer_peak_rss_mb - model_rss_mb; "
    "gpu_peak_mb = CUDA memory allocated above the loaded networks"
)
COLUMNS = [
    "arch",
    "size",
    "members",
    "mode",
    "precision",
    "ms_per_roi",
    "model_rss_mb",
    "answer_peak_rss_mb",
    "peak_delta_mb",
    "gpu_peak_mb",
    "map_corr",
    "foreign_cores",
]


def child(size: int, members: int, mode: str, arch: str, device: str, warmup: int, reps: int, batch: int) -> dict:
    """Measure one configuration in this (fresh) process and return its row."""
    import numpy as np
    import torch

    from scripts.model.inferers import AutocastInferer
    from scripts.model.network import Ensemble
    from scripts.saliency import EnsembleCAM

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    dev = torch.device(device)
    channels_last = mode != "predict_fp32_nocl"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = Ensemble(members, arch, 2).eval().to(dev, memory_format=fmt)
    x = torch.rand(batch, 1, size, size, device=dev)
    extra: dict[str, Any] = {}
    if mode in PREDICT_MODES:
        inferer = AutocastInferer(dev.type, enabled=mode == "predict", channels_last=channels_last)

        def step() -> Any:
            with torch.inference_mode():
                return inferer(x, net)

    else:
        if mode == "cam_last":  # plain Grad-CAM at the last feature map (the default before 0.5.0)
            cam = EnsembleCAM(net, method="gradcam", layer=LAST_LAYER.get(arch))
        else:
            cam = EnsembleCAM(net, freeze=mode != "cam_nofreeze", amp=mode == "cam_amp")

        def step() -> Any:
            return cam(x)

    sync(device)
    model_rss = current_rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    reset_ok = reset_vm_hwm()
    times = []
    mon = LoadMonitor()
    mon.start()
    for i in range(warmup + reps):
        sync(device)
        t0 = time.perf_counter()
        out = step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    load = mon.stop()
    if mode == "cam_amp":
        with EnsembleCAM(net) as ref:
            ref_maps = ref(x).maps
        a, b = out.maps.ravel(), ref_maps.ravel()
        extra["map_corr"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    row = {
        "size": size,
        "members": members,
        "mode": mode,
        "precision": PRECISION[mode][0],
        "memory_format": PRECISION[mode][1],
        "arch": arch,
        "batch": batch,
        "ms_per_roi": 1000.0 * median(times) / batch,
        "times_s": [round(t, 4) for t in times],
        "model_rss_mb": round(model_rss, 1),
        "answer_peak_rss_mb": round(vm_hwm_mb(), 1) if reset_ok else None,
        "peak_delta_mb": round(vm_hwm_mb() - model_rss, 1) if reset_ok else None,
        "threads": torch.get_num_threads(),
        "foreign_cores": load["foreign_cores"],
        "load1": load1(),
        **extra,
    }
    if dev.type == "cuda":
        row["gpu_peak_mb"] = round((torch.cuda.max_memory_allocated() - base_gpu) / 2**20, 1)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = base_parser(NAME, __doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--members", type=int, nargs="+", default=[1, 5], help="ensemble sizes K")
    ap.add_argument(
        "--modes", nargs="+", default=["predict", "predict_fp32", "predict_fp32_nocl", "cam", "cam_amp"], choices=MODES
    )
    ap.add_argument("--compare-freeze", action="store_true", help="add cam_nofreeze (slow and memory-hungry)")
    ap.add_argument(
        "--arch", default="efficientnet_lite0", help="efficientnet_lite0 (the bundle's), resnext50_32x4d, ..."
    )
    ap.add_argument("--batch", type=int, default=1, help="ROIs per call (latency is per ROI)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--in-process", action="store_true", help="no subprocesses (peak memory then accumulates)")
    ap.add_argument("--child", default=None, help=argparse_hidden())
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.members, args.warmup, args.reps = [64], [2], 0, 1  # on the chosen architecture
        args.in_process = True
    device = setup(args)
    if args.child:
        size, members, mode = args.child.split(",")
        row = child(int(size), int(members), mode, args.arch, device, args.warmup, args.reps, args.batch)
        print(json.dumps(row))
        return row
    modes = list(args.modes) + (["cam_nofreeze"] if args.compare_freeze and "cam_nofreeze" not in args.modes else [])
    with Run(NAME, args, device) as run:
        for size in args.sizes:
            for k in args.members:
                for mode in modes:
                    if args.in_process:
                        row = child(size, k, mode, args.arch, device, args.warmup, args.reps, args.batch)
                    else:
                        argv_child = [
                            "-m",
                            "benchmarks.inference_latency",
                            "--child",
                            f"{size},{k},{mode}",
                            "--arch",
                            args.arch,
                            "--device",
                            device,
                            "--warmup",
                            str(args.warmup),
                            "--reps",
                            str(args.reps),
                            "--batch",
                            str(args.batch),
                            "--out",
                            "/dev/null",
                        ] + (["--threads", str(args.threads)] if args.threads else [])
                        row = run_json_subprocess(argv_child)
                    run.rows.append(row)
                    print(table([row], COLUMNS))
        print()
        print(table(run.rows, COLUMNS, f"Latency per ROI ({args.arch}, batch {args.batch}, {device})"))
        print(MEMORY_NOTE)
        prec = precision_table(run.rows)
        if prec:
            run.payload["precision_table"] = prec
            cols = ["arch", "size", "members", *(f"{m}_ms" for m in PREDICT_MODES), "fastest", "fastest_vs_fp32_nocl"]
            cols += ["default", "default_vs_fastest"]
            print()
            print(
                table(
                    prec,
                    [c for c in cols if any(c in r for r in prec)],
                    f"Inference precision side by side ({args.arch}, ms per ROI, {device}; predict = bf16 autocast + "
                    "channels_last, predict_fp32 = fp32 + channels_last, predict_fp32_nocl = fp32 contiguous)",
                )
            )
    return run.payload


def precision_table(rows: list[dict]) -> list[dict]:
    """One row per (architecture, size, K) with the ``predict*`` modes' ms per ROI and the fastest of them."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if r["mode"] in PREDICT_MODES:
            key = (r["arch"], r["size"], r["members"])
            row = out.setdefault(key, {"arch": r["arch"], "size": r["size"], "members": r["members"]})
            row[f"{r['mode']}_ms"] = r["ms_per_roi"]
    for row in out.values():
        ms = {m: row[f"{m}_ms"] for m in PREDICT_MODES if f"{m}_ms" in row}
        row["fastest"] = min(ms, key=ms.get)
        ref = ms.get("predict_fp32_nocl")
        row["fastest_vs_fp32_nocl"] = ref / ms[row["fastest"]] if ref else None  # speed-up, >= 1
        # the bundle's default on this machine (configs/inference.json's amp, channels_last true)
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        row["default"] = "predict" if default_amp(row["arch"], device, row["size"]) else "predict_fp32"
        row["default_vs_fastest"] = ms[row["fastest"]] / ms[row["default"]] if row["default"] in ms else None
    return list(out.values())


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
