"""Lean weak weights through the fake webui: the choice between exact and lean,
the cache folder, the infotext, the memory budget on every generation, the
controls (UI order, API forms, paste-back, XYZ) and Interrupt."""

import os

import pytest
import torch
from modules import infotext_utils, scripts, shared

from lib_pg import lowrank
from lib_pg import settings as pg_settings
from lib_pg.hosts.common import frontend
from lib_pg.hosts.common import lean as pg_lean
from lib_pg.hosts.webui import controller as webui_controller
from lib_pg.errors import PGError
from tests.test_script import Env, pg_args, same_images


@pytest.fixture
def env(tmp_path):
    models = tmp_path / "models" / "Stable-diffusion"  # webui's layout: PG's cache goes to models/PersonalizationGuidance
    models.mkdir(parents=True)
    environment = Env(models)
    environment.models_root = tmp_path / "models"
    yield environment
    shared.reset()


def weights_infotext(result):
    return infotext_utils.parse_generation_parameters(result.infotexts[0]).get(frontend.KEY_WEIGHTS)


def images_distance(a, b):
    return sum(float((x.double() - y.double()).norm()) for x, y in zip(a.images, b.images))


def test_lean_with_a_budget_above_the_exact_copy_is_exact_mode_bit_for_bit(env):
    exact, _ = env.generate(pg_args(0.5, weights="exact"))
    lean, _ = env.generate(pg_args(0.5, weights="lean", lean_budget_mb=1000))
    assert same_images(exact, lean)
    assert weights_infotext(lean) == "exact"
    assert not os.path.isdir(pg_lean.lean_cache_folder())  # nothing factored


def test_small_budget_is_closer_to_exact_than_cfg_and_cached_across_restarts(env, monkeypatch):
    plain, _ = env.generate()
    exact, _ = env.generate(pg_args(0.5, weights="exact"))
    lean, _ = env.generate(pg_args(0.5, weights="lean", lean_budget_mb=4))
    assert not same_images(exact, lean)
    assert images_distance(lean, exact) < images_distance(plain, exact)
    note = weights_infotext(lean)  # e.g. "low-rank 4 MiB, 58 %"
    assert note.startswith("low-rank 4 MiB, ") and note.endswith(" %") and note.split()[-2].isdigit()
    assert pg_lean.lean_cache_folder() == str(env.models_root / "PersonalizationGuidance")
    weak = webui_controller.CONTROLLER.cache.weak
    assert weak.extra_bytes <= 4 * 2**20
    files = os.listdir(pg_lean.lean_cache_folder())
    assert len(files) == 1 and files[0].endswith("-4194304B-float32.safetensors")

    webui_controller.CONTROLLER.shutdown()  # a restart: nothing in memory, the file on disk

    def no_factoring(*_args, **_kwargs):
        raise AssertionError("factored again")

    monkeypatch.setattr(lowrank, "factor_pair", no_factoring)
    again, _ = env.generate(pg_args(0.5, weights="lean", lean_budget_mb=4))
    assert same_images(lean, again)


def test_scheduled_omega_in_lean_mode(env):
    lean, _ = env.generate(pg_args(0.2, weights="lean", lean_budget_mb=4, schedule="linear", omega_end=0.8))
    plain, _ = env.generate()
    assert not same_images(lean, plain) and weights_infotext(lean).startswith("low-rank 4 MiB")


def test_automatic_takes_lean_factors_when_the_exact_copy_is_above_the_memory_budget(env):
    shared.opts.data["pg_memory_budget_mb"] = 1
    result, _ = env.generate(pg_args(0.5))
    assert weights_infotext(result).startswith("low-rank ")
    assert webui_controller.CONTROLLER.cache.weak.extra_bytes <= 2**20
    with pytest.raises(PGError, match="above the memory budget of 1 MiB"):
        env.generate(pg_args(0.5, weights="exact"))


def test_the_memory_budget_holds_for_kept_weak_weights_too(env):
    env.generate(pg_args(0.5, weights="exact"))
    assert webui_controller.CONTROLLER.cache.weak is not None
    shared.opts.data["pg_memory_budget_mb"] = 1  # lowered between generations: the kept copy no longer fits
    with pytest.raises(PGError, match="above the memory budget of 1 MiB"):
        env.generate(pg_args(0.5, weights="exact"))
    assert webui_controller.CONTROLLER.cache.weak is None  # and its memory went back


def test_interrupt_stops_factoring_and_caches_nothing(env, monkeypatch):
    original = lowrank.truncated_svd

    def interrupting(*args, **kwargs):
        shared.state.interrupt()
        return original(*args, **kwargs)

    monkeypatch.setattr(lowrank, "truncated_svd", interrupting)
    with pytest.raises(PGError, match="interrupted while factoring"):
        env.generate(pg_args(0.5, weights="lean", lean_budget_mb=4))
    folder = pg_lean.lean_cache_folder()
    assert not os.path.isdir(folder) or not os.listdir(folder)
    assert shared.state.textinfo is None


