"""A tiny run of each benchmark script (``--smoke``): it must print its table and write its JSON.

Benchmarks measure speed and memory; these runs only keep the scripts working (minimal sizes, one thread).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.label_load import Answer, Upload, invariants, judge, summarize
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps

SCRIPTS = ["train_throughput", "data_path", "inference_latency", "scaling"]
# benchmarks run as modules (``python -m benchmarks.x``); from another folder the repository must be on PYTHONPATH
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_smoke(name: str, tmp_path) -> None:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--threads", "1", "--out", str(out)],
        cwd=str(tmp_path),  # the script must find the bundle by itself
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| " in proc.stdout and "|---" in proc.stdout, proc.stdout[-2000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == name
    assert result["rows"], "no measurements"
    machine = result["machine"]
    for key in ("nproc", "cpu_model", "load1_before", "load1_after", "foreign_cores"):
        assert key in machine


LABEL_PY = REPO / "apps" / "monailabel" / ".venv" / "bin" / "python"


def test_label_load_smoke(tmp_path) -> None:
    """The MONAI Label load test at its smoke size (2 clients x 3 requests, good and bad uploads) on the tiny bundle:
    every answer right, every bad upload a 4xx, nothing left in the server's temporary folder, exit status 0."""
    if not LABEL_PY.exists():
        pytest.skip(
            f"{LABEL_PY.relative_to(REPO)} absent: run `bash apps/monailabel/setup.sh` to test the monailabel app"
        )
    out = tmp_path / "label_load.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.label_load", "--smoke", "--threads", "1", "--out", str(out)],
        cwd=str(tmp_path),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "|---" in proc.stdout and "all invariants hold" in proc.stdout, proc.stdout[-2000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "label_load" and result["passed"] and all(result["invariants"].values()), result
    s = result["summary"]
    assert s["sent"] == s["answered"] == 6 and s["lost"] == s["wrong"] == s["server_errors_good"] == 0, s
    assert s["good_sent"] == 3 and s["bad_sent"] == s["bad_4xx"] == 3, s
    assert s["tmp_entries_left"] == [] and s["warm_up_wrong"] == [], s
    assert s["rss_before_mb"] > 0 and s["rss_after_mb"] > 0 and s["p50_ms"] > 0, s
    assert {r["upload"] for r in result["rows"]} == {
        "png_a", "corrupt", "dcm_a", "unknown_model", "png_b", "not_image"
    }  # fmt: skip


def test_label_load_flags_each_broken_invariant() -> None:
    """The load test's verdict (no server): a lost answer, a probability off by more than 1e-4, a wrong call, a 5xx
    for a good upload, a 200 for a bad one and an upload left in the temporary folder each fail an invariant."""
    good = Upload("png_a", "roi_a.png", b"", "m", True, p=0.3, pred_class=0)
    bad = Upload("corrupt", "roi_corrupt.dcm", b"", "m", False)
    uploads = {"png_a": good, "corrupt": bad}

    def body(p: float, k: int) -> bytes:
        return json.dumps({"probabilities": {"benign": 1 - p, "malignant": p}, "pred_class": k}).encode()

    assert judge(good, 200, body(0.30005, 0)) == ("", 0.30005)
    assert judge(good, 200, body(0.3002, 0))[0] and judge(good, 200, body(0.3, 1))[0] and judge(good, 422, b"{}")[0]
    assert judge(bad, 422, b"{}")[0] == "" and judge(bad, 200, body(0.3, 0))[0]

    def verdict(*answers: Answer, left: list[str] | None = None) -> dict[str, bool]:
        s = summarize(list(answers), uploads, 1.0)
        return invariants({**s, "warm_up_wrong": [], "tmp_entries_left": left or []})

    right = (Answer("png_a", 0, 200, 0.1), Answer("corrupt", 0, 422, 0.1))
    assert all(verdict(*right).values())
    assert not verdict(*right, Answer("png_a", 1, None, 0.1, wrong="no answer"))["no_lost_answers"]
    assert not verdict(*right, Answer("png_a", 1, 200, 0.1, wrong="p"))["no_wrong_answers"]
    broken = verdict(*right, Answer("png_a", 1, 500, 0.1, wrong="HTTP 500"))
    assert not broken["no_server_errors_for_good_uploads"] and broken["no_wrong_answers"]
    broken = verdict(*right, Answer("corrupt", 1, 200, 0.1, wrong="a prediction"))
    assert not broken["every_bad_upload_answered_4xx"] and not broken["no_wrong_answers"]
    assert not verdict(*right, Answer("corrupt", 1, 500, 0.1))["every_bad_upload_answered_4xx"]
    assert not verdict(*right, left=["upload-x/image.dcm"])["no_upload_left_in_tmp"]
