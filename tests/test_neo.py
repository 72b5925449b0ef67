"""PG on Forge Neo, driven through a fake of Neo's hook points (tests/fake_neo) on top of the fake
webui: Forge's engine and tagged sampling, with Neo's ComfyUI-style model patcher (per-key patch
lists without LoRA identity, namedtuple backups, merge then stochastic rounding, LoRAs left to a
layer's weight_function in online / low-VRAM modes)."""

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

FAKE_NEO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_neo")
# modules_forge/initialization.py:27 puts modules_forge/packages on sys.path (huggingface_guess)
FAKE_NEO_PACKAGES = os.path.join(FAKE_NEO, "modules_forge", "packages")
FAKE_PACKAGES = ("backend", "modules_forge", "huggingface_guess", "neo_host", "compile", "lib_pg.hosts.neo", "lib_pg.hosts.forge",
                 "lib_pg.hosts.reforge")


def _forget_fake_neo():
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_PACKAGES or any(name == p or name.startswith(p + ".") for p in FAKE_PACKAGES):
            del sys.modules[name]
    import lib_pg.hosts

    for host in ("neo", "forge", "reforge"):  # `from lib_pg.hosts.neo import controller` would find the forgotten one
        lib_pg.hosts.__dict__.pop(host, None)


def load_fake_networks(monkeypatch):
    """extensions-builtin/sd_forge_lora/networks.py, as the module `networks` (its name in Neo)."""
    return _load(monkeypatch, "networks", "extensions-builtin", "sd_forge_lora", "networks.py")


def _load(monkeypatch, name, *path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(FAKE_NEO, *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, name, module)
    return module


class NeoEnv(Env):
    def __init__(self, tmp_path, monkeypatch, **kwargs):
        super().__init__(tmp_path, **kwargs)
        self.host = importlib.import_module("neo_host")
        self.samplers = importlib.import_module("backend.sampling.sampling_function")
        self.management = importlib.import_module("backend.memory_management")
        self.networks = load_fake_networks(monkeypatch)
        self.forge_objects = self.host.install(self.model, monkeypatch, networks=self.networks)
        self.adapter = importlib.import_module("lib_pg.hosts.neo.controller")

    def patch_state(self):
        """Neo's LoRA state, by identity: both patchers' patch lists and uuids, the shared backups."""
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


def _neo_env(tmp_path, monkeypatch, **kwargs):
    _forget_fake_neo()
    monkeypatch.syspath_prepend(FAKE_NEO)
    monkeypatch.syspath_prepend(FAKE_NEO_PACKAGES)
    importlib.invalidate_caches()
    return NeoEnv(tmp_path, monkeypatch, **kwargs)


@pytest.fixture
def neo(tmp_path, monkeypatch):
    env = _neo_env(tmp_path, monkeypatch)
    yield env
    env.adapter.CONTROLLER.shutdown()
    shared.reset()
    _forget_fake_neo()


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
def test_neo_is_told_apart_from_forge_by_what_its_packages_provide(neo, monkeypatch):
    """Neo and Forge both ship backend/ and modules_forge/; Neo's modules_forge provides ComfyUI's
    LoRA weight adapters (modules_forge/packages/comfy/weight_adapter/), Forge's does not."""
    assert hosts.detect() == hosts.NEO
    assert hosts.unsupported_host() is None
    assert type(hosts.controller()).__name__ == "NeoController"
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda path: False if "weight_adapter" in str(path) else real_exists(path))
    assert hosts.detect() == hosts.FORGE


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
def test_every_layout_routes_exactly(neo, monkeypatch, name):
    env = neo
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
            if not weak:
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
def test_omega_zero_at_cfg_zero_is_the_base_models_image(neo, monkeypatch, own_call):
    env = neo
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


def test_lean_on_sd1(neo):
    """Lean weights on Neo's SD 1.x too: UNet factors within the budget, closer to exact than CFG, the
    model unchanged."""
    before = module_state_fingerprint(neo.tuned_inner)
    exact, _ = neo.generate(pg_args(0.0, weights="exact"), cfg_scale=0.0)
    exact_bytes = neo.adapter.CONTROLLER.cache.weak.extra_bytes
    plain, _ = neo.generate(cfg_scale=0.0)
    lean, _ = neo.generate(pg_args(0.0, weights="lean", lean_budget_mb=0.5), cfg_scale=0.0)
    weak = neo.adapter.CONTROLLER.cache.weak
    assert "low-rank 0.5 MiB" in lean.infotexts[0], lean.infotexts[0]
    assert sum(layer.nbytes() for layer in weak.unet) <= 0.5 * 2**20 < exact_bytes
    assert (lean.images[0] - exact.images[0]).abs().mean() < (plain.images[0] - exact.images[0]).abs().mean()
    assert module_state_fingerprint(neo.tuned_inner) == before


