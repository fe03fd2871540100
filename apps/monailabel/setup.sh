#!/usr/bin/env bash
# One-command setup of this app's own environment: apps/monailabel/.venv (or $VENV), from requirements.txt beside this file.
# Python 3.11 ($PYTHON, default python3). Re-running it on an existing environment only checks the pins.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${VENV:-$here/.venv}"
python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is needed, got " + sys.version)'
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
"$venv/bin/python" -c "import monailabel, pydicom; print('MONAI Label', monailabel.__version__, '(pydicom', pydicom.__version__ + ')', 'in', '$venv')"
