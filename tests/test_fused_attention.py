"""LoRAs stripped from OpenCLIP's fused attention (torch.nn.MultiheadAttention: SDXL's second text
encoder; SD 2.x's encoder is the same module), through the fake webui and the fake of webui 1.10.1's
Lora extension, whose MultiheadAttention paths mirror extensions-builtin/Lora/networks.py
(network_apply_weights: q/k/v parts merged into in_proj_weight, out_proj into the attention's
out_proj, in both Lora modes; network_MultiheadAttention_forward; load_network's re_x_proj match)
and lora_patches.py (the class-level MultiheadAttention patch).

A tiny SDXL with a kohya-named SDXL LoRA on the UNet, CLIP-L (`lora_te1_`) and OpenCLIP
(`lora_te2_`, q/k/v/out_proj + mlp) layers."""

import os
import sys

import pytest
import torch

LORA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_webui", "lora")
if LORA_DIR not in sys.path:
    sys.path.insert(0, LORA_DIR)

import networks  # noqa: E402  (the fake of extensions-builtin/Lora/networks.py)
from modules import processing, prompt_parser, sd_models, shared  # noqa: E402

from lib_pg.errors import PGError  # noqa: E402
from lib_pg.hosts.webui import controller as webui_controller  # noqa: E402
from lib_pg.hosts.webui import loras as webui_loras  # noqa: E402
from lib_pg.patching import module_state_fingerprint  # noqa: E402
from tests.helpers import fine_tune  # noqa: E402
from tests.ldm_models import make_sdxl, save_checkpoint  # noqa: E402
from tests.lora_files import sdxl_layers, write_kohya_lora, write_lycoris  # noqa: E402
from tests.test_script import generate_with, load_script_module, pg_args, reset_fake_webui, same_images  # noqa: E402

KINDS = {
    "lora": (write_kohya_lora, {}),
    "dora": (write_kohya_lora, dict(dora=True, alpha=2.0)),
    "loha": (write_lycoris, dict(kind="loha")),
    "lokr": (write_lycoris, dict(kind="lokr")),
    "full": (write_lycoris, dict(kind="full")),
    "oft": (write_lycoris, dict(kind="oft")),
    "boft": (write_lycoris, dict(kind="boft")),
    "ia3": (write_lycoris, dict(kind="ia3")),  # k/v only: webui merges no part of the fused attention
    "glora": (write_lycoris, dict(kind="glora")),
    "norm": (write_lycoris, dict(kind="norm")),  # with layers=sdxl_layers(norms=True)
}
TOLERANCE = dict(rtol=1e-4, atol=1e-5)
ATTENTION = "1_model_transformer_resblocks_0_attn"


class XlLoraEnv:
    """A fake webui with a tiny SDXL (and a base checkpoint of it) and webui's Lora extension."""

    def __init__(self, tmp_path, functional=False):
        reset_fake_webui()
        self.base_inner = make_sdxl("tiny", seed=0)
        self.tuned_inner = fine_tune(self.base_inner, text_encoder=True)
        sd_models.model_path = str(tmp_path)
        save_checkpoint(self.base_inner.state_dict(), tmp_path / "xlbase.safetensors")
        save_checkpoint(self.tuned_inner.state_dict(), tmp_path / "xltuned.safetensors")
        sd_models.list_models()
        self.model = sd_models.FakeSdModel(self.tuned_inner)
        self.script_module = load_script_module()
        sd_models.set_model(self.model, sd_models.get_closet_checkpoint_match("xltuned"))
        self.unet = self.tuned_inner.model.diffusion_model
        networks.reset()
        networks.install_patches()
        networks.assign_network_names_to_compvis_modules(self.model)
        shared.opts.lora_functional = functional
        self.tmp_path = tmp_path

    def add(self, name, kind, seed=0, **layers):
        writer, kwargs = KINDS[kind]
        path = self.tmp_path / f"{name}.safetensors"
        writer(path, self.tuned_inner, seed=seed, layers=sdxl_layers(self.tuned_inner, **layers), **kwargs)
        networks.register_network(str(path), name=name)

    def activate(self, names, multipliers):
        networks.load_networks(names, te_multipliers=multipliers, unet_multipliers=multipliers, dyn_dims=[None] * len(names))

    def generate(self, pg=None, **kwargs):
        # webui keys its cond cache on the prompt's <lora:…> tags, which these tests replace by
        # activate(): a new request must not reuse conds encoded with other networks
        processing.clear_cond_cache()
        return generate_with(self.script_module, pg, **{"steps": 2, "seed": 3, **kwargs})[0]

    def webui_conditioning(self, names, multipliers, prompt="blurry"):
        """webui's own conditioning of `prompt` as a negative prompt, with these networks."""
        self.activate(names, multipliers)
        conditioning = prompt_parser.SdConditioning([prompt], width=32, height=32, is_negative_prompt=True)
        with torch.no_grad():
            return self.model.get_learned_conditioning(conditioning)

    def close(self):
        networks.load_networks([], dyn_dims=[])
        networks.uninstall_patches()
        networks.reset()
        shared.reset()