def test_automatic_base_is_found(neo):
    guided, _ = neo.generate(pg_args(0.3, base="Automatic"))
    info = guided.infotexts[0]
    assert "PG base: base.safetensors [" in info and "PG base distance" in info


def test_fine_tuned_text_encoder_encodes_the_weak_negative_prompt(tmp_path, monkeypatch):
    env = _neo_env(tmp_path, monkeypatch, text_encoder=True)
    try:
        env.management.loaded.clear()
        before = module_state_fingerprint(env.tuned_inner)
        monkeypatch.setattr(env.samplers, "MEMORY_CHUNKS", 1)
        guided, _ = env.generate(pg_args(0.0), cfg_scale=0.0)
        assert env.management.loaded[0] is env.forge_objects.clip.patcher, "the text encoder is loaded before its weights are swapped"
        assert module_state_fingerprint(env.tuned_inner) == before
        with torch.no_grad():
            env.tuned_inner.load_state_dict(env.base_inner.state_dict(), strict=False)
        processing.clear_cond_cache()
        base_image, _ = env.generate(cfg_scale=0.0)
        assert same_images(guided, base_image), [(a - b).abs().max().item() for a, b in zip(guided.images, base_image.images)]
    finally:
        env.adapter.CONTROLLER.shutdown()
        shared.reset()
        _forget_fake_neo()


def test_cfg_scale_one_runs_no_unconditional_pass_and_says_so(neo):
    plain, _ = neo.generate(cfg_scale=1.0)
    guided, _ = neo.generate(pg_args(0.3), cfg_scale=1.0)
    assert same_images(plain, guided)
    assert "3 steps without unconditional pass (Forge Neo ran no unconditional pass: CFG Scale 1" in guided.infotexts[0]


def test_a_wrapper_that_drops_the_tags_stops_the_generation(neo):
    def untagged(apply_model, args):
        c = dict(args["c"])
        c["transformer_options"] = {}
        return apply_model(args["input"], args["timestep"], **c)

    neo.forge_objects.unet.model_options["model_function_wrapper"] = untagged
    with pytest.raises(PGError, match="unconditional rows reached the UNet"):
        neo.generate(pg_args(0.3))
    assert not neo.pg_callbacks()


@pytest.mark.parametrize("args, message", [
    (pg_args(0.3, base="nope"), "unknown base checkpoint 'nope'"),
    (pg_args(0.3, base=""), "choose a base checkpoint"),
    (pg_args(0.3, strip_loras="mydog"), "'strip_loras' is set but no LoRA is active"),
    (pg_args(1.5), "omega"),
])
def test_bad_input_stops_the_generation(neo, args, message):
    before = module_state_fingerprint(neo.tuned_inner)
    with pytest.raises(PGError, match=message.replace("(", r"\(").replace(")", r"\)")):
        neo.generate(args)
    assert module_state_fingerprint(neo.tuned_inner) == before
    assert not neo.pg_callbacks()


# -- what PG refuses on Neo, by name, before sampling -----------------------------------------
def _refused(env, message, **kwargs):
    before = module_state_fingerprint(env.tuned_inner)
    calls = []
    handle = env.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(PGError, match=message):
            env.generate(pg_args(0.3), **kwargs)
    finally:
        handle.remove()
    assert not calls, "refused before the UNet ran"
    assert module_state_fingerprint(env.tuned_inner) == before
    assert not env.pg_callbacks()
    plain, _ = env.generate(**kwargs)  # PG disabled: the host's own generation runs
    assert plain.images


def test_other_families_are_refused_by_name(neo, monkeypatch):
    for family in ("StableDiffusionXLRefiner", "Mugen", "Flux", "WAN"):  # backend/diffusion_engine/sdxl.py:129, mugen.py:15, ...
        monkeypatch.setattr(neo.model, "__class__", type(family, (type(neo.model),), {}))
        with pytest.raises(PGError, match=rf"this model's family \({family}\) is not supported by PG on Forge Neo; supported: SD 1.x, SDXL"):
            neo.generate(pg_args(0.3))


def test_inpainting_models_are_refused(neo, monkeypatch):
    monkeypatch.setitem(neo.model.__dict__, "is_inpaint", True)
    _refused(neo, r"StableDiffusion inpainting\) is not supported by PG on Forge Neo")


@pytest.mark.parametrize("storage", ["nf4", "gguf", torch.float8_e4m3fn])
def test_quantized_storage_is_refused(neo, monkeypatch, storage):
    monkeypatch.setattr(neo.forge_objects.unet.model, "storage_dtype", storage)
    _refused(neo, r"a quantized UNet \(storage .*\) is not supported by PG on Forge Neo")


