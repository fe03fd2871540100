"""Local servers for the app tests and benchmarks (MONAI Label, Orthanc): a free port, waiting until one answers,
and stopping its whole process group."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> bytes:
    """Poll ``url`` until it answers; return the body.

    Raises:
        RuntimeError: ``proc`` exited, or nothing answered within ``timeout_s``; with the tail of ``log``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def wait_for_json(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> dict:
    """:func:`wait_until_answering` for a JSON endpoint; the parsed answer."""
    return json.loads(wait_until_answering(url, proc, log, timeout_s, what))


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the process group of ``proc`` (started with ``start_new_session=True``), SIGKILL after
    ``timeout_s``; returns when it has exited."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
