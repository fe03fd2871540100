"""Tests of scripts.evaluation.report: one self-contained HTML file with embedded PNG figures."""

from __future__ import annotations

import base64
import html
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from scripts.evaluation import metrics as M
from scripts.evaluation import report as R

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(n: int, seed: int, prefix: str, with_birads: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = int(rng.integers(0, 2))
        mem = [float(1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal())))) for _ in range(2)]
        row = {"case": f"{prefix}{i}", "patient": f"{prefix}p{i // 2}", "lesion": f"{prefix}l{i}", "label": y}
        row["prob"] = float(np.mean(mem))
        if with_birads:
            row["birads"] = int(np.clip(round(3 + y + rng.normal()), 2, 5))
        row.update({f"member_{k}": m for k, m in enumerate(mem)})
        rows.append(row)
    return rows


class _Checker(HTMLParser):
    """Collects tags and checks that non-void elements are closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.imgs.append(dict(attrs).get("src", ""))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def _check_html(text: str) -> _Checker:
    assert text.lstrip().lower().startswith("<!doctype html>")
    c = _Checker()
    c.feed(text)
    c.close()
    assert not c.errors, c.errors
    assert not c.stack, f"unclosed: {c.stack}"
    assert {"html", "head", "body", "title", "table"} <= c.tags
    return c


def _embedded_pngs(c: _Checker) -> list[bytes]:
    out = []
    for src in c.imgs:
        m = re.fullmatch(r"data:image/png;base64,([A-Za-z0-9+/=]+)", src)
        assert m, f"not an embedded PNG: {src[:40]}"
        out.append(base64.b64decode(m.group(1)))
    return out


def test_report_is_self_contained_html_with_figures(tmp_path: Path):
    val, test = _rows(40, 1, "v"), _rows(60, 2, "t")
    summary = M.summarize(test, val, n_boot=50)
    gallery = tmp_path / "gallery.png"
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot(1, 1, 1).imshow(np.eye(8))
    fig.savefig(gallery, format="png")
    ds = {"source": "CBIS-DDSM", "splits": {"train": {"benign": 30, "malignant": 25, "patients": 40}}}
    path = R.write_report(tmp_path / "out" / "report.html", summary, test, val, ds, str(gallery), title="Eval <x>")
    text = path.read_text()
    c = _check_html(text)
    pngs = _embedded_pngs(c)
    assert len(pngs) == 4  # ROC, confusion matrix, reliability, saliency gallery
    assert all(p.startswith(PNG_MAGIC) for p in pngs)
    assert pngs[-1] == gallery.read_bytes()
    assert "Eval &lt;x&gt;" in text
    assert "SYNTHETIC" not in text
    assert html.escape(summary["threshold"]["description"]) in text  # how the threshold was chosen
    for needle in ("DeLong", "Wilson", "BI-RADS", "Paired DeLong", "train", "test (evaluated)", "member_1"):
        assert needle in text
    assert not list((tmp_path / "out").glob(".*tmp"))
    assert "http://" not in text and "https://" not in text  # nothing fetched when opened


def test_report_synthetic_banner_and_no_saliency(tmp_path: Path):
    test = _rows(30, 3, "t", with_birads=False)
    summary = M.summarize(test, None, threshold_rule="fixed", threshold_value=0.5, n_boot=0, data_source="synthetic")
    path = R.write_report(tmp_path / "r.html", summary, test)
    text = path.read_text()
    c = _check_html(text)
    assert len(_embedded_pngs(c)) == 3
    assert "SYNTHETIC data" in text and "not clinical evidence" in text
    assert "No saliency maps were computed" in text
    assert "No BI-RADS categories" in text
    assert "fixed threshold 0.5" in text


def test_report_cli(tmp_path: Path):
    val, test = _rows(30, 4, "v"), _rows(30, 5, "t")
    M.write_cases_csv(tmp_path / "val.csv", val)
    M.write_cases_csv(tmp_path / "test.csv", test)
    out = tmp_path / "report.html"
    args = ["--test", str(tmp_path / "test.csv"), "--out", str(out), "--n-boot", "20"]
    assert R.main(args) == 2  # youden without validation rows is refused
    assert not out.exists()
    assert R.main(args + ["--val", str(tmp_path / "val.csv"), "--summary-out", str(tmp_path / "s.json")]) == 0
    _check_html(out.read_text())
    assert (tmp_path / "s.json").is_file()


def _reference_line(text: str) -> str:
    m = re.search(r"Reference standard: ([^<]*?)\. Generated", text)
    assert m, "no reference-standard sentence"
    return html.unescape(m.group(1))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("synthetic", "simulated ground truth"),
        ("cbis-ddsm", "histopathology"),
        ("mini-mias", "mini-MIAS Info.txt"),
        ("csv", "not stated"),
        (None, "not stated"),
    ],
)
def test_report_reference_standard_comes_from_the_data_source(source, expected):
    test = _rows(20, 6, "t", with_birads=False)
    summary = M.summarize(test, None, threshold_rule="fixed", threshold_value=0.5, n_boot=0, data_source=source)
    line = _reference_line(R.render_report(summary, test))
    assert expected in line
    assert ("histopathology" in line) == (source == "cbis-ddsm")


def test_report_prefers_the_datalist_reference_standard_and_class_names(tmp_path: Path):
    from scripts.data import schema

    dl = schema.make_datalist(
        [], [], source="csv", task="target", class_names=["low", "high"], reference_standard="expert consensus"
    )
    test = _rows(24, 7, "t")
    summary = M.summarize(
        test,
        None,
        threshold_rule="fixed",
        threshold_value=0.5,
        n_boot=0,
        data_source="csv",
        class_names=schema.class_names(dl),
        reference_standard=schema.reference_standard(dl),
    )
    text = R.render_report(summary, test)
    assert _reference_line(text) == "expert consensus"
    n_high = sum(r["label"] for r in test)
    assert f"({n_high} high, {len(test) - n_high} low)" in text
    assert "called high when" in text
    assert "benign" not in text and "malignant" not in text


def test_reference_standard_of_old_datalists_falls_back_to_their_source():
    from scripts.data import schema

    assert schema.reference_standard({"metadata": {"source": "synthetic"}}).startswith("simulated ground truth")
    assert schema.reference_standard({"metadata": {"source": "CBIS-DDSM"}}).startswith("histopathology")
    assert schema.reference_standard({"metadata": {}}) == schema.REFERENCE_NOT_STATED
    written = schema.make_datalist([], [], source="mini-mias", task="target")["metadata"]["reference_standard"]
    assert written == schema.REFERENCE_STANDARDS["mini-mias"]
