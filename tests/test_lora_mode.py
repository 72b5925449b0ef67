"""The LoRA-stripped weak model (strip_loras), through the fake webui and a fake
of webui 1.10.1's built-in Lora extension (tests/fake_webui/lora), with real
kohya and LyCORIS files written by tests/lora_files.py."""

import os
import sys

import pytest
import torch

LORA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_webui", "lora")
if LORA_DIR not in sys.path:
    sys.path.insert(0, LORA_DIR)

import networks  # noqa: E402  (the fake of extensions-builtin/Lora/networks.py)
from modules import prompt_parser, sd_models, shared  # noqa: E402

from lib_pg.hosts.webui import controller as webui_controller  # noqa: E402
from lib_pg.errors import PGError  # noqa: E402
from lib_pg.patching import module_state_fingerprint  # noqa: E402
from tests.lora_files import write_kohya_lora, write_lycoris  # noqa: E402
from tests.test_script import Env, UNetRecorder, pg_args, same_images  # noqa: E402

# kind -> (writer, kwargs); every network type webui 1.10.1 loads
KINDS = {
    "lora": (write_kohya_lora, {}),
    "locon": (write_kohya_lora, dict(conv=True)),
    "locon_cp": (write_kohya_lora, dict(conv=True, cp=True)),
    "dora": (write_kohya_lora, dict(dora=True, alpha=2.0)),
    "loha": (write_lycoris, dict(kind="loha", conv=True)),
    "lokr": (write_lycoris, dict(kind="lokr", conv=True)),
    "ia3": (write_lycoris, dict(kind="ia3")),
    "oft": (write_lycoris, dict(kind="oft", conv=True)),
    "boft": (write_lycoris, dict(kind="boft")),
    "glora": (write_lycoris, dict(kind="glora")),
    "full": (write_lycoris, dict(kind="full", conv=True)),
    "norm": (write_lycoris, dict(kind="norm", conv=True)),
}
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float order of the merge, and batch-size dependent kernels


class LoraEnv(Env):
    def __init__(self, tmp_path, functional=False):
        super().__init__(tmp_path)
        networks.reset()
        networks.install_patches()
        networks.assign_network_names_to_compvis_modules(self.model)
        shared.opts.lora_functional = functional
        self.tmp_path = tmp_path

    def add(self, name, kind, seed=0):
        writer, kwargs = KINDS[kind]
        path = self.tmp_path / f"{name}.safetensors"
        writer(path, self.tuned_inner, seed=seed, **kwargs)
        networks.register_network(str(path), name=name)

    def activate(self, names, multipliers):
        networks.load_networks(names, te_multipliers=multipliers, unet_multipliers=multipliers, dyn_dims=[None] * len(names))

    def close(self):
        networks.load_networks([], dyn_dims=[])
        networks.uninstall_patches()
        networks.reset()
        shared.reset()


@pytest.fixture(params=[False, True], ids=["merged", "functional"])
def lenv(tmp_path, request):
    env = LoraEnv(tmp_path, functional=request.param)
    yield env
    env.close()


def lenv_functional():
    return bool(shared.opts.lora_functional)


def unet_rows(env, names, multipliers, x, t, context):
    """webui's own result: the live UNet with these networks at these multipliers."""
    env.activate(names, multipliers)
    with torch.no_grad():
        return env.unet(x, t, context=context)