def test_quantized_weights_are_refused(neo, monkeypatch):
    """Mixed precision (QuantizedTensor), int8 and other quantizations hold tensor subclasses or
    non-float dtypes in the UNet's parameters, whatever storage_dtype says."""

    class QuantizedTensor(torch.Tensor):  # backend/quant_ops.py (a torch.Tensor subclass)
        pass

    layer = neo.unet.input_blocks[0][0]
    dense = layer.weight.detach().clone()
    monkeypatch.setattr(layer, "weight", torch.nn.Parameter(dense.clone().as_subclass(QuantizedTensor), requires_grad=False))
    with pytest.raises(PGError, match=r"a quantized UNet \(QuantizedTensor weights, e.g. input_blocks.0.0.weight"):
        neo.generate(pg_args(0.3))
    monkeypatch.setattr(layer, "weight", torch.nn.Parameter(dense.to(torch.int8), requires_grad=False))
    with pytest.raises(PGError, match=r"a quantized UNet \(int8 weights"):
        neo.generate(pg_args(0.3))


def test_nunchaku_is_refused(neo, monkeypatch):
    args = importlib.import_module("backend.args")
    monkeypatch.setattr(args.dynamic_args, "nunchaku", True)
    with pytest.raises(PGError, match="a nunchaku \\(SVDQ\\) UNet is not supported by PG on Forge Neo"):
        neo.generate(pg_args(0.3))


def test_torch_compile_swap_is_refused(neo, monkeypatch):
    """The Torch Compile script wraps the KModel's apply_model in its process_batch, after PG's
    process(): PG refuses it when sampling is called, before the first UNet call."""
    compile_script = _load(monkeypatch, "compile", "extensions-builtin", "sd_forge_compile", "scripts", "compile.py")
    kmodel = neo.forge_objects.unet.model
    real_process = processing.StableDiffusionProcessing.setup_conds

    def process_batch_then_setup_conds(self):
        if "apply_model" not in vars(kmodel):
            compile_script.wrap(kmodel)
        return real_process(self)

    monkeypatch.setattr(processing.StableDiffusionProcessing, "setup_conds", process_batch_then_setup_conds)
    before = module_state_fingerprint(neo.tuned_inner)
    with pytest.raises(PGError, match="a UNet compiled with torch.compile .* is not supported by PG on Forge Neo"):
        neo.generate(pg_args(0.3))
    assert module_state_fingerprint(neo.tuned_inner) == before
    assert not neo.pg_callbacks()


def test_fast_refiner_swap_is_refused(neo, monkeypatch):
    """Neo's fast refiner (opts.refiner_fast_sd) loads the refiner's state dict into the same UNet
    mid-sampling (modules/sd_samplers_common.py apply_refiner): PG would guide the refiner's steps
    with the base model's weak weights."""
    monkeypatch.setitem(shared.opts.data, "refiner_fast_sd", True)
    _refused(neo, "fast refiner swap", refiner_checkpoint="base", refiner_switch_at=0.5)
    monkeypatch.setitem(shared.opts.data, "refiner_fast_sd", False)
    plain, _ = neo.generate(pg_args(0.3), refiner_checkpoint="base", refiner_switch_at=0.5)  # the slow path reloads a model
    assert plain.images


# -- LoRAs (tests/fork_lora_checks.py, against Neo's own patcher) ---------------------------
@pytest.fixture
def neo_lora(neo, tmp_path):
    lora_checks.add_loras(neo, tmp_path, neo.networks)
    return neo


def test_loras_change_the_image(neo_lora):
    lora_checks.check_loras_change_the_image(neo_lora)


def test_lora_strip_at_omega_one_is_plain_cfg(neo_lora):
    lora_checks.check_omega_one_is_plain_cfg(neo_lora)


def test_lora_strip_weak_branch_is_the_model_without_the_lora(neo_lora, monkeypatch):
    lora_checks.check_stripped_weak_branch_is_the_model_without_the_lora(neo_lora, monkeypatch)


def test_lora_strip_weak_weights_are_the_lerp_of_reference_and_live(neo_lora, monkeypatch):
    lora_checks.check_weak_weights_are_the_lerp_of_reference_and_live(neo_lora, monkeypatch)


def test_lora_strip_corrections_are_the_forks_merged_delta(neo_lora):
    lora_checks.check_corrections_are_the_forks_merged_delta(neo_lora)


def test_lora_strip_corrected_weak_rows_equal_the_copy_path(neo_lora, monkeypatch):
    lora_checks.check_corrected_weak_rows_equal_the_copy_path(neo_lora, monkeypatch)


