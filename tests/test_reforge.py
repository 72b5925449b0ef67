"""PG on reForge, driven through a fake of reForge's hook points (tests/fake_reforge)
on top of the fake webui: the step hands B rows to ldm_patched's sampling_function,
whose calc_cond_batch tags each chunk of a UNet call in transformer_options."""

import importlib
import os
import sys

import pytest
import torch

from modules import processing, script_callbacks, shared

from lib_pg import hosts
from lib_pg.errors import PGError
from lib_pg.forks import TaggedStepRouter, call_tags, weak_rows_from_tags
from lib_pg.patching import module_state_fingerprint
from tests import fork_lora_checks as lora_checks
from tests.helpers import interpolated_copy
from tests.test_script import Env, pg_args, same_images

FAKE_REFORGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_reforge")
FAKE_PACKAGES = ("ldm_patched", "modules_forge", "reforge_host", "lib_pg.hosts.reforge")


def _forget_fake_reforge():
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_PACKAGES or any(name == p or name.startswith(p + ".") for p in FAKE_PACKAGES):
            del sys.modules[name]
    import lib_pg.hosts

    lib_pg.hosts.__dict__.pop("reforge", None)  # `from lib_pg.hosts.reforge import controller` would find the forgotten one


def load_fake_networks(monkeypatch):
    """The fake of extensions-builtin/Lora/networks.py as the module `networks` (its name in reForge)."""
    path = os.path.join(FAKE_REFORGE, "extensions-builtin", "Lora", "networks.py")
    spec = importlib.util.spec_from_file_location("networks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "networks", module)
    return module


class ReForgeEnv(Env):
    def __init__(self, tmp_path, monkeypatch, **kwargs):
        super().__init__(tmp_path, **kwargs)
        self.host = importlib.import_module("reforge_host")
        self.samplers = importlib.import_module("ldm_patched.modules.samplers")
        self.networks = load_fake_networks(monkeypatch)
        self.forge_objects = self.host.install(self.model, monkeypatch, networks=self.networks)
        self.adapter = importlib.import_module("lib_pg.hosts.reforge.controller")

    def patch_state(self):
        """reForge's LoRA state, by identity: both patchers' patch lists and uuids, the shared backups."""
        objects = self.model.forge_objects
        state = [self.model.current_lora_hash]
        for patcher in (objects.unet, objects.clip.patcher):
            state.append(sorted((key, [id(e) for e in entries]) for key, entries in patcher.patches.items()))
            state.append((patcher.patches_uuid, patcher.model.current_weight_patches_uuid,
                          sorted((k, id(v.weight)) for k, v in patcher.backup.items())))
        return state

    def use_base_checkpoint(self, monkeypatch):
        model = lora_checks.use_base_checkpoint(self, monkeypatch, lambda m: self.host.install(m, monkeypatch, networks=self.networks))
        self.model = model


@pytest.fixture
def reforge(tmp_path, monkeypatch):
    _forget_fake_reforge()
    monkeypatch.syspath_prepend(FAKE_REFORGE)
    importlib.invalidate_caches()
    env = ReForgeEnv(tmp_path, monkeypatch)
    yield env
    env.adapter.CONTROLLER.shutdown()
    shared.reset()
    _forget_fake_reforge()


class TaggedRecorder:
    """Every diffusion-model call: inputs, tags, output, and PG's plan at that moment."""

    def __init__(self, env):
        self.env, self.calls = env, []
        self.handle = env.unet.register_forward_hook(self.record, with_kwargs=True)

    def record(self, _module, args, kwargs, output):
        run = self.env.adapter.CONTROLLER.active_run
        plan = run.router.current if run is not None else None
        self.calls.append((args[0].clone(), args[1].clone(), kwargs["context"].clone(), call_tags(args, kwargs), output.clone(), plan))

    def remove(self):
        self.handle.remove()


# -- host detection -----------------------------------------------------------
def test_hosts_are_told_apart_by_their_packages(reforge, monkeypatch):
    assert hosts.detect() == hosts.REFORGE
    assert hosts.unsupported_host() is None
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "backend" else (None if name == "ldm_patched" else real_find_spec(name, *a)))
    assert hosts.detect() == hosts.FORGE
    assert hosts.unsupported_host() is None  # Forge has an adapter too (tests/test_forge.py)


