"""The main job's headline: what it prints when it ends, from ``metrics.json`` and the saliency localisation."""

from __future__ import annotations

from pathlib import Path


def print_localisation(saliency: dict) -> None:
    """One line per localisation metric of the saliency maps on all masked test ROIs: mean [CI] vs chance."""
    table, st = (saliency.get("table") or {}).get("all") or {}, saliency.get("settings") or {}
    if not table.get("n"):
        return
    print(f"saliency {st.get('method')} at {st.get('layer')} ({table['n']} ROIs with masks):")
    for key, name, d in (("pointing_game", "pointing game", 3), ("energy_in_mask", "energy in mask", 4)):
        lo, hi = table[f"{key}_ci"]
        verdict = "above chance" if table[f"{key}_above_chance"] else "NOT above chance"
        chance = table[key + "_chance"]
        print(f"  {name:15s} {table[key]:.{d}f} (95% CI {lo:.{d}f}-{hi:.{d}f}), chance {chance:.{d}f}: {verdict}")
    if table.get("pointing_game_centre") is not None:
        print(
            f"  {'centre prior':15s} {table['pointing_game_centre']:.3f} (pointing game of a map fixed at the ROI centre)"
        )


def print_reader(summary: dict) -> None:
    """The model beside the reader's BI-RADS >= 4 at the reader-matched threshold, with biopsies avoided."""
    rad, matched = summary.get("radiologist"), summary.get("reader_matched")
    if not rad or "error" in rad or not matched:
        return
    reader, r, mm = rad.get("reader", "radiologist"), rad["birads_at_cut"], matched["metrics"]
    av, miss = matched["biopsies"]["benign_biopsies_avoided"], matched["biopsies"]["cancers_missed_caught_by_reader"]
    boot = av.get("bootstrap") or {}
    print(
        f"{reader} (BI-RADS >= {rad['cut']}): AUC {rad['birads_auc']['auc']:.3f}, sensitivity "
        f"{r['sensitivity']['value']:.3f}, specificity {r['specificity']['value']:.3f}, PPV {r['ppv']['value']:.3f}"
    )
    print(
        f"model at the {reader}'s validation sensitivity (threshold {matched['threshold']:.3f}): sensitivity "
        f"{mm['sensitivity']['value']:.3f}, specificity {mm['specificity']['value']:.3f}, PPV {mm['ppv']['value']:.3f}"
    )
    print(
        f"  benign biopsies avoided: {av['count']}/{av['of']} ({av['fraction']:.2f}, 95% CI "
        f"{boot.get('ci_low', float('nan')):.2f}-{boot.get('ci_high', float('nan')):.2f}); cancers missed that the "
        f"{reader} catches: {miss['count']}/{miss['of']}"
    )


def print_headline(summary: dict, saliency: dict, results: Path) -> None:
    """The main job's last lines: the test metrics with their intervals, the calibration, the reader comparison, the
    network's initialisation, the saliency localisation and where the results are; notes for synthetic data and for
    a stage 1 from random weights."""
    auc, thr, m = summary["auc"], summary["threshold"], summary["metrics"]
    print("\n=== ensemble on the test split ===", flush=True)
    print(f"AUC {auc['auc']:.3f} (95% CI {auc['ci_low']:.3f}-{auc['ci_high']:.3f}, DeLong)")
    print(f"threshold {thr['threshold']:.3f}: {thr.get('description', thr['rule'])}")
    for name in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        v = m.get(name, {})
        if isinstance(v, dict) and v.get("value") is not None:
            ci = f" (95% CI {v['ci_low']:.3f}-{v['ci_high']:.3f})" if v.get("ci_low") is not None else ""
            print(f"{name:12s} {v['value']:.3f}{ci}")
    cal = summary.get("calibration")
    if cal:
        before, after = cal["before"]["reliability"]["ece"], cal["after"]["reliability"]["ece"]
        print(f"calibration: expected calibration error {before:.3f} -> {after:.3f} ({cal['method']})")
    print_reader(summary)
    net = summary.get("network") or {}
    w = net.get("imagenet_weights")
    if w:
        sha = f", SHA-256 {w['sha256'][:12]}..." if w.get("sha256") else ""
        print(f"network {net.get('arch')}: ImageNet weights from {w['source']}{sha}")
    else:
        print(f"network {net.get('arch')}: initialised {net.get('init')}")
    print_localisation(saliency)
    if summary.get("data", {}).get("source") == "synthetic":
        print("NOTE: synthetic data; these numbers are not clinical evidence.")
    if net.get("init") == "scratch":
        print(
            "NOTE: stage 1 started from random weights, not ImageNet (the full recipe); see README.md, "
            "'What to expect from the default run'."
        )
    print(f"results: {results}/metrics.json, {results}/cases_test.csv, {results}/report.html", flush=True)