def test_lora_strip_corrections_cost_about_the_loras_size(neo_lora):
    lora_checks.check_corrections_cost_about_the_loras_size(neo_lora)


def test_base_with_loras_is_the_base_model_with_the_same_loras(neo_lora, monkeypatch):
    lora_checks.check_base_with_loras_is_the_base_model_with_the_same_loras(neo_lora, monkeypatch)


def test_base_built_right_after_a_lora_generation(neo_lora):
    lora_checks.check_base_built_right_after_a_lora_generation(neo_lora)


def test_lora_state_unchanged_after_success_error_and_interrupt(neo_lora):
    lora_checks.check_state_unchanged_after_success_error_and_interrupt(neo_lora)


def test_lora_weak_weights_are_kept_while_the_loras_are(neo_lora, monkeypatch):
    lora_checks.check_weak_weights_are_kept_while_the_loras_are(neo_lora, monkeypatch)


def test_lora_strip_errors(neo_lora):
    lora_checks.check_strip_errors(neo_lora)


@pytest.mark.parametrize("dtype, lora_fp16", [(torch.float32, False), (torch.float16, False), (torch.float16, True),
                                              (torch.bfloat16, False)])
def test_pg_merges_as_neos_patcher_does(neo_lora, dtype, lora_fp16):
    """PG's reference merge is Neo's patch_weight_to_device arithmetic: a copy in Neo's LoRA
    compute dtype on the load device, merge_lora_to_weight, stochastic rounding to the weight's
    dtype with the key's seed. With every entry it equals Neo's own merged weight bit for bit, in
    each storage dtype and LoRA compute dtype."""
    env = neo_lora
    env.management.LORA_FP16 = lora_fp16
    try:
        env.generate(prompt=lora_checks.DOG_STYLE)
        objects = env.model.forge_objects
        patchers = env.adapter.CONTROLLER.lora_patchers(env.model, frozenset())
        checked = 0
        for patcher, patcher_loras in zip((objects.unet, objects.clip.patcher), patchers):
            for key, entries in list(patcher_loras.live.items())[:12]:
                original = patcher_loras.original(key).detach().to(dtype)
                module, name = patcher.model.get_submodule(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1]
                kept = getattr(module, name)
                setattr(module, name, torch.nn.Parameter(original.clone(), requires_grad=False))
                try:
                    expected = patcher.patch_weight_to_device(key, device_to=patcher.load_device, return_weight=True)
                finally:
                    setattr(module, name, kept)
                got = patcher_loras.merge(entries, original, key)
                assert got.dtype == dtype and torch.equal(got, expected), key
                checked += 1
        assert checked == 24
    finally:
        env.management.LORA_FP16 = False


def test_lora_patches_another_extension_changed_are_refused(neo_lora):
    """Neo's patch lists carry no LoRA identity: PG finds a LoRA's entries by position, counted with
    Neo's own loader, and stops when the lists hold more than the prompt's LoRAs account for."""
    env = neo_lora
    env.generate(prompt=lora_checks.DOG_STYLE)
    objects = env.model.forge_objects
    key = next(iter(objects.unet.patches))
    unet = objects.unet.clone()
    unet.patches[key].append((1.0, ("diff", (torch.zeros_like(unet.model.state_dict()[key]),)), 1.0, None, None, False))
    objects.unet = unet
    env.model.forge_objects_after_applying_lora.unet = unet
    state = env.patch_state()
    with pytest.raises(PGError, match="do not match the prompt's LoRAs"):
        env.generate(lora_checks.strip(0.3, ["dog"]), prompt=lora_checks.DOG_STYLE)
    assert env.patch_state() == state


def test_loras_on_a_low_vram_unet_are_refused(neo_lora, monkeypatch):
    """In low VRAM Neo applies a layer's LoRA in its forward (weight_function): on a weak weight it
    would be applied again."""
    env = neo_lora
    monkeypatch.setattr(env.management, "LOWVRAM", True)
    env.generate(prompt=lora_checks.DOG)
    before = (env.patch_state(), module_state_fingerprint(env.tuned_inner))
    with pytest.raises(PGError, match="low-VRAM mode"):
        env.generate(lora_checks.strip(0.3), prompt=lora_checks.DOG)
    assert (env.patch_state(), module_state_fingerprint(env.tuned_inner)) == before
    assert not env.pg_callbacks()
    plain = env.generate(pg_args(0.3), prompt=lora_checks.PLAIN)  # without LoRAs the low-VRAM UNet is fine
    assert "PG skipped" not in plain[0].infotexts[0]


