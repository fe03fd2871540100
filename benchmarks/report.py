"""Print the saved benchmark results (``benchmarks/results/*.json``) as Markdown tables, with their machine lines.

python -m benchmarks.report [results/x.json ...] > tables.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import data_path, inference_latency, label_load, scaling, train_throughput
from benchmarks._common import RESULTS, fmt, table

COLUMNS = {
    "train_throughput": train_throughput.COLUMNS,
    "data_path": data_path.COLUMNS,
    "inference_latency": inference_latency.COLUMNS,
    "scaling": scaling.COLUMNS,
    "label_load": label_load.KIND_COLUMNS,
}


def render(path: Path) -> str:
    """Markdown for one result file."""
    res = json.loads(path.read_text())
    m = res["machine"]
    lines = [
        f"### {path.name} ({res['benchmark']}, {res.get('started', '?')})",
        "",
        f"{m['nproc']} cores, {m['cpu_model']}, torch {m.get('torch')} with {m['torch_threads']} thread(s), device "
        f"{m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}; 1-minute load average {m['load1_before']} "
        f"before, {m['load1_after']} after; other processes used {fmt(m.get('foreign_cores'))} cores on average"
        + ("" if m.get("quiet") else " (**not a quiet machine**)"),
        "",
        table(res["rows"], COLUMNS[res["benchmark"]]),
    ]
    if res["benchmark"] == "label_load":
        summary = label_load.summary_rows(res["summary"], res["invariants"])
        lines += ["", f"Bundle: {res['bundle']['what']}.", "", table(summary, label_load.SUMMARY_COLUMNS)]
    verdict = res.get("epoch_verdict")
    if verdict:
        cols = ["train_size", "train_img_per_s", "data_path", "data_img_per_s", "data_share_of_epoch", "limits"]
        lines += ["", f"Training throughput from {verdict['train_source']}:", "", table(verdict["rows"], cols)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", type=Path, help="result files (default: every benchmarks/results/*.json)")
    paths = ap.parse_args(argv).results or sorted(RESULTS.glob("*.json"))
    print("\n\n".join(render(p) for p in paths))


if __name__ == "__main__":
    main()
