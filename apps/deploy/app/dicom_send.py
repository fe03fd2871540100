"""Send the application's DICOM results to a PACS with STOW-RS (DICOMweb ``POST {root}/studies``, PS3.18 10.5).

``--send-to http://HOST:PORT/dicom-web`` names the DICOMweb root of the PACS (Orthanc with its DICOMweb plugin: its
``/dicom-web``); ``http://USER:PASSWORD@HOST:PORT/dicom-web`` adds HTTP basic authentication. One request per ROI
carries its SR and its Secondary Capture as ``multipart/related; type="application/dicom"``. Only the standard
library is used (no new dependency in the app's environment). Nothing here logs or returns a patient attribute, nor
the URL's password.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

SEND_OPTION = "--send-to"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"


class SendError(RuntimeError):
    """The PACS refused the objects or could not be reached (the message names no patient attribute)."""


def check_url(url: str) -> str:
    """``url`` when it is an ``http(s)://host[:port]/path`` DICOMweb root, else a :class:`ValueError` naming the
    option."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(
            f"{SEND_OPTION} needs the DICOMweb root URL of the PACS, e.g. http://127.0.0.1:8042/dicom-web, "
            f"got {shown_url(url)!r}"
        )
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{SEND_OPTION}: bad port in {shown_url(url)!r}") from None
    return url


def shown_url(url: str) -> str:
    """``url`` without its user name and password (for logs and records)."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc += f":{port}" if port else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def stow_rs(url: str, paths: list[Path], timeout: float = 60.0) -> list[str]:
    """Store the DICOM files ``paths`` on the DICOMweb server whose root is ``url`` (one STOW-RS request); return the
    SOP Instance UIDs the server reports stored. :class:`SendError` when it cannot be reached, answers an HTTP error,
    or lists any object as failed."""
    parts = urllib.parse.urlsplit(check_url(url))
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + Path(p).read_bytes() + b"\r\n"
        for p in paths
    )
    body += f"--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    endpoint = shown_url(
        urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/studies", "", ""))
    )
    request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = response.read()
    except urllib.error.HTTPError as e:
        raise SendError(f"STOW-RS to {shown_url(url)}: the server answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SendError(f"STOW-RS to {shown_url(url)}: cannot reach the server ({reason})") from None
    try:
        result = json.loads(answer) if answer.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        result = {}  # a server that answers 200 without a DICOM JSON body (none listed as failed)
    if isinstance(result, list):
        result = result[0] if result else {}
    failed = result.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    if failed:
        reasons = sorted({str(f.get(FAILURE_REASON, {}).get("Value", ["?"])[0]) for f in failed})
        raise SendError(
            f"STOW-RS to {shown_url(url)}: the server refused {len(failed)} of {len(paths)} object(s) "
            f"(failure reason {', '.join(reasons)})"
        )
    stored = result.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
    return [str(s.get("00081155", {}).get("Value", [""])[0]) for s in stored]