def test_online_loras_are_refused(neo_lora, monkeypatch):
    """Neo's online LoRA option (dynamic_args.online_lora) leaves every LoRA to the layers' forward."""
    env = neo_lora
    args = importlib.import_module("backend.args")
    monkeypatch.setattr(args.dynamic_args, "online_lora", True)
    env.generate(prompt=lora_checks.DOG)
    before = (env.patch_state(), module_state_fingerprint(env.tuned_inner))
    with pytest.raises(PGError, match="LoRAs applied online"):
        env.generate(lora_checks.strip(0.3), prompt=lora_checks.DOG)
    assert (env.patch_state(), module_state_fingerprint(env.tuned_inner)) == before


def test_model_comes_back_exactly_on_error_and_interrupt(neo):
    env = neo
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


def test_a_fork_whose_step_callback_never_comes_stops_the_generation(neo, monkeypatch):
    before = module_state_fingerprint(neo.unet)
    monkeypatch.setattr(neo.host, "cfg_denoiser_callback", lambda params: None)
    with pytest.raises(PGError, match="never announced a step to PG"):
        neo.generate(pg_args(0.3))
    assert module_state_fingerprint(neo.unet) == before


# -- SDXL (backend/diffusion_engine/sdxl.py), in Neo's own key space --------------------------------
class NeoXLEnv:
    """tests/test_fork_sdxl.py's XLEnv on the fake Neo: a tiny SDXL "fine-tune" (UNet and both text
    encoders perturbed) loaded as Neo loads it (neo_host.make_sdxl_model), the base next to it."""

    @staticmethod
    def make(tmp_path, monkeypatch, v_prediction=False):
        from tests import test_fork_sdxl

        class Env(test_fork_sdxl.XLEnv):
            def load(self, name, inner):
                info = sd_models.get_closet_checkpoint_match(name)
                model = self.host.make_sdxl_model(inner.state_dict(), info, v_prediction=v_prediction)
                sd_models.set_model(model, info)
                self.host.install(model, self.monkeypatch, networks=self.networks)
                self.model = model
                return model

            def patch_state(self):
                """Neo's LoRA state, by identity: both patchers' patch lists and uuids, the shared backups."""
                objects = self.model.forge_objects
                state = [self.model.current_lora_hash]
                for patcher in (objects.unet, objects.clip.patcher):
                    state.append(sorted((key, [id(e) for e in entries]) for key, entries in patcher.patches.items()))
                    state.append((patcher.patches_uuid, patcher.model.current_weight_patches_uuid,
                                  sorted((k, id(v.weight)) for k, v in patcher.backup.items())))
                return state

        from modules import sd_models

        monkeypatch.setitem(test_fork_sdxl.FORKS, "neo", (sys.modules[__name__], FAKE_NEO, "_forget_fake_neo", "neo_host",
                                                           "lib_pg.hosts.neo.controller", "backend.sampling.sampling_function"))
        _forget_fake_neo()
        monkeypatch.syspath_prepend(FAKE_NEO)
        monkeypatch.syspath_prepend(FAKE_NEO_PACKAGES)
        importlib.invalidate_caches()
        return Env("neo", tmp_path, monkeypatch)


@pytest.fixture
def xl(tmp_path, monkeypatch):
    env = NeoXLEnv.make(tmp_path, monkeypatch)
    yield env
    env.adapter.CONTROLLER.shutdown()
    shared.reset()
    _forget_fake_neo()


def _xl_pg(omega, base="xlbase", **extra):
    return [{"enabled": True, "omega": omega, "base": base, **extra}]


def _xl_strip(omega, **extra):
    return [{"enabled": True, "omega": omega, "base": "", "strip_loras": True, **extra}]


XL_DOG = "a photo of sks dog <lora:xl:1>"
# The weak rows of a batched call run per layer: float rounding differs from a whole-batch call.
XL_CLOSE = dict(rtol=1e-4, atol=1e-4)


def test_sdxl_weak_weights_are_keyed_in_neos_own_space(xl):
    """Both text encoders in Neo's Hugging Face layout (OpenCLIP's fused attention split by Neo's
    process_clip_state_dict), clip_g's projection the Linear Neo reads the pooled vector through."""
    guided = xl.generate(_xl_pg(0.3))
    assert "PG base: xlbase.safetensors [" in guided.infotexts[0]
    weak = xl.adapter.CONTROLLER.cache.weak
    assert weak.live_family == "SDXL" and weak.unet and weak.text
    text_modules = {id(m): n for n, m in xl.text_encoders().named_modules()}
    names = {text_modules[id(layer.module)] for layer in weak.text if id(layer.module) in text_modules}
    assert any(n.startswith("clip_l.transformer.text_model.") for n in names)
    assert any(".self_attn.q_proj" in n and n.startswith("clip_g.") for n in names)
    assert "clip_g.transformer.text_projection" in names
    # Neo's own parameters no SDXL file holds (clip_l's logit_scale and projection) are never weak
    assert not any(text_modules.get(id(layer.module)) == "clip_l" for layer in weak.text)
    assert "clip_l.transformer.text_projection" not in names
    # the token embeddings' weak tensors reach the module Neo's forward reads (classic_engine.py wraps it)
    assert not any(type(layer.module).__name__ == "CLIPEmbeddingForTextualInversion" for layer in weak.text)