def test_the_plan_exact_or_lean():
    plan = pg_lean.weights_plan
    lean = pg_settings.PGSettings(True, weights="lean")
    auto = pg_settings.PGSettings(True)
    mib = 2**20
    assert plan(lean, 100 * mib, None).lean_budget == lowrank.default_budget(100 * mib)  # 8 % by default
    assert plan(pg_settings.PGSettings(True, weights="lean", lean_budget_mb=100), 100 * mib, None).lean_budget is None
    assert plan(auto, 100 * mib, None).lean_budget is None  # no limit (a CPU, no budget set): exact
    assert plan(auto, 100 * mib, 100 * mib).lean_budget is None
    assert plan(auto, 100 * mib, 5 * mib).lean_budget == 4 * mib  # what is available, as a power of two MiB
    assert plan(auto, 100 * mib, 50 * mib).lean_budget == lowrank.default_budget(100 * mib)


def test_lean_refuses_loras_to_strip(env):
    info = webui_controller.sd_models.get_closet_checkpoint_match("base")
    with pytest.raises(PGError, match="cannot be combined with LoRAs to strip"):
        webui_controller.CONTROLLER._weights_plan(shared.sd_model, pg_settings.PGSettings(True, weights="lean"), info,
                                               ["a stripped network"], torch.float32)


def test_controls_api_forms_paste_back_and_xyz(env):
    runner = scripts.ScriptRunner()
    script = runner.add_script(env.script_module.PersonalizationGuidanceScript)
    defaults = runner.make_script_args()[script.args_from:script.args_to]
    assert len(defaults) == len(pg_settings.ARG_ORDER) and pg_settings.ARG_ORDER[-2:] == ("weights", "lean_budget_mb")
    old_payload = [True, 0.4, "base", "negative", "constant", 0.5, 0.0, 1.0, ""]  # before lean weights existed
    assert pg_settings.from_script_args(old_payload).weights == "auto"
    assert pg_settings.from_script_args(old_payload + ["lean", 256]).lean_budget_mb == 256.0
    with pytest.raises(PGError, match="'lean_budget_mb' must be a number of MiB"):
        pg_settings.from_script_args([{"enabled": True, "lean_budget_mb": -1}])
    with pytest.raises(PGError, match="'weights' must be one of"):
        pg_settings.from_script_args([{"enabled": True, "weights": "tiny"}])

    result, _ = env.generate(pg_args(0.5, weights="lean", lean_budget_mb=4))
    params = infotext_utils.parse_generation_parameters(result.infotexts[0])
    pasted = [key(params) if callable(key) else params.get(key) for _component, key in script.infotext_fields]
    settings = pg_settings.from_script_args(pasted)
    assert (settings.weights, settings.lean_budget_mb) == ("lean", 4.0)

    assert frontend.weights_from_text("lean 256") == ("lean", 256.0)
    assert frontend.weights_from_text("Exact") == ("exact", 0.0)
    with pytest.raises(ValueError):
        frontend.weights_from_text("lean lots")


def test_xyz_weights_axis_sets_mode_and_budget(env):
    import xyz_grid_fake  # noqa: PLC0415 (tests/fake_webui)

    axis = next(o for o in env.script_module.make_axis_options(xyz_grid_fake.AxisOption) if o.label == "[PG] Weights")
    axis.confirm(None, ["auto", "exact", "lean 8"])
    with pytest.raises(RuntimeError, match=r"\[PG\] Weights"):
        axis.confirm(None, ["lean lots"])

    class P:
        pass

    p = P()
    axis.apply(p, "lean 8", None)
    assert getattr(p, frontend.XYZ_OVERRIDES) == {"weights": "lean", "lean_budget_mb": 8.0}


def test_a_budget_under_one_mib_reads_as_a_size_and_pastes_back():
    """Tiny models' lean budgets are well under 1 MiB: the infotext and console say how much
    ("low-rank 0.0763 MiB"), not "low-rank 0 MiB", and paste-back reads the same budget."""
    assert frontend.mib_text(80_000) == "0.0763"
    assert frontend.mib_text(0.5 * 2**20) == "0.5"
    assert frontend.mib_text(4 * 2**20) == "4"
    assert frontend.mib_text(136.4 * 2**20) == "136"
    mode, budget = frontend.weights_from_infotext(f"low-rank {frontend.mib_text(80_000)} MiB, 62 %")
    assert mode == "lean" and budget == pytest.approx(80_000 / 2**20, rel=1e-3)
