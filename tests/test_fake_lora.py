"""The fake of webui's built-in Lora extension (tests/fake_webui/lora) on the tiny SD1 model with
real LoRA / LyCORIS files (tests/lora_files.py): every key matches a layer, merging changes
exactly the targeted layers, a repeated apply does nothing, restore is bit-exact, the functional
path equals the merged one, and deltas are linear in the multiplier."""

import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

LORA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_webui", "lora")
if LORA_DIR not in sys.path:
    sys.path.insert(0, LORA_DIR)

import extra_networks_lora  # noqa: E402
import networks  # noqa: E402
from modules import sd_models, shared  # noqa: E402

from tests.ldm_models import make_sd1  # noqa: E402
from tests.lora_files import kohya_unet_name, write_kohya_lora, write_lycoris  # noqa: E402

LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)

# kind -> (writer, kwargs, functional path exact?)
KINDS = {
    "lora": (write_kohya_lora, {}, True),
    "lora_alpha_te_only": (write_kohya_lora, dict(alpha=2.0, rank=8), True),
    "locon": (write_kohya_lora, dict(conv=True, mid=True), True),
    "locon_cp": (write_kohya_lora, dict(conv=True, cp=True), False),  # webui's LoRA forward ignores lora_mid
    "dora": (write_kohya_lora, dict(dora=True, alpha=2.0), False),  # ... and DoRA
    "loha": (write_lycoris, dict(kind="loha", conv=True), True),
    "loha_cp": (write_lycoris, dict(kind="loha", conv=True, cp=True), True),
    "lokr": (write_lycoris, dict(kind="lokr", conv=True), True),
    "ia3": (write_lycoris, dict(kind="ia3"), True),
    "oft": (write_lycoris, dict(kind="oft", conv=True), True),
    "oft_constrained": (write_lycoris, dict(kind="oft", alpha=1e-3), True),
    "boft": (write_lycoris, dict(kind="boft", mid=True), True),
    "oft_diag": (write_lycoris, dict(kind="oft_diag"), True),
    "glora": (write_lycoris, dict(kind="glora"), True),
    "full": (write_lycoris, dict(kind="full", conv=True, mid=True), True),
    "norm": (write_lycoris, dict(kind="norm", conv=True), True),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: on a shared, busy CPU torch's thread pool spins far longer than it computes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():
    inner = make_sd1("tiny", seed=0)
    return inner, {k: v.clone() for k, v in inner.state_dict().items()}


@pytest.fixture
def env(tiny, tmp_path):
    inner, original = tiny
    shared.reset()
    model = sd_models.FakeSdModel(inner)
    shared.sd_model = model
    networks.install_patches()
    networks.reset()
    networks.assign_network_names_to_compvis_modules(model)
    yield types.SimpleNamespace(inner=inner, model=model, original=original, dir=tmp_path)
    networks.uninstall_patches()
    networks.reset()
    with torch.no_grad():
        for m in inner.modules():
            for attr in ("network_current_names", "network_weights_backup", "network_bias_backup"):
                m.__dict__.pop(attr, None)
        inner.load_state_dict(original)
    shared.reset()


_PATHS = {}


def _path(inner, module):
    if not _PATHS:
        _PATHS.update({id(m): n for n, m in inner.named_modules()})
    return _PATHS[id(module)]


def layers(inner):
    return [m for m in inner.modules() if isinstance(m, LAYER_TYPES) and getattr(m, "network_layer_name", None) is not None]


def apply_all(inner):
    with torch.no_grad():
        for m in layers(inner):
            networks.network_apply_weights(m)


def state(inner):
    return {k: v.clone() for k, v in inner.state_dict().items()}


def write(env, kind, name=None, **extra):
    writer, kwargs, _ = KINDS[kind]
    kwargs = dict(kwargs, **extra)
    path = env.dir / f"{name or kind}.safetensors"
    if writer is write_lycoris:
        kwargs = dict(kwargs)
        targets = writer(path, env.model, kwargs.pop("kind"), **kwargs)
    else:
        targets = writer(path, env.model, **kwargs)
    networks.register_network(path, name or kind)
    return targets


def forward(env, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        cond = env.model.get_learned_conditioning(["a photo of a dog", "blurry"])
        return cond, env.inner.model.diffusion_model(x, t, context=cond)


@pytest.mark.parametrize("kind", list(KINDS))
def test_file_kind_loads_merges_restores(env, kind):
    targets = write(env, kind)
    networks.load_networks([kind], [1.0], [1.0], [None])
    (net,) = networks.loaded_networks
    assert net.keys_failed_to_match == {}

    # every file layer became one module on exactly the layer the writer targeted
    by_path = {path: kname for kname, path in targets.items()}
    assert {_path(env.inner, m.sd_module) for m in net.modules.values()} == set(by_path)
    for key, module in net.modules.items():
        assert module.sd_module.network_layer_name == key
        assert module.network_key.partition(".")[0] == by_path[_path(env.inner, module.sd_module)]

    # merge: exactly the targeted weights (and biases where the kind has bias deltas) change
    before = state(env.inner)
    apply_all(env.inner)
    after = state(env.inner)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {f"{p}.weight" for p in targets.values()}
    if kind == "norm":
        expected |= {f"{p}.bias" for p in targets.values()}
    if kind == "full":
        expected |= {f"{p}.bias" for p in targets.values() if f"{p}.bias" in before}
    assert changed == expected
    for k in changed:
        delta = (after[k] - before[k]).abs().max().item()
        assert 1e-5 < delta < 1.0, (k, delta)
    assert networks.extra_network_lora.errors == {}
    wanted = (kind, 1.0, 1.0, None)
    assert all(m.network_current_names == (wanted,) for m in layers(env.inner))
    assert all(m.network_weights_backup.device.type == "cpu" for m in layers(env.inner))

    # a second apply with the same wanted names computes nothing and changes nothing
    calls = []
    for module in net.modules.values():
        module.calc_updown = (lambda f: lambda w: calls.append(1) or f(w))(module.calc_updown)
    apply_all(env.inner)
    assert calls == []
    assert all(torch.equal(v, after[k]) for k, v in env.inner.state_dict().items())

    # linear in the multiplier
    for module in net.modules.values():
        weight = module.sd_module.network_weights_backup
        net.te_multiplier = net.unet_multiplier = 1.0
        full, full_bias = module.calc_updown(weight)
        net.te_multiplier = net.unet_multiplier = 0.5
        half, half_bias = module.calc_updown(weight)
        torch.testing.assert_close(half, full * 0.5, rtol=0, atol=1e-6)
        if full_bias is not None:
            torch.testing.assert_close(half_bias, full_bias * 0.5, rtol=0, atol=1e-6)
    net.te_multiplier = net.unet_multiplier = 1.0

    # unloading restores every layer from its backup, bit-exactly
    networks.load_networks([])
    apply_all(env.inner)
    assert all(torch.equal(v, before[k]) for k, v in env.inner.state_dict().items())
    assert state(env.inner).keys() == before.keys()

    # and network_restore_weights_from_backup does too
    networks.load_networks([kind], [1.0], [1.0], [None])
    apply_all(env.inner)
    with torch.no_grad():
        for m in layers(env.inner):
            networks.network_restore_weights_from_backup(m)
    assert all(torch.equal(v, before[k]) for k, v in env.inner.state_dict().items())


@pytest.mark.parametrize("kind", [k for k, v in KINDS.items() if v[2]])
def test_functional_equals_merged(env, kind):
    write(env, kind)
    plain_cond, plain_out = forward(env)
    networks.load_networks([kind], [0.8], [0.6], [None])
    merged_cond, merged_out = forward(env)  # the patched forwards merge on first use
    assert not torch.allclose(merged_out, plain_out, atol=1e-4)
    shared.opts.lora_functional = True
    functional_cond, functional_out = forward(env)
    # functional mode un-merges: the layers hold the original weights again
    assert all(torch.equal(v, env.original[k]) for k, v in env.inner.state_dict().items())
    torch.testing.assert_close(functional_cond, merged_cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(functional_out, merged_out, rtol=0, atol=1e-5)
    shared.opts.lora_functional = False
    _, merged_again = forward(env)
    torch.testing.assert_close(merged_again, merged_out, rtol=0, atol=1e-6)


def test_te_and_unet_multipliers_split_by_sd_key(env):
    targets = write(env, "lora")
    networks.load_networks(["lora"], [0.0], [1.0], [None])
    before = state(env.inner)
    apply_all(env.inner)
    changed = {k for k, v in env.inner.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{p}.weight" for p in targets.values() if p.startswith("model.diffusion_model.")}
    networks.load_networks(["lora"], [1.0], [0.0], [None])
    apply_all(env.inner)
    changed = {k for k, v in env.inner.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{p}.weight" for p in targets.values() if p.startswith("cond_stage_model.")}


def test_extra_network_activate_multipliers_hashes_and_errors(env):
    write(env, "lora", name="lora_a")
    write(env, "ia3", name="lora_b")
    extra = networks.extra_network_lora
    assert isinstance(extra, extra_networks_lora.ExtraNetworkLora)
    Params = extra_networks_lora.ExtraNetworkParams
    p = types.SimpleNamespace(all_prompts=["x"], extra_generation_params={}, comment=lambda text: comments.append(text))
    comments = []
    extra.activate(p, [Params(items=["lora_a", "0.5"]), Params(items=["lora_b", "0.5", "0.25", "unet=0.75"])])
    got = [(n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim, n.mentioned_name) for n in networks.loaded_networks]
    assert got == [("lora_a", 0.5, 0.5, None, "lora_a"), ("lora_b", 0.5, 0.75, None, "lora_b")]
    hashes = p.extra_generation_params["Lora hashes"]
    assert hashes.startswith("lora_a: ") and ", lora_b: " in hashes
    extra.activate(p, [Params(items=["lora_a"])])
    assert [(n.name, n.te_multiplier, n.unet_multiplier) for n in networks.loaded_networks] == [("lora_a", 1.0, 1.0)]
    apply_all(env.inner)
    assert extra.errors == {}
    extra.deactivate(p)
    assert comments == []

    # a layer whose delta does not fit: counted, not raised; reported at deactivate
    path = env.dir / "lora_a.safetensors"
    sd = load_file(path)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    save_file(dict(sorted(sd.items())), path)
    os.utime(path, (os.path.getmtime(path) + 10, os.path.getmtime(path) + 10))  # newer file: reloaded
    extra.activate(p, [Params(items=["lora_a", "0.5"])])
    apply_all(env.inner)
    assert extra.errors == {"lora_a": 1}
    extra.deactivate(p)
    assert comments == ["Networks with errors: lora_a (1)"] and extra.errors == {}


def test_unmatched_keys_are_counted_and_missing_networks_reported(env):
    targets = write(env, "lora")
    path = env.dir / "lora.safetensors"
    sd = load_file(path)
    sd["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 4)
    sd["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 4)
    save_file(dict(sorted(sd.items())), path)
    networks.load_networks(["lora", "nowhere"], [1.0, 1.0], [1.0, 1.0], [None, None])
    (net,) = networks.loaded_networks
    assert set(net.keys_failed_to_match) == {"lora_unet_no_such_layer.lora_up.weight", "lora_unet_no_such_layer.lora_down.weight"}
    assert len(net.modules) == len(targets)
    assert networks.comments == ["Lora not found: nowhere"]


def test_compvis_form_keys_load_like_diffusers_ones(env):
    targets = write(env, "locon")
    sd = load_file(env.dir / "locon.safetensors")
    renamed = {}
    for key, value in sd.items():
        kname, _, part = key.partition(".")
        path = targets[kname]
        if path.startswith("model.diffusion_model."):
            kname = "lora_unet_" + path[len("model.diffusion_model."):].replace(".", "_")
        renamed[f"{kname}.{part}"] = value
    save_file(dict(sorted(renamed.items())), env.dir / "compvis.safetensors")
    networks.register_network(env.dir / "compvis.safetensors")
    networks.load_networks(["locon"], [1.0], [1.0], [None])
    apply_all(env.inner)
    diffusers_state = state(env.inner)
    networks.load_networks(["compvis"], [1.0], [1.0], [None])
    assert networks.loaded_networks[0].keys_failed_to_match == {}
    apply_all(env.inner)
    assert all(torch.equal(v, diffusers_state[k]) for k, v in env.inner.state_dict().items())


def test_dyn_dim_truncates_the_rank(env):
    write(env, "lora")
    networks.load_networks(["lora"], [1.0], [1.0], [2])
    module = next(iter(networks.loaded_networks[0].modules.values()))
    up, down = module.up_model.weight, module.down_model.weight
    updown, _ = module.calc_updown(module.sd_module.weight)
    expected = (up.reshape(up.shape[0], -1)[:, :2] @ down.reshape(down.shape[0], -1)[:2]).reshape(updown.shape)
    torch.testing.assert_close(updown, expected, rtol=0, atol=1e-7)


SD1_NAMES = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": "diffusion_model_input_blocks_1_1_proj_in",
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k": "diffusion_model_input_blocks_5_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_0_resnets_1_conv1": "diffusion_model_input_blocks_2_0_in_layers_2",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "diffusion_model_input_blocks_4_0_skip_connection",
    "lora_unet_down_blocks_2_resnets_1_time_emb_proj": "diffusion_model_input_blocks_8_0_emb_layers_1",
    "lora_unet_down_blocks_1_downsamplers_0_conv": "diffusion_model_input_blocks_6_0_op",
    "lora_unet_mid_block_attentions_0_proj_out": "diffusion_model_middle_block_1_proj_out",
    "lora_unet_mid_block_resnets_1_norm2": "diffusion_model_middle_block_2_out_layers_0",
    "lora_unet_up_blocks_0_resnets_2_conv2": "diffusion_model_output_blocks_2_0_out_layers_3",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "diffusion_model_output_blocks_2_1_conv",
    "lora_unet_up_blocks_1_upsamplers_0_conv": "diffusion_model_output_blocks_5_2_conv",
    "lora_unet_up_blocks_2_attentions_2_transformer_blocks_0_ff_net_0_proj": "diffusion_model_output_blocks_8_1_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_conv_in": "diffusion_model_input_blocks_0_0",
    "lora_unet_conv_out": "diffusion_model_out_2",
    "lora_unet_time_embedding_linear_2": "diffusion_model_time_embed_2",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "transformer_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc2": "transformer_text_model_encoder_layers_1_mlp_fc2",
    "lora_unet_input_blocks_1_1_proj_in": "lora_unet_input_blocks_1_1_proj_in",  # compvis form: load_network's fallback handles it
}


def test_names_assigned_and_diffusers_names_converted(env):
    mapping = env.model.network_layer_mapping
    assert mapping["diffusion_model_input_blocks_1_1_proj_in"] is env.inner.model.diffusion_model.input_blocks[1][1].proj_in
    assert mapping["transformer_text_model_encoder_layers_0_self_attn_q_proj"] is \
        env.inner.cond_stage_model.transformer.text_model.encoder.layers[0].self_attn.q_proj
    for name, module in env.inner.named_modules():
        if isinstance(module, LAYER_TYPES) and name.startswith(("model.", "cond_stage_model.")):
            expected = name.split(".", 1)[1].replace(".", "_")
            assert module.network_layer_name == expected and mapping[expected] is module
    for kohya, compvis in SD1_NAMES.items():
        assert networks.convert_diffusers_name_to_compvis(kohya, False) == compvis
        assert compvis in mapping or compvis.startswith("lora_unet_input")
    # every UNet layer of the tiny model round-trips through its diffusers name
    unet = env.inner.model.diffusion_model
    for name, module in unet.named_modules():
        if isinstance(module, LAYER_TYPES) and name != "out.0":  # conv_norm_out: webui has no rule for it
            assert networks.convert_diffusers_name_to_compvis(kohya_unet_name(unet, name), False) == \
                "diffusion_model_" + name.replace(".", "_")


def test_install_patches_at_class_level_and_uninstall(env):
    originals = networks.originals
    assert torch.nn.Linear.forward is networks.network_Linear_forward
    assert torch.nn.Conv2d.forward is networks.network_Conv2d_forward
    assert torch.nn.GroupNorm.forward is networks.network_GroupNorm_forward
    assert torch.nn.LayerNorm.forward is networks.network_LayerNorm_forward
    assert networks.install_patches() is originals
    networks.uninstall_patches()
    assert torch.nn.Linear.forward is not networks.network_Linear_forward
    assert torch.nn.Linear.forward.__qualname__ == "Linear.forward"
    assert torch.nn.GroupNorm.forward.__qualname__ == "GroupNorm.forward"
    assert networks.originals is None
    networks.install_patches()
    assert torch.nn.Linear.forward is networks.network_Linear_forward
