"""The one string-to-bool parser, and the settings that use it."""

import pytest

from scripts.engine.checkpoints import parse_resume
from scripts.engine.config_values import parse_bool
from scripts.engine.resilience import set_deterministic_algorithms
from scripts.model.inferers import AutocastInferer


@pytest.mark.parametrize("text", ["1", "true", "True", " YES ", "on", "On"])
def test_true_spellings(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "false", "FALSE", " no", "off", "Off "])
def test_false_spellings(text):
    assert parse_bool(text) is False


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False)])
def test_bools_and_zero_one(value, expected):
    assert parse_bool(value) is expected


def test_numpy_bools_and_integers():
    import numpy as np

    assert parse_bool(np.True_) is True and parse_bool(np.int64(0)) is False
    with pytest.raises(ValueError, match="got np.int64\\(3\\)"):
        parse_bool(np.int64(3))


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, -1, 0.5, None, "truthy"])
def test_anything_else_is_an_error_naming_the_setting_and_the_value(value):
    with pytest.raises(ValueError) as err:
        parse_bool(value, "channels_last")
    assert "channels_last" in str(err.value) and repr(value) in str(err.value)


def test_the_inferer_uses_it():
    inferer = AutocastInferer(enabled="off", channels_last="Yes")
    assert inferer.enabled is False and inferer.channels_last is True
    with pytest.raises(ValueError, match="enabled.*'sometimes'"):
        AutocastInferer(enabled="sometimes")


@pytest.mark.parametrize(
    "value, mode", [(None, "auto"), ("AUTO", "auto"), ("none", "auto"), (True, "true"), ("yes", "true"), ("0", "false")]
)
def test_resume_modes(value, mode):
    assert parse_resume(value) == mode


def test_resume_error_names_the_modes_and_the_value():
    with pytest.raises(ValueError, match=r"resume must be one of .*'later'"):
        parse_resume("later")


def test_deterministic_algorithms_rejects_a_misspelling_instead_of_ignoring_it():
    assert set_deterministic_algorithms("false") is False
    with pytest.raises(ValueError, match="deterministic_algorithms.*'flase'"):
        set_deterministic_algorithms("flase")
