"""A tiny run of each benchmark script (``--smoke``): it must print its table and write its JSON.

Benchmarks measure speed and memory; these runs only keep the scripts working (minimal sizes, one thread).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # trains networks, runs subprocesses or the real apps

SCRIPTS = ["train_throughput", "data_path", "inference_latency", "scaling"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_smoke(name: str, tmp_path) -> None:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--smoke", "--threads", "1", "--out", str(out)],
        cwd=str(tmp_path),  # the script must find the bundle by itself
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
