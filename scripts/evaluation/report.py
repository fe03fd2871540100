"""One self-contained HTML evaluation report (figures embedded as base64 PNG, made with matplotlib's Agg canvas).

:func:`write_report` assembles the HTML (the figures come from :mod:`scripts.evaluation.report_figures`); it takes the dict from :func:`scripts.evaluation.metrics.summarize` and the per-case rows. The command line
runs both steps on per-case CSVs::

    python -m scripts.evaluation.report --test cases_test.csv --val cases_val.csv --out report.html [--summary-out s.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from scripts.data.schema import TARGET_CLASSES, default_reference_standard
from scripts.engine.atomic import write_json, write_text
from scripts.evaluation.metrics import class_counts, read_cases_csv, summarize
from scripts.evaluation.report_clinical import calibration_section, decision_section, reader_section
from scripts.evaluation.report_figures import (
    calibration_figure,
    ci_range,
    confusion_figure,
    esc,
    html_figure,
    html_table,
    num,
    png_uri,
    roc_figure,
)

DEFAULT_TITLE = "Mammographic microcalcification classification: evaluation report"
SYNTHETIC_BANNER = (
    "These results are on SYNTHETIC data. They test that the pipeline runs; they are not clinical evidence and "
    "say nothing about performance on real mammograms."
)

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}
.banner{background:#fff3cd;border:2px solid #d39e00;padding:.8em 1em;font-weight:bold;margin:1em 0}
.note{color:#555;font-size:.92em}.figs{display:flex;flex-wrap:wrap;gap:1em}
.figs figure{margin:0}img{max-width:100%}figcaption{font-size:.9em;color:#555}
"""


# ----------------------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------------------
def _auc_section(summary: dict) -> str:
    a = summary.get("auc") or {}
    boot = a.get("bootstrap") or {}
    rows = [
        [
            "ensemble (test)",
            num(a.get("auc")),
            ci_range(a.get("ci_low"), a.get("ci_high")),
            ci_range(boot.get("ci_low"), boot.get("ci_high")),
        ]
    ]
    for k, m in (summary.get("members") or {}).items():
        rows.append([esc(k), num(m.get("auc")), ci_range(m.get("ci_low"), m.get("ci_high")), "&mdash;"])
    va = summary.get("validation_auc")
    if va:
        rows.append(
            ["ensemble (validation)", num(va.get("auc")), ci_range(va.get("ci_low"), va.get("ci_high")), "&mdash;"]
        )
    note = ""
    if boot:
        note = (
            f'<p class="note">Bootstrap: {boot.get("n_valid", "?")} valid of {boot.get("n_boot")} '
            f'{esc(boot.get("method", ""))} resamples ({boot.get("n_clusters")} clusters).</p>'
        )
    return (
        "<h2>Discrimination (AUC)</h2>"
        + html_table(["scores", "AUC", "DeLong 95% CI", "patient-clustered bootstrap 95% CI"], rows)
        + note
    )


def _metrics_rows(m: dict) -> list[list[str]]:
    rows = []
    for name, label in (
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("ppv", "PPV"),
        ("npv", "NPV"),
        ("accuracy", "accuracy"),
        ("f1", "F1"),
    ):
        e = m.get(name) or {}
        frac = f"{e['num']}/{e['den']}" if "num" in e else "&mdash;"
        rows.append(
            [
                label,
                num(e.get("value")),
                frac,
                ci_range(e.get("ci_low"), e.get("ci_high")),
                ci_range(*(e.get("boot_ci") or [None, None])),
            ]
        )
    return rows


def _threshold_section(summary: dict, names: Sequence[str]) -> str:
    thr = summary.get("threshold") or {}
    m = summary.get("metrics") or {}
    out = [
        "<h2>Operating threshold and metrics</h2>",
        f"<p>Threshold <b>{num(thr.get('threshold'), 4)}</b>, rule <b>{esc(thr.get('rule'))}</b>: "
        f"{esc(thr.get('description', ''))}. A case is called {esc(names[1])} when its ensemble probability is &ge; the "
        "threshold. The threshold was not tuned on the test set.</p>",
    ]
    out.append(
        html_table(
            ["metric (test)", "value", "count", "Wilson 95% CI", "patient-clustered bootstrap 95% CI"], _metrics_rows(m)
        )
    )
    vm = summary.get("validation_metrics") or thr.get("validation")
    if vm:
        out.append(
            '<p class="note">Validation-set metrics at the same threshold (the data it was tuned on, so '
            "optimistic):</p>"
        )
        out.append(
            html_table(["metric (validation)", "value", "count", "Wilson 95% CI", "bootstrap"], _metrics_rows(vm))
        )
    out.append(
        f'<p>Brier score {num(summary.get("brier"))}; expected calibration error '
        f'{num((summary.get("reliability") or {}).get("ece"))} ({(summary.get("reliability") or {}).get("n_bins")}'
        " equal-width bins).</p>"
    )
    return "".join(out)


