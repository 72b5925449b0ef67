"""PG on Forge, driven through a fake of Forge's hook points (tests/fake_forge) on top of
the fake webui: the engine is not an nn.Module, the step hands B rows to backend/sampling's
calc_cond_uncond_batch, which tags each chunk of a UNet call in transformer_options."""

import importlib
import os
import sys

import pytest
import torch

from modules import processing, script_callbacks, shared

from lib_pg import hosts
from lib_pg.errors import PGError
from lib_pg.forks import call_tags, weak_rows_from_tags
from lib_pg.patching import module_state_fingerprint
from tests import fork_lora_checks as lora_checks
from tests.helpers import interpolated_copy
from tests.test_script import Env, pg_args, same_images

FAKE_FORGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_forge")
FAKE_PACKAGES = ("backend", "modules_forge", "forge_host", "lib_pg.hosts.forge", "lib_pg.hosts.reforge")


def _forget_fake_forge():
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_PACKAGES or any(name == p or name.startswith(p + ".") for p in FAKE_PACKAGES):
            del sys.modules[name]
    import lib_pg.hosts

    # `from lib_pg.hosts.forge import controller` would find the forgotten package through these
    lib_pg.hosts.__dict__.pop("reforge", None)
    lib_pg.hosts.__dict__.pop("forge", None)


