#!/usr/bin/env bash
# One-command setup of this app's own environment: apps/monailabel/.venv (or $VENV), from requirements.txt beside this file.
# Python 3.11 ($PYTHON, default python3). Re-running it on an existing environment only checks the pins.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec bash "$here/../venv_setup.sh" "$here" \
    "import sys, monailabel, pydicom; print('MONAI Label', monailabel.__version__, '(pydicom', pydicom.__version__ + ')', 'in', sys.prefix)"
