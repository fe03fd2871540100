"""Learnability and shortcut probe for a datalist: is the task learnable at all, and what could a network cheat with?

Two checks, in seconds to a minute on a CPU, before spending an hour on the real networks:

* **Shortcuts**: the ROC AUC of simple whole-image statistics (mean, standard deviation and maximum intensity)
  for the label, separately in the training and the test split. Far from 0.5 means the statistic carries label
  information; a *different* value in the two splits means a network that fits it in training will be misled on
  test (an AUC on the other side of 0.5 in test than in training flips the network's ranking).
* **Learnability**: a four-block CNN (3x3 convolutions with batch norm and max pooling, global average pooling,
  ~60 k parameters) trained from scratch on the whole training split and scored on the test split. If it learns,
  the images carry the label; if the bundle's network then does not, the cause is the network or its budget.

    python -m scripts.data.probe --datalist data/synthetic/target/datalist.json
    python -m scripts.data.probe --datalist data/synthetic/target/datalist.json --epochs 15 --out results/probe.json

Images are the ROI files at their own size (a datalist of mixed sizes is resized to the first ROI's size).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.data.imageio import read_roi_png
from scripts.data.schema import load_split
from scripts.engine.atomic import write_json
from scripts.evaluation.metrics import delong_ci, roc_auc

logger = logging.getLogger("probe")
LABELS = {"mean": "mean intensity", "std": "intensity standard deviation", "max": "maximum intensity"}
STATISTICS = {
    "mean": lambda x: x.mean(axis=(1, 2)),
    "std": lambda x: x.std(axis=(1, 2)),
    "max": lambda x: x.max(axis=(1, 2)),
}


def load_images(items: Sequence[dict], size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(N, H, W)`` float32 ROIs in [0, 1] and ``(N,)`` int labels; ROIs of another shape are resized to ``size``."""
    images, labels = [], []
    for it in items:
        roi = read_roi_png(it["image"])
        size = size or roi.shape
        if roi.shape != tuple(size):
            roi = F.interpolate(torch.from_numpy(roi)[None, None], size=size, mode="area")[0, 0].numpy()
        images.append(roi)
        labels.append(int(it["label"]))
    return np.stack(images), np.asarray(labels)


def small_cnn(width: int = 16) -> nn.Module:
    """Four conv(3x3)-BN-ReLU-maxpool blocks, global average pooling, a 2-class linear head."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    w = width
    return nn.Sequential(
        block(1, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * w, 2),
    )  # fmt: skip


def train_probe(
    x: np.ndarray, y: np.ndarray, x_test: np.ndarray, epochs: int = 15, lr: float = 3e-3, batch: int = 16, seed: int = 0
) -> np.ndarray:
    """Train :func:`small_cnn` on ``x`` ``(N, H, W)`` with flips; return P(class 1) for ``x_test``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = small_cnn()
    xt, yt = torch.from_numpy(x)[:, None], torch.from_numpy(y).long()
    mean, std = float(xt.mean()), float(xt.std()) + 1e-6
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(xt) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(epochs):
        net.train()
        order, total = torch.randperm(len(xt), generator=gen), 0.0
        for i in range(0, len(xt), batch):
            idx = order[i : i + batch]
            xb = (xt[idx] - mean) / std
            for dim in (-1, -2):
                if torch.rand(1, generator=gen).item() < 0.5:
                    xb = xb.flip(dim)
            loss = F.cross_entropy(net(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        logger.info("probe epoch %d/%d: loss %.3f (%.0f s)", epoch + 1, epochs, total / len(xt), time.time() - t0)
    net.eval()
    with torch.no_grad():
        xe = (torch.from_numpy(x_test)[:, None] - mean) / std
        return torch.cat([torch.softmax(net(xe[i : i + 64]), 1)[:, 1] for i in range(0, len(xe), 64)]).numpy()


def run_probe(datalist: str | Path, epochs: int = 15, seed: int = 0) -> dict:
    """Both checks on ``datalist`` (training split = every fold; test split); returns a JSON-ready summary."""
    train_items, test_items = load_split(datalist, "training"), load_split(datalist, "test")
    x, y = load_images(train_items)
    x_test, y_test = load_images(test_items, x.shape[1:])
    for name, labels in (("training", y), ("test", y_test)):
        if len(set(labels.tolist())) < 2:
            raise ValueError(f"{datalist}: the {name} split needs both classes for an AUC, got {sorted(set(labels))}")
    shortcuts = {
        name: {"training": roc_auc(y, f(x)), "test": roc_auc(y_test, f(x_test))} for name, f in STATISTICS.items()
    }
    t0 = time.time()
    scores = train_probe(x, y, x_test, epochs=epochs, seed=seed)
    cnn = delong_ci(y_test, scores)
    return {
        "datalist": str(datalist),
        "n_training": int(len(y)),
        "n_test": int(len(y_test)),
        "shortcut_auc": shortcuts,
        "cnn": {"epochs": epochs, "seed": seed, "seconds": round(time.time() - t0, 1), **cnn},
    }


def format_summary(s: dict) -> str:
    """The probe's result as a Markdown table."""
    lines = [
        f"Probe of {s['datalist']} ({s['n_training']} training, {s['n_test']} test ROIs)",
        "",
        "| check | training | test |",
        "|---|---|---|",
    ]
    for name, v in s["shortcut_auc"].items():
        lines.append(f"| AUC of the ROI's {LABELS[name]} | {v['training']:.3f} | {v['test']:.3f} |")
    c = s["cnn"]
    lines.append(
        f"| small CNN from scratch ({c['epochs']} epochs, {c['seconds']:.0f} s), test AUC | | "
        f"{c['auc']:.3f} ({c['ci_low']:.3f}-{c['ci_high']:.3f}) |"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.data.probe", description=__doc__.splitlines()[0])
    p.add_argument("--datalist", required=True, help="a datalist with training and test splits")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the summary as JSON here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    summary = run_probe(a.datalist, epochs=a.epochs, seed=a.seed)
    print(format_summary(summary))
    if a.out:
        print(f"written: {write_json(a.out, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