def _radiologist_section(summary: dict, names: Sequence[str]) -> str:
    rad = summary.get("radiologist")
    if not rad:
        return "<h2>Radiologist comparison</h2><p>No BI-RADS categories in these data: no radiologist comparison.</p>"
    reader = rad.get("reader", "radiologist")
    if "error" in rad:
        return f"<h2>Comparison with the {esc(reader)}</h2><p>{esc(rad['error'])}</p>"
    cut = rad["cut"]
    ba, ma, pt = rad["birads_auc"], rad["model_auc"], rad["paired_delong"]
    rows = [
        [
            f"{esc(reader)}: BI-RADS (ordinal)",
            num(ba["auc"]),
            ci_range(ba["ci_low"], ba["ci_high"]),
            ci_range(*(lambda b: (b.get("ci_low"), b.get("ci_high")))(ba.get("bootstrap") or {})),
        ],
        [
            "model (ensemble)",
            num(ma["auc"]),
            ci_range(ma["ci_low"], ma["ci_high"]),
            ci_range(*(lambda b: (b.get("ci_low"), b.get("ci_high")))(ma.get("bootstrap") or {})),
        ],
    ]
    out = [
        f"<h2>Comparison with the {esc(reader)} (same lesions, BI-RADS)</h2>",
        f"<p>{rad['n']} test cases with a BI-RADS category ({rad['n_pos']} {esc(names[1])}, {rad['n_neg']} {esc(names[0])}; "
        f"{rad['n_excluded_missing_birads']} without BI-RADS left out). BI-RADS counts: "
        f"{esc(', '.join(f'{k}: {v}' for k, v in rad['birads_counts'].items()))}.</p>",
        html_table(["scores", "AUC", "DeLong 95% CI", "patient-clustered bootstrap 95% CI"], rows),
        f"<p>Paired DeLong test, model &minus; BI-RADS: difference {num(pt['diff'])} "
        f"(95% CI {ci_range(*pt['ci_diff'])}), z = {num(pt['z'], 2)}, p = {num(pt['p'], 4)}.</p>",
        f"<p>BI-RADS &ge; {cut} as a positive call:</p>",
        html_table(
            ["metric", "value", "count", "Wilson 95% CI", "patient-clustered bootstrap 95% CI"],
            _metrics_rows(rad["birads_at_cut"]),
        ),
    ]
    s = rad["model_at_radiologist_sensitivity"]
    sp = rad["model_at_radiologist_specificity"]
    out.append(
        f"<p>Model at the {esc(reader)}'s sensitivity ({num(s['target_sensitivity'])}): specificity "
        f"{num(s['specificity'])} at threshold {num(s['threshold'], 4)} (sensitivity {num(s['sensitivity'])}; "
        f"linearly interpolated ROC: specificity {num(s['specificity_interpolated'])}). Model at the {esc(reader)}'s "
        f"specificity ({num(sp['target_specificity'])}): sensitivity {num(sp['sensitivity'])}.</p>"
        f'<p class="note">{esc(s["method"])}. {esc(rad.get("note", ""))}</p>'
    )
    return "".join(out)


def _dataset_section(
    summary: dict, test_rows: Sequence[dict], val_rows: Sequence[dict] | None, dataset_summary: dict | None
) -> str:
    splits: dict[str, dict] = {}
    extra: dict[str, Any] = {}
    if dataset_summary:
        given = dataset_summary.get("splits")
        if isinstance(given, dict):
            splits.update({str(k): dict(v) for k, v in given.items() if isinstance(v, dict)})
        for k, v in dataset_summary.items():
            if k == "splits":
                continue
            if isinstance(v, dict) and given is None:
                splits[str(k)] = dict(v)
            elif not isinstance(v, (dict, list)):
                extra[str(k)] = v
    splits.setdefault("test (evaluated)", class_counts(test_rows, _class_names(summary, dataset_summary)))
    if val_rows:
        splits.setdefault("validation (threshold)", class_counts(val_rows, _class_names(summary, dataset_summary)))
    cols: list[str] = []
    for v in splits.values():
        cols += [k for k in v if k not in cols]
    rows = [[esc(name)] + [num(v.get(c), 3) if c in v else "&mdash;" for c in cols] for name, v in splits.items()]
    out = ["<h2>Data</h2>", html_table(["split"] + cols, rows)]
    if extra:
        out.append(html_table(["item", "value"], [[esc(k), esc(v)] for k, v in extra.items()], left_cols=2))
    return "".join(out)


