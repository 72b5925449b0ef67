"""XYZ plot axes, Settings and automatic base detection, through the fake webui."""

import pytest
import torch

import xyz_grid_fake
from modules import script_callbacks, scripts, shared, sd_models

from lib_pg import checkpoints
from lib_pg.hosts.webui import controller as webui_controller
from lib_pg.errors import PGError
from tests.ldm_models import make_sd1, make_sdxl_like_state_dict, save_checkpoint
from tests.test_script import Env, pg_args


@pytest.fixture
def env(tmp_path):
    env = Env(tmp_path)
    scripts.scripts_data[:] = [scripts.ScriptClassData(type("Script", (), {"__module__": "xyz_grid.py"}), "xyz_grid.py", "", xyz_grid_fake)]
    yield env
    scripts.scripts_data.clear()
    del xyz_grid_fake.axis_options[2:]
    shared.reset()


def axis(label):
    return next(o for o in xyz_grid_fake.axis_options if o.label == label)


def test_axes_are_registered_once_before_the_ui(env):
    env.script_module.PersonalizationGuidanceScript()  # webui instantiates scripts (API-only: before before_ui)
    script_callbacks.before_ui_callback()
    script_callbacks.before_ui_callback()
    labels = [o.label for o in xyz_grid_fake.axis_options]
    wanted = ["[PG] Enabled", "[PG] ω", "[PG] ω end", "[PG] Base checkpoint", "[PG] Weak prompt", "[PG] Strip LoRAs",
              "[PG] Weights"]
    assert [label for label in labels if label.startswith("[PG]")] == wanted
    assert axis("[PG] Enabled").choices() == ["False", "True"]
    assert sd_models.get_closet_checkpoint_match("base").title in axis("[PG] Base checkpoint").choices()


def test_grid_of_omega_by_cfg_builds_once_per_omega(env, monkeypatch):
    script_callbacks.before_ui_callback()
    builds = []
    real_build = webui_controller.build_weak_model
    monkeypatch.setattr(webui_controller, "build_weak_model", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    runner = scripts.ScriptRunner()
    script = runner.add_script(env.script_module.PersonalizationGuidanceScript)
    # PG's box unticked, base picked: the ω axis turns PG on for its cells
    args = runner.make_script_args({script: [False, 0.5, "base"]})
    from modules import processing
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a dog", steps=2, width=32, height=32, seed=1,
                                                    sampler_name="Euler", scripts=runner, script_args=args)
    cells = xyz_grid_fake.run_grid(p, axis("[PG] ω"), ["0.2", "0.6"], axis("CFG Scale"), ["3", "7"])
    assert len(cells) == 4 and all(len(c.images) == 1 for c in cells.values())
    for (ix, iy), processed in cells.items():
        info = processed.infotexts[0]
        assert f"PG omega: {[0.2, 0.6][ix]}" in info and f"CFG scale: {[3.0, 7.0][iy]}" in info
    assert len(builds) == 2


def test_base_axis_confirms_names_and_enabled_axis_turns_pg_off(env):
    script_callbacks.before_ui_callback()
    with pytest.raises(RuntimeError, match="Unknown base checkpoint"):
        axis("[PG] Base checkpoint").confirm(None, ["base", "nope"])
    runner = scripts.ScriptRunner()
    script = runner.add_script(env.script_module.PersonalizationGuidanceScript)
    from modules import processing
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a dog", steps=2, width=32, height=32, seed=1, sampler_name="Euler",
                                                    scripts=runner, script_args=runner.make_script_args({script: [True, 0.3, "base"]}))
    cells = xyz_grid_fake.run_grid(p, axis("[PG] Enabled"), ["True", "False"], axis("Nothing"), [""])
    assert "PG omega" in cells[(0, 0)].infotexts[0] and "PG omega" not in cells[(1, 0)].infotexts[0]


def test_settings_section_and_their_effects(env):
    labels = shared.opts.data_labels
    for key in ("pg_default_base", "pg_keep_weak_weights", "pg_memory_budget_mb", "pg_accordion_open"):
        assert labels[key].section == ("personalization_guidance", "Personalization Guidance")
    shared.opts.data["pg_keep_weak_weights"] = False
    env.generate(pg_args(0.3))
    assert webui_controller.CONTROLLER.cache.weak is None  # freed after the generation
    shared.opts.data["pg_memory_budget_mb"] = 1
    with pytest.raises(PGError, match="above the memory budget of 1 MiB"):
        env.generate(pg_args(0.3, weights="exact"))  # (automatic weights would go lean: tests/test_lean_webui.py)
    shared.opts.data["pg_memory_budget_mb"] = 0
    shared.opts.data["pg_default_base"] = "base"
    runner = scripts.ScriptRunner()
    script = runner.add_script(env.script_module.PersonalizationGuidanceScript)
    assert runner.make_script_args()[script.args_from + 2] == "base"  # the UI's (and API's) default base


def test_automatic_base_picks_the_closest_checkpoint(env, tmp_path):
    save_checkpoint(make_sd1("tiny", seed=3).state_dict(), tmp_path / "decoy.safetensors")
    save_checkpoint(make_sdxl_like_state_dict("tiny"), tmp_path / "sdxl.safetensors")
    sd_models.list_models()
    result, _ = env.generate(pg_args(0.3, base="Automatic"))
    info = result.infotexts[0]
    assert "PG base: base.safetensors [" in info and "PG base distance: " in info
    distance = float(info.split("PG base distance: ")[1].split(",")[0])
    assert distance < checkpoints.MAX_BASE_DISTANCE


def test_automatic_base_refuses_when_nothing_is_plausible(env, tmp_path):
    (tmp_path / "base.safetensors").unlink()
    (tmp_path / "inpaint-base.safetensors").unlink()
    save_checkpoint(make_sd1("tiny", seed=3).state_dict(), tmp_path / "decoy.safetensors")
    sd_models.checkpoints_list.clear()
    sd_models.list_models()
    with pytest.raises(PGError, match="no plausible base"):
        env.generate(pg_args(0.3, base="Automatic"))
