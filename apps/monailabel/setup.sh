#!/usr/bin/env bash
# One-command setup of this app's own environment: apps/monailabel/.venv (or $VENV), from requirements.txt beside this file.
# Python 3.11 ($PYTHON, default python3). Re-running it on an existing environment only checks the pins.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/../venv_setup.sh" "$here" \
    "import sys, monailabel, pydicom, pytorch_grad_cam; print('MONAI Label', monailabel.__version__, '(pydicom', pydicom.__version__ + ')', 'in', sys.prefix)"
# Orthanc (a PACS serving studies over DICOMweb) and storescu: system packages (installed by .ci/run)
{ PATH="$PATH:/usr/sbin" command -v Orthanc && command -v storescu; } >/dev/null ||
    echo "note: Orthanc or storescu absent (Debian packages orthanc, orthanc-dicomweb, dcmtk): the tests that serve studies from Orthanc will skip"
