"""Fill (or check) the ``hash_val`` of every entry of ``large_files.yml`` from the file it names.

    python -m scripts.model.hash_weights               # write the SHA-256 of models/model.pt (and any other entry) in place
    python -m scripts.model.hash_weights --check       # exit 1 when a file is missing or its hash differs

Only the ``hash_val`` lines are rewritten (comments and order are kept); ``hash_type`` must be ``sha256`` or
``md5``. Entries whose file is absent are left unchanged (with a warning) unless ``--check`` is given.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

import yaml

from scripts.engine.atomic import file_digest, write_text

BUNDLE_DIR = Path(__file__).resolve().parents[2]
HASH_TYPES = ("sha256", "md5")


def read_entries(yml: str | Path) -> list[dict]:
    """The ``large_files`` entries; raises ``ValueError`` for a file that is not in the model-zoo format."""
    data = yaml.safe_load(Path(yml).read_text()) or {}
    entries = data.get("large_files") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{yml}: expected a non-empty 'large_files' list")
    for i, e in enumerate(entries):
        missing = [k for k in ("path", "url", "hash_val", "hash_type") if not isinstance(e, dict) or k not in e]
        if missing:
            raise ValueError(f"{yml}: large_files[{i}] lacks {', '.join(missing)}")
        if e["hash_type"] not in HASH_TYPES:
            raise ValueError(f"{yml}: large_files[{i}] hash_type {e['hash_type']!r} is not one of {HASH_TYPES}")
    return entries


def fill_hashes(yml: str | Path, bundle_root: str | Path | None = None) -> dict[str, str]:
    """Write each present file's digest into its entry's ``hash_val`` line; returns ``{path: digest}``."""
    yml = Path(yml)
    root = Path(bundle_root) if bundle_root else yml.parent
    entries = read_entries(yml)
    digests = {}
    for e in entries:
        f = root / e["path"]
        if f.is_file():
            digests[e["path"]] = file_digest(f, e["hash_type"])
        else:
            print(f"warning: {f} not found; hash_val of {e['path']} left unchanged", file=sys.stderr)
    lines = yml.read_text().splitlines(keepends=True)
    current = None
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*-?\s*)path:\s*['\"]?([^'\"#]+?)['\"]?\s*(#.*)?$", line)
        if m:
            current = m.group(2).strip()
            continue
        m = re.match(r"^(\s*)hash_val:.*?(\r?\n)?$", line)
        if m and current in digests:
            lines[i] = f'{m.group(1)}hash_val: "{digests[current]}"{m.group(2) or ""}'
    text = "".join(lines)
    check = {e["path"]: e["hash_val"] for e in yaml.safe_load(text)["large_files"]}
    if any(check.get(p) != d for p, d in digests.items()):
        raise RuntimeError(f"{yml}: could not place every hash_val line; edit the file by hand")

    write_text(yml, text)
    return digests


def check_hashes(yml: str | Path, bundle_root: str | Path | None = None) -> list[str]:
    """Problems (missing files, differing digests) as lines; empty when every file matches its ``hash_val``."""
    yml = Path(yml)
    root = Path(bundle_root) if bundle_root else yml.parent
    problems = []
    for e in read_entries(yml):
        f = root / e["path"]
        if not f.is_file():
            problems.append(f"{e['path']}: file not found")
        elif file_digest(f, e["hash_type"]) != str(e["hash_val"]):
            problems.append(f"{e['path']}: {e['hash_type']} differs from hash_val")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.model.hash_weights", description=__doc__.splitlines()[0])
    p.add_argument("--file", default=str(BUNDLE_DIR / "large_files.yml"), help="the large_files.yml to update")
    p.add_argument("--bundle-root", default=None, help="folder the entries' paths are relative to (default: the yml's)")
    p.add_argument("--check", action="store_true", help="verify instead of writing; exit 1 on a mismatch")
    a = p.parse_args(argv)
    if a.check:
        problems = check_hashes(a.file, a.bundle_root)
        for line in problems:
            print(line)
        print("all hashes match" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    for path, digest in fill_hashes(a.file, a.bundle_root).items():
        print(f"{path}: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
