"""Helpers shared by the benchmark scripts: repository path, machine facts, quiet-machine checks, timing, output.

Every script measures what it measures side by side in one run, prints a table and writes a JSON file whose
``machine`` block records the CPU, the thread count, the 1-minute load average before and after, and the CPU time
that *other* processes used while the script ran (``foreign_cores``: 0 on an idle machine, 1.0 when another
process kept one core busy). Timings taken with ``foreign_cores`` well above 0 are pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "benchmarks" / "results"


# ----------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _busy_jiffies() -> int | None:
    """Busy CPU time of the whole machine (all cores), in clock ticks, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    vals = [int(v) for v in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]) - idle


def _own_cpu_s() -> float:
    """CPU seconds used by this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class LoadMonitor:
    """Measure how much CPU other processes used between :meth:`start` and :meth:`stop` (in cores)."""

    def __init__(self) -> None:
        self.t0 = self.busy0 = self.own0 = None

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_jiffies(), _own_cpu_s()

    def stop(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self.t0
        busy1, own1 = _busy_jiffies(), _own_cpu_s()
        if self.busy0 is None or busy1 is None or wall <= 0:
            return {"wall_s": wall, "own_cores": None, "foreign_cores": None}
        hz = os.sysconf("SC_CLK_TCK")
        total = (busy1 - self.busy0) / hz
        own = own1 - self.own0
        return {
            "wall_s": round(wall, 3),
            "own_cores": round(own / wall, 2),
            "foreign_cores": round(max(total - own, 0.0) / wall, 2),
        }


def load1() -> float:
    """The 1-minute load average."""
    return round(os.getloadavg()[0], 2)


def wait_for_quiet(max_load: float, retries: int, sleep_s: float = 60.0, log: Callable = print) -> dict:
    """Wait (``retries`` times ``sleep_s``) until the 1-minute load average is at most ``max_load``.

    Returns ``{"load1_before": ..., "quiet": bool, "waited_s": ...}``; measuring goes on either way.
    """
    waited = 0.0
    for attempt in range(retries + 1):
        now = load1()
        if now <= max_load:
            return {"load1_before": now, "quiet": True, "waited_s": waited}
        if attempt < retries:
            log(f"# load average {now} > {max_load}: waiting {sleep_s:.0f} s ({attempt + 1}/{retries})")
            time.sleep(sleep_s)
            waited += sleep_s
    log(f"# load average still {now} > {max_load}: measuring anyway (timings are pessimistic)")
    return {"load1_before": now, "quiet": False, "waited_s": waited}


def machine_info(device: str) -> dict[str, Any]:
    """Facts about the machine that a timing depends on."""
    import torch

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    try:
        info["mem_total_gib"] = round(
            int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) / 2**20, 1
        )
    except (OSError, IndexError, ValueError):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------------------------- arguments
def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: ``--out``, ``--device``, ``--smoke``, ``--threads``, quiet-machine knobs."""
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    ap.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="JSON result file")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    ap.add_argument("--smoke", action="store_true", help="minimal sizes: checks that the script works, not speed")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-minute load average is above")
    ap.add_argument("--wait-retries", type=int, default=3, help="how many 60 s waits for a quiet machine")
    return ap


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return name


def setup(args: argparse.Namespace) -> str:
    """Apply ``--threads``, silence library warnings and return the resolved device."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")

    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


# ----------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@contextmanager
def timer(out: list[float], device: str = "cpu") -> Iterator[None]:
    """Append the wall time of the block (synchronising CUDA) to ``out``."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    out.append(time.perf_counter() - t0)


def reset_vm_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process; False when not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_mb(key: str) -> float:
    """The ``key`` line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...; the kernel reports KiB) in MiB; NaN
    where there is no such file or line."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    values = [int(line.split()[1]) for line in lines if line.startswith(key + ":")]
    return values[0] / 1024.0 if values else float("nan")


def vm_hwm_mb() -> float:
    """``VmHWM`` of this process in MiB: its peak resident set size since it started or since
    :func:`reset_vm_hwm`."""
    return proc_status_mb("VmHWM")


def current_rss_mb() -> float:
    """This process's current resident set size, in MiB."""
    return proc_status_mb("VmRSS")


def run_json_subprocess(argv: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``python argv...`` (a benchmark's ``--child`` mode) and parse the JSON on its last stdout line."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=str(REPO), check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"child {argv} printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------- output
def train_workflow(
    data_root: Path, out_dir: Path, size: int, arch: str, batch: int, device: str, **overrides: Any
) -> Any:
    """The bundle's train workflow (``configs/train.json`` with the ``configs/resilience.json`` overlay, as the main
    job trains, through ``ConfigWorkflow``), initialised, with validation pushed out of the way (``val_interval`` of
    10**9); ``overrides`` are config ids (``"a#b": value``)."""
    from monai.bundle import ConfigWorkflow

    settings: dict[str, Any] = dict(
        bundle_root=str(REPO),
        dataset_dir=str(data_root),
        output_dir=str(out_dir / "runs"),
        ckpt_dir=str(out_dir / "models"),
        arch=arch,
        init="scratch",
        image_size=size,
        batch_size=batch,
        device=f"$torch.device('{device}')",
        val_interval=10**9,
    )
    settings.update(overrides)
    wf = ConfigWorkflow(
        config_file=[str(REPO / "configs" / f) for f in ("train.json", "resilience.json")],
        meta_file=str(REPO / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **settings,
    )
    wf.initialize()
    return wf


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> str:
    """A Markdown table of ``rows`` restricted to ``columns``."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [f"### {title}"] if title else []
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def write_result(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as JSON (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


class Run:
    """One benchmark run: quiet-machine check, load monitoring, the result file.

    Use as ``with Run(name, args, device) as run: ...; run.rows.append(...)``; on exit the machine block (load
    average before/after, CPU used by other processes) is completed and the JSON written.
    """

    def __init__(self, name: str, args: argparse.Namespace, device: str) -> None:
        self.name, self.args, self.device = name, args, device
        self.payload: dict[str, Any] = {"benchmark": name, "args": vars(args), "rows": []}
        self.monitor = LoadMonitor()

    @property
    def rows(self) -> list[dict]:
        return self.payload["rows"]

    def __enter__(self) -> "Run":
        retries = 0 if self.args.smoke else self.args.wait_retries
        quiet = wait_for_quiet(self.args.max_load, retries)
        self.payload["machine"] = {**machine_info(self.device), **quiet}
        self.payload["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.monitor.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        m = self.payload["machine"]
        m.update(self.monitor.stop())
        m["load1_after"] = load1()
        if exc[0] is None:
            out = write_result(self.args.out, self.payload)
            print(
                f"\nmachine: {m['nproc']} cores ({m['cpu_model']}), torch threads {m['torch_threads']}, "
                f"device {m['device']}; load1 before {m['load1_before']} after {m['load1_after']}; "
                f"other processes used {fmt(m.get('foreign_cores'))} cores on average"
                + ("" if m["quiet"] else "  ** machine was not quiet: timings are pessimistic **")
            )
            print(f"results: {out}")