@pytest.mark.parametrize("kind", list(KINDS))
def test_weak_branch_is_the_model_with_the_multiplier_scaled_by_omega(lenv, kind):
    if kind == "locon_cp" and lenv_functional():
        pytest.skip("webui's functional LoRA forward ignores lora_mid: a CP LoCon fails there without PG too")
    lenv.add("subject", kind)
    lenv.activate(["subject"], [0.8])
    plain, _ = lenv.generate()
    lenv.activate(["subject"], [0.8])
    same, _ = lenv.generate(pg_args(1.0, base="", strip_loras=True))
    assert same_images(plain, same), "ω = 1 must be bit-identical to PG disabled, with the same LoRAs"

    after_plain = module_state_fingerprint(lenv.tuned_inner)
    for omega in (0.0, 0.4):
        lenv.activate(["subject"], [0.8])
        recorder = UNetRecorder(lenv.unet)
        guided, _ = lenv.generate(pg_args(omega, base="", strip_loras=True))
        recorder.remove()
        assert not same_images(plain, guided)
        assert "PG strip LoRAs: *" in guided.infotexts[0]
        # webui's Lora state and the model are exactly as webui left them
        assert module_state_fingerprint(lenv.tuned_inner) == after_plain
        x, t, context, output, split = recorder.calls[0]
        k = split.split
        expected_weak = unet_rows(lenv, ["subject"], [0.8 * omega], x[k:], t[k:], context[k:])
        expected_cond = unet_rows(lenv, ["subject"], [0.8], x[:k], t[:k], context[:k])
        torch.testing.assert_close(output[k:], expected_weak, **TOLERANCE)
        torch.testing.assert_close(output[:k], expected_cond, **TOLERANCE)
        if omega == 0.0:  # and ω = 0 is the model where webui loaded no LoRA at all
            torch.testing.assert_close(output[k:], unet_rows(lenv, [], [], x[k:], t[k:], context[k:]), **TOLERANCE)


def test_plain_lora_costs_no_weight_copy_in_the_unet(lenv):
    lenv.add("subject", "lora")
    lenv.activate(["subject"], [1.0])
    lenv.generate(pg_args(0.3, base="", strip_loras=True))
    weak = webui_controller.CONTROLLER.cache.weak
    # merged: low-rank corrections on the weak rows, or copies of the layers where they cost most,
    # within twice the LoRA's UNet weights; functional: the multipliers scaled in forward, no copy
    assert weak.unet and all(layer.corrections or layer.names or lenv_functional() for layer in weak.unet)
    assert any(layer.corrections for layer in weak.unet) or lenv_functional()
    unet_layers = {getattr(m, "network_layer_name", None) for m in lenv.unet.modules()} - {None}
    unet_lora_bytes = sum(t.numel() * t.element_size() for net in networks.loaded_networks
                          for name, m in net.modules.items() if name in unet_layers
                          for t in (m.up_model.weight, m.down_model.weight))
    assert weak.extra_bytes <= 2 * unet_lora_bytes  # text-encoder layers keep corrections: no copies there
    assert all(not layer.names for layer in weak.text)
    assert any(layer.corrections for layer in weak.text) or lenv_functional()


def test_text_encoder_lora_weights_count_in_the_weak_conditioning(tmp_path):
    env = LoraEnv(tmp_path)
    try:
        env.add("subject", "lora")
        env.activate(["subject"], [1.0])
        recorder = UNetRecorder(env.unet)
        env.generate(pg_args(0.25, base="", strip_loras=True), negative_prompt="blurry")
        recorder.remove()
        env.activate(["subject"], [0.25])
        negative = prompt_parser.SdConditioning(["blurry"], width=32, height=32, is_negative_prompt=True)
        with torch.no_grad():
            expected = env.model.get_learned_conditioning(negative)
        torch.testing.assert_close(recorder.calls[0][2][1:], expected, **TOLERANCE)
    finally:
        env.close()


def test_only_the_named_loras_are_stripped(lenv):
    lenv.add("subject", "lora", seed=1)
    lenv.add("style", "loha", seed=2)
    lenv.activate(["subject", "style"], [1.0, 0.7])
    recorder = UNetRecorder(lenv.unet)
    guided, _ = lenv.generate(pg_args(0.0, base="", strip_loras=["subject"]))
    recorder.remove()
    assert "PG strip LoRAs: subject" in guided.infotexts[0]
    x, t, context, output, split = recorder.calls[0]
    k = split.split
    expected = unet_rows(lenv, ["style"], [0.7], x[k:], t[k:], context[k:])  # the style LoRA stays in both branches
    torch.testing.assert_close(output[k:], expected, **TOLERANCE)


