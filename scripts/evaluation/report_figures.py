"""The report's figures (ROC curves, confusion matrix, reliability diagram), each returned as an embedded PNG
``data:`` URI made with matplotlib's Agg canvas (no display needed). :mod:`scripts.evaluation.report` assembles the HTML.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

import numpy as np

from scripts.evaluation.metrics import member_keys, roc_curve_points


def num(x: Any, nd: int = 3) -> str:
    """``x`` with ``nd`` decimals (integers as they are, ``None`` as n/a, anything else HTML-escaped)."""
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    try:
        return f"{float(x):.{nd}f}"
    except (TypeError, ValueError):
        return html.escape(str(x))


def esc(x: Any) -> str:
    """``x`` as HTML text."""
    return html.escape(str(x))


def ci_range(lo: Any, hi: Any, nd: int = 3) -> str:
    """``lo–hi`` for a table cell (``n/a`` when either is missing)."""
    if lo is None or hi is None:
        return "n/a"
    return f"{num(lo, nd)}&ndash;{num(hi, nd)}"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], left_cols: int = 1) -> str:
    """An HTML table (cells are HTML already; the first ``left_cols`` columns left-aligned)."""
    out = ["<table><thead><tr>"]
    out += [f'<th class="{"l" if i < left_cols else ""}">{esc(h)}</th>' for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="{"l" if i < left_cols else ""}">{c}</td>' for i, c in enumerate(r)))
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def html_figure(uri: str, alt: str, caption: str = "") -> str:
    """An embedded image with its caption."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{esc(alt)}">{cap}</figure>'


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def fig_uri(fig) -> str:
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # optional heavy dependency: loaded only when a figure is drawn
    )

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return png_uri(buf.getvalue())


def _operating_point(ax, m: dict, marker: str, color: str, label: str, **style: Any) -> None:
    """Mark the operating point of binary metrics ``m`` (sensitivity against 1 - specificity) on ROC axes."""
    ax.plot(1 - m["specificity"]["value"], m["sensitivity"]["value"], marker, color=color, ms=8, label=label, **style)


def roc_figure(summary: dict, test_rows: Sequence[dict]) -> str:
    from matplotlib.figure import Figure  # optional heavy dependency: loaded only when a figure is drawn

    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    y = np.array([int(r["label"]) for r in test_rows])
    for k in member_keys(test_rows):
        sel = [i for i, r in enumerate(test_rows) if r.get(k) not in (None, "")]
        ys = y[sel]
        if 0 < ys.sum() < ys.size:
            roc = roc_curve_points(ys, [float(test_rows[i][k]) for i in sel])
            auc = (summary.get("members") or {}).get(k, {}).get("auc")
            ax.plot(roc["fpr"], roc["tpr"], lw=0.8, alpha=0.6, label=f"{k} (AUC {num(auc)})")
    if 0 < y.sum() < y.size:
        roc = roc_curve_points(y, [float(r["prob"]) for r in test_rows])
        auc = (summary.get("auc") or {}).get("auc")
        ax.plot(roc["fpr"], roc["tpr"], lw=2.2, color="C3", label=f"ensemble (AUC {num(auc)})")
        m = summary.get("metrics") or {}
        if m.get("sensitivity", {}).get("value") is not None and m.get("specificity", {}).get("value") is not None:
            _operating_point(ax, m, "o", "C3", f"ensemble at threshold {num(m.get('threshold'), 3)}", mfc="white")
    rad = summary.get("radiologist")
    bsel = [i for i, r in enumerate(test_rows) if r.get("birads") not in (None, "")]
    if rad and bsel and "birads_auc" in rad:
        yb = y[bsel]
        roc = roc_curve_points(yb, [float(test_rows[i]["birads"]) for i in bsel])
        ax.plot(
            roc["fpr"],
            roc["tpr"],
            lw=1.8,
            color="k",
            ls="--",
            marker=".",
            label=f"BI-RADS (AUC {num(rad['birads_auc']['auc'])})",
        )
        _operating_point(ax, rad["birads_at_cut"], "s", "k", f"BI-RADS >= {rad['cut']}")
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title("ROC, test set")
    return fig_uri(fig)


def confusion_figure(metrics: dict, names: Sequence[str]) -> str:
    from matplotlib.figure import Figure  # optional heavy dependency: loaded only when a figure is drawn

    c = metrics["confusion"]
    mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig = Figure(figsize=(3.8, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(int(mat.max()), 1))
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(mat[i, j]),
                ha="center",
                va="center",
                fontsize=14,
                color="white" if mat[i, j] > mat.max() / 2 else "black",
            )
    ax.set_xticks([0, 1], list(names[:2]))
    ax.set_yticks([0, 1], list(names[:2]))
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference standard")
    ax.set_title(f"Confusion matrix (threshold {num(metrics.get('threshold'))})")
    return fig_uri(fig)


def calibration_figure(summary: dict, test_rows: Sequence[dict], names: Sequence[str]) -> str:
    from matplotlib.figure import Figure  # optional heavy dependency: loaded only when a figure is drawn

    fig = Figure(figsize=(4.8, 5.2))
    ax, axh = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect calibration")
    bins = (summary.get("reliability") or {}).get("bins", [])
    if bins:
        x = np.array([b["mean_pred"] for b in bins])
        yv = np.array([b["frac_pos"] for b in bins])
        lo = np.array([b["ci_low"] for b in bins])
        hi = np.array([b["ci_high"] for b in bins])
        ax.errorbar(
            x,
            yv,
            yerr=[np.clip(yv - lo, 0, None), np.clip(hi - yv, 0, None)],
            fmt="o-",
            color="C0",
            capsize=3,
            label="ensemble (Wilson 95% CI)",
        )
    ax.set_ylabel(f"observed {names[1]} fraction")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(f"Reliability (Brier {num(summary.get('brier'))})")
    p = np.array([float(r["prob"]) for r in test_rows])
    y = np.array([int(r["label"]) for r in test_rows])
    edges = np.linspace(0, 1, 11)
    axh.hist([p[y == 0], p[y == 1]], bins=edges, label=list(names[:2]), color=["C2", "C3"])
    axh.set_xlabel(f"predicted {names[1]} probability")
    axh.set_ylabel("cases")
    axh.legend(fontsize=7)
    return fig_uri(fig)
