"""Shared fixtures: tiny synthetic data, the shared real-data folder, quiet threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset (film and mass intermediate sets + target, 64 px, 3 folds), made once per session."""
    from scripts.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, "intermediate", n_train=24, n_test=0, num_folds=3, image_size=64, seed=1)
    generate_dataset(root, "film", n_train=24, n_test=0, num_folds=3, image_size=64, seed=1)
    generate_dataset(root, "target", n_train=24, n_test=12, num_folds=3, image_size=64, seed=1)
    return root


def tiny_settings(**overrides) -> dict:
    """Main-job settings small enough for a test (as ``--<id> <value>``): resnet18 from scratch, 64 px, one epoch per
    stage, small sets."""
    base = {
        "arch": "resnet18", "init": "scratch", "image_size": 64, "num_folds": 2, "intermediate_data#n_train": 16,
        "target_data#n_train": 24, "target_data#n_test": 8, "stage_intermediate#train#trainer#max_epochs": 1,
        "stage_target#train#trainer#max_epochs": 1, "batch_size": 8, "n_boot": 20,
    }  # fmt: skip
    return {**base, **overrides}
