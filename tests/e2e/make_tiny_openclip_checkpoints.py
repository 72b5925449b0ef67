#!/usr/bin/env python
"""Generate tiny, randomly initialised checkpoints with OpenCLIP text encoders that webui 1.10.1
loads, and kohya-format LoRAs for them (text-encoder and UNet layers).

Used by tests/e2e/test_webui_openclip_lora_e2e.py. Run it with the WEBUI's python (torch, omegaconf,
transformers, open_clip, safetensors); ldm and sgm come from the webui install:

    $SD_WEBUI_PYTHON tests/e2e/make_tiny_openclip_checkpoints.py MODELS_DIR LORA_DIR --repos $SD_WEBUI_PATH/repositories

Writes into MODELS_DIR (deterministic: tensors and JSON header in sorted key order):
    tiny-sdxl.safetensors + .yaml  sgm DiffusionEngine: CLIP-L stand-in (HF CLIPTextModel, hidden 32)
                                   and open_clip's ViT-S-32-alt text tower (width 256, 10 layers; the
                                   smallest config open_clip 2.20 ships, so webui's unchanged open_clip
                                   builds it) as FrozenOpenCLIPEmbedder2, a three-level UNet
    tiny-sd2.safetensors + .yaml   ldm LatentDiffusion with FrozenOpenCLIPEmbedder (ViT-S-32-alt)
    tiny-clip-xl/                  the CLIP-L stand-in's config and tokenizer files
and into LORA_DIR, kohya-format (alpha = rank):
    tinyxl-lora / tinyxl-loha / tinyxl-lokr   SDXL: lora_unet_<compvis name> (every SpatialTransformer
        Linear), lora_te1_text_model_encoder_layers_N_{self_attn_q/k/v/out_proj, mlp_fc1/fc2} (CLIP-L)
        and lora_te2_… (OpenCLIP: q/k/v/out_proj merge into the MultiheadAttention's in_proj_weight
        and out_proj; mlp_fc1/fc2 -> c_fc/c_proj)
    tinysd2-lora / tinysd2-loha    SD 2.x: lora_unet_<compvis name> and lora_te_text_model_encoder_…
The names follow webui 1.10.1's extensions-builtin/Lora/networks.py (convert_diffusers_name_to_compvis,
load_network's lora_unet/re_x_proj fallbacks); the script checks that every name lands on a module.
"""
import argparse
import copy
import os
import sys

from make_tiny_checkpoints import save_sorted_safetensors, write_clip_dir, write_text_atomic  # siblings

OPENCLIP_ARCH = "ViT-S-32-alt"  # text tower: width 256, 10 layers, 4 heads, embed_dim 256
OPENCLIP_WIDTH = 256
CLIP_HIDDEN = 32
SIZE_EMBED = 32  # ConcatTimestepEmbedderND outdim (x2 per embedder)
UNET_CHANNELS = 32
RANK = 4


def vae_config(target):
    return {"target": target, "params": {
        "embed_dim": 4, "monitor": "val/rec_loss",
        "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}}


def unet_params(context_dim):
    return {"in_channels": 4, "out_channels": 4, "model_channels": UNET_CHANNELS, "attention_resolutions": [1, 2],
            "num_res_blocks": 2, "channel_mult": [1, 2, 2], "num_head_channels": 16, "use_spatial_transformer": True,
            "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": context_dim,
            "use_checkpoint": False, "legacy": False}


def sdxl_config(clip_dir):
    unet = unet_params(CLIP_HIDDEN + OPENCLIP_WIDTH)
    unet.update({"adm_in_channels": OPENCLIP_WIDTH + 3 * 2 * SIZE_EMBED, "num_classes": "sequential",
                 "spatial_transformer_attn_type": "softmax"})
    size = {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": SIZE_EMBED}}
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025, "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"version": clip_dir, "layer": "hidden", "layer_idx": 2}},
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
             "params": {"arch": OPENCLIP_ARCH, "version": "none", "freeze": True, "layer": "penultimate",
                        "always_return_pooled": True, "legacy": False}},
            {"is_trainable": False, "input_key": "original_size_as_tuple", **copy.deepcopy(size)},
            {"is_trainable": False, "input_key": "crop_coords_top_left", **copy.deepcopy(size)},
            {"is_trainable": False, "input_key": "target_size_as_tuple", **copy.deepcopy(size)}]}},
        "first_stage_config": vae_config("sgm.models.autoencoder.AutoencoderKLInferenceWrapper")}}}