def _ci_cell(v: dict, key: str) -> str:
    """``mean [low-high] (chance)`` of one localisation metric, with ``*`` when it is above chance."""
    ci = v.get(f"{key}_ci")
    cell = num(v.get(key)) + (f" [{num(ci[0])}-{num(ci[1])}]" if ci else "")
    star = "*" if v.get(f"{key}_above_chance") else ""
    return f"{cell}{star} ({num(v.get(key + '_chance'))})"


def _localisation_section(summary: dict) -> str:
    """Saliency localisation against the lesion masks: each figure with its 95 % CI, chance level and the centre
    prior's pointing game."""
    sal = summary.get("saliency")
    if not sal or not sal.get("table"):
        return ""
    rows = []
    for group, v in sal["table"].items():
        cells = [esc(group), esc(v.get("n"))]
        cells += [_ci_cell(v, "pointing_game"), num(v.get("pointing_game_centre")), _ci_cell(v, "energy_in_mask")]
        cells.append(f"{num(v.get('iou'))} ({num(v.get('iou_chance'))})")
        rows.append(cells)
    st = sal.get("settings", {})
    out = [
        "<h2>Saliency localisation</h2>",
        f"<p>{esc(st.get('method', ''))} maps of the ensemble (target: {esc(st.get('target', ''))}, layer "
        f"{esc(st.get('layer', ''))}); pointing-game tolerance: {esc(st.get('tolerance', ''))}. Mean [95 % CI, "
        f"{esc(st.get('ci', 'bootstrap'))}] (chance level); * = above chance (the CI of the paired excess over chance "
        "excludes 0). The centre prior is a map that always peaks at the ROI centre: ROIs cropped around a lesion "
        "make it a strong baseline.</p>",
        html_table(
            ["group", "n", "pointing game", "centre prior", "energy in mask", "IoU"],
            rows,
            left_cols=1,
        ),
    ]
    final = (sal.get("randomisation") or {}).get("final")
    if final:
        out.append(
            f"<p>Randomisation check (weights re-initialised, {esc(final.get('randomised', ''))}): similarity to the "
            f"trained maps, Spearman {num(final.get('spearman'))}, SSIM {num(final.get('ssim'))} "
            "(low values: the maps depend on the learned weights).</p>"
        )
    return "".join(out)


def _gallery_section(gallery_png: str | os.PathLike | None) -> str:
    head = "<h2>Saliency (Grad-CAM) gallery</h2>"
    if gallery_png is None:
        return head + "<p>No saliency maps were computed for this evaluation.</p>"
    p = Path(gallery_png)
    if not p.is_file():
        return head + f"<p>Saliency gallery file not found ({esc(p.name)}); no maps shown.</p>"
    return head + html_figure(png_uri(p.read_bytes()), "saliency gallery", p.name)


def _is_synthetic(summary: dict, dataset_summary: dict | None) -> bool:
    vals = [summary.get("data_source"), summary.get("source")]
    if dataset_summary:
        vals += [dataset_summary.get("data_source"), dataset_summary.get("source")]
    return any(isinstance(v, str) and "synthetic" in v.lower() for v in vals)


def _class_names(summary: dict, dataset_summary: dict | None) -> list[str]:
    """The data's class names (negative, positive): the summary's, else the dataset summary's, else the target's."""
    names = summary.get("class_names") or (dataset_summary or {}).get("class_names") or TARGET_CLASSES
    return [str(c) for c in names]


def _reference_standard(summary: dict, dataset_summary: dict | None) -> str:
    """Where the labels come from: the summary's or dataset summary's ``reference_standard``, else that of their
    data source (:func:`scripts.data.schema.default_reference_standard`: "not stated" for an unknown source)."""
    ds = dataset_summary or {}
    given = summary.get("reference_standard") or ds.get("reference_standard")
    if given:
        return str(given)
    sources = [summary.get("data_source"), summary.get("source"), ds.get("data_source"), ds.get("source")]
    return default_reference_standard(next((v for v in sources if v), None))


