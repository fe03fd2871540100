"""The report's decision sections: calibration before/after, the paper's model-vs-reader table at the reader-matched
operating point with the biopsies avoided, the decision curve and the referral curve (HTML strings and figures for
:mod:`scripts.evaluation.report`, from :func:`scripts.evaluation.metrics.summarize`'s dict)."""

from __future__ import annotations

from typing import Sequence

from scripts.evaluation.report_figures import ci_range, esc, fig_uri, html_figure, html_table, num


def _ci(c: dict | None) -> str:
    c = c or {}
    return ci_range(c.get("ci_low"), c.get("ci_high"))


def calibration_section(summary: dict) -> str:
    """Brier score and expected calibration error of the raw and the calibrated ensemble score on test."""
    cal = summary.get("calibration")
    if not cal:
        return ""
    rows = []
    for key in ("before", "after"):
        part = cal[key]
        rows.append([esc(part["score"]), num(part["reliability"].get("ece")), num(part["brier"])])
    return (
        "<h2>Calibration (test)</h2>"
        f"<p>Method: {esc(cal.get('method'))}, fitted on the out-of-fold validation predictions only.</p>"
        + html_table(["score", "expected calibration error (10 bins)", "Brier score"], rows)
    )


def reader_section(summary: dict, names: Sequence[str]) -> str:
    """Model at its operating point and at the reader-matched one, beside BI-RADS >= cut, with biopsies avoided."""
    rad, matched = summary.get("radiologist"), summary.get("reader_matched")
    if not rad or "error" in rad or not matched:
        return ""
    reader = rad.get("reader", "radiologist")
    cut = rad["cut"]

    def point(label: str, m: dict) -> list[str]:
        return [label] + [f"{num(m[k]['value'])} ({_ci(m[k])})" for k in ("sensitivity", "specificity", "ppv", "npv")]

    rows = [
        point(
            f"model at its operating point (threshold {num(summary['threshold']['threshold'], 4)})", summary["metrics"]
        ),
        point(f"model at the {reader}'s sensitivity (threshold {num(matched['threshold'], 4)})", matched["metrics"]),
        point(f"{reader}: BI-RADS &ge; {cut}", rad["birads_at_cut"]),
    ]
    b = matched["biopsies"]
    av, miss, extra = (
        b["benign_biopsies_avoided"],
        b["cancers_missed_caught_by_reader"],
        b["cancers_caught_missed_by_reader"],
    )
    boot = lambda c: _ci(c.get("bootstrap"))  # noqa: E731
    return (
        f"<h2>Model and {esc(reader)} on the same test lesions</h2>"
        f"<p>AUC: model {num(rad['model_auc']['auc'])}, {esc(reader)} (BI-RADS as an ordinal score) "
        f"{num(rad['birads_auc']['auc'])}; paired DeLong p = {num(rad['paired_delong']['p'], 4)}. Both model thresholds "
        "were chosen on the out-of-fold validation predictions; the reader-matched one matches the reader's "
        f"validation sensitivity ({num(matched['target_sensitivity'])}).</p>"
        + html_table(["(test, 95% Wilson CI)", "sensitivity", "specificity", "PPV", "NPV"], rows)
        + f"<p>At the reader-matched threshold: of the {b['benign_biopsies_by_reader']} {esc(names[0])} lesions the "
        f"{esc(reader)} would biopsy, the model calls <b>{av['count']} ({num(av['fraction'])}; patient-clustered "
        f"bootstrap 95% CI {boot(av)})</b> {esc(names[0])}: biopsies avoided. It misses {miss['count']} of "
        f"{miss['of']} cancers that the {esc(reader)} sends to biopsy ({num(miss['fraction'])}; {boot(miss)}) and "
        f"catches {extra['count']} that the {esc(reader)} does not ({num(extra['fraction'])}; {boot(extra)}).</p>"
    )


def decision_curve_figure(dc: dict) -> str:
    from matplotlib.figure import Figure  # optional heavy dependency: loaded only when a figure is drawn

    fig = Figure(figsize=(5.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    t = dc["thresholds"]
    ax.plot(t, dc["model"], color="C0", label="model (calibrated probability)")
    if dc.get("birads"):
        ax.plot(t, dc["birads"], color="C3", label=dc.get("birads_label", "BI-RADS"))
    ax.plot(t, dc["biopsy_all"], color="grey", ls="--", label="biopsy all")
    ax.plot(t, dc["biopsy_none"], color="black", lw=0.8, label="biopsy none")
    ax.set_ylim(-0.05, max(dc["prevalence"], 0.05) * 1.1)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.legend(fontsize=7)
    ax.set_title("Decision curve (test)")
    return fig_uri(fig)


def referral_figure(ref: dict) -> str:
    from matplotlib.figure import Figure  # optional heavy dependency: loaded only when a figure is drawn

    fig = Figure(figsize=(5.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    f = [100 * r["fraction"] for r in ref["rows"]]
    ax.plot(f, [r["error_rate"] for r in ref["rows"]], "o-", color="C0", label="refer the most uncertain")
    ax.plot(f, [r["random_error_rate"] for r in ref["rows"]], "s--", color="grey", label="refer at random")
    ax.set_xlabel("% of test cases referred")
    ax.set_ylabel("error rate of the cases kept")
    ax.legend(fontsize=7)
    ax.set_title("Referral by member disagreement (test)")
    return fig_uri(fig)


def decision_section(summary: dict) -> str:
    """The decision curve and the referral curve with their tables."""
    parts = []
    dc, ref = summary.get("decision_curve"), summary.get("referral")
    figs = []
    if dc:
        figs.append(
            html_figure(decision_curve_figure(dc), "decision curve", "Net benefit against threshold probability")
        )
    if ref:
        figs.append(
            html_figure(
                referral_figure(ref), "referral curve", "Error rate of kept cases as uncertain ones are referred"
            )
        )
    if not figs:
        return ""
    parts.append("<h2>Decision curve and referral</h2>")
    parts.append('<div class="figs">' + "".join(figs) + "</div>")
    if ref:
        rows = [
            [f"{100 * r['fraction']:.0f}%", r["kept"], num(r["error_rate"]), num(r["random_error_rate"]), num(r["auc"]),
             num(r["random_auc"])]
            for r in ref["rows"]
        ]  # fmt: skip
        parts.append(
            html_table(["referred", "kept", "error rate", "random: error rate", "AUC kept", "random: AUC kept"], rows)
        )
        parts.append(
            f'<p class="note">Uncertainty: {esc(ref["uncertainty"])}; calls at threshold {num(ref["threshold"], 4)}.</p>'
        )
    return "".join(parts)
