#!/usr/bin/env python
"""Generate a random, full-size SD 1.5 checkpoint and a "fine-tuned" copy for the fork e2e tests.

Forge and reForge detect the model family from tensor shapes, so the tiny models of
make_tiny_checkpoints.py do not load there. These files have SD 1.5's real key names and shapes
(686 UNet, 248 VAE, 197 text-encoder tensors), built from ldm's own classes and transformers'
CLIPTextModel, every weight random (ldm zero-initialises 39 output weights: here they are random
too, or the UNet predicts zero noise). Run it with the fork's python (torch, transformers,
safetensors, and ldm from the fork's repositories/):

    $FORK_PYTHON tests/e2e/make_sd15_checkpoints.py MODELS_DIR --repos $FORK/repositories [--seed 0]

Writes into MODELS_DIR, fp16:
    rand-sd15.safetensors      the "base"
    rand-sd15-ft.safetensors   the base with every UNet weight and the text encoder's last layer perturbed
    .rand-sd15.json            sha256 of this script (the files are regenerated when it changes)
About 2.1 GB each; about a minute and 6 GB of RAM on a 2-core CPU.
"""
import argparse
import hashlib
import json
import os
import sys

MANIFEST = ".rand-sd15.json"
NAMES = ("rand-sd15", "rand-sd15-ft")
HERE = os.path.dirname(os.path.abspath(__file__))


def script_hash():
    with open(os.path.abspath(__file__), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def up_to_date(models_dir):
    try:
        with open(os.path.join(models_dir, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return manifest.get("script") == script_hash() and all(
        os.path.isfile(os.path.join(models_dir, f"{name}.safetensors")) for name in NAMES)


def build(seed):
    import torch
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from tests.ldm_models import init_random_

    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                    num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    vae = AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=4)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                        projection_dim=768, bos_token_id=49406, eos_token_id=49407))
    state = {}
    for prefix, module, offset in (("model.diffusion_model.", unet, 0), ("first_stage_model.", vae, 1),
                                   ("cond_stage_model.transformer.", clip, 2)):
        init_random_(module, seed * 10 + offset)
        for key, tensor in module.state_dict().items():
            if module is clip and not key.startswith("text_model."):
                key = "text_model." + key  # transformers 5 dropped the text_model level from CLIPTextModel's keys
            state[prefix + key] = tensor
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return state


def fine_tune(state, seed):
    import torch

    generator = torch.Generator().manual_seed(seed + 1000)
    tuned = {}
    for key, tensor in state.items():
        touched = key.startswith("model.diffusion_model.") or key.startswith("cond_stage_model.transformer.text_model.encoder.layers.11.")
        if touched and tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator)
            tensor = tensor + 0.15 * tensor.float().std().clamp_min(1e-3) * noise
        tuned[key] = tensor
    return tuned


def save(state, path):
    import torch
    from safetensors.torch import save_file

    out = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sorted(state.items())}
    save_file(out, path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models_dir")
    parser.add_argument("--repos", required=True, help="the fork's repositories/ folder (ldm comes from there)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.models_dir, exist_ok=True)
    if up_to_date(args.models_dir):
        print("up to date")
        return
    sys.path.insert(0, os.path.join(args.repos, "stable-diffusion-stability-ai"))
    import torch

    with torch.no_grad():
        state = build(args.seed)
        save(state, os.path.join(args.models_dir, "rand-sd15.safetensors"))
        save(fine_tune(state, args.seed), os.path.join(args.models_dir, "rand-sd15-ft.safetensors"))
    with open(os.path.join(args.models_dir, MANIFEST), "w") as f:
        json.dump({"script": script_hash()}, f)
    print("written")


if __name__ == "__main__":
    main()
