#!/usr/bin/env bash
# One-command setup of this app's own environment: apps/deploy/.venv (or $VENV), from requirements.txt beside this file.
# Python 3.11 ($PYTHON, default python3). Re-running it on an existing environment only checks the pins.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/../venv_setup.sh" "$here" \
    "import sys, holoscan, monai.deploy; print('MONAI Deploy App SDK', monai.deploy.__version__, '(holoscan', holoscan.__version__ + ')', 'in', sys.prefix)"
# dciodvfy validates the app's DICOM results in tests/test_apps.py (a system package: installed by .ci/run)
command -v dciodvfy >/dev/null ||
    echo "note: dciodvfy absent (Debian package dicom3tools, e.g. sudo apt-get install dicom3tools): the tests that validate the app's DICOM results will skip"
# Orthanc (the PACS the tests send the results to) and storescu: system packages (installed by .ci/run)
{ PATH="$PATH:/usr/sbin" command -v Orthanc && command -v storescu; } >/dev/null ||
    echo "note: Orthanc or storescu absent (Debian packages orthanc, orthanc-dicomweb, dcmtk): the tests that send the app's results to Orthanc will skip"