def load_fake_networks(monkeypatch):
    """The fake of extensions-builtin/sd_forge_lora/networks.py as the module `networks` (its name in Forge)."""
    path = os.path.join(FAKE_FORGE, "extensions-builtin", "sd_forge_lora", "networks.py")
    spec = importlib.util.spec_from_file_location("networks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "networks", module)
    return module


class ForgeEnv(Env):
    def __init__(self, tmp_path, monkeypatch, **kwargs):
        super().__init__(tmp_path, **kwargs)
        self.host = importlib.import_module("forge_host")
        self.samplers = importlib.import_module("backend.sampling.sampling_function")
        self.networks = load_fake_networks(monkeypatch)
        self.forge_objects = self.host.install(self.model, monkeypatch, networks=self.networks)
        self.adapter = importlib.import_module("lib_pg.hosts.forge.controller")

    def patch_state(self):
        """Forge's LoRA state, by identity: both patchers' lora_patches and the loader's backups."""
        objects = self.model.forge_objects
        state = [self.model.current_lora_hash]
        for patcher in (objects.unet, objects.clip.patcher):
            state.append([(k, [(key, [id(e) for e in entries]) for key, entries in patches.items()])
                          for k, patches in patcher.lora_patches.items()])
            loader = patcher.lora_loader
            state.append((loader.loaded_hash, sorted((k, id(v)) for k, v in loader.backup.items())))
        return state

    def use_base_checkpoint(self, monkeypatch):
        model = lora_checks.use_base_checkpoint(self, monkeypatch, lambda m: self.host.install(m, monkeypatch, networks=self.networks))
        self.model = model


@pytest.fixture
def forge(tmp_path, monkeypatch):
    _forget_fake_forge()
    monkeypatch.syspath_prepend(FAKE_FORGE)
    importlib.invalidate_caches()
    env = ForgeEnv(tmp_path, monkeypatch)
    yield env
    env.adapter.CONTROLLER.shutdown()
    shared.reset()
    _forget_fake_forge()


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
def test_forge_is_told_apart_by_its_packages(forge):
    assert hosts.detect() == hosts.FORGE
    assert hosts.unsupported_host() is None


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
def test_every_layout_routes_exactly(forge, monkeypatch, name):
    env = forge
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
def test_omega_zero_at_cfg_zero_is_the_base_models_image(forge, monkeypatch, own_call):
    """At CFG Scale 0 the image is the unconditional branch alone: with ω = 0 it
    is the base checkpoint's own image at CFG Scale 0. Bit for bit when the
    unconditional chunk runs in a call of its own (Forge's memory halving);
    batched with the conditional chunk, to within the float rounding by which
    the UNet's kernels already differ between batch sizes (test_script.py
    test_unet_rows_depend_on_batch)."""
    env = forge
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
    _forget_fake_forge()
    monkeypatch.syspath_prepend(FAKE_FORGE)
    env = ForgeEnv(tmp_path, monkeypatch, text_encoder=True)
    try:
        management = importlib.import_module("backend.memory_management")
        management.loaded.clear()
        before = module_state_fingerprint(env.tuned_inner)
        monkeypatch.setattr(env.samplers, "MEMORY_CHUNKS", 1)
        guided, _ = env.generate(pg_args(0.0), cfg_scale=0.0)
        assert management.loaded[0] is env.forge_objects.clip.patcher, "the text encoder is loaded before its weights are swapped"
        assert module_state_fingerprint(env.tuned_inner) == before
        embedding = env.tuned_inner.cond_stage_model.transformer.text_model.embeddings.token_embedding
        assert type(embedding).__name__ == "CLIPEmbeddingForTextualInversion"
        with torch.no_grad():  # (the wrapper's own name for the embedding weight is the checkpoint's)
            env.tuned_inner.load_state_dict(env.base_inner.state_dict(), strict=False)
        processing.clear_cond_cache()  # webui's cache of conditioning knows nothing of weights loaded in place
        base_image, _ = env.generate(cfg_scale=0.0)
        assert same_images(guided, base_image), [(a - b).abs().max().item() for a, b in zip(guided.images, base_image.images)]
    finally:
        env.adapter.CONTROLLER.shutdown()
        shared.reset()
        _forget_fake_forge()


@pytest.mark.parametrize("text_encoder", [False, True])
def test_cfg_scale_one_runs_no_unconditional_pass_and_says_so(forge, text_encoder):
    """Forge drops the negative conditioning altogether at CFG Scale 1 (params.text_uncond is None)."""
    if text_encoder:  # a weak text encoder: PG must not put a weak negative prompt where there is none
        with torch.no_grad():
            forge.tuned_inner.cond_stage_model.transformer.text_model.final_layer_norm.weight.add_(0.1)
    plain, _ = forge.generate(cfg_scale=1.0)
    guided, _ = forge.generate(pg_args(0.3), cfg_scale=1.0)
    assert same_images(plain, guided)
    assert "3 steps without unconditional pass (Forge ran no unconditional pass: CFG Scale 1" in guided.infotexts[0]


def test_tiles_of_a_function_wrapper_are_routed(forge):
    """MultiDiffusion-like: the wrapper cuts the latent into two tiles and stacks
    them along the batch, passing the same transformer_options."""
    env = forge

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


def test_a_wrapper_that_drops_the_tags_stops_the_generation(forge):
    def untagged(apply_model, args):
        c = dict(args["c"])
        c["transformer_options"] = {}
        return apply_model(args["input"], args["timestep"], **c)

    forge.forge_objects.unet.model_options["model_function_wrapper"] = untagged
    with pytest.raises(PGError, match="unconditional rows reached the UNet"):
        forge.generate(pg_args(0.3))
    assert not forge.pg_callbacks()


@pytest.mark.parametrize("args, message", [
    (pg_args(0.3, base="nope"), "unknown base checkpoint 'nope'"),
    (pg_args(0.3, base=""), "choose a base checkpoint"),
    (pg_args(0.3, strip_loras="mydog"), "'strip_loras' is set but no LoRA is active"),
    (pg_args(1.5), "omega"),
])
def test_bad_input_stops_the_generation(forge, args, message):
    before = module_state_fingerprint(forge.tuned_inner)
    with pytest.raises(PGError, match=message.replace("(", r"\(").replace(")", r"\)")):
        forge.generate(args)
    assert module_state_fingerprint(forge.tuned_inner) == before
    assert not forge.pg_callbacks()


def test_other_families_are_refused_by_name(forge, monkeypatch):
    monkeypatch.setattr(forge.model, "__class__", type("Flux", (type(forge.model),), {}))
    with pytest.raises(PGError, match=r"this model's family \(Flux\) is not supported by PG on Forge"):
        forge.generate(pg_args(0.3))


# -- LoRAs (tests/fork_lora_checks.py) ------------------------------------------------------
@pytest.fixture
def forge_lora(forge, tmp_path):
    lora_checks.add_loras(forge, tmp_path, forge.networks)
    return forge


def test_loras_change_the_image(forge_lora):
    lora_checks.check_loras_change_the_image(forge_lora)


def test_lora_strip_at_omega_one_is_plain_cfg(forge_lora):
    lora_checks.check_omega_one_is_plain_cfg(forge_lora)


def test_lora_strip_weak_branch_is_the_model_without_the_lora(forge_lora, monkeypatch):
    lora_checks.check_stripped_weak_branch_is_the_model_without_the_lora(forge_lora, monkeypatch)


def test_lora_strip_weak_weights_are_the_lerp_of_reference_and_live(forge_lora, monkeypatch):
    lora_checks.check_weak_weights_are_the_lerp_of_reference_and_live(forge_lora, monkeypatch)


def test_lora_strip_corrections_are_the_forks_merged_delta(forge_lora):
    lora_checks.check_corrections_are_the_forks_merged_delta(forge_lora)


def test_lora_strip_corrected_weak_rows_equal_the_copy_path(forge_lora, monkeypatch):
    lora_checks.check_corrected_weak_rows_equal_the_copy_path(forge_lora, monkeypatch)


def test_lora_strip_corrections_cost_about_the_loras_size(forge_lora):
    lora_checks.check_corrections_cost_about_the_loras_size(forge_lora)


def test_base_with_loras_is_the_base_model_with_the_same_loras(forge_lora, monkeypatch):
    lora_checks.check_base_with_loras_is_the_base_model_with_the_same_loras(forge_lora, monkeypatch)


def test_base_built_right_after_a_lora_generation(forge_lora):
    lora_checks.check_base_built_right_after_a_lora_generation(forge_lora)


def test_lora_state_unchanged_after_success_error_and_interrupt(forge_lora):
    lora_checks.check_state_unchanged_after_success_error_and_interrupt(forge_lora)


def test_lora_weak_weights_are_kept_while_the_loras_are(forge_lora, monkeypatch):
    lora_checks.check_weak_weights_are_kept_while_the_loras_are(forge_lora, monkeypatch)


def test_lora_strip_errors(forge_lora):
    lora_checks.check_strip_errors(forge_lora)


def test_online_loras_are_refused(forge_lora, monkeypatch):
    """Forge's online LoRA (a UNet stored in another dtype) applies the patches in each forward."""
    monkeypatch.setattr(forge_lora.networks, "ONLINE", True)
    forge_lora.generate(prompt=lora_checks.DOG)
    before = (forge_lora.patch_state(), module_state_fingerprint(forge_lora.tuned_inner))
    with pytest.raises(PGError, match="LoRAs applied online"):
        forge_lora.generate(lora_checks.strip(0.3), prompt=lora_checks.DOG)
    assert (forge_lora.patch_state(), module_state_fingerprint(forge_lora.tuned_inner)) == before


def test_model_comes_back_exactly_on_error_and_interrupt(forge):
    env = forge
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


def test_a_fork_whose_step_callback_never_comes_stops_the_generation(forge, monkeypatch):
    before = module_state_fingerprint(forge.unet)
    monkeypatch.setattr(forge.host, "cfg_denoiser_callback", lambda params: None)
    with pytest.raises(PGError, match="never announced a step to PG"):
        forge.generate(pg_args(0.3))
    assert module_state_fingerprint(forge.unet) == before
