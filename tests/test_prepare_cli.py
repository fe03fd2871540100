"""The prepare command line refuses unusable mini-MIAS and CBIS-DDSM inputs before any image is decoded.

(The CSV source's argument checks are in ``test_prepare_csv.py``.)"""

from __future__ import annotations

import pytest

import scripts.data.prepare.cbis_ddsm as cbis
import scripts.data.prepare.mini_mias as mias
from scripts.data.prepare.__main__ import main


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _no_decoding(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("an image was decoded before the arguments were checked")

    monkeypatch.setattr(mias, "load_image", fail)
    monkeypatch.setattr(cbis, "read_dicom", fail)


def test_mini_mias_folder_info_and_films_are_checked_first(tmp_path, capsys, monkeypatch):
    _no_decoding(monkeypatch)
    out = tmp_path / "out"
    last = _refused(capsys, ["mini-mias", "--in", str(tmp_path / "nope"), "--out", str(out)])
    assert last.endswith("error: argument --in: " + f"{tmp_path / 'nope'}: folder not found")
    src = tmp_path / "mias"
    src.mkdir()
    last = _refused(capsys, ["mini-mias", "--in", str(src), "--out", str(out)])
    assert "error: argument --in: " in last and "Info.txt not found" in last
    (src / "Info.txt").write_text("mdb001 G CALC B 535 425 197\n")
    last = _refused(capsys, ["mini-mias", "--in", str(src), "--out", str(out)])
    assert "error: argument --in: " in last and "no mini-MIAS films" in last
    (src / "mdb001.pgm").write_bytes(b"P5\n4 4\n255\n" + bytes(16))
    last = _refused(capsys, ["mini-mias", "--in", str(src), "--out", str(out), "--test-fraction", "1.5"])
    assert "error: argument --test-fraction: must be >= 0 and < 1" in last
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tables", "{tmp}/nope"], "argument --tables: {tmp}/nope: folder not found"),
        (["--tables", "{tmp}/empty"], "argument --tables: {tmp}/empty: no calcification case table"),
        (["--target", "none", "--tables", "{tmp}/empty"], "argument --tables: {tmp}/empty: no mass case table"),
        (["--intermediate", "calc"], "argument --target/--intermediate: target=calc with intermediate=calc"),
        (["--source-pitch-mm", "5"], "argument --source-pitch-mm: 5 mm is outside the plausible pixel pitch range"),
        (["--folds", "1"], "argument --folds: must be an integer >= 2"),
    ],
)
def test_cbis_ddsm_folders_and_tables_are_checked_first(tmp_path, capsys, monkeypatch, extra, message):
    _no_decoding(monkeypatch)
    (tmp_path / "empty").mkdir()
    (tmp_path / "tree").mkdir()
    out = tmp_path / "out"
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    last = _refused(capsys, ["cbis-ddsm", "--in", str(tmp_path / "tree"), "--out", str(out), *extra])
    assert last.startswith("python -m scripts.data.prepare cbis-ddsm: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in last, last
    assert not out.exists()
