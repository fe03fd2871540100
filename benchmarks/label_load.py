"""MONAI Label under load: concurrent clients on a real server, good and bad uploads, every answer checked.

The script takes a bundle (``--bundle``) or builds the apps' tests' tiny one (:func:`tests.app_bundle.make_app_bundle`:
a two-member resnet18 ensemble at 64 px trained for one epoch on synthetic ROIs, a stand-in for a trained model, with
the test calibration and an operating point that calls its inputs both ways). It writes three synthetic ROIs, each as
a 16-bit PNG and as a DICOM (MONOCHROME2, or MONOCHROME1 for the second) that states the bundle's pixel pitch and no
patient identifiers, and has the bundle itself (``configs/inference.json`` through ``ConfigWorkflow``, as the apps'
tests do) give each one's probability of malignancy and call. It then starts the real MONAI Label server
(``apps/monailabel/.venv/bin/python -m monailabel.main start_server`` on 127.0.0.1, a free port, a throwaway studies
folder, its own ``TMPDIR``) with this repository's app (a copy of ``apps/monailabel`` in the throwaway folder: the
server writes ``logs/``, ``model/``, ``lib/`` and ``bin/`` into its app folder) and ``--conf bundle``, sends every good
upload once (warm-up: the model is loaded and each reader used), and runs C clients x R requests each, all at once,
over a fixed mix of 9 uploads: the 6 good ones and 3 bad ones (a DICOM whose pixel data is cut short, a text file, a
good DICOM sent to an unknown model). Client ``c``'s request ``r`` is mix item ``(r * C + c) % 9``.

Reported: requests sent and answered; lost answers (no HTTP answer); wrong answers (a good upload answered 4xx, or
200 with a probability of malignancy more than 1e-4 from the bundle's or another call; a bad upload answered 200);
server errors (5xx) for good uploads; bad uploads answered 4xx; latency (client side, per request) p50/p95/max of the
good uploads; throughput (answers per second of the load phase); the resident memory of the server's process tree
(``VmRSS`` of ``/proc/PID/status``, summed) when started, after the warm-up, at its peak under load (sampled every
0.25 s) and after the load; the entries that the load left in the server's temporary folder (an upload that outlived
its request). The invariants (0 lost, 0 wrong, 0 server errors for good uploads, every bad upload answered 4xx, every
warm-up answer right, no entry left in the temporary folder) decide the exit status: 1 when one fails. A benchmark,
not a timed test: nothing is asserted about speed or memory.

    python -m benchmarks.label_load                         # 4 clients x 50 requests on the tiny bundle (~35 s)
    python -m benchmarks.label_load --clients 8 --requests 25 --bundle /path/to/bundle
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from benchmarks._common import REPO, Run, base_parser, setup, table
from scripts.data.imageio import read_roi_png
from scripts.data.prepare.dicom_writer import write_dicom
from scripts.data.schema import load_split
from scripts.data.synthetic import generate_dataset
from tests.app_bundle import make_app_bundle, run_inference_workflow, write_tiny_operating_point
from tests.servers import free_port, stop_process_group, wait_for_json

NAME = "label_load"
APP = REPO / "apps" / "monailabel"
LABEL_PY = APP / ".venv" / "bin" / "python"
MODEL = "microcalcification_classification"  # the app's default model name (and the tiny bundle's folder name)
TOL = 1e-4  # how far an answer's probability of malignancy may be from the bundle's own
#: the fixed request mix: six good uploads (three ROIs, each as PNG and DICOM) and three bad ones, interleaved
MIX = ("png_a", "corrupt", "dcm_a", "unknown_model", "png_b", "not_image", "dcm_b", "png_c", "dcm_c")
#: what the app answers a bad upload (its documented 4xx; the invariant asks only for a 4xx)
BAD_STATUS = {"corrupt": 422, "not_image": 422, "unknown_model": 404}
SUMMARY_COLUMNS = ["measure", "value", "expected", "ok"]
KIND_COLUMNS = ["upload", "expected", "sent", "answered", "statuses", "wrong", "p50_ms", "p95_ms", "max_ms"]


@dataclass(frozen=True)
class Upload:
    """One upload of the mix: its file, the model it is sent to and what the answer must be."""

    name: str
    filename: str
    data: bytes
    model: str
    good: bool
    p: float | None = None  # the bundle's probability of malignancy (good uploads)
    pred_class: int | None = None  # the bundle's call (good uploads)

    def expected(self) -> str:
        if self.good:
            return f"200, p {self.p:.4f}, class {self.pred_class}"
        return f"4xx ({BAD_STATUS[self.name]})"


@dataclass
class Answer:
    """One request's outcome: HTTP status (``None``: no answer), client-side seconds, why it is wrong ("" if not)."""

    upload: str
    client: int
    status: int | None
    seconds: float
    wrong: str = ""
    p: float | None = None


