"""Is an output current? One answer for every stage, from explicit inputs, with the reason when it is not.

A :class:`Fingerprint` is a set of named parts, each a short text: the digest of a config file's text, the JSON of a
setting, the digest of an input file's contents. Its :attr:`~Fingerprint.digest` is the SHA-256 of the parts. Beside
an output, :func:`record` keeps the parts (``<output>.fingerprint``, JSON), so that :func:`why_stale` can say which
part changed: ``"fold 2 reruns: setting learning_rate 0.001 -> 0.002"``.

Users: the main job (:mod:`scripts.main_job`, one record per stage output), training resume
(``run_fingerprint`` in ``configs/resilience.json``: a ``last.pt`` of another run is not resumed) and data preparation
(:func:`digest_of` of the preparation settings).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from scripts.engine.atomic import file_digest, write_json

PathLike = str | os.PathLike


def digest_of(value: Any) -> str:
    """SHA-256 (hex) of ``value`` as sorted-key JSON (non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """Named parts (``"config train.json"``, ``"setting fold"``, ``"file datalist"`` -> text) and their digest."""

    parts: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return digest_of(self.parts)

    def changes(self, old: Mapping[str, str]) -> list[str]:
        """What differs from the ``old`` parts, one phrase each (settings show old -> new, files and configs not)."""
        out = []
        for name in sorted(set(old) | set(self.parts)):
            before, now = old.get(name), self.parts.get(name)
            if before == now:
                continue
            if before is None:
                out.append(f"{name} added")
            elif now is None:
                out.append(f"{name} removed")
            elif name.startswith("setting "):
                out.append(f"{name} {_short(before)} -> {_short(now)}")
            else:
                out.append(f"{name} changed")
        return out


def describe(obj: Any, depth: int = 3) -> Any:
    """A JSON-able description of ``obj`` for a fingerprint, so that changing any parameter of, say, an
    augmentation changes the description.

    Args:
        obj: numbers, strings and ``None`` are kept as they are, sequences and mappings described item by item,
            classes by their name, other objects as their class name and public attributes.
        depth: how many levels of nested objects are described by their attributes; deeper ones by their class
            name only.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): describe(v, depth) for k, v in obj.items()}
    if isinstance(obj, type):
        return obj.__name__
    if depth <= 0 or not hasattr(obj, "__dict__"):
        return type(obj).__name__
    public = {k: describe(v, depth - 1) for k, v in vars(obj).items() if not k.startswith("_")}
    return {"class": type(obj).__name__, **public}


def compute(
    configs: Sequence[PathLike] = (),
    settings: Mapping[str, Any] | None = None,
    files: Mapping[str, PathLike | None] | None = None,
) -> Fingerprint:
    """The fingerprint of a run made from these ``configs`` (file text), ``settings`` and input ``files``.

    Args:
        configs: config files; each part is named by the file name and holds the digest of its text.
        settings: values that change the output (not file locations: a moved folder leaves a stage current);
            nested dicts become one part per leaf (``generator.params.cnr``), so a change names the leaf.
        files: role -> input file, hashed by content; ``None`` and paths that are not files (e.g. a torchvision
            weights name, which is a setting) are left out.
    """
    parts = {f"config {Path(c).name}": file_digest(c) for c in configs}
    parts.update({f"setting {k}": json.dumps(v, sort_keys=True, default=str) for k, v in _flat(settings or {})})
    for role, path in (files or {}).items():
        if path is not None and Path(path).is_file():
            parts[f"file {role}"] = file_digest(path)
    return Fingerprint(parts)


def record_file(output: PathLike) -> Path:
    """Where the fingerprint of ``output`` is kept: ``<output>.fingerprint`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".fingerprint")


def why_stale(output: PathLike, fp: Fingerprint) -> str | None:
    """Whether ``output`` must be made (again).

    Args:
        output: the file a step writes.
        fp: the fingerprint the step would record now.

    Returns:
        ``None`` when ``output`` exists and its record holds ``fp``; otherwise the reason, e.g. the changed parts.
    """
    if not Path(output).is_file():
        return "no output yet"
    rec = record_file(output)
    try:
        text = rec.read_text()
        old = None if re.fullmatch(r"[0-9a-f]{64}\s*", text) else json.loads(text)  # plain digest: an earlier version
    except FileNotFoundError:
        return f"no fingerprint record beside {Path(output).name}"
    except (OSError, ValueError) as e:
        return f"fingerprint record {rec.name} unreadable ({e})"
    if not isinstance(old, dict) or not isinstance(old.get("parts"), dict):
        return f"fingerprint record {rec.name} is from an earlier version of the bundle"
    if old.get("digest") == fp.digest:
        return None
    return "; ".join(fp.changes(old["parts"])) or "fingerprint differs"


def record(output: PathLike, fp: Fingerprint) -> None:
    """Keep ``fp`` beside ``output`` (atomically)."""
    write_json(record_file(output), {"digest": fp.digest, "parts": fp.parts})


def forget(output: PathLike) -> None:
    """Drop the record of ``output`` (before remaking it, so that a crash leaves it stale)."""
    record_file(output).unlink(missing_ok=True)


def _flat(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in settings.items():
        if isinstance(v, Mapping) and v:
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
