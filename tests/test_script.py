"""The script and its webui adapter, driven through the fake of webui 1.10.1's
hook points (tests/fake_webui) on tiny ldm-layout models and real safetensors files."""

import copy
import importlib.util
import os

import pytest
import torch

import gradio as gr  # the fake one (tests/fake_webui/gradio.py)
from modules import errors, infotext_utils, processing, prompt_parser, script_callbacks, scripts, sd_models, shared

from lib_pg import settings as pg_settings
from lib_pg import hosts
from lib_pg.hosts.webui import controller as webui_controller
from lib_pg.errors import PGError
from lib_pg.patching import module_state_fingerprint
from tests.helpers import fine_tune, interpolated_copy
from tests.ldm_models import make_sd1, save_checkpoint

SCRIPT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "personalization_guidance.py")
LONG_PROMPT = " ".join(f"word{i}" for i in range(90))


def load_script_module():
    spec = importlib.util.spec_from_file_location("personalization_guidance_script", SCRIPT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_fake_webui():
    """Every piece of fake-webui and PG state a test could leave behind."""
    shared.reset()
    script_callbacks.clear_callbacks()
    processing.clear_cond_cache()
    gr.reset()
    errors.reported.clear()
    webui_controller.CONTROLLER.shutdown()


def generate_with(script_module, pg=None, **kwargs):
    """One txt2img generation through webui's processing, with PG's script args `pg`."""
    runner = scripts.ScriptRunner()
    script = runner.add_script(script_module.PersonalizationGuidanceScript)
    args = runner.make_script_args({script: pg} if pg is not None else None)
    params = dict(prompt="a photo of sks dog", negative_prompt="blurry", steps=3, cfg_scale=5.0, width=32, height=32,
                  seed=7, sampler_name="Euler")
    params.update(kwargs)
    p = processing.StableDiffusionProcessingTxt2Img(scripts=runner, script_args=args, **params)
    return processing.process_images(p), p


class Env:
    """A fake webui with a base checkpoint and a "DreamBooth" fine-tune of it loaded."""

    def __init__(self, tmp_path, text_encoder=False):
        reset_fake_webui()
        self.base_inner = make_sd1("tiny", seed=0)
        self.tuned_inner = fine_tune(self.base_inner, text_encoder=text_encoder)
        sd_models.model_path = str(tmp_path)
        save_checkpoint(self.base_inner.state_dict(), tmp_path / "base.safetensors")
        save_checkpoint(self.tuned_inner.state_dict(), tmp_path / "tuned.safetensors")
        save_checkpoint(make_sd1("tiny", inpainting=True).state_dict(), tmp_path / "inpaint-base.safetensors")
        sd_models.list_models()
        self.tuned_info = sd_models.get_closet_checkpoint_match("tuned")
        self.model = sd_models.FakeSdModel(self.tuned_inner)
        self.script_module = load_script_module()  # registers its callbacks like webui's script loader
        sd_models.set_model(self.model, self.tuned_info)
        self.unet = self.tuned_inner.model.diffusion_model

    def generate(self, pg=None, **kwargs):
        return generate_with(self.script_module, pg, **kwargs)

    def pg_callbacks(self):
        """PG's denoiser callbacks still registered (there must be none between generations)."""
        return [c for c in script_callbacks.callback_map["callbacks_cfg_denoiser"] if "personalization" in str(c.script)]


@pytest.fixture
def env(tmp_path):
    yield Env(tmp_path)
    shared.reset()


def pg_args(omega, base="base", **extra):
    return [{"enabled": True, "omega": omega, "base": base, **extra}]


def same_images(a, b):
    return len(a.images) == len(b.images) and all(torch.equal(x, y) for x, y in zip(a.images, b.images))


class UNetRecorder:
    """Records every UNet call (inputs, output, the router's split at that moment)."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_hook(self.record, with_kwargs=True)

    def record(self, _module, args, kwargs, output):
        run = webui_controller.CONTROLLER.active_run
        split = run.router.current if run is not None else None
        self.calls.append((args[0].clone(), args[1].clone(), kwargs["context"].clone(), output.clone(), split))

    def remove(self):
        self.handle.remove()


CONFIGS = {
    "batch_cond_uncond": ({}, {}),
    "batch_cond_uncond off": ({"batch_cond_uncond": False}, {}),
    "different token lengths": ({}, {"prompt": LONG_PROMPT}),
    "pad_cond_uncond": ({"pad_cond_uncond": True}, {"prompt": LONG_PROMPT}),
    "pad_cond_uncond_v0": ({"pad_cond_uncond_v0": True}, {"prompt": LONG_PROMPT}),
    "AND prompt, batch 2, off": ({"batch_cond_uncond": False}, {"prompt": "a dog AND a hat:0.5", "batch_size": 2}),
    "AND prompt, batch 2": ({}, {"prompt": "a dog AND a hat:0.5", "batch_size": 2}),
    "batch count 2": ({}, {"n_iter": 2, "batch_size": 2}),
    "prompt editing": ({}, {"prompt": "a [dog:cat:2] photo", "negative_prompt": "[blurry:sharp:1]"}),
    "NGMS": ({}, {"s_min_uncond": 100.0}),
    "skip early CFG": ({"skip_early_cond": 0.5}, {}),
    "hires fix": ({}, {"enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 2}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_batching_path_routes_exactly(env, name):
    options, p_kwargs = CONFIGS[name]
    for key, value in options.items():
        setattr(shared.opts, key, value)
    before = module_state_fingerprint(env.tuned_inner)

    recorder = UNetRecorder(env.unet)
    plain, _ = env.generate(**p_kwargs)
    plain_calls = len(recorder.calls)
    recorder.calls.clear()
    same, _ = env.generate(pg_args(1.0), **p_kwargs)
    assert same_images(plain, same), "ω = 1 must be bit-identical to PG disabled"
    assert len(recorder.calls) == plain_calls
    recorder.calls.clear()
    guided, p = env.generate(pg_args(0.3), **p_kwargs)
    recorder.remove()

    assert len(recorder.calls) == plain_calls, "PG adds no model evaluation"
    assert not same_images(plain, guided)
    assert module_state_fingerprint(env.tuned_inner) == before
    assert not env.pg_callbacks()

    # Row by row, each call's conditional rows are the live model's and its
    # unconditional rows the weak model's. Compared to within float rounding:
    # the UNet's own kernels (attention) give last-bit differences between a
    # batch of 1 and of 2 even without PG (see test_unet_rows_depend_on_batch).
    weak_unet = interpolated_copy(env.base_inner, env.tuned_inner, 0.3).model.diffusion_model
    base_unet = env.base_inner.model.diffusion_model
    routed = 0
    with torch.no_grad():
        for x, t, context, output, split in recorder.calls:
            k = split.split if split is not None else x.shape[0]
            if k:
                torch.testing.assert_close(output[:k], env.unet(x[:k], t[:k], context=context[:k]), rtol=1e-5, atol=1e-5)
            if split is not None:
                routed += 1
                weak_rows = output[k:]
                torch.testing.assert_close(weak_rows, weak_unet(x[k:], t[k:], context=context[k:]), rtol=1e-5, atol=1e-5)
                assert not torch.allclose(weak_rows, env.unet(x[k:], t[k:], context=context[k:]), rtol=1e-3, atol=1e-3)
                assert not torch.allclose(weak_rows, base_unet(x[k:], t[k:], context=context[k:]), rtol=1e-3, atol=1e-3)
    assert routed > 0
    info = guided.infotexts[0]
    assert "PG omega: 0.3" in info and "PG base: base.safetensors [" in info
    if name == "NGMS":
        assert "PG skipped: " in info and "(NGMS)" in info
    elif name == "skip early CFG":
        assert "(Skip Early CFG)" in info
    else:
        assert "PG skipped" not in info


def test_unet_rows_depend_on_batch():
    """Why the row checks above use a float tolerance: the plain UNet already
    gives last-bit differences between one batched call and per-row calls."""
    unet = make_sd1("tiny").model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        both, first = unet(x, t, context=context), unet(x[:1], t[:1], context=context[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)


def test_hires_pass_on_another_checkpoint_is_plain_cfg_and_said_so(env, tmp_path, monkeypatch):
    other = sd_models.FakeSdModel(make_sd1("tiny", seed=5))
    models = {env.tuned_info.title: env.model, sd_models.get_closet_checkpoint_match("inpaint").title: other}
    # the hires checkpoint is another model object: PG leaves its steps alone
    save_checkpoint(other.inner.state_dict(), tmp_path / "other.safetensors")
    sd_models.list_models()
    models[sd_models.get_closet_checkpoint_match("other").title] = other
    monkeypatch.setattr(processing, "switch_checkpoint_hook", lambda title: models[title])
    result, _ = env.generate(pg_args(0.3), enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2, hr_checkpoint_name="other")
    assert "PG skipped: 2 steps on another checkpoint (refiner/hires)" in result.infotexts[0]


def test_fine_tuned_text_encoder_gives_the_weak_branch_its_conditioning(tmp_path):
    env = Env(tmp_path, text_encoder=True)
    recorder = UNetRecorder(env.unet)
    env.generate(pg_args(0.0), negative_prompt="blurry")
    recorder.remove()
    base_model = sd_models.FakeSdModel(env.base_inner)
    negative = prompt_parser.SdConditioning(["blurry"], width=32, height=32, is_negative_prompt=True)
    with torch.no_grad():
        expected_weak = base_model.get_learned_conditioning(negative)
        expected_cond = env.model.get_learned_conditioning(prompt_parser.SdConditioning(["a photo of sks dog"]))
    x, t, context, output, split = recorder.calls[0]
    assert split is not None and split.split == 1
    assert torch.equal(context[1:], expected_weak)  # the base text encoder (ω = 0) read the negative prompt
    assert torch.equal(context[:1], expected_cond)  # the conditional rows keep the live text encoder


def test_empty_weak_prompt_uses_the_null_prompt(env):
    recorder = UNetRecorder(env.unet)
    env.generate(pg_args(0.5, weak_prompt="empty"), negative_prompt="blurry")
    recorder.remove()
    with torch.no_grad():
        empty = env.model.get_learned_conditioning(prompt_parser.SdConditioning([""], is_negative_prompt=True))
    assert torch.equal(recorder.calls[0][2][1:], empty)


@pytest.mark.parametrize("args, message", [
    ([{"enabled": True, "omega": 1.5, "base": "base"}], "'omega' must be between 0 and 1"),
    ([{"enabled": True, "omega": 0.5, "base": "nope"}], "unknown base checkpoint 'nope'"),
    ([{"enabled": True, "omega": 0.5}], "choose a base checkpoint"),
    ([{"enabled": True, "omegaa": 0.5}], "unknown key(s) 'omegaa'"),
    ([True, "0.x", "base"], "'omega' must be a number"),
    ([{"enabled": True, "omega": 0.5, "base": "inpaint-base"}], "(SD 1.x inpainting) does not match the active model (SD 1.x)"),
])
def test_bad_input_stops_the_generation_before_sampling(env, args, message):
    before = module_state_fingerprint(env.tuned_inner)
    recorder = UNetRecorder(env.unet)
    with pytest.raises(PGError) as info:
        env.generate(args)
    recorder.remove()
    assert message in str(info.value)
    assert recorder.calls == []  # nothing was sampled
    assert module_state_fingerprint(env.tuned_inner) == before
    assert not env.pg_callbacks()


def test_missing_base_file_and_edit_models_are_refused(env, tmp_path):
    os.remove(tmp_path / "base.safetensors")
    with pytest.raises(PGError, match="base checkpoint file not found"):
        env.generate(pg_args(0.5))
    env.model.cond_stage_key = "edit"
    with pytest.raises(PGError, match="InstructPix2Pix"):
        env.generate(pg_args(0.5, base="tuned"))


def test_model_comes_back_exactly_on_error_interrupt_and_skip(env):
    before = module_state_fingerprint(env.tuned_inner)
    calls = []

    def fail_on_third_call(*_):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")

    handle = env.unet.register_forward_pre_hook(fail_on_third_call)
    with pytest.raises(RuntimeError, match="simulated"):
        env.generate(pg_args(0.3))
    handle.remove()
    assert module_state_fingerprint(env.tuned_inner) == before

    for flag in ("interrupted", "skipped"):
        def stop(params, flag=flag):
            if params.denoiser.step == 1:
                setattr(shared.state, flag, True)

        script_callbacks.on_cfg_denoiser(stop)
        env.generate(pg_args(0.3))
        script_callbacks.remove_callbacks_for_function(stop)
        setattr(shared.state, flag, False)
        assert module_state_fingerprint(env.tuned_inner) == before
    assert not env.pg_callbacks()


def test_weak_weights_are_cached_and_freed(env, monkeypatch):
    builds = []
    real_build = webui_controller.build_weak_model
    monkeypatch.setattr(webui_controller, "build_weak_model", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    env.generate(pg_args(0.3))
    env.generate(pg_args(0.3), seed=9)
    assert len(builds) == 1
    env.generate(pg_args(0.4))
    assert len(builds) == 2
    assert webui_controller.CONTROLLER.cache.weak is not None
    env.generate([False])
    assert webui_controller.CONTROLLER.cache.weak is None  # disabled: memory given back
    env.generate(pg_args(0.4))
    sd_models.set_model(env.model, env.tuned_info)  # webui's on_model_loaded
    assert webui_controller.CONTROLLER.cache.weak is None
    # weights changed in place (a reload, a merged LoRA): rebuilt, not reused
    env.generate(pg_args(0.4))
    with torch.no_grad():
        env.unet.out[2].bias.add_(0.0)
    env.generate(pg_args(0.4))
    assert len(builds) == 5


def test_ui_components_are_in_api_order_and_their_defaults_parse(env):
    runner = scripts.ScriptRunner()
    script = runner.add_script(env.script_module.PersonalizationGuidanceScript)
    defaults = runner.make_script_args()[script.args_from:script.args_to]
    assert len(defaults) == len(pg_settings.ARG_ORDER)
    assert pg_settings.from_script_args(defaults) == pg_settings.DEFAULTS


def test_infotext_pastes_back_every_control(env):
    runner = scripts.ScriptRunner()
    script = runner.add_script(env.script_module.PersonalizationGuidanceScript)
    wanted = {"enabled": True, "omega": 0.25, "base": "base", "weak_prompt": "empty", "schedule": "cosine",
              "omega_end": 0.75, "start": 0.1, "end": 0.9}
    result, _ = env.generate([wanted])
    params = infotext_utils.parse_generation_parameters(result.infotexts[0])
    pasted = []
    for component, key in script.infotext_fields:
        pasted.append(key(params) if callable(key) else params.get(key))
    settings = pg_settings.from_script_args(pasted)
    base_title = sd_models.get_closet_checkpoint_match("base").title
    # "PG weights: exact" pastes back as exact: the weights this image was made with
    assert settings == pg_settings.PGSettings(**{**wanted, "base": base_title, "weights": "exact"})
    # an infotext without PG turns PG off and leaves the other controls alone
    plain = infotext_utils.parse_generation_parameters("a dog\nSteps: 3, Seed: 1")
    assert [key(plain) if callable(key) else plain.get(key) for _, key in script.infotext_fields][0] is False


def test_a_p_processed_twice_is_wrapped_once(env):
    from modules import processing

    runner = scripts.ScriptRunner()
    script = runner.add_script(env.script_module.PersonalizationGuidanceScript)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a dog", steps=2, width=32, height=32, seed=1, sampler_name="Euler",
                                                    scripts=runner, script_args=runner.make_script_args({script: pg_args(0.3)}))
    webui_controller.CONTROLLER.prepare(p, pg_args(0.3))
    webui_controller.CONTROLLER.prepare(p, pg_args(0.3))
    assert not hasattr(p.sample.pg_original, "pg_original")
    webui_controller.CONTROLLER.prepare(p, [False])
    assert not hasattr(p.sample, "pg_original")


def test_hires_pass_with_a_fine_tuned_text_encoder(tmp_path):
    env = Env(tmp_path, text_encoder=True)
    recorder = UNetRecorder(env.unet)
    result, p = env.generate(pg_args(0.0), enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2, hr_negative_prompt="grainy")
    recorder.remove()
    base_model = sd_models.FakeSdModel(env.base_inner)
    hires_negative = prompt_parser.SdConditioning(["grainy"], width=64, height=64, is_negative_prompt=True)
    with torch.no_grad():
        expected = base_model.get_learned_conditioning(hires_negative)
    hires_calls = [call for call in recorder.calls if call[0].shape[-1] == 8]
    assert hires_calls and all(torch.equal(call[2][1:], expected) for call in hires_calls)
    assert "PG skipped" not in result.infotexts[0]


@pytest.mark.parametrize("package, host", [("backend", "Forge"), ("ldm_patched", "reForge")])
def test_an_unsupported_fork_refuses_enabled_generations_by_name(env, monkeypatch, package, host):
    """A Forge-like host PG cannot identify as Forge or reForge (found by the
    packages they add, never by version strings: here one package without
    modules_forge/) stops an enabled generation with a message naming the
    host; disabled generations run as usual."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == package else real_find_spec(name, *a))
    assert hosts.unsupported_host() == host
    with pytest.raises(PGError, match=f"this webui is {host}, which PG does not support yet"):
        env.generate(pg_args(0.3))
    assert not env.pg_callbacks()
    plain, _ = env.generate()
    assert plain.images


def test_a_host_whose_step_callback_never_comes_stops_the_generation(env, monkeypatch):
    """A host version whose sampler no longer calls on_cfg_denoiser would run
    every step unguided: PG stops the generation with the reason instead, and
    the model is as before."""
    from modules import sd_samplers_cfg_denoiser

    before = module_state_fingerprint(env.tuned_inner)
    monkeypatch.setattr(sd_samplers_cfg_denoiser, "cfg_denoiser_callback", lambda params: None)
    with pytest.raises(PGError, match="never announced a step to PG"):
        env.generate(pg_args(0.3))
    assert module_state_fingerprint(env.tuned_inner) == before
    assert not env.pg_callbacks()
    plain, _ = env.generate()  # PG disabled: the host's own sampling is untouched
    assert plain.images