def test_plain_webui_is_webui():
    assert hosts.detect() == hosts.WEBUI


# -- the row layout -------------------------------------------------------------
@pytest.mark.parametrize("tags, rows, batch, weak", [
    ([1, 0], 2, 1, [0]),                      # one image: the unconditional chunk first
    ([1, 0], 4, 2, [0, 1]),                   # batch 2
    ([0, 1], 4, 2, [2, 3]),
    ([1, 0, 0], 6, 2, [0, 1]),                # an AND prompt
    ([1], 2, 2, [0, 1]),                      # memory halving: the unconditional chunk alone
    ([0], 2, 2, []),                          # a cond-only call (PAG)
    ([1, 0], 6, 1, [0, 2, 4]),                # three tiles of [uncond, cond] (MultiDiffusion)
    ([1, 0], 3, 1, None),                     # rows sliced by someone: not a whole block
    ([], 2, 1, None),
])
def test_weak_rows_come_from_the_tags(tags, rows, batch, weak):
    assert weak_rows_from_tags(tags, rows, batch) == weak


def test_router_reads_tags_by_keyword_or_position():
    router = TaggedStepRouter()
    router.begin_step(batch=1, omega=0.5)
    x = torch.zeros(2, 4, 2, 2)
    router.enter_call((x, None), {"transformer_options": {"cond_or_uncond": [1, 0]}})
    assert router.current.weak == (0,) and router.current.omega == 0.5
    router.enter_call((x, None, None, None, None, {"cond_or_uncond": [0, 1]}), {})
    assert router.current.weak == (1,) and router.current.split == 1
    router.enter_call((x, None), {})
    assert router.current is None and router.untagged_calls == 1
    router.begin_step(batch=1, omega=1.0)
    router.enter_call((x, None), {"transformer_options": {"cond_or_uncond": [1, 0]}})
    assert router.current is None


