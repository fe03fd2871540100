"""The datalist schema: validation refuses leaks and broken items; folds are patient-grouped and stratified."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from scripts.data.imageio import write_roi_png
from scripts.data.schema import (
    DatalistError,
    assign_folds,
    load_split,
    make_datalist,
    make_item,
    read_datalist,
    select,
    split_by_patient,
    validate_datalist,
    write_datalist,
)


def _items(n, prefix="c", per_patient=2):
    return [make_item(f"{prefix}{i}.png", i % 2, f"p{i // per_patient}", f"{prefix}{i}") for i in range(n)]


def test_patient_in_two_splits_is_refused_with_the_offender():
    dl = make_datalist(_items(4), [make_item("x.png", 0, "p0", "x0")], "test", "target")
    with pytest.raises(DatalistError, match="patient p0 is in several splits"):
        validate_datalist(dl, check_files=False)


def test_patient_in_two_folds_is_refused():
    train = [dict(it, fold=i % 2) for i, it in enumerate(_items(4))]
    with pytest.raises(DatalistError, match="several folds"):
        validate_datalist(make_datalist(train, [], "test", "target"), check_files=False)


def test_missing_file_bad_label_and_duplicate_case_are_all_listed(tmp_path):
    write_roi_png(tmp_path / "ok.png", np.zeros((8, 8)))
    train = [
        make_item("ok.png", 0, "p1", "a", fold=0),
        make_item("missing.png", 1, "p2", "b", fold=1),
        make_item("ok.png", 5, "p3", "c", fold=1),
        make_item("ok.png", 1, "p4", "a", fold=0),
    ]
    with pytest.raises(DatalistError) as err:
        write_datalist(tmp_path / "datalist.json", make_datalist(train, [], "test", "target"))
    msg = str(err.value)
    assert "missing.png" in msg and "label 5 outside the class map" in msg and "case id also used" in msg
    assert not (tmp_path / "datalist.json").exists()  # nothing written when refused


def test_assign_folds_groups_patients_and_balances_classes():
    items = _items(90, per_patient=3)
    folded = assign_folds(items, 3, seed=0)
    folds_of = {}
    for it in folded:
        folds_of.setdefault(it["patient"], set()).add(it["fold"])
    assert all(len(f) == 1 for f in folds_of.values())
    per_fold = Counter((it["fold"], it["label"]) for it in folded)
    counts = [per_fold[(f, lab)] for f in range(3) for lab in (0, 1)]
    assert max(counts) - min(counts) <= 3
    assert assign_folds(items, 3, seed=0) == folded  # reproducible
    assert assign_folds(items, 3, seed=1) != folded


def test_split_by_patient_keeps_patients_whole():
    items = _items(100, per_patient=2)
    rest, test = split_by_patient(items, 0.3, seed=0)
    assert {it["patient"] for it in rest}.isdisjoint({it["patient"] for it in test})
    assert 20 <= len(test) <= 40 and len(rest) + len(test) == 100


def test_select_and_load_split_resolve_paths(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        write_roi_png(tmp_path / name, np.zeros((8, 8)))
    train = [make_item("a.png", 0, "p1", "a", fold=0), make_item("b.png", 1, "p2", "b", fold=1)]
    path = write_datalist(tmp_path / "dl.json", make_datalist(train, [make_item("c.png", 1, "p3", "c")], "t", "target"))
    dl = read_datalist(path)
    assert [it["case"] for it in select(dl, "validation", 1)] == ["b"]
    assert [it["case"] for it in select(dl, "training", 1)] == ["a"]
    test = load_split(path, "test")
    assert test[0]["image"] == str(tmp_path / "c.png")
    with pytest.raises(DatalistError, match="empty"):
        load_split(path, "validation", 2)


def test_split_and_folds_follow_the_patient_key_not_the_pseudonym():
    """Two salts give two sets of pseudonyms; with the original ids as key, split and folds are the same."""
    items = _items(120, per_patient=2)

    def pseudonymised(salt: str) -> tuple[list[dict], dict[str, str]]:
        alias = {it["patient"]: hashlib.sha256((salt + it["patient"]).encode()).hexdigest()[:12] for it in items}
        back = {v: k for k, v in alias.items()}
        return [dict(it, patient=alias[it["patient"]]) for it in items], back

    (a, back_a), (b, back_b) = pseudonymised("one"), pseudonymised("two")
    for fn in (lambda x, key: split_by_patient(x, 0.25, seed=5, patient_key=key)[1],
               lambda x, key: assign_folds(x, 3, seed=5, patient_key=key)):  # fmt: skip
        got_a = sorted((it["case"], it.get("fold")) for it in fn(a, back_a.get))
        got_b = sorted((it["case"], it.get("fold")) for it in fn(b, back_b.get))
        assert got_a == got_b
        plain = sorted((it["case"], it.get("fold")) for it in fn(items, None))
        assert plain == got_a  # the original ids as key = the original ids as patients
        salted = [sorted((it["case"], it.get("fold")) for it in fn(x, None)) for x in (a, b)]
        assert salted[0] != salted[1]  # without the key the pseudonyms (and so the salt) decide


def test_split_helpers_refuse_bad_options():
    with pytest.raises(ValueError, match="num_folds must be >= 2"):
        assign_folds(_items(4), 1)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        assign_folds(_items(4), 2, seed=-1)
    with pytest.raises(ValueError, match="test_fraction must be within"):
        split_by_patient(_items(4), 1.5)