class ConditioningRecorder:
    """The text conditioning (context, vector) and the router's split of every UNet call."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_hook(self.record, with_kwargs=True)  # after PG's routing pre-hook

    def record(self, _module, _args, kwargs, _output):
        run = webui_controller.CONTROLLER.active_run
        split = run.router.current if run is not None else None
        self.calls.append((kwargs["context"].clone(), kwargs["y"].clone(), split))

    def weak(self):
        context, y, split = self.calls[0]
        return context[split.split:], y[split.split:]

    def remove(self):
        self.handle.remove()


@pytest.fixture(params=[False, True], ids=["merged", "functional"])
def xenv(tmp_path, request):
    env = XlLoraEnv(tmp_path, functional=request.param)
    yield env
    env.close()


def recorded(env, pg, **kwargs):
    recorder = ConditioningRecorder(env.unet)
    try:
        image = env.generate(pg, **kwargs)
    finally:
        recorder.remove()
    return image, recorder


def assert_conditioning(actual, expected):
    context, y = actual
    torch.testing.assert_close(context, expected["crossattn"], **TOLERANCE)
    torch.testing.assert_close(y, expected["vector"], **TOLERANCE)


def test_the_lora_reaches_the_fused_attention(tmp_path):
    """The premise: webui's Lora merges te2 q/k/v/out_proj into the MultiheadAttention."""
    env = XlLoraEnv(tmp_path)
    try:
        env.add("subject", "lora", unet=False, te1=False)
        without = env.webui_conditioning([], [])
        with_lora = env.webui_conditioning(["subject"], [1.0])
        attention = env.model.network_layer_mapping[ATTENTION]
        assert isinstance(attention, torch.nn.MultiheadAttention)
        assert not torch.equal(attention.in_proj_weight, attention.network_weights_backup[0])
        assert not torch.allclose(without["crossattn"], with_lora["crossattn"], **TOLERANCE)
    finally:
        env.close()


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "norm"])
def test_weak_conditioning_is_webuis_own_with_the_multiplier_scaled_by_omega(xenv, kind):
    xenv.add("subject", kind)
    multiplier = 0.8
    xenv.activate(["subject"], [multiplier])
    xenv.generate()
    after_plain = module_state_fingerprint(xenv.tuned_inner)
    for omega in (0.0, 0.5):
        xenv.activate(["subject"], [multiplier])
        guided, recorder = recorded(xenv, pg_args(omega, base="", strip_loras=True))
        assert "PG strip LoRAs: *" in guided.infotexts[0]
        assert module_state_fingerprint(xenv.tuned_inner) == after_plain  # the live model as webui left it
        context, y, split = recorder.calls[0]
        k = split.split
        assert_conditioning((context[:k], y[:k]), xenv.webui_conditioning(["subject"], [multiplier], "a photo of sks dog"))
        expected = xenv.webui_conditioning(["subject"] if omega else [], [multiplier * omega] if omega else [])
        assert_conditioning(recorder.weak(), expected)


def test_fused_attention_keeps_no_weight_copy(tmp_path):
    """Without a base the weak attention weights are recomputed for the weak text encoder's call."""
    env = XlLoraEnv(tmp_path)
    try:
        env.add("subject", "lora", unet=False, te1=False)
        env.activate(["subject"], [1.0])
        env.generate(pg_args(0.0, base="", strip_loras=True))
        weak = webui_controller.CONTROLLER.cache.weak
        attentions = {id(m) for m in env.tuned_inner.modules() if isinstance(m, torch.nn.MultiheadAttention)}
        assert weak.text_scope is not None and not any(id(layer.module) in attentions for layer in weak.text)
        assert all(not layer.names for layer in weak.text)
    finally:
        env.close()


def test_with_a_base_the_weak_conditioning_is_the_base_without_the_stripped_lora(xenv):
    xenv.add("subject", "loha", seed=1)
    xenv.activate(["subject"], [1.0])
    _, recorder = recorded(xenv, pg_args(0.0, base="xlbase", strip_loras=True))
    xenv.activate([], [])
    with torch.no_grad():  # the base model has no networks at all
        expected = xenv.base_inner.get_learned_conditioning(["blurry"], width=32, height=32)
    assert_conditioning(recorder.weak(), expected)


