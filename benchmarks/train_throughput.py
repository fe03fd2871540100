"""Training throughput: the bundle's trainer against a plain PyTorch loop, side by side.

The bundle's trainer is the ``SupervisedTrainer`` that ``configs/train.json`` with the ``configs/resilience.json``
overlay builds, as the main job trains (through ``monai.bundle.ConfigWorkflow``: its CacheDataset of loaded ROIs,
random augmentation, DataLoader, AutocastInferer, postprocessing and handlers; validation is pushed past the measured
window). The plain loop trains the same network (same architecture, seed, optimiser, loss, batch and input size) on
the same ROIs, held in one tensor in memory.
Two more variants separate the cost of MONAI's metadata tracking from the rest of the trainer: ``plain+meta`` is
the plain loop fed ``MetaTensor`` batches (what the trainer's network sees), and ``bundle+tensor`` is the bundle's
trainer with an inferer that drops the metadata before the network: ``scripts.model.inferers.AutocastInferer`` now does
that itself, so this variant is the shipped trainer again (kept so that earlier results stay comparable);
``bundle+tensor+none`` also frees the gradients between iterations (``optim_set_to_none``) as the plain loop does.

Precisions (``--precisions``): ``fp32`` (float32, contiguous tensors), ``fp32_cl`` (float32, network and batches in
channels_last) and ``amp`` (channels_last + bfloat16 autocast, as ``AutocastInferer`` does on CPU and CUDA): the
bundle's ``amp`` / ``channels_last`` settings (``configs/train.json``; ``scripts.model.inferers.default_amp`` picks ``amp``
per architecture and device). After the per-size tables a precision table puts them side by side (images/s of each
variant, ratio to ``fp32`` and the fastest). Throughput is the batch size over the median iteration time after
warm-up. An untimed first round runs every variant once (whichever network first meets an input shape pays for
kernel creation: without it, the variant that ran first looked 20-40 % slower); the timed rounds then alternate
the order of the variants, so that a change in machine load hits all of them.

    python -m benchmarks.train_throughput          # efficientnet_lite0, 128/224 px, 3 precisions (~5 min, 2 cores)
    python -m benchmarks.train_throughput --arch resnext50_32x4d --precisions fp32 amp    # the paper's network
    python -m benchmarks.train_throughput --device cuda --batch 32
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (
    LoadMonitor,
    Run,
    base_parser,
    load1,
    median,
    setup,
    sync,
    table,
    train_workflow,
)
from scripts.model.inferers import default_amp

NAME = "train_throughput"
VARIANTS = ["bundle", "bundle+tensor", "bundle+tensor+none", "plain", "plain+meta"]
# precision -> (bfloat16 autocast, channels_last)
PRECISIONS = {"fp32": (False, False), "fp32_cl": (False, True), "amp": (True, True)}
COLUMNS = [
    "arch",
    "size",
    "precision",
    "variant",
    "img_per_s",
    "ms_per_iter",
    "data_ms",
    "step_ms",
    "post_ms",
    "ratio_vs_plain",
    "ratio_vs_fp32",
    "foreign_cores",
]


def make_data(root: Path, n_train: int, roi_size: int) -> Path:
    """Synthetic target ROIs (written once per run) and their datalist."""
    from scripts.data.synthetic import generate_dataset

    # two folds: the training split (fold 0 held out) has about n_train ROIs
    return generate_dataset(root, "target", n_train=2 * n_train, n_test=2, num_folds=2, image_size=roi_size, seed=0)


def build_bundle_trainer(
    data_root: Path,
    out_dir: Path,
    size: int,
    arch: str,
    batch: int,
    amp: bool,
    iters: int,
    device: str,
    plain_tensor: bool = False,
    set_to_none: bool = False,
    channels_last: bool | None = None,
) -> tuple[Any, Any]:
    """The bundle's SupervisedTrainer from configs/train.json (validation moved out of the way).

    ``plain_tensor`` sets the inferer to ``scripts.model.inferers.AutocastInferer`` (metadata dropped before the network;
    the shipped config's inferer), everything else unchanged; ``set_to_none`` sets the trainer's ``optim_set_to_none`` (gradients
    freed instead of zero-filled between iterations, as the plain loop does); ``channels_last`` defaults to ``amp``.
    """
    extra: dict[str, Any] = {"train#inferer#_target_": "scripts.model.inferers.AutocastInferer"} if plain_tensor else {}
    if set_to_none:
        extra["train#trainer#optim_set_to_none"] = True
    wf = train_workflow(
        data_root,
        out_dir,
        size,
        arch,
        batch,
        device,
        amp=amp,
        channels_last=amp if channels_last is None else channels_last,
        **{"train#trainer#max_epochs": 1, "train#trainer#epoch_length": iters, **extra},
    )
    return wf, wf.parser.get_parsed_content("train#trainer")


def attach_timers(trainer: Any, device: str) -> dict[str, list[float]]:
    """Record per-iteration timestamps: batch fetch, model step (forward/backward/optimiser), postprocessing."""
    from ignite.engine import Events
    from monai.engines.utils import IterationEvents

    marks: dict[str, list[float]] = {"get0": [], "get1": [], "start": [], "model": [], "end": []}

    def mark(key: str, do_sync: bool = False):
        def _fn(*_: Any) -> None:
            if do_sync:
                sync(device)
            marks[key].append(time.perf_counter())

        return _fn

    trainer.add_event_handler(Events.GET_BATCH_STARTED, mark("get0"))
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, mark("get1"))
    trainer.add_event_handler(Events.ITERATION_STARTED, mark("start"))
    # first in line on MODEL_COMPLETED: before the bundle's postprocessing runs
    trainer._event_handlers[IterationEvents.MODEL_COMPLETED].insert(0, (mark("model", True), (), {}))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, mark("end", True))  # last: after every handler
    return marks


def bundle_times(marks: dict[str, list[float]], warmup: int) -> dict[str, list[float]]:
    """Per-iteration phases (s) of the measured iterations (iterations after ``warmup``)."""
    n = len(marks["end"])
    out: dict[str, list[float]] = {"iter": [], "data": [], "step": [], "post": []}
    for i in range(max(warmup, 1), n):
        out["iter"].append(marks["end"][i] - marks["end"][i - 1])
        out["data"].append(marks["get1"][i] - marks["get0"][i])
        out["step"].append(marks["model"][i] - marks["start"][i])
        out["post"].append(marks["end"][i] - marks["model"][i])
    return out


def run_bundle(trainer: Any, warmup: int, device: str, iters: int) -> dict[str, list[float]]:
    """One epoch of ``iters`` iterations. ``Workflow.run`` would restart a finished engine with the loader's length
    as the epoch length, so ignite's ``Engine.run`` is called with it explicitly."""
    from ignite.engine import Engine

    marks = attach_timers(trainer, device)
    Engine.run(trainer, trainer.data_loader, max_epochs=1, epoch_length=iters)
    return bundle_times(marks, warmup)


def run_plain(
    network: Any,
    images: Any,
    labels: Any,
    batch: int,
    iters: int,
    warmup: int,
    amp: bool,
    device: str,
    lr: float,
    weight_decay: float,
    meta: bool = False,
    channels_last: bool | None = None,
) -> dict[str, list[float]]:
    """A plain training loop: index a batch from memory, forward/loss/backward/step (``channels_last``: network and
    batches in channels_last memory format; defaults to ``amp``)."""
    import torch

    from scripts.model.network import param_groups

    dev = torch.device(device)
    dtype = torch.bfloat16  # as AutocastInferer, on CPU and CUDA
    channels_last = amp if channels_last is None else channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(dev, memory_format=fmt)
    network.train()
    opt = torch.optim.AdamW(param_groups(network, lr), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {"iter": [], "data": [], "step": [], "post": []}
    order = torch.randperm(len(images), generator=gen)
    pos = 0
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        if pos + batch > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        x, y = images[idx].to(dev, non_blocking=True), labels[idx].to(dev, non_blocking=True)
        if meta:
            from monai.data import MetaTensor

            x = MetaTensor(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=amp):
            pred = network(x)
        loss = loss_fn(pred.float(), y)
        loss.backward()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            out["iter"].append(t2 - t0)
            out["data"].append(t1 - t0)
            out["step"].append(t2 - t1)
            out["post"].append(0.0)
    return out


def summarise(times: dict[str, list[float]], batch: int) -> dict[str, float]:
    it = median(times["iter"])
    return {
        "img_per_s": batch / it,
        "ms_per_iter": 1000 * it,
        "data_ms": 1000 * median(times["data"]),
        "step_ms": 1000 * median(times["step"]),
        "post_ms": 1000 * median(times["post"]),
        "n_iters": len(times["iter"]),
    }


def load_memory_data(wf: Any) -> tuple[Any, Any]:
    """The training ROIs as the bundle loads them (deterministic transforms), stacked into tensors."""
    import torch

    ds = wf.parser.get_parsed_content("train#dataset")
    det = wf.parser.get_parsed_content("train#deterministic_transforms")
    from monai.transforms import Compose

    load = Compose(det)
    items = [load(dict(d)) for d in ds.data]
    images = torch.stack([torch.as_tensor(it["image"]).as_subclass(torch.Tensor) for it in items]).float()
    labels = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
    return images.contiguous(), labels


def main(argv: list[str] | None = None) -> dict:
    ap = base_parser(NAME, __doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="input sizes (px)")
    ap.add_argument(
        "--arch", default="efficientnet_lite0", help="efficientnet_lite0 (the bundle's), resnext50_32x4d, ..."
    )
    ap.add_argument("--batch", type=int, default=16, help="batch size (the config's default is 16)")
    ap.add_argument("--warmup", type=int, default=2, help="iterations not timed, per round")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating bundle/plain rounds")
    ap.add_argument(
        "--precisions",
        nargs="+",
        default=list(PRECISIONS),
        choices=list(PRECISIONS),
        help="fp32 (contiguous), fp32_cl (fp32 + channels_last), amp (bf16 autocast + channels_last)",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["bundle", "plain"],
        choices=VARIANTS,
        help="bundle+tensor, bundle+tensor+none and plain+meta isolate the MetaTensor cost (docs/performance.md)",
    )
    ap.add_argument("--n-rois", type=int, default=None, help="training ROIs in memory (default: 4 batches)")
    args = ap.parse_args(argv)
    if args.smoke:  # every precision once, on the chosen architecture
        args.sizes, args.batch = [64], 2
        args.warmup, args.iters, args.rounds = 1, 1, 1
    device = setup(args)
    logging.getLogger().setLevel(logging.WARNING)
    import torch

    from scripts.model.network import build_network

    with Run(NAME, args, device) as run, tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        n_rois = args.n_rois or 4 * args.batch
        roi_size = 64 if args.smoke else 128
        t0 = time.perf_counter()
        make_data(tmp / "data", n_rois, roi_size)
        print(f"# {n_rois} synthetic ROIs ({roi_size} px) written in {time.perf_counter() - t0:.1f} s")
        for size in args.sizes:
            for precision in args.precisions:
                amp, channels_last = PRECISIONS[precision]
                iters = args.warmup + args.iters
                torch.manual_seed(0)
                trainers = {}
                for v in ("bundle", "bundle+tensor", "bundle+tensor+none"):
                    if v in args.variants or (v == "bundle" and not trainers):
                        torch.manual_seed(0)
                        trainers[v] = build_bundle_trainer(
                            tmp / "data",
                            tmp / f"out_{len(trainers)}",
                            size,
                            args.arch,
                            args.batch,
                            amp,
                            iters,
                            device,
                            plain_tensor=v.startswith("bundle+tensor"),
                            set_to_none=v.endswith("+none"),
                            channels_last=channels_last,
                        )
                wf = next(iter(trainers.values()))[0]
                images, labels = load_memory_data(wf)
                lr = float(wf.parser.get_parsed_content("learning_rate"))
                wd = float(wf.parser.get_parsed_content("weight_decay"))
                plain_nets = {}
                for v in ("plain", "plain+meta"):
                    if v in args.variants:
                        torch.manual_seed(0)
                        plain_nets[v] = build_network(args.arch, 2)
                acc: dict[str, dict[str, list[float]]] = {
                    v: {"iter": [], "data": [], "step": [], "post": []} for v in args.variants
                }
                mon = LoadMonitor()
                mon.start()
                row_load = load1()
                # round 0 is an untimed warm-up of every variant: the first network to run a given shape pays for
                # oneDNN's kernel creation and the allocator's growth, whichever variant it is (measured: ~40 %
                # slower); timed rounds then alternate the order (ABBA) so that drift hits every variant alike
                for r in range(args.rounds + 1):
                    order = list(args.variants) if r % 2 else list(reversed(args.variants))
                    for v in order:
                        if v.startswith("bundle"):
                            t = run_bundle(trainers[v][1], args.warmup, device, iters)
                        else:
                            t = run_plain(
                                plain_nets[v],
                                images,
                                labels,
                                args.batch,
                                args.iters,
                                args.warmup,
                                amp,
                                device,
                                lr,
                                wd,
                                meta=v == "plain+meta",
                                channels_last=channels_last,
                            )
                        if r > 0:
                            for k in acc[v]:
                                acc[v][k].extend(t[k])
                load = mon.stop()
                rows = {}
                for v in args.variants:
                    rows[v] = {
                        "size": size,
                        "precision": precision,
                        "autocast": "bf16" if amp else None,
                        "channels_last": channels_last,
                        "variant": v,
                        "arch": args.arch,
                        "batch": args.batch,
                        **summarise(acc[v], args.batch),
                        "load1": row_load,
                        "foreign_cores": load["foreign_cores"],
                        "iter_s": [round(x, 4) for x in acc[v]["iter"]],
                    }
                if "plain" in rows:
                    for v in rows:
                        rows[v]["ratio_vs_plain"] = rows[v]["img_per_s"] / rows["plain"]["img_per_s"]
                run.rows.extend(rows.values())
                add_fp32_ratios(run.rows)
                print(table(list(rows.values()), COLUMNS))
                del wf, trainers, plain_nets
        run.payload["notes"] = (
            "img_per_s = batch / median iteration time after warm-up; data_ms = batch fetch (bundle: DataLoader "
            "with the config's random augmentation over the CacheDataset; plain: tensor indexing); step_ms = "
            "forward + loss + backward + optimiser step; post_ms = the bundle's postprocessing and iteration handlers."
        )
        add_fp32_ratios(run.rows)
        run.payload["precision_table"] = precision_table(run.rows, args.precisions)
        print()
        print(table(run.rows, COLUMNS, f"Training throughput ({args.arch}, batch {args.batch}, {device})"))
        print()
        print(
            table(
                run.payload["precision_table"],
                [
                    "arch",
                    "size",
                    "variant",
                    *(f"{p}_img_per_s" for p in args.precisions),
                    "fastest",
                    "fastest_vs_fp32",
                    "default",
                    "default_vs_fastest",
                ],
                f"Precision side by side ({args.arch}, images/s, {device}; fp32_cl = fp32 + channels_last, "
                "amp = bf16 autocast + channels_last)",
            )
        )
    return run.payload


def add_fp32_ratios(rows: list[dict]) -> None:
    """``ratio_vs_fp32``: each row's images/s over the fp32 row of the same architecture, size and variant."""
    fp32 = {(r["arch"], r["size"], r["variant"]): r["img_per_s"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        ref = fp32.get((r["arch"], r["size"], r["variant"]))
        r["ratio_vs_fp32"] = r["img_per_s"] / ref if ref else None


def precision_table(rows: list[dict], precisions: list[str]) -> list[dict]:
    """One row per (architecture, size, variant): images/s of each precision, the fastest of them and the bundle's
    default on this machine (``scripts.model.inferers.default_amp``: ``amp``, else ``fp32_cl``) with its speed
    relative to the fastest."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["arch"], r["size"], r["variant"])
        row = out.setdefault(key, {"arch": r["arch"], "size": r["size"], "variant": r["variant"]})
        row[f"{r['precision']}_img_per_s"] = r["img_per_s"]
    for row in out.values():
        rates = {p: row.get(f"{p}_img_per_s") for p in precisions if row.get(f"{p}_img_per_s")}
        best = max(rates, key=rates.get) if rates else None
        row["fastest"] = best
        row["fastest_vs_fp32"] = rates[best] / rates["fp32"] if best and "fp32" in rates else None
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        row["default"] = "amp" if default_amp(row["arch"], device, row["size"]) else "fp32_cl"
        row["default_vs_fastest"] = rates[row["default"]] / rates[best] if row["default"] in rates else None
    return list(out.values())


if __name__ == "__main__":
    main()