def test_with_a_base_checkpoint_the_reference_is_the_base_without_the_stripped_loras(lenv):
    lenv.add("subject", "lora", seed=1)
    lenv.add("style", "lokr", seed=2)
    lenv.activate(["subject", "style"], [1.0, 1.0])
    lenv.generate(pg_args(0.0, base="base", strip_loras=["subject"]))
    weak = webui_controller.CONTROLLER.cache.weak
    base_params = dict(lenv.base_inner.named_parameters())
    names = {id(m): n for n, m in lenv.tuned_inner.named_modules()}
    style = next(net for net in networks.loaded_networks if net.name == "style")
    functional = shared.opts.lora_functional
    checked = 0
    for layer in weak.unet + weak.text:
        name = names[id(layer.module)]
        for param_name, tensor in zip(layer.names, layer.tensors_at(0.0)):
            expected = base_params[f"{name}.{param_name}"].detach().clone()
            network_module = style.modules.get(getattr(layer.module, "network_layer_name", None))
            if network_module is not None and param_name == "weight" and not functional:
                # merged mode: the style LoRA goes onto the base too (full strength in both branches)
                updown, _ = network_module.calc_updown(layer.module.network_weights_backup)
                expected += updown.reshape(expected.shape)
                checked += 1
            torch.testing.assert_close(tensor, expected, **TOLERANCE)
    assert checked > 0 or functional
    if functional:  # the networks run in forward: the weak rows scale the subject's multiplier only
        assert all(layer.scope is not None for layer in weak.unet)


def test_changing_loras_and_multipliers_rebuild_the_weak_weights(lenv, monkeypatch):
    builds = []
    real_build = webui_controller.build_weak_model
    monkeypatch.setattr(webui_controller, "build_weak_model", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    lenv.add("subject", "loha", seed=1)
    lenv.add("other", "lora", seed=3)
    for names, multipliers in ((["subject"], [1.0]), (["subject"], [1.0]), (["subject"], [0.5]), (["other"], [0.5])):
        lenv.activate(names, multipliers)
        lenv.generate(pg_args(0.3, base="", strip_loras=True))
    assert len(builds) == 3


@pytest.mark.parametrize("strip, message", [
    (["nope"], "LoRA 'nope' in 'strip_loras' is not active in this prompt (active: subject)"),
    (True, None),
])
def test_strip_errors_stop_before_sampling(lenv, strip, message):
    lenv.add("subject", "lora")
    if message is None:  # strip requested, no LoRA in the prompt
        lenv.activate([], [])
        message = "'strip_loras' is set but no LoRA is active"
    else:
        lenv.activate(["subject"], [1.0])
    recorder = UNetRecorder(lenv.unet)
    with pytest.raises(PGError) as info:
        lenv.generate(pg_args(0.3, base="", strip_loras=strip))
    recorder.remove()
    assert message in str(info.value) and recorder.calls == []


def test_lora_state_comes_back_after_an_exception(lenv):
    lenv.add("subject", "loha")
    lenv.activate(["subject"], [1.0])
    lenv.generate()
    after_plain = module_state_fingerprint(lenv.tuned_inner)
    currents = {n: getattr(m, "network_current_names", None) for n, m in lenv.tuned_inner.named_modules()}
    calls = []

    def fail(*_):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure")

    handle = lenv.unet.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="simulated"):
        lenv.generate(pg_args(0.3, base="", strip_loras=True))
    handle.remove()
    assert module_state_fingerprint(lenv.tuned_inner) == after_plain
    assert currents == {n: getattr(m, "network_current_names", None) for n, m in lenv.tuned_inner.named_modules()}
