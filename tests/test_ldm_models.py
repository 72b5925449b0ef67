import random

import pytest
import torch
import torch.nn as nn

from tests import ldm_models as L


@pytest.fixture(scope="module")
def sd1():
    return L.make_sd1("tiny", seed=0)


def test_sd1_key_prefixes_and_layout(sd1):
    sd = sd1.state_dict()
    prefixes = {"model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model."}
    for k in sd:
        assert any(k.startswith(p) for p in prefixes) or k in ("betas", "alphas_cumprod", "alphas_cumprod_prev") \
            or "cumprod" in k or k.startswith("posterior_"), k
    for p in prefixes:
        assert any(k.startswith(p) for k in sd), p
    u = "model.diffusion_model."
    assert sd[u + "input_blocks.0.0.weight"].shape == (32, 4, 3, 3)
    assert sd[u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (32, 32)
    assert u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.bias" not in sd
    assert sd[u + "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (512, 64)
    assert sd[u + "input_blocks.4.1.proj_in.weight"].shape == (64, 64, 1, 1)
    assert not any(k.startswith(u + "input_blocks.7.1.") for k in sd)  # deepest level: no attention
    assert u + "output_blocks.2.1.conv.weight" in sd and u + "output_blocks.5.2.conv.weight" in sd
    assert sd[u + "middle_block.1.transformer_blocks.0.attn1.to_out.0.bias"].shape == (64,)
    t = "cond_stage_model.transformer.text_model."
    assert sd[t + "embeddings.token_embedding.weight"].shape == (49408, 32)
    assert sd[t + "embeddings.position_embedding.weight"].shape == (77, 32)
    assert sd[t + "encoder.layers.1.self_attn.q_proj.weight"].shape == (32, 32)
    assert sd[t + "encoder.layers.1.mlp.fc1.weight"].shape == (64, 32)
    assert t + "final_layer_norm.weight" in sd
    assert "first_stage_model.decoder.conv_in.weight" in sd and "first_stage_model.quant_conv.weight" in sd


def test_inpainting_in_channels():
    m = L.make_sd1("tiny", inpainting=True, unet_only=True)
    assert m.cond_stage_model is None
    assert m.model.diffusion_model.input_blocks[0][0].weight.shape == (32, 9, 3, 3)
    out = m.apply_model(torch.randn(1, 9, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32))
    assert out.shape == (1, 4, 8, 8)


def test_forward_shapes_and_batch_first(sd1):
    b = 3
    seen = []

    def hook(mod, args):
        seen.append(type(mod).__name__)
        assert args[0].shape[0] == b, (type(mod).__name__, args[0].shape)

    handles = [m.register_forward_pre_hook(hook) for m in sd1.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding))
               and not isinstance(m, L.FirstStageStandIn)]
    try:
        with torch.no_grad():
            cond = sd1.get_learned_conditioning(["a photo of a cat", "", "x y z"])
            assert cond.shape == (b, 77, 32)
            out = sd1.apply_model(torch.randn(b, 4, 16, 16), torch.tensor([1, 500, 999]), cond)
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (b, 4, 16, 16) and torch.isfinite(out).all()
    assert {"Linear", "Conv2d", "GroupNorm32", "GroupNorm", "LayerNorm", "Embedding"} <= set(seen)


def test_encode_deterministic():
    ids = L.encode_prompts(["", "hello world", "hello world"])
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert ids[0, 0] == L.BOS_TOKEN and (ids[0, 1:] == L.EOS_TOKEN).all()
    assert torch.equal(ids[1], ids[2]) and ids[1, 1] < 49000 and ids[1, 3] == L.EOS_TOKEN


def test_fp16_forward_finite():
    m = L.make_sd1("tiny", dtype=torch.float16)
    assert m.model.diffusion_model.out[2].weight.dtype == torch.float16
    with torch.no_grad():
        c = m.get_learned_conditioning(["hi"])
        out = m.apply_model(torch.randn(1, 4, 8, 8, dtype=torch.float16), torch.tensor([5]), c)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_checksum_determinism(sd1):
    c0 = L.state_dict_checksum(sd1)
    m = L.make_sd1("tiny", seed=0)
    assert c0 == L.state_dict_checksum(m)
    assert c0 != L.state_dict_checksum(L.make_sd1("tiny", seed=1, unet_only=True))
    m.betas[3] += 1e-3  # buffers count too
    assert L.state_dict_checksum(m) != c0
    assert L.state_dict_checksum(sd1.state_dict()) == L.state_dict_checksum(dict(reversed(sd1.state_dict().items())))


def test_save_checkpoint_byte_determinism(tmp_path, sd1):
    from safetensors.torch import load_file

    sd = dict(sd1.state_dict())
    items = list(sd.items())
    random.Random(0).shuffle(items)
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    L.save_checkpoint(sd, p1)
    L.save_checkpoint(dict(items), p2)
    assert p1.read_bytes() == p2.read_bytes()
    loaded = load_file(str(p1))
    assert L.state_dict_checksum(loaded) == L.state_dict_checksum(sd)


@pytest.fixture(scope="module")
def sdxl():
    return L.make_sdxl("tiny")


def test_sdxl_like_state_dict(sdxl):
    sd = L.make_sdxl_like_state_dict("tiny")
    assert L.state_dict_checksum(sd) == L.state_dict_checksum(sdxl.state_dict())
    u = "model.diffusion_model."
    assert sd[u + "label_emb.0.0.weight"].shape[1] == L.sdxl_unet_config("tiny")["adm_in_channels"]
    assert sd[u + "input_blocks.4.1.proj_in.weight"].dim() == 2  # use_linear_in_transformer
    assert not any(k.startswith(u + "input_blocks.1.1.") for k in sd)  # no attention at level 0
    assert u + "middle_block.1.transformer_blocks.1.attn2.to_k.weight" in sd  # per-level depth list
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd
    g = "conditioner.embedders.1.model."
    for k in ("ln_final.weight", "text_projection", "positional_embedding", "token_embedding.weight",
              "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.weight"):
        assert g + k in sd, k
    assert any(k.startswith("first_stage_model.") for k in sd)


def test_sdxl_model_forward_and_meta_full(sdxl):
    m = sdxl
    with torch.no_grad():
        cond = m.get_learned_conditioning(["a", "b c"])
        out = m.apply_model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), cond)
    assert out.shape == (2, 4, 8, 8)
    full = L.make_sdxl_unet("sdxl", device="meta", dtype=torch.float16)
    assert full.input_blocks[7][1].transformer_blocks[9].attn2.to_k.weight.shape == (1280, 2048)
    assert full.label_emb[0][0].weight.shape == (1280, 2816)
