"""Forge Classic (Haoming02/sd-webui-forge-classic `classic`): PG's script must load there and
refuse enabled generations by name, and its X/Y/Z axes must register with Classic's XYZ script,
whose helpers moved to the package lib_xyz (tests/fake_classic mirrors that layout on top of the
fake webui)."""

import importlib
import os
import sys

import pytest

from modules import script_callbacks, scripts, shared

from lib_pg import hosts
from lib_pg.errors import PGError
from tests.test_script import Env, pg_args

FAKE_CLASSIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_classic")
XYZ_EXTENSION = os.path.join(FAKE_CLASSIC, "extensions-builtin", "xyz")
FAKE_PACKAGES = ("ldm_patched", "modules_forge", "lib_xyz", "backend")
PG_AXES = ["[PG] Enabled", "[PG] ω", "[PG] ω end", "[PG] Base checkpoint", "[PG] Weak prompt", "[PG] Strip LoRAs", "[PG] Weights"]


def _forget_fake_classic():
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_PACKAGES or name == "xyz_grid.py":
            del sys.modules[name]


def load_xyz_script(path):
    """webui loads a script file as a module named after the file, with its extension's folder on
    sys.path (modules/scripts.py load_scripts): here Classic's xyz_grid.py, which imports lib_xyz."""
    spec = importlib.util.spec_from_file_location("xyz_grid.py", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scripts.scripts_data[:] = [scripts.ScriptClassData(type("Script", (), {"__module__": "xyz_grid.py"}), path, "", module)]
    return module


@pytest.fixture
def classic(tmp_path, monkeypatch):
    _forget_fake_classic()
    monkeypatch.syspath_prepend(FAKE_CLASSIC)
    monkeypatch.syspath_prepend(XYZ_EXTENSION)
    importlib.invalidate_caches()
    xyz = load_xyz_script(os.path.join(XYZ_EXTENSION, "scripts", "xyz_grid.py"))
    env = Env(tmp_path)  # loads PG's script as webui does
    env.xyz = xyz
    yield env
    scripts.scripts_data.clear()
    shared.reset()
    _forget_fake_classic()


def test_classic_is_told_apart_from_reforge_by_what_its_packages_provide(classic):
    assert not os.path.exists(os.path.join(FAKE_CLASSIC, "backend"))
    assert hosts.detect() == hosts.CLASSIC
    assert hosts.unsupported_host() == "Forge Classic"
    assert type(hosts.controller()).__name__ == "WebuiController"  # webui's front end, refusing by name


def test_the_script_loads_and_its_axes_register_with_classics_xyz(classic, capsys):
    lib_classes = importlib.import_module("lib_xyz.classes")
    assert not hasattr(classic.xyz, "boolean_choice") and not hasattr(classic.xyz, "format_remove_path")
    classic.script_module.PersonalizationGuidanceScript()  # webui instantiates the scripts
    script_callbacks.before_ui_callback()
    options = {o.label: o for o in classic.xyz.axis_options}
    assert [label for label in options if label.startswith("[PG]")] == PG_AXES
    assert all(isinstance(options[label], lib_classes.AxisOption) for label in PG_AXES)
    assert options["[PG] Enabled"].choices() == ["False", "True"]
    base = options["[PG] Base checkpoint"]
    assert base.format_value(None, base, os.path.join("models", "Stable-diffusion", "base.safetensors")) == "base.safetensors"
    assert "base.safetensors" in " ".join(base.choices())

    class Cell:
        pass

    cell = Cell()
    options["[PG] ω"].apply(cell, 0.25, [0.25])
    options["[PG] Enabled"].apply(cell, "True", ["True"])
    assert cell.pg_overrides == {"omega": 0.25, "enabled": True}
    assert "Error" not in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["no AxisOption", "AxisOption elsewhere", "an AxisOption that refuses PG's arguments"])
def test_an_xyz_script_pg_cannot_read_costs_the_axes_not_the_script(classic, monkeypatch, capsys, layout):
    """However a host's XYZ script is laid out, webui's script loading goes on: PG's script is
    instantiated, its callbacks run, and generations work."""
    if layout == "no AxisOption":
        monkeypatch.delattr(classic.xyz, "AxisOption")
        monkeypatch.delitem(sys.modules, "lib_xyz.classes")
    elif layout == "AxisOption elsewhere":  # only in lib_xyz.classes (loaded by the script)
        monkeypatch.delattr(classic.xyz, "AxisOption")
    else:
        monkeypatch.setattr(classic.xyz, "AxisOption", lambda label, type, apply: None)
    classic.script_module.PersonalizationGuidanceScript()
    script_callbacks.before_ui_callback()
    labels = [o.label for o in classic.xyz.axis_options]
    if layout == "AxisOption elsewhere":
        assert [label for label in labels if label.startswith("[PG]")] == PG_AXES
    else:
        assert labels == ["Nothing", "CFG Scale"]
        captured = capsys.readouterr()
        assert "[PG]" in captured.out + captured.err and "axes" in captured.out + captured.err  # said on the console
    plain, _ = classic.generate()
    assert plain.images


def test_enabled_generations_are_refused_by_name(classic):
    with pytest.raises(PGError, match="this webui is Forge Classic, which PG does not support yet"):
        classic.generate(pg_args(0.3))
    assert not classic.pg_callbacks()
    plain, _ = classic.generate()
    assert plain.images
    disabled, _ = classic.generate([False, 0.3, "base"])
    assert disabled.images