def test_with_a_base_a_kept_lora_stays_on_the_fused_attention(xenv):
    """Base + LoRAs to strip: the reference is the base with the same non-stripped LoRAs, on the
    fused attention too (its merged weights are offsets onto the base's)."""
    xenv.add("subject", "lora", seed=1)
    xenv.add("style", "lokr", seed=2, unet=False, te1=False)
    xenv.activate(["subject", "style"], [1.0, 0.7])
    xenv.generate(pg_args(0.0, base="xlbase", strip_loras=["subject"]))
    weak = webui_controller.CONTROLLER.cache.weak
    attention = xenv.model.network_layer_mapping[ATTENTION]
    layer = next(layer for layer in weak.text if layer.module is attention)
    style = next(net for net in networks.loaded_networks if net.name == "style")
    base_in_proj = dict(xenv.base_inner.named_parameters())["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    parts = webui_loras.fused_attention_parts(style, ATTENTION)
    backup = attention.network_weights_backup[0]
    style_delta = torch.vstack([part.calc_updown(chunk)[0] for part, chunk in zip(parts[:3], backup.chunk(3, 0))])
    torch.testing.assert_close(layer.tensors_at(0.0)[layer.names.index("in_proj_weight")], base_in_proj + style_delta,
                               **TOLERANCE)


@pytest.mark.parametrize("functional", [False, True], ids=["merged", "functional"])
def test_the_same_request_gives_the_same_result_after_any_other(tmp_path, functional):
    """Nothing carries from one generation to the next: not into the weak conditioning, not into
    the live model (webui's own images without PG are unchanged too)."""
    env = XlLoraEnv(tmp_path, functional=functional)
    try:
        env.add("subject", "lora", seed=1)
        env.add("other", "loha", seed=2)

        def strip():
            env.activate(["subject"], [1.0])
            return recorded(env, pg_args(0.0, base="", strip_loras=True))

        def with_base():
            env.activate([], [])
            return recorded(env, pg_args(0.0, base="xlbase"))

        def plain():
            env.activate([], [])
            return recorded(env, None, prompt="a cat")

        def other():
            env.activate(["other", "subject"], [0.6, 0.9])
            return recorded(env, pg_args(0.5, base="xlbase", strip_loras=["other"]), prompt="a photo of a dog")

        requests = {"strip": strip, "with base": with_base, "plain": plain, "other": other}
        first = {name: request() for name, request in requests.items()}
        for name, request in requests.items():
            for before in requests.values():
                before()
                image, recorder = request()
                assert same_images(first[name][0], image), f"{name!r} changed after another request"
                for (context, y, _), (context0, y0, _) in zip(recorder.calls, first[name][1].calls):
                    assert torch.equal(context, context0) and torch.equal(y, y0), name
    finally:
        env.close()


def test_an_unaccounted_layer_stops_the_generation(tmp_path, monkeypatch):
    """The guard: a stripped network's layer without a reference stops before sampling, naming it."""
    env = XlLoraEnv(tmp_path)
    try:
        env.add("subject", "lora")
        env.activate(["subject"], [1.0])
        monkeypatch.setattr(webui_loras, "fused_attention_reference",
                            lambda *args, **kwargs: {"offsets": {}, "text_scope": None})  # PG as before this fix
        recorder = ConditioningRecorder(env.unet)
        with pytest.raises(PGError) as info:
            env.generate(pg_args(0.0, base="", strip_loras=True))
        recorder.remove()
        assert recorder.calls == []
        message = str(info.value)
        assert "LoRA 'subject' changes layer 1_model_transformer_resblocks_" in message
        assert "MultiheadAttention" in message and "strip_loras" in message
    finally:
        env.close()


def test_every_touched_layer_is_accounted_for(xenv):
    """The guard passes for every layer type webui's Lora patches (UNet, CLIP-L, OpenCLIP attention
    and MLP, layer norms), in both modes, with and without a base."""
    xenv.add("subject", "lora")
    xenv.add("norms", "norm", seed=4, norms=True)
    xenv.activate(["subject", "norms"], [1.0, 1.0])
    stripped = list(networks.loaded_networks)
    for with_base in (False, True):
        webui_loras.finalize_lora_weights(xenv.model)
        webui_loras.lora_reference(xenv.model, stripped, with_base=with_base)  # raises if not
    touched = {webui_loras.applied_layer(xenv.model, net, key, m) for net in stripped for key, m in net.modules.items()}
    assert any(isinstance(layer, torch.nn.MultiheadAttention) for layer in touched)