# -- generations -----------------------------------------------------------------
CONFIGS = {
    "one image": ({}, {}),
    "batch 2": ({}, {"batch_size": 2}),
    "AND prompt, batch 2": ({}, {"prompt": "a dog AND a hat:0.5", "batch_size": 2}),
    "different token lengths": ({}, {"prompt": " ".join(f"word{i}" for i in range(90))}),
    "uncond in its own call": ({"MEMORY_CHUNKS": 1}, {}),
    "hires fix": ({}, {"enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 2}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_layout_routes_exactly(reforge, monkeypatch, name):
    env = reforge
    sampler_options, p_kwargs = CONFIGS[name]
    for key, value in sampler_options.items():
        monkeypatch.setattr(env.samplers, key, value)
    before = module_state_fingerprint(env.tuned_inner)
    options_before = repr(env.forge_objects.unet.model_options)

    recorder = TaggedRecorder(env)
    plain, _ = env.generate(**p_kwargs)
    plain_calls = len(recorder.calls)
    recorder.calls.clear()
    same, _ = env.generate(pg_args(1.0), **p_kwargs)
    assert same_images(plain, same), "ω = 1 must be bit-identical to PG disabled"
    assert len(recorder.calls) == plain_calls
    recorder.calls.clear()
    guided, _ = env.generate(pg_args(0.3), **p_kwargs)
    recorder.remove()

    assert len(recorder.calls) == plain_calls, "PG adds no model evaluation"
    assert not same_images(plain, guided)
    assert module_state_fingerprint(env.tuned_inner) == before
    assert repr(env.forge_objects.unet.model_options) == options_before
    assert not env.pg_callbacks()

    weak_unet = interpolated_copy(env.base_inner, env.tuned_inner, 0.3).model.diffusion_model
    routed = 0
    with torch.no_grad():
        for x, t, context, tags, output, plan in recorder.calls:
            batch = x.shape[0] // len(tags)
            weak = weak_rows_from_tags(tags, x.shape[0], batch)
            if not weak:  # a call of conditional chunks only
                assert plan is None
                continue
            assert list(plan.weak) == weak
            cond = [i for i in range(x.shape[0]) if i not in weak]
            if cond:
                torch.testing.assert_close(output[cond], env.unet(x[cond], t[cond], context=context[cond]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(output[weak], weak_unet(x[weak], t[weak], context=context[weak]), rtol=1e-5, atol=1e-5)
            routed += 1
    assert routed == sum(1 for call in recorder.calls if 1 in call[3])
    info = guided.infotexts[0]
    assert "PG omega: 0.3" in info and "PG base: base.safetensors [" in info and "PG skipped" not in info


@pytest.mark.parametrize("own_call", [True, False])
def test_omega_zero_at_cfg_zero_is_the_base_models_image(reforge, monkeypatch, own_call):
    """At CFG Scale 0 the image is the unconditional branch alone: with ω = 0 it
    is the base checkpoint's own image at CFG Scale 0. Bit for bit when the
    unconditional chunk runs in a call of its own (reForge's memory halving);
    batched with the conditional chunk, to within the float rounding by which
    the UNet's kernels already differ between batch sizes (test_script.py
    test_unet_rows_depend_on_batch)."""
    env = reforge
    if own_call:
        monkeypatch.setattr(env.samplers, "MEMORY_CHUNKS", 1)
    guided, _ = env.generate(pg_args(0.0), cfg_scale=0.0)
    live_unet_state = {k: v.clone() for k, v in env.unet.state_dict().items()}
    with torch.no_grad():
        env.unet.load_state_dict(env.base_inner.model.diffusion_model.state_dict())
    base_image, _ = env.generate(cfg_scale=0.0)
    with torch.no_grad():
        env.unet.load_state_dict(live_unet_state)
    if own_call:
        assert same_images(guided, base_image), [(a - b).abs().max().item() for a, b in zip(guided.images, base_image.images)]
    else:
        assert all(torch.allclose(a, b, rtol=0, atol=1e-4) for a, b in zip(guided.images, base_image.images))
    plain, _ = env.generate(cfg_scale=0.0)
    assert not any(torch.allclose(a, b, rtol=0, atol=1e-3) for a, b in zip(plain.images, base_image.images))


def test_fine_tuned_text_encoder_encodes_the_weak_negative_prompt(tmp_path, monkeypatch):
    _forget_fake_reforge()
    monkeypatch.syspath_prepend(FAKE_REFORGE)
    env = ReForgeEnv(tmp_path, monkeypatch, text_encoder=True)
    try:
        management = importlib.import_module("ldm_patched.modules.model_management")
        management.loaded.clear()
        before = module_state_fingerprint(env.tuned_inner)
        monkeypatch.setattr(env.samplers, "MEMORY_CHUNKS", 1)
        guided, _ = env.generate(pg_args(0.0), cfg_scale=0.0)
        assert management.loaded[0] is env.forge_objects.clip.patcher, "the text encoder is loaded before its weights are swapped"
        assert module_state_fingerprint(env.tuned_inner) == before
        with torch.no_grad():
            env.tuned_inner.load_state_dict(env.base_inner.state_dict())
        processing.clear_cond_cache()  # webui's cache of conditioning knows nothing of weights loaded in place
        base_image, _ = env.generate(cfg_scale=0.0)
        assert same_images(guided, base_image), [(a - b).abs().max().item() for a, b in zip(guided.images, base_image.images)]
    finally:
        env.adapter.CONTROLLER.shutdown()
        shared.reset()
        _forget_fake_reforge()


def test_cfg_scale_one_runs_no_unconditional_pass_and_says_so(reforge):
    plain, _ = reforge.generate(cfg_scale=1.0)
    guided, _ = reforge.generate(pg_args(0.3), cfg_scale=1.0)
    assert same_images(plain, guided)
    assert "3 steps without unconditional pass (reForge ran no unconditional pass: CFG Scale 1" in guided.infotexts[0]


def test_tiles_of_a_function_wrapper_are_routed(reforge):
    """MultiDiffusion-like: the wrapper cuts the latent into two tiles and stacks
    them along the batch, passing the same transformer_options."""
    env = reforge

    def tiles(apply_model, args):
        x, c = args["input"], args["c"]
        half = x.shape[-1] // 2
        stacked = torch.cat([x[..., :half], x[..., half:]])
        t = torch.cat([args["timestep"]] * 2)
        c2 = {k: (torch.cat([v] * 2) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
        out = apply_model(stacked, t, **c2)
        left, right = out.chunk(2)
        return torch.cat([left, right], dim=-1)

    env.forge_objects.unet.model_options["model_function_wrapper"] = tiles
    recorder = TaggedRecorder(env)
    guided, _ = env.generate(pg_args(0.3), width=64)
    recorder.remove()
    plans = [plan for *_rest, plan in recorder.calls]
    assert plans and all(plan is not None and plan.weak == (0, 2) for plan in plans)
    assert "PG skipped" not in guided.infotexts[0]


def test_a_wrapper_that_drops_the_tags_stops_the_generation(reforge):
    def untagged(apply_model, args):
        c = dict(args["c"])
        c["transformer_options"] = {}
        return apply_model(args["input"], args["timestep"], **c)

    reforge.forge_objects.unet.model_options["model_function_wrapper"] = untagged
    with pytest.raises(PGError, match="unconditional rows reached the UNet"):
        reforge.generate(pg_args(0.3))
    assert not reforge.pg_callbacks()


@pytest.mark.parametrize("args, message", [
    (pg_args(0.3, base="nope"), "unknown base checkpoint 'nope'"),
    (pg_args(0.3, base=""), "choose a base checkpoint"),
    (pg_args(0.3, strip_loras="mydog"), "'strip_loras' is set but no LoRA is active"),
    (pg_args(1.5), "omega"),
])
def test_bad_input_stops_the_generation(reforge, args, message):
    before = module_state_fingerprint(reforge.tuned_inner)
    with pytest.raises(PGError, match=message.replace("(", r"\(").replace(")", r"\)")):
        reforge.generate(args)
    assert module_state_fingerprint(reforge.tuned_inner) == before
    assert not reforge.pg_callbacks()


def test_other_families_are_refused_by_name(reforge):
    supported = importlib.import_module("ldm_patched.modules.supported_models")
    reforge.forge_objects.unet.model.model_config = supported.Flux()
    with pytest.raises(PGError, match=r"this model's family \(Flux\) is not supported by PG on reForge"):
        reforge.generate(pg_args(0.3))


# -- LoRAs (tests/fork_lora_checks.py) ------------------------------------------------------
@pytest.fixture
def reforge_lora(reforge, tmp_path):
    lora_checks.add_loras(reforge, tmp_path, reforge.networks)
    return reforge


def test_loras_change_the_image(reforge_lora):
    lora_checks.check_loras_change_the_image(reforge_lora)


def test_lora_strip_at_omega_one_is_plain_cfg(reforge_lora):
    lora_checks.check_omega_one_is_plain_cfg(reforge_lora)


def test_lora_strip_weak_branch_is_the_model_without_the_lora(reforge_lora, monkeypatch):
    lora_checks.check_stripped_weak_branch_is_the_model_without_the_lora(reforge_lora, monkeypatch)


def test_lora_strip_weak_weights_are_the_lerp_of_reference_and_live(reforge_lora, monkeypatch):
    lora_checks.check_weak_weights_are_the_lerp_of_reference_and_live(reforge_lora, monkeypatch)


def test_lora_strip_corrections_are_the_forks_merged_delta(reforge_lora):
    lora_checks.check_corrections_are_the_forks_merged_delta(reforge_lora)


def test_lora_strip_corrected_weak_rows_equal_the_copy_path(reforge_lora, monkeypatch):
    lora_checks.check_corrected_weak_rows_equal_the_copy_path(reforge_lora, monkeypatch)


def test_lora_strip_corrections_cost_about_the_loras_size(reforge_lora):
    lora_checks.check_corrections_cost_about_the_loras_size(reforge_lora)


def test_base_with_loras_is_the_base_model_with_the_same_loras(reforge_lora, monkeypatch):
    lora_checks.check_base_with_loras_is_the_base_model_with_the_same_loras(reforge_lora, monkeypatch)


def test_base_built_right_after_a_lora_generation(reforge_lora):
    lora_checks.check_base_built_right_after_a_lora_generation(reforge_lora)


def test_lora_state_unchanged_after_success_error_and_interrupt(reforge_lora):
    lora_checks.check_state_unchanged_after_success_error_and_interrupt(reforge_lora)


def test_lora_weak_weights_are_kept_while_the_loras_are(reforge_lora, monkeypatch):
    lora_checks.check_weak_weights_are_kept_while_the_loras_are(reforge_lora, monkeypatch)


def test_lora_strip_errors(reforge_lora):
    lora_checks.check_strip_errors(reforge_lora)


def test_lora_patches_another_extension_changed_are_refused(reforge_lora):
    """reForge's patch lists carry no LoRA identity: PG finds a LoRA's entries by position, and
    stops when the lists hold more than the prompt's LoRAs account for."""
    env = reforge_lora
    state = lora_checks.install_extra_patch(env)
    with pytest.raises(PGError, match="do not match the prompt's LoRAs"):
        env.generate(lora_checks.strip(0.3, ["dog"]), prompt=lora_checks.DOG_STYLE)
    assert env.patch_state() == state


def test_loras_on_a_low_vram_unet_are_refused(reforge_lora, monkeypatch):
    """In low VRAM reForge applies a layer's LoRA in its forward (weight_function): on a weak weight
    it would be applied again."""
    env = reforge_lora
    management = importlib.import_module("ldm_patched.modules.model_management")
    monkeypatch.setattr(management, "LOWVRAM", True)
    env.generate(prompt=lora_checks.DOG)
    before = (env.patch_state(), module_state_fingerprint(env.tuned_inner))
    with pytest.raises(PGError, match="low-VRAM mode"):
        env.generate(lora_checks.strip(0.3), prompt=lora_checks.DOG)
    assert (env.patch_state(), module_state_fingerprint(env.tuned_inner)) == before
    assert not env.pg_callbacks()
    plain = env.generate(pg_args(0.3), prompt=lora_checks.PLAIN)  # without LoRAs the low-VRAM UNet is fine
    assert "PG skipped" not in plain[0].infotexts[0]


def test_model_comes_back_exactly_on_error_and_interrupt(reforge):
    env = reforge
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

    def stop(params):
        if params.denoiser.step == 1:
            shared.state.interrupted = True

    script_callbacks.on_cfg_denoiser(stop)
    env.generate(pg_args(0.3))
    script_callbacks.remove_callbacks_for_function(stop)
    shared.state.interrupted = False
    assert module_state_fingerprint(env.tuned_inner) == before
    assert not env.pg_callbacks()


def test_weak_weights_follow_the_live_parameters_device():
    """The fork moves its UNet between devices when it loads it for sampling:
    the weak tensors are placed where the live ones are at the first routed call."""
    from lib_pg.forks import place_like_live
    from lib_pg.weights import WeakLayer

    module = torch.nn.Linear(2, 2)
    layer = WeakLayer(module, ("weight", "bias"), fixed=(torch.zeros(2, 2), torch.zeros(2)), fixed_omega=0.5)
    assert place_like_live([layer]) == 0
    module.to("meta")
    assert place_like_live([layer]) == 1
    assert all(t.device.type == "meta" for t in layer.fixed)
    assert all(t.device.type == "meta" for _m, _n, t in layer.swaps_at(0.5))


def test_a_fork_whose_step_callback_never_comes_stops_the_generation(reforge, monkeypatch):
    before = module_state_fingerprint(reforge.unet)
    monkeypatch.setattr(reforge.host, "cfg_denoiser_callback", lambda params: None)
    with pytest.raises(PGError, match="never announced a step to PG"):
        reforge.generate(pg_args(0.3))
    assert module_state_fingerprint(reforge.unet) == before
