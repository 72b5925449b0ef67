"""LoRA checks shared by tests/test_forge.py and tests/test_reforge.py.

Each takes a fork env (the fake webui with that fork's fake installed, its fake Lora `networks`
module activating the prompt's <lora:...> as the fork does, and its fake model patchers merging
them when the model is loaded for sampling) with two kohya LoRA files registered: `dog` (UNet
attention layers and the text encoder) and `style` (UNet only). The reference model is always
the fork's own result: the same fake fork run without the stripped LoRA, or with the base
checkpoint loaded. Equalities are exact: the unconditional chunk runs in a UNet call of its own
(MEMORY_CHUNKS = 1) where an image is compared, so its rows see the same kernels either way.

LoRA mode (no base checkpoint) gives layers that differ only by stripped plain LoRAs low-rank
corrections instead of weight copies (lib_pg/hosts/common/fork_loras.py low_rank_corrections):
the bit-for-bit checks of the reference run the copy path (`copy_path`, fork_loras.LOW_RANK off),
and the corrections are compared with it, and with the fork's own merge, within TOLERANCE.
"""

import contextlib

import torch

from lib_pg.hosts.common import fork_loras

from modules import script_callbacks, sd_models, shared

from lib_pg.errors import PGError
from lib_pg.patching import module_state_fingerprint
from lib_pg.weights import interpolate
from tests.lora_files import write_kohya_lora
from tests.test_script import pg_args, same_images

DOG = "a photo of sks dog <lora:dog:1>"
DOG_STYLE = "a photo of sks dog <lora:dog:1> <lora:style:0.8>"
STYLE = "a photo of sks dog <lora:style:0.8>"
PLAIN = "a photo of sks dog"
# As tests/test_lora_mode.py: the correction computes (ω − 1)·up(down(x)) where the copy path
# computes with the merged weight, a different float order (fp32 here).
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@contextlib.contextmanager
def copy_path(env, monkeypatch):
    """The weak weights as copies of every layer a stripped LoRA changes (no low-rank corrections)."""
    env.adapter.CONTROLLER.cache.clear()
    monkeypatch.setattr(fork_loras, "LOW_RANK", False)
    try:
        yield
    finally:
        monkeypatch.setattr(fork_loras, "LOW_RANK", True)
        env.adapter.CONTROLLER.cache.clear()


