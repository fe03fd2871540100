#!/usr/bin/env bash
# Shared by apps/*/setup.sh: make (or, if it exists, re-check the pins of) an app's own environment, APP_DIR/.venv
# (or $VENV), from APP_DIR/requirements.txt, with Python 3.11 ($PYTHON, default python3); then run CHECK (Python
# code that imports the app's tools and prints their versions).
# Usage: bash apps/venv_setup.sh APP_DIR CHECK
set -euo pipefail
here="$(cd "$1" && pwd)"
check="$2"
venv="${VENV:-$here/.venv}"
python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is needed, got " + sys.version)'
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
"$venv/bin/python" -c "$check"
