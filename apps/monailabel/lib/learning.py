"""Learning from the radiologist: class labels in the datastore, fine-tuning into published model versions, and the
members' disagreement as an active-learning strategy.

- **Labels.** A class label is a small JSON file saved with the stock ``PUT /datastore/label`` (tag ``final``):
  ``{"label": "malignant"}`` (a class name or index), optionally with ``"spacing_mm"`` for an image that states no
  pixel pitch.
- **Training** (:class:`FineTuneTask`, ``POST /train/{model}``): ``python -m scripts.finetune`` in the bundle folder
  on the labelled images, starting from the model in use; the result is published as the next version
  (:class:`ModelVersions`), which ``/infer`` uses from its next request.
- **Active learning** (:class:`Uncertainty`, ``POST /activelearning/uncertainty``): the unlabelled image on which the
  ensemble's members disagree most (the ``uncertainty`` the app's inference answers), scored with the model in use.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Sequence

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)

LABEL_TAG = DefaultLabelTag.FINAL.value
MODEL_FILE = "model.pt"
OPERATING_POINT_FILE = "operating_point.json"  # the bundle's name for the file beside the weights
VERSION_FILE = "version.json"
VERSION_DIR = re.compile(r"^v(\d+)$")


class LabelledSetError(ValueError):
    """Labels that cannot fine-tune the model: a label that is not a class label (naming its image), or too few
    labelled images of a class; the message says which and why."""


#: ``python -m scripts.finetune``'s exit status for a labelled set it cannot use
FINETUNE_INPUT_ERROR = 2


def read_class_label(path: str, class_names: Sequence[str]) -> tuple[int, float | None]:
    """The class index and the optional ``spacing_mm`` of the JSON label file at ``path``.

    Raises:
        ValueError: not a JSON object with a ``label`` naming one of ``class_names`` (or its index).
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a JSON class label ({type(e).__name__})") from None
    value = doc.get("label") if isinstance(doc, dict) else None
    names = [c.lower() for c in class_names]
    if isinstance(value, str) and value.strip().lower() in names:
        index = names.index(value.strip().lower())
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        index = value
    else:
        raise ValueError(f'label must be one of {list(class_names)}, e.g. {{"label": "{class_names[-1]}"}}')
    spacing = doc.get("spacing_mm")
    return index, None if spacing is None else float(spacing)