def record_unet_calls(env):
    calls = []

    def record(_module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        tags = tuple(kwargs.get("transformer_options", {}).get("cond_or_uncond", ()))
        calls.append((tags, x.detach().clone(), output.detach().clone()))

    return calls, env.unet.register_forward_hook(record, with_kwargs=True)


def add_loras(env, tmp_path, networks):
    write_kohya_lora(tmp_path / "dog.safetensors", env.tuned_inner, seed=11, alpha=4.0, rank=4)
    write_kohya_lora(tmp_path / "style.safetensors", env.tuned_inner, seed=12, alpha=2.0, rank=4, text_encoder=False)
    env.dog_lora = tmp_path / "dog.safetensors"
    networks.register(tmp_path / "dog.safetensors")
    networks.register(tmp_path / "style.safetensors")


def strip(omega, loras=True, base="", **extra):
    return [{"enabled": True, "omega": omega, "base": base, "strip_loras": loras, **extra}]


def check_loras_change_the_image(env):
    plain, _ = env.generate(prompt=PLAIN)
    dog, _ = env.generate(prompt=DOG)
    both, _ = env.generate(prompt=DOG_STYLE)
    assert not same_images(plain, dog) and not same_images(dog, both), "the test LoRAs must change the image"


def check_omega_one_is_plain_cfg(env):
    plain, _ = env.generate(prompt=DOG_STYLE)
    same, _ = env.generate(strip(1.0), prompt=DOG_STYLE)
    assert same_images(plain, same)
    with_base, _ = env.generate(strip(1.0, ["dog"], base="base"), prompt=DOG_STYLE)
    assert same_images(plain, with_base)


def check_stripped_weak_branch_is_the_model_without_the_lora(env, monkeypatch):
    """ω = 0 at CFG Scale 0: the image is the weak branch alone, which must be the fork's own
    image of the prompt without the stripped LoRA, bit for bit (the copy path)."""
    monkeypatch.setattr(env.samplers, "MEMORY_CHUNKS", 1)
    with copy_path(env, monkeypatch):
        _check_stripped_weak_branch(env)


def _check_stripped_weak_branch(env):
    everything, _ = env.generate(strip(0.0), prompt=DOG_STYLE, cfg_scale=0.0)
    no_lora, _ = env.generate(prompt=PLAIN, cfg_scale=0.0)
    assert same_images(everything, no_lora)
    only_dog, _ = env.generate(strip(0.0, ["dog"]), prompt=DOG_STYLE, cfg_scale=0.0)
    style_only, _ = env.generate(prompt=STYLE, cfg_scale=0.0)
    assert same_images(only_dog, style_only)
    assert not same_images(only_dog, everything)
    info = only_dog.infotexts[0]
    assert "PG strip LoRAs: dog" in info and "PG base" not in info and "PG skipped" not in info, info


def check_weak_weights_are_the_lerp_of_reference_and_live(env, monkeypatch):
    """The weak tensors of every layer a stripped LoRA changes are exactly
    lerp(reference, live, ω), both taken from the fork's own merge (the copy path)."""
    with copy_path(env, monkeypatch):
        _check_lerp(env)


def _check_lerp(env):
    env.generate(prompt=DOG_STYLE)
    live = {k: v.clone() for k, v in env.tuned_inner.state_dict().items()}
    env.generate(prompt=STYLE)
    reference = {k: v.clone() for k, v in env.tuned_inner.state_dict().items()}
    env.generate(strip(0.3, ["dog"]), prompt=DOG_STYLE)
    weak = env.adapter.CONTROLLER.cache.weak
    names = {id(module): name for name, module in env.tuned_inner.named_modules()}
    unet_layers = text_layers = 0
    for layer in weak.unet + weak.text:
        for name, tensor in zip(layer.names, layer.fixed):
            key = f"{names[id(layer.module)]}.{name}"
            assert torch.equal(tensor, interpolate(reference[key], live[key], 0.3)), key
            assert not torch.equal(reference[key], live[key]), key
        unet_layers += layer in weak.unet
        text_layers += layer in weak.text
    differing = {k for k in live if not torch.equal(live[k], reference[k])}
    assert unet_layers and text_layers and len(differing) == sum(len(layer.names) for layer in weak.unet + weak.text)


def fork_merges(env):
    """The fork's own merged weights with both LoRAs (live) and with `style` only (reference)."""
    env.generate(prompt=DOG_STYLE)
    live = {k: v.clone() for k, v in env.tuned_inner.state_dict().items()}
    env.generate(prompt=STYLE)
    reference = {k: v.clone() for k, v in env.tuned_inner.state_dict().items()}
    return live, reference


def check_corrections_are_the_forks_merged_delta(env):
    """Stripping `dog` (a plain LoRA) next to `style`: its layers get low-rank corrections, no copy,
    and each correction is the fork's merged delta (reference − live, both the fork's own merge)
    applied to the input, within TOLERANCE; the layers it gives no correction have copies equal to
    lerp(reference, live) exactly."""
    live, reference = fork_merges(env)
    env.generate(strip(0.3, ["dog"]), prompt=DOG_STYLE)
    weak = env.adapter.CONTROLLER.cache.weak
    names = {id(module): name for name, module in env.tuned_inner.named_modules()}
    generator = torch.Generator().manual_seed(0)
    corrected = {"unet": 0, "text": 0}
    for part, layers in (("unet", weak.unet), ("text", weak.text)):
        for layer in layers:
            prefix = names[id(layer.module)]
            for name, tensor in zip(layer.names, layer.fixed):
                key = f"{prefix}.{name}"
                assert torch.equal(tensor, interpolate(reference[key], live[key], 0.3)), key
            if not layer.corrections:
                continue
            assert layer.corrections_only, prefix
            corrected[part] += 1
            key = f"{prefix}.weight"
            delta = reference[key].double() - live[key].double()  # what the weak rows subtract at ω = 0
            module = layer.module
            if delta.dim() == 4:
                x = torch.randn(2, delta.shape[1], 8, 8, generator=generator)
                expected = torch.nn.functional.conv2d(x.double(), delta, None, module.stride, module.padding, module.dilation)
            else:
                x = torch.randn(3, delta.shape[1], generator=generator)
                expected = torch.nn.functional.linear(x.double(), delta)
            got = -sum(correction(x) for correction in layer.corrections)
            torch.testing.assert_close(got.double(), expected, **TOLERANCE)
    assert corrected["unet"] and corrected["text"], corrected
    assert all(not layer.names for layer in weak.text)  # text-encoder layers always keep corrections


def check_corrected_weak_rows_equal_the_copy_path(env, monkeypatch):
    """The UNet's first step (same latent and conditioning either way), ω = 0.3 stripping `dog`:
    the conditional chunk is bit for bit what the copy path computes (corrections touch only the
    weak rows), the unconditional chunk equal within TOLERANCE; the weak negative conditioning
    (text-encoder corrections, lib_pg.routing.corrected_text_layers) is part of that input."""
    monkeypatch.setattr(env.samplers, "MEMORY_CHUNKS", 1)
    outputs = {}
    for path in ("corrections", "copies"):
        scope = copy_path(env, monkeypatch) if path == "copies" else contextlib.nullcontext()
        with scope:
            calls, handle = record_unet_calls(env)
            try:
                env.generate(strip(0.3, ["dog"]), prompt=DOG_STYLE)
            finally:
                handle.remove()
            weak = env.adapter.CONTROLLER.cache.weak
            outputs[path] = (calls[:2], weak.extra_bytes, sum(1 for layer in weak.unet + weak.text if layer.corrections))
    (with_corrections, corrected_bytes, corrected_layers), (with_copies, copied_bytes, copy_corrections) = outputs["corrections"], outputs["copies"]
    assert corrected_layers and not copy_corrections
    assert [tags for tags, _x, _out in with_corrections] == [tags for tags, _x, _out in with_copies]
    (_, cond_x, cond_out), (_, uncond_x, uncond_out) = sorted(with_corrections, key=lambda call: call[0])  # COND 0, UNCOND 1
    (_, cond_x2, cond_out2), (_, uncond_x2, uncond_out2) = sorted(with_copies, key=lambda call: call[0])
    assert sorted(tags for tags, _x, _out in with_corrections) == [(0,), (1,)]
    assert torch.equal(cond_x, cond_x2) and torch.equal(uncond_x, uncond_x2)
    assert torch.equal(cond_out, cond_out2)
    torch.testing.assert_close(uncond_out, uncond_out2, **TOLERANCE)
    assert not torch.equal(uncond_out, cond_out)
    assert corrected_bytes < copied_bytes


def check_corrections_cost_about_the_loras_size(env):
    """Memory: copies of the UNet layers where a correction costs most, within twice the stripped
    LoRA's UNet weights (lib_pg.weights.layers_to_copy, as on webui), plus the corrections' own
    factors (the LoRA's weights in the layer's dtype)."""
    env.generate(strip(0.3, ["dog"]), prompt=DOG_STYLE)
    weak = env.adapter.CONTROLLER.cache.weak
    from safetensors.torch import load_file

    lora_bytes = {"unet": 0, "all": 0}
    for name, tensor in load_file(str(env.dog_lora)).items():
        if name.endswith((".lora_up.weight", ".lora_down.weight")):
            lora_bytes["all"] += tensor.numel() * tensor.element_size()
            lora_bytes["unet"] += tensor.numel() * tensor.element_size() if name.startswith("lora_unet_") else 0
    held = sum(layer.correction_bytes for layer in weak.unet + weak.text)
    copied = weak.extra_bytes - held
    assert 0 < held <= lora_bytes["all"] and copied <= 2 * lora_bytes["unet"], (held, copied, lora_bytes)
    assert weak.extra_bytes <= 3 * lora_bytes["all"]
    print(f"stripped LoRA {lora_bytes['all']} B: weak weights {weak.extra_bytes} B ({held} B factors, {copied} B copies)")


def check_base_with_loras_is_the_base_model_with_the_same_loras(env, monkeypatch):
    """A base checkpoint and LoRAs in the prompt: the reference is the base checkpoint with the
    prompt's non-stripped LoRAs, as the fork loads it."""
    monkeypatch.setattr(env.samplers, "MEMORY_CHUNKS", 1)
    guided, _ = env.generate(pg_args(0.0), prompt=DOG_STYLE, cfg_scale=0.0)
    stripped, _ = env.generate(strip(0.0, ["dog"], base="base"), prompt=DOG_STYLE, cfg_scale=0.0)
    env.use_base_checkpoint(monkeypatch)
    base_both, _ = env.generate(prompt=DOG_STYLE, cfg_scale=0.0)
    base_style, _ = env.generate(prompt=STYLE, cfg_scale=0.0)
    assert same_images(guided, base_both)
    assert same_images(stripped, base_style)
    assert not same_images(base_both, base_style)


def check_base_built_right_after_a_lora_generation(env):
    """Before sampling the fork's UNet still holds the previous prompt's LoRA merge (it unmerges
    when it loads the model for sampling): the weak weights are built from the weights it will
    sample with, not from that merge."""
    fresh, _ = env.generate(pg_args(0.5), prompt=PLAIN)
    env.generate(prompt=DOG_STYLE)
    env.adapter.CONTROLLER.cache.clear()
    after, _ = env.generate(pg_args(0.5), prompt=PLAIN)
    assert same_images(fresh, after)


def check_state_unchanged_after_success_error_and_interrupt(env):
    first, _ = env.generate(prompt=DOG_STYLE)
    before = (env.patch_state(), module_state_fingerprint(env.tuned_inner))
    env.generate(strip(0.3, ["dog"]), prompt=DOG_STYLE)
    assert (env.patch_state(), module_state_fingerprint(env.tuned_inner)) == before
    env.generate(strip(0.3, ["dog"], base="base"), prompt=DOG_STYLE)  # the cache changes, not the model
    assert (env.patch_state(), module_state_fingerprint(env.tuned_inner)) == before
    try:
        env.generate(strip(0.3, ["nope"]), prompt=DOG_STYLE)
    except PGError as error:
        assert "not active in this prompt" in error.reason
    else:
        raise AssertionError("stripping a LoRA the prompt does not have must stop the generation")
    assert (env.patch_state(), module_state_fingerprint(env.tuned_inner)) == before
    calls = []

    def fail_on_third_call(*_):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")

    handle = env.unet.register_forward_pre_hook(fail_on_third_call)
    try:
        env.generate(strip(0.3), prompt=DOG_STYLE)
    except RuntimeError as error:
        assert "simulated" in str(error)
    finally:
        handle.remove()
    assert (env.patch_state(), module_state_fingerprint(env.tuned_inner)) == before

    def stop(params):
        if params.denoiser.step == 1:
            shared.state.interrupted = True

    script_callbacks.on_cfg_denoiser(stop)
    try:
        env.generate(strip(0.3), prompt=DOG_STYLE)
    finally:
        script_callbacks.remove_callbacks_for_function(stop)
        shared.state.interrupted = False
    assert (env.patch_state(), module_state_fingerprint(env.tuned_inner)) == before
    again, _ = env.generate(prompt=DOG_STYLE)
    assert same_images(first, again)
    assert not env.pg_callbacks()


def check_weak_weights_are_kept_while_the_loras_are(env, monkeypatch):
    env.generate(strip(0.3, ["dog"]), prompt=DOG_STYLE)
    weak = env.adapter.CONTROLLER.cache.weak
    env.generate(strip(0.3, ["dog"]), prompt=DOG_STYLE)
    assert env.adapter.CONTROLLER.cache.weak is weak
    env.generate(strip(0.3, ["dog"]), prompt=DOG)
    assert env.adapter.CONTROLLER.cache.weak is not weak


def check_strip_errors(env):
    for args, prompt, message in ((strip(0.3, ["nope"]), DOG, "'nope' in 'strip_loras' is not active in this prompt"),
                                  (strip(0.3), PLAIN, "no LoRA is active")):
        env.generate(prompt=prompt)  # the fork's own LoRA state for this prompt
        before = (env.patch_state(), module_state_fingerprint(env.tuned_inner))
        try:
            env.generate(args, prompt=prompt)
        except PGError as error:
            assert message in error.reason, error.reason
        else:
            raise AssertionError(f"expected: {message}")
        assert (env.patch_state(), module_state_fingerprint(env.tuned_inner)) == before
        assert not env.pg_callbacks()


def install_extra_patch(env):
    """Give the UNet's patcher one more entry than the prompt's LoRAs account for (as another
    extension adding patches to the LoRA patcher would); returns the patch state after it."""
    env.generate(prompt=DOG_STYLE)
    objects = env.model.forge_objects
    key = next(iter(objects.unet.patches))
    unet = objects.unet.clone()
    unet.patches[key].append((1.0, ("diff", (torch.zeros_like(unet.model.state_dict()[key]),)), 1.0, None, None))
    objects.unet = unet
    env.model.forge_objects_after_applying_lora.unet = unet
    return env.patch_state()


def use_base_checkpoint(env, monkeypatch, install):
    """Load the base checkpoint as the fork would (a new model, patchers without LoRAs)."""
    base_info = sd_models.get_closet_checkpoint_match("base")
    model = sd_models.FakeSdModel(env.base_inner)
    sd_models.set_model(model, base_info)
    install(model)
    return model