def _network_section(summary: dict) -> str:
    """Which backbone ran and where its ImageNet weights came from (package or file, SHA-256)."""
    net = summary.get("network")
    if not net:
        return ""
    text = f"Network: {esc(net.get('arch', '?'))}, stage-1 initialisation: {esc(net.get('init', '?'))}"
    w = net.get("imagenet_weights")
    if w:
        text += f"; ImageNet weights from {esc(w.get('source'))}"
        if w.get("sha256"):
            text += f" (SHA-256 <code>{esc(w['sha256'])}</code>)"
    return f"<p>{text}.</p>"


# ----------------------------------------------------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------------------------------------------------
def render_report(
    summary: dict,
    test_rows: Sequence[dict],
    val_rows: Sequence[dict] | None = None,
    dataset_summary: dict | None = None,
    gallery_png: str | os.PathLike | None = None,
    title: str = DEFAULT_TITLE,
) -> str:
    """The report as one HTML string."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if _is_synthetic(summary, dataset_summary):
        parts.append(f'<div class="banner">{esc(SYNTHETIC_BANNER)}</div>')
    names = _class_names(summary, dataset_summary)
    c = (summary.get("counts") or {}).get("test") or class_counts(test_rows, names)
    neg, pos = names[0], names[1]
    parts.append(
        f"<p>Test set: {c['cases']} cases ({c.get(pos)} {esc(pos)}, {c.get(neg)} {esc(neg)}) from {c['patients']} "
        f"patients. Reference standard: {esc(_reference_standard(summary, dataset_summary))}. "
        f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>"
    )
    parts.append(_network_section(summary))
    figs = [html_figure(roc_figure(summary, test_rows), "ROC curves", "ROC curves on the test set")]
    if summary.get("metrics"):
        figs.append(
            html_figure(confusion_figure(summary["metrics"], names), "confusion matrix", "Confusion matrix (test)")
        )
    figs.append(html_figure(calibration_figure(summary, test_rows, names), "reliability diagram", "Calibration (test)"))
    parts.append('<div class="figs">' + "".join(figs) + "</div>")
    parts.append(_auc_section(summary))
    parts.append(_threshold_section(summary, names))
    parts.append(calibration_section(summary))
    parts.append(_radiologist_section(summary, names))
    parts.append(reader_section(summary, names))
    parts.append(decision_section(summary))
    parts.append(_dataset_section(summary, test_rows, val_rows, dataset_summary))
    parts.append(_localisation_section(summary))
    parts.append(_gallery_section(gallery_png))
    parts.append(
        '<p class="note">AUC CIs: DeLong et al. (1988) and a percentile bootstrap resampling patients. Proportions: '
        "Wilson score interval and the same patient-clustered bootstrap. See docs/evaluation.md.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """Write the self-contained HTML report (:func:`render_report` of the other arguments) atomically and return
    its path."""
    return write_text(path, render_report(*args, **kwargs))


def main(argv: Sequence[str] | None = None) -> int:
    """Summarise per-case CSVs and write the report (and optionally the summary JSON)."""
    ap = argparse.ArgumentParser(description="Evaluation summary and HTML report from per-case CSVs.")
    ap.add_argument("--test", required=True, help="per-case CSV of the test split")
    ap.add_argument("--val", default=None, help="per-case CSV of the validation split (threshold tuning)")
    ap.add_argument("--out", required=True, help="HTML report path")
    ap.add_argument("--summary-out", default=None, help="also write the summary JSON here")
    ap.add_argument("--rule", default="youden", choices=("youden", "sensitivity", "fixed"))
    ap.add_argument("--value", type=float, default=None, help="target sensitivity or fixed threshold")
    ap.add_argument("--birads-cut", type=int, default=4)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-source", default=None, help="e.g. 'synthetic' or 'CBIS-DDSM'")
    ap.add_argument("--gallery", default=None, help="saliency gallery PNG to embed")
    ap.add_argument("--title", default=DEFAULT_TITLE)
    args = ap.parse_args(argv)
    test_rows = read_cases_csv(args.test)
    val_rows = read_cases_csv(args.val) if args.val else None
    try:
        summary = summarize(
            test_rows,
            val_rows,
            args.rule,
            args.value,
            args.birads_cut,
            args.n_boot,
            args.seed,
            data_source=args.data_source,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.summary_out:
        write_json(args.summary_out, summary)
    out = write_report(
        args.out,
        summary,
        test_rows,
        val_rows,
        {"data_source": args.data_source} if args.data_source else None,
        args.gallery,
        args.title,
    )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
