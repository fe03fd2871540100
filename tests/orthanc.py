"""A throwaway Orthanc PACS on 127.0.0.1 for the apps' tests (and for trying the Orthanc-backed workflow by hand).

    python -m tests.orthanc [--http-port 8042] [--dicom-port 4242]

starts Debian's ``Orthanc`` (packages ``orthanc`` and ``orthanc-dicomweb``) with a generated configuration: a
temporary storage folder, the DICOMweb plugin at ``/dicom-web``, HTTP answered for this machine only
(``RemoteAccessAllowed`` false) without authentication, and DICOM C-STORE accepted only from 127.0.0.1 (any calling
AE title). It runs until Ctrl-C (or SIGTERM), then stops Orthanc and deletes its storage, which holds the patient
attributes of whatever was stored. It never touches a system Orthanc service, its configuration or its ports.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.servers import free_port, stop_process_group, wait_until_answering

#: where Debian's orthanc-dicomweb puts its plugin (``dpkg -L orthanc-dicomweb``)
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*",
)
AET = "ORTHANC"
INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb dcmtk (.ci/run installs them)"


class OrthancUnavailable(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed."""


@dataclass
class Orthanc:
    """A running Orthanc: its REST root ``url``, DICOMweb root ``dicomweb``, DICOM ``aet`` and ``dicom_port``."""

    url: str
    dicomweb: str
    aet: str
    dicom_port: int
    log: Path

    def get(self, path: str) -> object:
        """``GET url + path`` as JSON."""
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: object) -> object:
        """``POST url + path`` with a JSON body, answered as JSON."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


def find_binary() -> str:
    """The ``Orthanc`` executable (on PATH or in /usr/sbin), or :class:`OrthancUnavailable`."""
    found = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)
    if not found:
        raise OrthancUnavailable(f"the Orthanc binary is absent: {INSTALL_HINT}")
    return found


def find_dicomweb_plugin() -> str:
    """The DICOMweb plugin's shared library, or :class:`OrthancUnavailable`."""
    for pattern in PLUGIN_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    raise OrthancUnavailable(f"Orthanc's DICOMweb plugin (libOrthancDicomWeb.so) is absent: {INSTALL_HINT}")


def orthanc_config(storage: Path, http_port: int, dicom_port: int, plugin: str) -> dict:
    """Orthanc's configuration: storage in ``storage``, the DICOMweb plugin, local access only, no authentication."""
    return {
        "Name": "throwaway test PACS",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP: this machine only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        # C-STORE from 127.0.0.1 only (any calling AE title: storescu says STORESCU, pynetdicom PYNETDICOM)
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {
            "storescu": {"AET": "STORESCU", "Host": "127.0.0.1", "Port": 104},
            "pynetdicom": {"AET": "PYNETDICOM", "Host": "127.0.0.1", "Port": 104},
        },
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1", "Ssl": False},
        "SaveJobs": False,
        "StorageCompression": False,
        "HttpThreadsCount": 8,
        "ConcurrentJobs": 1,
    }


@contextlib.contextmanager
def running_orthanc(
    http_port: int | None = None, dicom_port: int | None = None, timeout: float = 60
) -> Iterator[Orthanc]:
    """Start a throwaway Orthanc (free ports unless given); yield it; stop it and delete its storage."""
    binary, plugin = find_binary(), find_dicomweb_plugin()
    work = Path(tempfile.mkdtemp(prefix="orthanc-"))
    http_port, dicom_port = http_port or free_port(), dicom_port or free_port()
    config = work / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(work / "storage", http_port, dicom_port, plugin), indent=2))
    log = work / "orthanc.log"
    url = f"http://127.0.0.1:{http_port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [binary, "--no-jobs", str(config)], cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_answering(url + "/dicom-web/studies", proc, log, timeout, "Orthanc")
        yield Orthanc(url=url, dicomweb=url + "/dicom-web", aet=AET, dicom_port=dicom_port, log=log)
    finally:
        stop_process_group(proc)
        shutil.rmtree(work, ignore_errors=True)  # the storage holds the stored DICOMs' patient attributes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.orthanc", description=__doc__.splitlines()[0])
    p.add_argument("--http-port", type=int, default=8042, help="HTTP port (REST, DICOMweb at /dicom-web); 8042")
    p.add_argument("--dicom-port", type=int, default=4242, help="DICOM port (C-STORE, AE title ORTHANC); 4242")
    a = p.parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        with running_orthanc(a.http_port, a.dicom_port) as pacs:
            print(f"Orthanc: DICOMweb {pacs.dicomweb}, DICOM {pacs.aet}@127.0.0.1:{pacs.dicom_port}; Ctrl-C stops it")
            sys.stdout.flush()
            while not stop:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except OrthancUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