def sd2_config():
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": 1000,
        "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": {"image_size": 32, **unet_params(OPENCLIP_WIDTH)}},
        "first_stage_config": vae_config("ldm.models.autoencoder.AutoencoderKL"),
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"arch": OPENCLIP_ARCH, "version": "none", "freeze": True, "layer": "penultimate"}}}}}


# ---- LoRA names (webui's view) ------------------------------------------------------------------
def lora_layers(state, family):
    """{kohya name: weight key} of the layers a kohya LoRA trains, for this checkpoint's state dict."""
    layers = {}
    for key, tensor in state.items():
        if not key.endswith(".weight") or tensor.dim() != 2:
            continue
        module = key[:-len(".weight")]
        if module.startswith("model.diffusion_model.") and (".transformer_blocks." in module or module.endswith((".proj_in", ".proj_out"))):
            layers["lora_unet_" + module[len("model.diffusion_model."):].replace(".", "_")] = key
    text = {"sdxl": ("conditioner.embedders.1.model.transformer.resblocks.", "lora_te2_"),
            "sd2": ("cond_stage_model.model.transformer.resblocks.", "lora_te_")}[family]
    prefix, kohya = text
    blocks = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    for i in blocks:
        base = f"{prefix}{i}."
        for part in "qkv":
            layers[f"{kohya}text_model_encoder_layers_{i}_self_attn_{part}_proj"] = (base + "attn.in_proj_weight", "qkv".index(part))
        layers[f"{kohya}text_model_encoder_layers_{i}_self_attn_out_proj"] = base + "attn.out_proj.weight"
        layers[f"{kohya}text_model_encoder_layers_{i}_mlp_fc1"] = base + "mlp.c_fc.weight"
        layers[f"{kohya}text_model_encoder_layers_{i}_mlp_fc2"] = base + "mlp.c_proj.weight"
    if family == "sdxl":
        prefix = "conditioner.embedders.0.transformer.text_model.encoder.layers."
        for key in state:
            if key.startswith(prefix) and key.endswith(".weight") and (".self_attn." in key or ".mlp." in key):
                module = key[len("conditioner.embedders.0.transformer."):-len(".weight")]
                layers["lora_te1_" + module.replace(".", "_")] = key
    return dict(sorted(layers.items()))


def webui_module_name(kohya, family):
    """The network_layer_name webui's load_network gives a kohya name (the rules these files use)."""
    import re
    if kohya.startswith("lora_unet_"):
        return "diffusion_model_" + kohya[len("lora_unet_"):]
    if kohya.startswith("lora_te1_text_model"):
        return "0_transformer_text_model" + kohya[len("lora_te1_text_model"):]
    m = re.match(r"lora_te2?_text_model_encoder_layers_(\d+)_(.+)", kohya)
    prefix = "1_model" if kohya.startswith("lora_te2_") else "model"
    rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
    name = f"{prefix}_transformer_resblocks_{m[1]}_{rest}"
    return re.sub(r"_([qkv])_proj$", "", name)  # re_x_proj: the MultiheadAttention itself