def test_sdxl_omega_one_is_off_bit_for_bit_and_the_model_is_unchanged(xl):
    plain = xl.generate()  # (Neo's first load records the patch uuid the model carries)
    before, patches = xl.fingerprint(), xl.patch_state()
    assert same_images(plain, xl.generate(_xl_pg(1.0)))
    guided = xl.generate(_xl_pg(0.3))
    assert not same_images(plain, guided)
    assert xl.fingerprint() == before and xl.patch_state() == patches
    with pytest.raises(PGError, match="unknown base checkpoint"):
        xl.generate(_xl_pg(0.3, base="nope"))
    assert xl.fingerprint() == before and xl.patch_state() == patches
    assert same_images(plain, xl.generate())


def _check_omega_zero_is_the_base(xl, monkeypatch):
    monkeypatch.setattr(xl.samplers, "MEMORY_CHUNKS", 1)  # the unconditional chunk in a call of its own
    vectors = []
    unet = xl.model.model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda m, a, k: vectors.append(k["y"].clone()), with_kwargs=True)
    guided = xl.generate(_xl_pg(0.0), cfg_scale=0.0)
    handle.remove()
    active = xl.generate(cfg_scale=0.0)
    with torch.no_grad():
        live_pooled = xl.model.get_learned_conditioning(["blurry"])["vector"][:, :32]  # bigG's projected pooled output
    xl.load("xlbase", xl.base_inner)
    base = xl.generate(cfg_scale=0.0)
    assert not same_images(active, base)
    torch.testing.assert_close(guided.images[0], base.images[0], rtol=0, atol=1e-6)
    # the weak rows' pooled vector `y` is the base's: clip_g's projection was swapped where Neo reads it
    with torch.no_grad():
        pooled = xl.model.get_learned_conditioning(["blurry"])["vector"][:, :32]
    assert not torch.allclose(pooled, live_pooled)
    assert any(torch.allclose(v[:1, :32], pooled, rtol=1e-5, atol=1e-6) for v in vectors)


def test_sdxl_omega_zero_at_cfg_zero_is_the_base_checkpoint_as_neo_loads_it(xl, monkeypatch):
    """CFG Scale 0: the image is the unconditional branch alone; at ω = 0 that is the base's UNet and
    both of its text encoders as Neo converts them: cross-attention context and pooled `y`."""
    _check_omega_zero_is_the_base(xl, monkeypatch)


def test_v_prediction_sdxl(tmp_path, monkeypatch):
    """A v-prediction SDXL (NoobAI-style: a `v_pred` key, model_list.py:205-209; the scheduler's
    prediction type set from it, loader.py:933-941): the same identities."""
    env = NeoXLEnv.make(tmp_path, monkeypatch, v_prediction=True)
    try:
        assert env.model.forge_objects.unet.model.prediction_type == "v_prediction"
        plain = env.generate()
        assert same_images(plain, env.generate(_xl_pg(1.0)))
        _check_omega_zero_is_the_base(env, monkeypatch)
    finally:
        env.adapter.CONTROLLER.shutdown()
        shared.reset()
        _forget_fake_neo()


def test_sdxl_automatic_base_is_found(xl):
    guided = xl.generate(_xl_pg(0.3, base="Automatic"))
    info = guided.infotexts[0]
    assert "PG base: xlbase.safetensors [" in info and "PG base distance" in info


