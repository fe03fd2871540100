"""``python -m scripts.finetune``: its labelled-set checks (the fine-tuning itself runs in the MONAI Label app's
test, tests/test_apps.py, through the app's train task)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from scripts import finetune
from scripts.data.imageio import write_roi_png
from scripts.model.network import Ensemble


def labelled_csv(folder, labels: list[str]):
    rng = np.random.default_rng(0)
    lines = ["image,label"]
    for i, label in enumerate(labels):
        write_roi_png(folder / f"roi{i}.png", rng.random((32, 32)))
        lines.append(f"roi{i}.png,{label}")
    path = folder / "labels.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_folds_are_stratified_so_every_fold_validates_on_both_classes():
    labels = [0, 1, 0, 0, 1, 1, 0, 1]
    folds = finetune.stratified_folds(labels, 3)
    for k in range(3):
        assert {c for c, f in zip(labels, folds) if f == k} == {0, 1}


def test_labels_are_class_names_or_indices_and_a_wrong_one_names_its_line(tmp_path):
    items = finetune.read_labelled_csv(labelled_csv(tmp_path, ["benign", "Malignant", "1", "0"]))
    assert [it["label"] for it in items] == [0, 1, 1, 0]
    with pytest.raises(finetune.LabelError, match=r"labels.csv line 3: label 'maybe' is not one of"):
        finetune.read_labelled_csv(labelled_csv(tmp_path, ["benign", "maybe"]))


def test_too_few_labels_of_a_class_is_a_clear_error_before_any_training(tmp_path, caplog):
    base = tmp_path / "models" / "model.pt"
    base.parent.mkdir()
    torch.save(Ensemble(3, "resnet18").state_dict(), base)
    csv = labelled_csv(tmp_path, ["benign", "benign", "malignant", "malignant", "malignant", "malignant"])
    with caplog.at_level(logging.ERROR):
        rc = finetune.main(["--input-csv", str(csv), "--from", str(base), "--bundle_root", str(tmp_path / "run")])
    assert rc == 2
    assert "at least 3 labelled images of each class" in caplog.text and "{'benign': 2, 'malignant': 4}" in caplog.text
    assert not (tmp_path / "run" / "models").exists()  # nothing trained