def write_lora(torch, state, family, kind, path, seed, relative=0.5):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, source in lora_layers(state, family).items():
        if isinstance(source, tuple):
            key, part = source
            weight = state[key].chunk(3, 0)[part]
        else:
            weight = state[source]
        out_dim, in_dim = weight.shape
        std = relative * weight.float().std().item()
        if kind == "lora":
            s = (std / RANK ** 0.5) ** 0.5
            tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, in_dim, generator=g) * s
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, RANK, generator=g) * s
        elif kind == "loha":
            s = (std / RANK ** 0.5) ** 0.25
            for i in (1, 2):
                tensors[f"{name}.hada_w{i}_a"] = torch.randn(out_dim, RANK, generator=g) * s
                tensors[f"{name}.hada_w{i}_b"] = torch.randn(RANK, in_dim, generator=g) * s
        elif kind == "lokr":
            out_l = max(d for d in range(1, int(out_dim ** 0.5) + 1) if out_dim % d == 0)
            in_m = max(d for d in range(1, int(in_dim ** 0.5) + 1) if in_dim % d == 0)
            s = (std / RANK ** 0.5) ** (1 / 3)
            tensors[f"{name}.lokr_w1"] = torch.randn(out_l, in_m, generator=g) * s
            tensors[f"{name}.lokr_w2_a"] = torch.randn(out_dim // out_l, RANK, generator=g) * s
            tensors[f"{name}.lokr_w2_b"] = torch.randn(RANK, in_dim // in_m, generator=g) * s
        tensors[f"{name}.alpha"] = torch.tensor(float(RANK))
    from safetensors.torch import save_file
    meta = ({"ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(RANK)} if kind == "lora"
            else {"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{kind}"}}'})
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, path, metadata=meta)
    return len(lora_layers(state, family))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", help="webui's models/Stable-diffusion folder")
    ap.add_argument("loradir", help="webui's models/Lora folder")
    ap.add_argument("--repos", required=True, help="the webui install's repositories folder")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    outdir, loradir = os.path.abspath(a.outdir), os.path.abspath(a.loradir)
    os.makedirs(outdir, exist_ok=True)
    os.makedirs(loradir, exist_ok=True)
    repos = os.path.abspath(a.repos)
    sys.path[:0] = [os.path.join(repos, "stable-diffusion-stability-ai"), os.path.join(repos, "generative-models")]

    import torch
    import open_clip
    import transformers
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from ldm.util import instantiate_from_config

    clip_dir = os.path.join(outdir, "tiny-clip-xl")
    write_clip_dir(clip_dir)
    # as webui's sd_disable_initialization does at load time: no downloads, configs only
    real_create = open_clip.create_model_and_transforms
    open_clip.create_model_and_transforms = lambda *args, pretrained=None, **kw: real_create(*args, pretrained=None, **kw)
    transformers.CLIPTextModel.from_pretrained = classmethod(
        lambda cls, p, *args, **kw: transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(p)))
    torch.use_deterministic_algorithms(True)

    def build(cfg, seed):
        torch.manual_seed(seed)
        return instantiate_from_config(OmegaConf.create(cfg).model).eval()

    def randomized(model, seed):
        """Random weights everywhere, constant ones jittered (zero-initialised output convs would
        make prompts irrelevant)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _name, p in sorted(model.named_parameters()):
                if p.is_floating_point() and p.numel() > 0 and bool((p == p.flatten()[0]).all()):
                    c = p.flatten()[0].item()
                    p.add_((0.1 if c != 0 else 0.05) * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    for name, cfg, family, seed in (("tiny-sdxl", sdxl_config(clip_dir), "sdxl", a.seed),
                                    ("tiny-sd2", sd2_config(), "sd2", a.seed + 10)):
        yaml_path = os.path.join(outdir, name + ".yaml")
        write_text_atomic(yaml_path, OmegaConf.to_yaml(OmegaConf.create(cfg)))
        state = randomized(build(cfg, seed), seed + 100)
        state = {k: v for k, v in state.items() if not k.startswith("denoiser.")}  # buffers webui rebuilds
        path = os.path.join(outdir, name + ".safetensors")
        save_sorted_safetensors(state, path)
        check = build(cfg, 12345)
        missing, unexpected = check.load_state_dict(load_file(path), strict=False)
        assert not unexpected and all(k.startswith("denoiser.") for k in missing), (missing[:5], unexpected[:5])
        modules = {n.replace(".", "_") for n, _ in check.model.named_modules()}
        text_root = check.conditioner.embedders if family == "sdxl" else [check.cond_stage_model]
        for i, embedder in enumerate(text_root):
            prefix = f"{i}_" if family == "sdxl" else ""
            modules |= {prefix + n.replace(".", "_") for n, _ in embedder.named_modules()}
        unmapped = [k for k in lora_layers(state, family) if webui_module_name(k, family) not in modules]
        assert not unmapped, f"LoRA names webui would not map: {unmapped[:5]}"
        print(f"{name}: {len(state)} tensors, {sum(v.numel() for v in state.values())} params")
        for kind in (("lora", "loha", "lokr") if family == "sdxl" else ("lora", "loha")):
            lora_name = f"tiny{'xl' if family == 'sdxl' else 'sd2'}-{kind}"
            count = write_lora(torch, state, family, kind, os.path.join(loradir, lora_name + ".safetensors"),
                               seed=a.seed + 1000 + len(kind))
            print(f"{lora_name}: {count} layers")


if __name__ == "__main__":
    main()