def test_sdxl_lora_te1_te2_unet_stripped_at_omega_zero_is_the_prompt_without_it(xl, tmp_path, monkeypatch):
    monkeypatch.setattr(xl.samplers, "MEMORY_CHUNKS", 1)
    chosen = xl.write_lora(tmp_path / "xl.safetensors")
    with_lora = xl.generate(prompt=XL_DOG, cfg_scale=0.0)
    without = xl.generate(cfg_scale=0.0)
    patches = xl.patch_state()
    assert not same_images(with_lora, without)
    assert same_images(xl.generate(_xl_strip(1.0), prompt=XL_DOG, cfg_scale=0.0), with_lora)
    stripped = xl.generate(_xl_strip(0.0), prompt=XL_DOG, cfg_scale=0.0)
    torch.testing.assert_close(stripped.images[0], without.images[0], **XL_CLOSE)
    weak = xl.adapter.CONTROLLER.cache.weak
    corrected_text = [layer for layer in weak.text if layer.corrections_only]
    text_modules = {id(m): n for n, m in xl.text_encoders().named_modules()}
    encoders = {text_modules[id(layer.module)].split(".")[0] for layer in corrected_text}
    assert encoders == {"clip_l", "clip_g"}, encoders  # low-rank corrections, no copies, in both text encoders
    assert len(weak.text) == sum(1 for n in chosen if n.startswith("lora_te"))
    assert any(layer.corrections_only for layer in weak.unet)
    assert weak.extra_bytes < sum(p.numel() * p.element_size() for p in xl.text_encoders().parameters()) / 4
    # Neo's own LoRA state and images as before (it merges and unmerges the LoRA itself)
    assert same_images(xl.generate(prompt=XL_DOG, cfg_scale=0.0), with_lora) and same_images(xl.generate(cfg_scale=0.0), without)
    assert xl.patch_state() == patches


def test_sdxl_base_with_a_lora_in_the_prompt_is_the_base_with_that_lora(xl, tmp_path, monkeypatch):
    """A base checkpoint and a LoRA in the prompt, ω = 0, CFG Scale 0: the base model with the LoRA as
    Neo merges it (merge_lora_to_weight, stochastic rounding), text encoders and UNet."""
    monkeypatch.setattr(xl.samplers, "MEMORY_CHUNKS", 1)
    xl.write_lora(tmp_path / "xl.safetensors")
    guided = xl.generate(_xl_pg(0.0), prompt=XL_DOG, cfg_scale=0.0)
    xl.load("xlbase", xl.base_inner)
    base_with_lora = xl.generate(prompt=XL_DOG, cfg_scale=0.0)
    torch.testing.assert_close(guided.images[0], base_with_lora.images[0], rtol=0, atol=1e-6)


def test_sdxl_state_unchanged_after_error_and_interrupt(xl, tmp_path):
    xl.write_lora(tmp_path / "xl.safetensors")
    xl.generate(prompt=XL_DOG)
    before, patches = xl.fingerprint(), xl.patch_state()
    calls = []

    def fail_on_third_call(*_):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")

    handle = xl.model.model.diffusion_model.register_forward_pre_hook(fail_on_third_call)
    with pytest.raises(RuntimeError, match="simulated"):
        xl.generate(_xl_strip(0.3), prompt=XL_DOG)
    handle.remove()
    assert xl.fingerprint() == before and xl.patch_state() == patches

    def stop(params):
        if params.denoiser.step == 1:
            shared.state.interrupted = True

    script_callbacks.on_cfg_denoiser(stop)
    try:
        xl.generate(_xl_pg(0.3), prompt=XL_DOG)
    finally:
        script_callbacks.remove_callbacks_for_function(stop)
        shared.state.interrupted = False
    assert xl.fingerprint() == before and xl.patch_state() == patches