class ModelVersions:
    """The fine-tuned versions of a bundle's model: ``<root>/v<N>/`` holding ``model.pt``, ``operating_point.json``
    and ``version.json`` (written last: a folder without it is not published). Version ``N`` is named
    ``<bundle version>+ft<N>``; without any, the bundle's own ``models/model.pt`` is in use.

    Args:
        root: the folder of the versions (created on the first publication).
        base_model: the bundle's own weights file.
        base_version: the bundle's version (``configs/metadata.json``).
    """

    def __init__(self, root: str | Path, base_model: str | Path, base_version: str) -> None:
        self.root = Path(root)
        self.base_model = Path(base_model)
        self.base_version = base_version

    def _numbers(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = [VERSION_DIR.match(p.name) for p in self.root.iterdir() if (p / VERSION_FILE).is_file()]
        return sorted(int(m.group(1)) for m in found if m)

    def name(self, number: int) -> str:
        return self.base_version if number == 0 else f"{self.base_version}+ft{number}"

    def current(self) -> tuple[str, Path]:
        """``(version name, weights file)`` of the model in use: the newest published version, else the bundle's."""
        numbers = self._numbers()
        if not numbers:
            return self.base_version, self.base_model
        return self.name(numbers[-1]), self.root / f"v{numbers[-1]}" / MODEL_FILE

    def publish(self, model_file: Path, info: Dict[str, Any]) -> str:
        """Copy ``model_file`` and the operating point beside it into the next version's folder, with ``info`` in
        its ``version.json``; returns the new version's name."""
        number = (self._numbers() or [0])[-1] + 1
        folder = self.root / f"v{number}"
        shutil.rmtree(folder, ignore_errors=True)  # an unpublished leftover of a failed publication
        folder.mkdir(parents=True)
        shutil.copyfile(model_file, folder / MODEL_FILE)
        shutil.copyfile(model_file.with_name(OPERATING_POINT_FILE), folder / OPERATING_POINT_FILE)
        name = self.name(number)
        tmp = folder / (VERSION_FILE + ".tmp")
        tmp.write_text(json.dumps({"version": name, **info}, indent=2))
        os.replace(tmp, folder / VERSION_FILE)
        return name

    def info(self) -> list[Dict[str, Any]]:
        """Every published version's ``version.json``, oldest first."""
        return [json.loads((self.root / f"v{n}" / VERSION_FILE).read_text()) for n in self._numbers()]


class FineTuneTask(TrainTask):
    """Fine-tune the model in use on the datastore's labelled images (``python -m scripts.finetune`` run in the bundle
    folder: each member from its own weights, the bundle's target-stage config, a new calibration and operating point
    by the deployed rule) and publish the result as the next :class:`ModelVersions` version.

    Request parameters: ``max_epochs`` (default: the target stage's), ``seed`` (default 0).

    Args:
        bundle: the bundle folder.
        versions: where versions are published; the model in use is the starting point.
        class_names: the bundle's class names, in index order.
        local_image: ``(datastore, image id, folder) -> path`` of the image as a local file.
    """

    def __init__(
        self,
        bundle: Path,
        versions: ModelVersions,
        class_names: Sequence[str],
        local_image: Callable[[Datastore, str, str], str],
    ) -> None:
        super().__init__("Fine-tune the ensemble on the labelled images (the bundle's target-stage recipe)")
        self.bundle = bundle
        self.versions = versions
        self.class_names = list(class_names)
        self.local_image = local_image
        # the target stage's epochs: the default of a fine-tuning run, read from the bundle's own config
        stage = json.loads((bundle / "configs" / "stage_target.json").read_text())
        self.defaults = {"max_epochs": int(stage["train#trainer#max_epochs"]), "seed": 0}

    def config(self) -> Dict[str, Any]:
        return dict(self.defaults)

    def stats(self) -> Dict[str, Any]:
        version, _ = self.versions.current()
        return {"current_version": version, "versions": self.versions.info()}

    def info(self) -> Dict[str, Any]:
        """The stock description and defaults, with :meth:`stats` (``/info`` shows the model versions)."""
        return {**super().info(), **self.stats()}

    def labelled(self, datastore: Datastore, folder: str) -> list[dict]:
        """One row per image with a ``final`` label: its local path, class name and optional pitch.

        Raises:
            LabelledSetError: a label file that is not a class label (naming the image).
        """
        rows = []
        for image_id in sorted(datastore.get_labeled_images(LABEL_TAG)):
            label_file = datastore.get_label_uri(image_id, LABEL_TAG)
            try:
                index, spacing = read_class_label(label_file, self.class_names)
            except ValueError as e:
                raise LabelledSetError(f"label of image {image_id!r}: {e}") from None
            image = self.local_image(datastore, image_id, folder)
            rows.append({"image": image, "label": self.class_names[index], "spacing_mm": spacing or ""})
        return rows

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        t0 = time.time()
        epochs, seed = (int(request.get(k, v)) for k, v in self.defaults.items())
        base_version, base_model = self.versions.current()
        work = tempfile.mkdtemp(prefix="finetune-")  # image paths and ROIs: removed whatever the outcome
        try:
            rows = self.labelled(datastore, work)
            labels_csv = Path(work) / "labels.csv"
            with labels_csv.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["image", "label", "spacing_mm"])
                writer.writeheader()
                writer.writerows(rows)
            cmd = [sys.executable, "-m", "scripts.finetune", "--input-csv", str(labels_csv)]
            cmd += ["--from", str(base_model), "--bundle_root", str(Path(work) / "run")]
            cmd += ["--train#trainer#max_epochs", str(epochs), "--seed", str(seed)]
            logger.info("fine-tuning %s on %d labelled images", base_version, len(rows))
            done = subprocess.run(cmd, cwd=self.bundle, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in done.stdout.splitlines()[-40:]:
                logger.info("finetune: %s", line)
            if done.returncode != 0:
                tail = [ln for ln in done.stdout.splitlines() if "ERROR" in ln][-1:] or done.stdout.splitlines()[-1:]
                reason = " ".join(tail).split(" ERROR: ", 1)[-1]
                if done.returncode == FINETUNE_INPUT_ERROR:
                    raise LabelledSetError(f"cannot fine-tune on the labelled images: {reason}")
                raise RuntimeError(f"fine-tuning failed: {reason}")
            model = Path(work) / "run" / "models" / MODEL_FILE
            op = json.loads(model.with_name(OPERATING_POINT_FILE).read_text())
            counts = {c: sum(r["label"] == c for r in rows) for c in self.class_names}
            info = {
                "from_version": base_version,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "labels": counts,
                "max_epochs": epochs,
                "seed": seed,
                "operating_point": op.get("rule_description"),
                "threshold": op.get("threshold"),
                "validation": op.get("validation"),
            }
            version = self.versions.publish(model, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        logger.info("published model version %s", version)
        return {"version": version, "from_version": base_version, "labels": counts, "seconds": round(time.time() - t0)}


class Uncertainty(Strategy):
    """The unlabelled image on which the ensemble's members disagree most (highest ``uncertainty``: the population
    SD of the members' probabilities of malignancy), scored by the model in use. Scores are kept per model version,
    so each image is scored once per version; an image that cannot be scored (e.g. a DICOM without a pixel pitch) is
    skipped.

    Args:
        score: ``(image id, datastore) -> (model version, uncertainty or None)``.
    """

    def __init__(self, score: Callable[[str, Datastore], tuple[str, float | None]]) -> None:
        super().__init__("The unlabelled image with the highest member disagreement (ensemble uncertainty)")
        self.score = score

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        best: tuple[float, str, str] | None = None
        for image_id in sorted(datastore.get_unlabeled_images(LABEL_TAG)):
            version, value = self.score(image_id, datastore)
            if value is not None and (best is None or value > best[0]):
                best = (value, image_id, version)
        if best is None:
            return {}
        return {"id": best[1], "uncertainty": best[0], "model_version": best[2]}
