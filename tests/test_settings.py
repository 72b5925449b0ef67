import math

import pytest

from lib_pg import settings as s
from lib_pg.errors import PGError
from lib_pg.schedule import in_active_range, omega_at


def test_positional_args_in_ui_order():
    got = s.from_script_args([True, 0.3, "base.safetensors", "Empty prompt (as the paper)", "Linear", 0.8, 0.1, 0.9, "mydog, style"])
    assert got == s.PGSettings(True, 0.3, "base.safetensors", "empty", "linear", 0.8, 0.1, 0.9, ("mydog", "style"))
    # positional args of the foundation's 8 controls still parse (webui fills missing positions)
    assert s.from_script_args([True, 0.3, "b"]).strip_loras == ()


def test_ui_defaults_parse_to_defaults():
    # webui fills missing positions with the ui() defaults (labels for the radios)
    ui_defaults = [False, 0.5, "", "Negative prompt (as CFG)", "Constant", 0.5, 0.0, 1.0, ""]
    assert s.from_script_args(ui_defaults) == s.DEFAULTS


def test_single_object_form_fills_missing_keys_with_defaults():
    got = s.from_script_args([{"enabled": True, "omega": 0.4, "base": "name"}, 0.5, "", "Negative prompt"])
    assert got == s.PGSettings(enabled=True, omega=0.4, base="name")
    assert s.from_script_args([{"weak_prompt": "empty", "schedule": "cosine"}]).schedule == "cosine"


@pytest.mark.parametrize("args, field", [
    ([{"omega": 1.5}], "'omega'"),
    ([{"omega": "lots"}], "'omega'"),
    ([{"omega": True}], "'omega'"),
    ([{"enabled": "yes"}], "'enabled'"),
    ([{"base": 3}], "'base'"),
    ([{"weak_prompt": "null"}], "'weak_prompt'"),
    ([{"schedule": "exp"}], "'schedule'"),
    ([{"omega_end": -0.1}], "'omega_end'"),
    ([{"start": 0.8, "end": 0.2}], "'start'"),
    ([{"omegaa": 0.3}], "unknown key(s) 'omegaa'"),
    ([True, 0.5, "", "Negative prompt", "Constant", 0.5, 0.0, 1.0, "", "auto", 0, "extra"], "at most 11 arguments"),
    ([{"strip_loras": 3}], "'strip_loras'"),
])
def test_bad_values_name_the_field(args, field):
    with pytest.raises(PGError) as info:
        s.from_script_args(args)
    assert field in str(info.value)
    assert str(info.value).startswith("Personalization Guidance: ")


def test_labels_short_values_and_first_words_are_accepted():
    for value in ("Negative prompt (as CFG)", "negative", "Negative prompt"):
        assert s.from_mapping({"weak_prompt": value}).weak_prompt == "negative"
    assert s.from_mapping({"schedule": "Cosine"}).schedule == "cosine"


def test_strip_loras_forms():
    assert s.from_mapping({"strip_loras": True}).strip_loras == ("*",)
    assert s.from_mapping({"strip_loras": False}).strip_loras == ()
    assert s.from_mapping({"strip_loras": ["mydog", " style "]}).strip_loras == ("mydog", "style")
    assert s.from_mapping({"strip_loras": "*"}).strips_all_loras
    assert s.describe_strip(s.from_mapping({"strip_loras": "a,b"})) == "a, b"


def test_omega_key_distinguishes_constant_from_schedule():
    assert s.PGSettings(omega=0.3).omega_key == ("constant", 0.3)
    assert s.PGSettings(omega=0.3, schedule="linear", omega_end=0.3).omega_key == ("constant", 0.3)
    assert s.PGSettings(omega=0.3, schedule="linear", omega_end=0.9).omega_key == ("scheduled",)


def test_constant_schedule_and_active_range():
    assert omega_at(0.0, 0.3, 0.9, "constant") == 0.3
    assert omega_at(0.99, 0.3, 0.9, "constant") == 0.3
    # outside the active range the step is plain CFG
    assert omega_at(0.1, 0.3, 0.9, "constant", start=0.2, end=0.8) == 1.0
    assert omega_at(0.8, 0.3, 0.9, "constant", start=0.2, end=0.8) == 1.0
    assert omega_at(0.5, 0.3, 0.9, "constant", start=0.2, end=0.8) == 0.3
    assert in_active_range(0.95, 0.0, 1.0)


def test_linear_and_cosine_schedules():
    assert omega_at(0.0, 0.2, 1.0, "linear") == 0.2
    assert omega_at(0.5, 0.2, 1.0, "linear") == pytest.approx(0.6)
    assert omega_at(0.25, 0.0, 1.0, "cosine") == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert omega_at(0.5, 0.0, 1.0, "cosine") == pytest.approx(0.5)
    # progress is measured inside the active range
    assert omega_at(0.5, 0.0, 1.0, "linear", start=0.5, end=1.0) == 0.0