class NeoLinear(torch.nn.Linear):
    """Neo's own Linear (backend/operations.py ForgeOperations.Linear @ f95f632a): an nn.Linear subclass
    whose forward, without manual cast (the CPU), is F.linear of get_weight_and_bias(self)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class NeoConv2d(torch.nn.Conv2d):
    """Neo's own Conv2d (backend/operations.py ForgeOperations.Conv2d @ f95f632a): an nn.Conv2d subclass
    whose forward, without manual cast, is nn.Conv2d._conv_forward of its weight and bias."""

    def forward(self, x):
        return self._conv_forward(x, self.weight, self.bias)


NeoLinear.__name__, NeoConv2d.__name__ = "Linear", "Conv2d"


def _neo_layers(xl):
    """The fake's UNet built from Neo's own layer classes, as Neo builds it (using_forge_operations)."""
    unet = xl.model.model.diffusion_model
    for module in unet.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = NeoLinear
        elif type(module) is torch.nn.Conv2d:
            module.__class__ = NeoConv2d
    return unet


def test_sdxl_lean_is_within_budget_and_closer_to_exact_than_cfg(xl, monkeypatch):
    """Lean weak weights on Neo (the forks' lean path): the UNet's factors within the budget, as
    corrections on Neo's own Linear/Conv2d (no copies of whole layers), closer to the exact weak
    weights' image than plain CFG; ω = 1 is off bit for bit; the model and Neo's patch lists unchanged."""
    monkeypatch.setattr(xl.samplers, "MEMORY_CHUNKS", 1)
    unet = _neo_layers(xl)
    assert any(type(m) is NeoLinear for m in unet.modules()) and any(type(m) is NeoConv2d for m in unet.modules())
    plain = xl.generate(cfg_scale=0.0)
    before, patches = xl.fingerprint(), xl.patch_state()
    exact = xl.generate(_xl_pg(0.0, weights="exact"), cfg_scale=0.0)
    exact_bytes = xl.adapter.CONTROLLER.cache.weak.extra_bytes
    lean = xl.generate(_xl_pg(0.0, weights="lean", lean_budget_mb=2), cfg_scale=0.0)
    assert 'PG weights: "low-rank 2 MiB' in lean.infotexts[0], lean.infotexts[0]
    weak = xl.adapter.CONTROLLER.cache.weak
    assert sum(layer.nbytes() for layer in weak.unet) <= 2 * 2**20
    assert weak.text and weak.extra_bytes < exact_bytes
    for cls in (NeoLinear, NeoConv2d):
        layers = [layer for layer in weak.unet if type(layer.module) is cls]
        assert layers and all(layer.corrections_only for layer in layers), cls
    assert (lean.images[0] - exact.images[0]).abs().mean() < (plain.images[0] - exact.images[0]).abs().mean()
    assert xl.fingerprint() == before and xl.patch_state() == patches
    # ω = 1 with lean weights is PG off, bit for bit
    assert same_images(plain, xl.generate(_xl_pg(1.0, weights="lean", lean_budget_mb=2), cfg_scale=0.0))
    # a budget that holds the exact copy gives the exact weights' image
    whole = xl.generate(_xl_pg(0.0, weights="lean", lean_budget_mb=1000), cfg_scale=0.0)
    torch.testing.assert_close(whole.images[0], exact.images[0], rtol=0, atol=1e-6)
    assert xl.fingerprint() == before and xl.patch_state() == patches
    assert same_images(plain, xl.generate(cfg_scale=0.0))


def test_sdxl_lean_state_unchanged_after_error_and_interrupt(xl):
    _neo_layers(xl)
    plain = xl.generate()
    before, patches = xl.fingerprint(), xl.patch_state()
    calls = []

    def fail_on_third_call(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")

    handle = xl.model.model.diffusion_model.register_forward_pre_hook(fail_on_third_call)
    with pytest.raises(RuntimeError, match="simulated"):
        xl.generate(_xl_pg(0.3, weights="lean", lean_budget_mb=2))
    handle.remove()
    assert xl.fingerprint() == before and xl.patch_state() == patches

    def stop(params):
        if params.denoiser.step == 1:
            shared.state.interrupted = True

    script_callbacks.on_cfg_denoiser(stop)
    try:
        xl.generate(_xl_pg(0.3, weights="lean", lean_budget_mb=2))
    finally:
        script_callbacks.remove_callbacks_for_function(stop)
        shared.state.interrupted = False
    assert xl.fingerprint() == before and xl.patch_state() == patches
    assert same_images(plain, xl.generate())


def test_sdxl_auto_weights_as_on_forge(xl, monkeypatch):
    """'auto' takes the exact copy where it fits (no limit on a CPU), lean factors where it does not
    (the forks' shared plan, lib_pg.lean_plan.weights_plan)."""
    exact = xl.generate(_xl_pg(0.3))
    assert "low-rank" not in exact.infotexts[0]
    monkeypatch.setattr(xl.adapter.CONTROLLER, "_available_bytes", lambda unet_param: 2 * 2**20)
    lean = xl.generate(_xl_pg(0.3, lean_budget_mb=2))
    assert 'PG weights: "low-rank 2 MiB' in lean.infotexts[0], lean.infotexts[0]


def test_sdxl_lean_refusals(xl, tmp_path):
    xl.write_lora(tmp_path / "xl.safetensors")
    with pytest.raises(PGError, match="lean weak weights .* with LoRAs in the prompt"):
        xl.generate(_xl_pg(0.3, weights="lean"), prompt=XL_DOG)
    with pytest.raises(PGError, match="cannot be combined with LoRAs to strip"):
        xl.generate(_xl_pg(0.3, weights="lean", strip_loras=True), prompt=XL_DOG)


def test_sdxl_other_families_are_refused_by_name(xl, monkeypatch):
    monkeypatch.setitem(xl.model.__dict__, "is_inpaint", True)
    with pytest.raises(PGError, match=r"family \(StableDiffusionXL inpainting\) is not supported by PG on Forge Neo"):
        xl.generate(_xl_pg(0.3))
    monkeypatch.setitem(xl.model.__dict__, "is_inpaint", False)
    monkeypatch.setattr(xl.model, "__class__", type("StableDiffusionXLRefiner", (type(xl.model),), {}))
    with pytest.raises(PGError, match=r"family \(StableDiffusionXLRefiner\) is not supported by PG on Forge Neo"):
        xl.generate(_xl_pg(0.3))