# -- the bundle, the inputs and the bundle's own answers -------------------------------------------------------------


def bundle_setting(bundle: Path, key: str) -> float:
    """A numeric setting of ``bundle``'s ``configs/inference.json`` (``roi_size``, ``roi_pitch_mm``)."""
    value = json.loads((bundle / "configs" / "inference.json").read_text())[key]
    if not isinstance(value, (int, float)):
        raise SystemExit(f"{bundle}/configs/inference.json: {key} is {value!r}, not a number")
    return value


def write_inputs(bundle: Path, folder: Path) -> dict[str, Path]:
    """Three synthetic ROIs of the bundle's ROI size: ``png_*`` (16-bit PNG) and ``dcm_*`` (DICOM at the bundle's pitch,
    12 bits stored, ``dcm_b`` MONOCHROME1), ``corrupt`` (``dcm_a`` with its pixel data cut short) and ``not_image`` (a
    text file). No file holds a patient identifier."""
    size, pitch = int(bundle_setting(bundle, "roi_size")), float(bundle_setting(bundle, "roi_pitch_mm"))
    datalist = generate_dataset(
        folder / "synthetic", "target", n_train=2, n_test=6, num_folds=2, image_size=size, seed=7
    )
    items = load_split(datalist, "test")[:3]
    if len(items) < 3:
        raise RuntimeError(f"{datalist}: fewer than 3 test ROIs")
    files: dict[str, Path] = {}
    for key, item in zip("abc", items):
        files[f"png_{key}"] = Path(shutil.copyfile(item["image"], folder / f"roi_{key}.png"))
        stored = np.round(read_roi_png(item["image"]) * 4095).astype(np.uint16)
        mono1 = key == "b"
        files[f"dcm_{key}"] = write_dicom(
            folder / f"roi_{key}.dcm",
            4095 - stored if mono1 else stored,
            photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
            bits_stored=12,
            window=(2048, 4096),  # stored 0..4095 -> [0, 1]
            pixel_spacing=(pitch, pitch),
        )
    data = files["dcm_a"].read_bytes()
    files["corrupt"] = folder / "roi_corrupt.dcm"
    files["corrupt"].write_bytes(data[: len(data) - len(data) // 4])  # pixel data cut short
    files["not_image"] = folder / "notes.txt"
    files["not_image"].write_text("follow-up in six months\n" * 40)
    return files


def bundle_answers(bundle: Path, files: dict[str, Path], out: Path) -> dict[str, dict]:
    """The bundle's own inference (its ``configs/inference.json``) on the good inputs: predictions.csv rows by key."""
    keys = [k for k in files if k.startswith(("png_", "dcm_"))]
    csv_path = out / "inputs.csv"
    out.mkdir(parents=True)
    csv_path.write_text("image,spacing_mm,case\n" + "".join(f"{files[k]},,{k}\n" for k in keys))
    rows = {
        r["case"]: r
        for r in run_inference_workflow(bundle / "configs", out, bundle_root=str(bundle), input_csv=str(csv_path))
    }
    bad = {k: r.get("error") for k, r in rows.items() if r["status"] != "ok"}
    if bad or set(rows) != set(keys):
        raise RuntimeError(f"the bundle's own inference failed on the benchmark's inputs: {bad or sorted(rows)}")
    return rows


def widest_gap_threshold(p: list[float]) -> float:
    """The middle of the widest gap between the probabilities ``p``: a threshold that calls them both ways."""
    values = sorted(p)
    return max((b - a, (a + b) / 2) for a, b in zip(values, values[1:]))[1]


def prepare(bundle: Path | None, work: Path) -> tuple[Path, str, dict[str, Path], dict[str, dict]]:
    """The bundle (``bundle``, or the apps' tests' tiny one built under ``work``), what it is, the inputs and the
    bundle's own answers on the good ones. The tiny bundle gets the test calibration and a threshold that calls the
    inputs both ways, chosen on their calibrated probabilities (as ``tests/test_apps.py`` does)."""
    built = bundle is None
    if bundle is None:
        bundle = make_app_bundle(work / "bundle" / MODEL)
        write_tiny_operating_point(bundle, 0.5)
        what = "tiny stand-in (tests/app_bundle.py: 2 x resnet18, 64 px, one epoch on synthetic ROIs, test calibration)"
    else:
        bundle = bundle.resolve()
        if not any((bundle / "models" / name).is_file() for name in ("model.pt", "model.ts")):
            raise SystemExit(f"--bundle {bundle}: no models/model.pt or models/model.ts")
        what = f"given: {bundle}"
    files = write_inputs(bundle, work / "inputs")
    if built:
        calibrated = bundle_answers(bundle, files, work / "threshold")
        write_tiny_operating_point(
            bundle, widest_gap_threshold([float(r["prob_malignant"]) for r in calibrated.values()])
        )
    return bundle, what, files, bundle_answers(bundle, files, work / "reference")


def make_uploads(files: dict[str, Path], rows: dict[str, dict]) -> dict[str, Upload]:
    """The mix's uploads: the good ones with the bundle's answers, the bad ones."""
    uploads = {}
    for key in MIX:
        good = key in rows
        path = files["dcm_a" if key == "unknown_model" else key]
        uploads[key] = Upload(
            name=key,
            filename=path.name,
            data=path.read_bytes(),
            model="no_such_model" if key == "unknown_model" else MODEL,
            good=good,
            p=float(rows[key]["prob_malignant"]) if good else None,
            pred_class=int(rows[key]["pred_class"]) if good else None,
        )
    return uploads


# -- the server --------------------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def tree_rss_mb(pid: int) -> float:
    """The resident set of ``pid`` and its descendants (``VmRSS`` of ``/proc/PID/status``, summed), in MiB."""
    kib = 0
    for p in process_tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        kib += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return kib / 1024


class RssSampler(threading.Thread):
    """The peak of :func:`tree_rss_mb` over the time it runs (sampled every ``every_s``)."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak_mb = pid, every_s, 0.0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))
            self.halt.wait(self.every_s)

    def stop(self) -> float:
        self.halt.set()
        self.join()
        return self.peak_mb


@dataclass
class Server:
    base: str
    pid: int
    tmp: Path
    started_s: float


@contextlib.contextmanager
def label_server(bundle: Path, work: Path, threads: int | None, timeout_s: float) -> Iterator[Server]:
    """The MONAI Label server with this repository's app (copied to ``work/app``) serving ``bundle``, on 127.0.0.1 and
    a free port, with an empty studies folder and its own ``TMPDIR`` (``work/tmp``); stopped after."""
    if not LABEL_PY.exists():
        raise SystemExit(f"{LABEL_PY.relative_to(REPO)} absent: run `bash apps/monailabel/setup.sh` first")
    app = Path(
        shutil.copytree(
            APP, work / "app", ignore=shutil.ignore_patterns(".venv", "logs", "model", "bin", "__pycache__")
        )
    )
    for name in ("studies", "tmp", "sessions"):
        (work / name).mkdir()
    port = free_port()
    cmd = [str(LABEL_PY), "-m", "monailabel.main", "start_server", "--app", str(app)]
    cmd += ["--studies", str(work / "studies")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--conf", "bundle", str(bundle)]
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "MONAI_LABEL_SESSION_PATH": str(work / "sessions")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_path = work / "server.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_json(f"{base}/info/", proc, log_path, timeout_s, "the server")
        yield Server(base=base, pid=proc.pid, tmp=work / "tmp", started_s=time.monotonic() - t0)
    finally:
        stop_process_group(proc)


def temporary_entries(tmp: Path) -> set[str]:
    """Every file and folder under the server's temporary folder, relative to it."""
    return {str(p.relative_to(tmp)) for p in tmp.rglob("*")}


# -- the clients -------------------------------------------------------------------------------------------------


def post_upload(base: str, upload: Upload, timeout_s: float) -> tuple[int, bytes]:
    """POST ``upload`` as the multipart field ``file`` to ``/infer/{model}?output=json``; (HTTP status, body)."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{upload.filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    body = head.encode() + upload.data + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    req = urllib.request.Request(f"{base}/infer/{upload.model}?output=json", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def judge(upload: Upload, status: int, body: bytes) -> tuple[str, float | None]:
    """Why an answer is wrong ("" when it is right) and the probability of malignancy it gave."""
    if not upload.good:
        return ("a prediction for a bad upload" if status == 200 else ""), None
    if status != 200:
        return f"HTTP {status}", None
    try:
        answer = json.loads(body)
        p, k = float(answer["probabilities"]["malignant"]), int(answer["pred_class"])
    except (ValueError, KeyError, TypeError):
        return "not the app's JSON answer", None
    if abs(p - upload.p) > TOL:
        return f"p {p:.6f}, the bundle's {upload.p:.6f}", p
    if k != upload.pred_class:
        return f"class {k}, the bundle's {upload.pred_class}", p
    return "", p


def request(base: str, upload: Upload, client: int, timeout_s: float) -> Answer:
    t0 = time.perf_counter()
    try:
        status, body = post_upload(base, upload, timeout_s)
    except (OSError, http.client.HTTPException) as e:  # no answer: refused, reset, timed out
        return Answer(upload.name, client, None, time.perf_counter() - t0, wrong=f"no answer: {type(e).__name__}")
    seconds = time.perf_counter() - t0
    wrong, p = judge(upload, status, body)
    return Answer(upload.name, client, status, seconds, wrong=wrong, p=p)


def run_load(
    base: str, uploads: dict[str, Upload], clients: int, requests: int, timeout_s: float
) -> tuple[list[Answer], float]:
    """``clients`` threads, started together, each sending ``requests`` requests one after the other; (answers, wall
    seconds from the start to the last answer)."""
    start = threading.Barrier(clients + 1)

    def client(c: int) -> list[Answer]:
        start.wait()
        return [request(base, uploads[MIX[(r * clients + c) % len(MIX)]], c, timeout_s) for r in range(requests)]

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(client, c) for c in range(clients)]
        start.wait()
        t0 = time.perf_counter()
        answers = [a for f in futures for a in f.result()]
    return answers, time.perf_counter() - t0


# -- the report --------------------------------------------------------------------------------------------------


def percentile_ms(seconds: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``seconds``, in ms; NaN for none."""
    if not seconds:
        return float("nan")
    ranked = sorted(seconds)
    return 1000 * ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]


def is_wrong(answer: Answer, upload: Upload) -> bool:
    """A wrong answer: a good upload answered with another probability or call, or a 4xx; a bad one answered 200
    (no answer is lost, not wrong; a 5xx for a good upload is a server error)."""
    return answer.status is not None and bool(answer.wrong) and not (upload.good and answer.status >= 500)


def summarize(answers: list[Answer], uploads: dict[str, Upload], wall_s: float) -> dict[str, Any]:
    """The load's figures (counts, latency of the good uploads, throughput)."""
    good = [a for a in answers if uploads[a.upload].good]
    bad = [a for a in answers if not uploads[a.upload].good]
    answered = [a for a in answers if a.status is not None]
    latency = [a.seconds for a in good if a.status is not None]
    errors = [abs(a.p - uploads[a.upload].p) for a in good if a.p is not None]
    return {
        "sent": len(answers),
        "answered": len(answered),
        "lost": len(answers) - len(answered),
        "wrong": sum(1 for a in answers if is_wrong(a, uploads[a.upload])),
        "server_errors_good": sum(1 for a in good if a.status is not None and a.status >= 500),
        "good_sent": len(good),
        "bad_sent": len(bad),
        "bad_4xx": sum(1 for a in bad if a.status is not None and 400 <= a.status < 500),
        "max_abs_p_error": max(errors) if errors else None,
        "p50_ms": percentile_ms(latency, 50),
        "p95_ms": percentile_ms(latency, 95),
        "max_ms": percentile_ms(latency, 100),
        "wall_s": wall_s,
        "answers_per_s": len(answered) / wall_s if wall_s > 0 else float("nan"),
        "good_answers_per_s": len(latency) / wall_s if wall_s > 0 else float("nan"),
    }


def invariants(summary: dict[str, Any]) -> dict[str, bool]:
    """What must hold after the load (any failure: exit status 1)."""
    return {
        "no_lost_answers": summary["lost"] == 0 and summary["answered"] == summary["sent"],
        "no_wrong_answers": summary["wrong"] == 0,
        "no_server_errors_for_good_uploads": summary["server_errors_good"] == 0,
        "every_bad_upload_answered_4xx": summary["bad_4xx"] == summary["bad_sent"],
        "warm_up_answered_right": summary["warm_up_wrong"] == [],
        "no_upload_left_in_tmp": summary["tmp_entries_left"] == [],
    }


def summary_rows(s: dict[str, Any], ok: dict[str, bool]) -> list[dict]:
    yes = {True: "yes", False: "**NO**"}
    rss = f"{s['rss_started_mb']:.0f} / {s['rss_before_mb']:.0f} / {s['rss_peak_mb']:.0f} / {s['rss_after_mb']:.0f}"
    return [
        {"measure": "clients x requests", "value": f"{s['clients']} x {s['requests']}"},
        {"measure": "requests sent / answered", "value": f"{s['sent']} / {s['answered']}", "expected": "all answered"},
        {"measure": "lost answers", "value": s["lost"], "expected": 0, "ok": yes[ok["no_lost_answers"]]},
        {"measure": "wrong answers", "value": s["wrong"], "expected": 0, "ok": yes[ok["no_wrong_answers"]]},
        {"measure": "server errors (5xx) for good uploads", "value": s["server_errors_good"], "expected": 0,
         "ok": yes[ok["no_server_errors_for_good_uploads"]]},
        {"measure": "bad uploads answered 4xx", "value": f"{s['bad_4xx']} / {s['bad_sent']}", "expected": "all",
         "ok": yes[ok["every_bad_upload_answered_4xx"]]},
        {"measure": "warm-up answers wrong", "value": len(s["warm_up_wrong"]), "expected": 0,
         "ok": yes[ok["warm_up_answered_right"]]},
        {"measure": "entries left in the server's TMPDIR", "value": len(s["tmp_entries_left"]), "expected": 0,
         "ok": yes[ok["no_upload_left_in_tmp"]]},
        {"measure": f"max abs(p - bundle's p), good uploads (tolerance {TOL:g})", "value": s["max_abs_p_error"]},
        {"measure": "latency p50 / p95 / max, good uploads (ms)",
         "value": f"{s['p50_ms']:.0f} / {s['p95_ms']:.0f} / {s['max_ms']:.0f}"},
        {"measure": "throughput (answers/s; good answers/s)",
         "value": f"{s['answers_per_s']:.2f}; {s['good_answers_per_s']:.2f}"},
        {"measure": "server RSS MB: started / after warm-up / peak / after", "value": rss},
        {"measure": "server start (s); load phase (s)", "value": f"{s['server_start_s']:.1f}; {s['wall_s']:.1f}"},
    ]  # fmt: skip


def kind_rows(answers: list[Answer], uploads: dict[str, Upload]) -> list[dict]:
    """One row per upload of the mix that was sent: what it expects, what it got, its latency."""
    rows = []
    for key in MIX:
        mine = [a for a in answers if a.upload == key]
        if not mine:
            continue
        statuses: dict[str, int] = {}
        for a in mine:
            statuses[str(a.status or "none")] = statuses.get(str(a.status or "none"), 0) + 1
        seconds = [a.seconds for a in mine if a.status is not None]
        rows.append({
            "upload": key,
            "expected": uploads[key].expected(),
            "sent": len(mine),
            "answered": len(seconds),
            "statuses": ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items())),
            "wrong": sum(1 for a in mine if is_wrong(a, uploads[key])),
            "p50_ms": round(percentile_ms(seconds, 50), 1),
            "p95_ms": round(percentile_ms(seconds, 95), 1),
            "max_ms": round(percentile_ms(seconds, 100), 1),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = base_parser(NAME, __doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    ap.add_argument("--requests", type=int, default=50, help="requests per client (default 50)")
    ap.add_argument("--bundle", type=Path, default=None, help="the bundle to serve (default: build the tiny one)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a client waits for one answer")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds the server may take to start")
    args = ap.parse_args(argv)
    if args.smoke:
        args.clients, args.requests = 2, 3
    if args.clients < 1 or args.requests < 1:
        ap.error("--clients and --requests must be at least 1")
    device = setup(args)
    with Run(NAME, args, device) as run, tempfile.TemporaryDirectory(prefix="bench_label_load_") as tmp:
        work = Path(tmp)
        print(
            "# the bundle and its answers on the inputs" + (" (building the tiny one)" if args.bundle is None else ""),
            flush=True,
        )
        bundle, what, files, rows = prepare(args.bundle, work)
        uploads = make_uploads(files, rows)
        first = next(iter(rows.values()))
        run.payload["bundle"] = {
            "what": what,
            "operating_point": first["operating_point"],
            "threshold": float(first["threshold"]),
        }
        run.payload["uploads"] = {
            k: {"expected": u.expected(), "model": u.model, "bytes": len(u.data)} for k, u in uploads.items()
        }
        print(f"# starting the MONAI Label server on {what}", flush=True)
        with label_server(bundle, work / "server", args.threads, args.start_timeout) as server:
            rss_started = tree_rss_mb(server.pid)
            before = temporary_entries(server.tmp)  # the server's own (its logging configuration)
            warm = [request(server.base, u, -1, args.timeout) for u in uploads.values() if u.good]
            rss_before = tree_rss_mb(server.pid)
            print(
                f"# server up in {server.started_s:.1f} s; load: {args.clients} clients x {args.requests} requests",
                flush=True,
            )
            sampler = RssSampler(server.pid)
            sampler.start()
            answers, wall_s = run_load(server.base, uploads, args.clients, args.requests, args.timeout)
            rss_peak = sampler.stop()
            time.sleep(1)  # background tasks run after an answer is sent
            rss_after = tree_rss_mb(server.pid)
            left = sorted(temporary_entries(server.tmp) - before)
        summary = summarize(answers, uploads, wall_s)
        summary.update(
            clients=args.clients,
            requests=args.requests,
            warm_up_wrong=[f"{a.upload}: {a.wrong}" for a in warm if a.wrong],
            tmp_entries_at_start=len(before),
            tmp_entries_left=left,
            rss_started_mb=round(rss_started, 1),
            rss_before_mb=round(rss_before, 1),
            rss_peak_mb=round(max(rss_peak, rss_before, rss_after), 1),
            rss_after_mb=round(rss_after, 1),
            server_start_s=round(server.started_s, 1),
        )
        ok = invariants(summary)
        run.payload.update(summary=summary, invariants=ok, passed=all(ok.values()))
        run.payload["requests"] = [asdict(a) for a in answers]
        run.rows.extend(kind_rows(answers, uploads))
        print()
        print(table(summary_rows(summary, ok), SUMMARY_COLUMNS, "MONAI Label under load"))
        print(f"bundle: {what}; {run.payload['bundle']['operating_point']}")
        print()
        print(table(run.rows, KIND_COLUMNS, "Per upload (latency of every answered request)"))
        wrong = [f"{a.upload} (client {a.client}): {a.wrong}" for a in warm + answers if a.wrong]
        if wrong:
            print("\nnot answered right: " + "; ".join(wrong[:20]) + (" ..." if len(wrong) > 20 else ""))
        if left:
            print(f"\nleft in the server's TMPDIR: {left[:20]}")
        failed = [k for k, v in ok.items() if not v]
        print("\nINVARIANTS FAILED: " + ", ".join(failed) if failed else "\nall invariants hold")
    return run.payload


if __name__ == "__main__":
    sys.exit(0 if main().get("passed") else 1)
