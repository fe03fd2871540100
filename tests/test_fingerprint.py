"""One up-to-date scheme: named parts, a digest, and the reason a step is stale."""

from __future__ import annotations

import hashlib
import json

from scripts.engine import fingerprint as F


def _inputs(tmp_path):
    config, data = tmp_path / "stage.json", tmp_path / "datalist.json"
    config.write_text('{"lr": 0.001}')
    data.write_text('{"training": []}')
    return config, data


def test_parts_are_named_and_file_locations_do_not_count(tmp_path):
    config, data = _inputs(tmp_path)
    fp = F.compute([config], {"fold": 1}, {"datalist": data, "weights": None, "torchvision": "IMAGENET1K_V2"})
    assert sorted(fp.parts) == ["config stage.json", "file datalist", "setting fold"]  # None / not a file: left out
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "datalist.json").write_bytes(data.read_bytes())
    assert F.compute([config], {"fold": 1}, {"datalist": moved / "datalist.json"}).digest == fp.digest
    assert F.compute([config], {"fold": 2}, {"datalist": data}).digest != fp.digest


def test_why_stale_names_what_changed(tmp_path):
    config, data = _inputs(tmp_path)
    out = tmp_path / "model.pt"
    fp = F.compute([config], {"fold": 1, "lr": 0.001}, {"datalist": data})
    assert F.why_stale(out, fp) == "no output yet"
    out.write_bytes(b"weights")
    assert F.why_stale(out, fp) == "no fingerprint record beside model.pt"
    F.record(out, fp)
    assert F.why_stale(out, fp) is None
    assert json.loads(F.record_file(out).read_text())["digest"] == fp.digest

    data.write_text('{"training": [1]}')
    new = F.compute([config], {"fold": 1, "lr": 0.002, "seed": 3}, {"datalist": data})
    assert F.why_stale(out, new) == "file datalist changed; setting lr 0.001 -> 0.002; setting seed added"
    F.forget(out)
    assert not F.record_file(out).exists()


def test_a_record_of_an_earlier_version_or_unreadable_is_stale(tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"weights")
    fp = F.compute(settings={"fold": 0})
    F.record_file(out).write_text("0123abcd" * 8 + "\n")  # the plain-digest records of earlier versions
    assert "earlier version" in F.why_stale(out, fp)
    F.record_file(out).write_text("{")
    assert "unreadable" in F.why_stale(out, fp)


def test_nested_settings_name_the_leaf_that_changed():
    old = F.compute(settings={"generator": {"params": {"cnr": 2.5, "overlap": 0.1}}, "n": 3})
    new = F.compute(settings={"generator": {"params": {"cnr": 3.0, "overlap": 0.1}}, "n": 3})
    assert new.changes(old.parts) == ["setting generator.params.cnr 2.5 -> 3.0"]


def test_digest_of_is_order_independent_and_stable():
    assert F.digest_of({"a": 1, "b": [2, 3]}) == F.digest_of({"b": [2, 3], "a": 1})
    # the preparation fingerprint of earlier versions (sha256 of the sorted-key JSON), so prepared folders stay current
    assert F.digest_of({"b": 2, "a": 1}) == hashlib.sha256(b'{"a": 1, "b": 2}').hexdigest()


def test_training_fingerprint_sees_every_augmentation_parameter():
    """The resume fingerprint (resilience.json over train.json) changes with a parameter of one augmentation, not only
    with its class."""
    from monai.bundle import ConfigParser

    from tests.conftest import REPO

    def digest(**overrides) -> str:
        parser = ConfigParser()
        parser.read_config([str(REPO / "configs" / f) for f in ("train.json", "resilience.json")])
        parser.update(overrides)
        return parser.get_parsed_content("run_fingerprint")

    base = digest()
    assert digest() == base  # the same config, the same fingerprint
    assert digest(**{"train#random_transforms#3#factors": 0.2}) != base  # RandScaleIntensityd's range
    assert digest(**{"train#random_transforms#0#prob": 0.25}) != base
