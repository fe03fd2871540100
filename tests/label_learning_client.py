"""A radiologist's round of active learning against a running MONAI Label server, through MONAI Label's own client
(run by the Label app's environment; prints one JSON document of what the server answered).

    apps/monailabel/.venv/bin/python -m tests.label_learning_client URL MODEL LABELS.json [--bad-label IMAGE_ID]

``LABELS.json`` maps image ids to class names. The round: the uncertainty strategy's pick before any label, the
members' disagreement and probability of every image, the labels saved (``PUT /datastore/label``, tag ``final``),
the next pick, a fine-tuning run (``POST /train/MODEL``, the client's background task, polled to its end), and every
image's probability and the model version after it. With ``--bad-label``, that image gets a label that names no
class after that round, and a second training run is made, in the background and then synchronously (both are
expected to fail: the synchronous one with HTTP 422).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import requests
from monailabel.client import MONAILabelClient


def predictions(client: MONAILabelClient, model: str, images: list[str]) -> dict:
    out = {}
    for image in images:
        _, body = client.infer(model, image, {})
        body = json.loads(body) if isinstance(body, (str, bytes)) else body
        out[image] = {"p": body["probabilities"]["malignant"], "u": body["uncertainty"], "version": body["model"]}
    return out


def wait_for_training(client: MONAILabelClient, timeout_s: float = 600) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        status = client.train_status()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            return {"status": status.get("status"), "details": list(status.get("details") or [])}
        time.sleep(1)
    return {"status": "TIMEOUT", "details": []}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("labels")
    p.add_argument("--bad-label", default=None)
    a = p.parse_args()
    client = MONAILabelClient(a.url)
    labels = json.loads(Path(a.labels).read_text())
    info = client.info()
    images = sorted(client.datastore()["objects"])
    out = {"strategies": sorted(info["strategies"]), "trainers": sorted(info["trainers"]), "images": images}
    out["first_pick"] = client.next_sample("uncertainty", {})
    out["before"] = predictions(client, a.model, images)
    with tempfile.TemporaryDirectory() as tmp:
        for image, name in labels.items():
            path = Path(tmp) / "label.json"
            path.write_text(json.dumps({"label": name}))
            client.save_label(image, str(path), tag="final")
    out["next_pick"] = client.next_sample("uncertainty", {})
    out["random_pick"] = client.next_sample("random", {})
    client.train_start(a.model, {"max_epochs": 1})
    out["training"] = wait_for_training(client)
    out["train_stats"] = client.info()["trainers"][a.model]
    out["after"] = predictions(client, a.model, images)
    out["pick_after"] = client.next_sample("uncertainty", {})
    if a.bad_label:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "label.json"
            path.write_text(json.dumps({"label": "probably benign"}))
            client.save_label(a.bad_label, str(path), tag="final")
        client.train_start(a.model, {"max_epochs": 1})
        out["bad_training"] = wait_for_training(client)
        out["after_bad"] = predictions(client, a.model, images[:1])
        out["stats_after_bad"] = client.info()["trainers"][a.model]
        answer = requests.post(f"{a.url}/train/{a.model}?run_sync=true", json={"max_epochs": 1}, timeout=600)
        out["bad_training_sync"] = {"status": answer.status_code, "body": answer.json()}
    json.dump(out, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
