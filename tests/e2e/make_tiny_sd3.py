#!/usr/bin/env python
"""Write a tiny random SD3-style diffusion model (MMDiT), a random subject LoRA for it, and a CLIP-L text
encoder file for ComfyUI's SD3 CLIP loader, for tests/e2e/test_comfyui_dit_e2e.py.

Run it with ComfyUI's python from the ComfyUI folder (it builds ComfyUI's own MMDiT class,
comfy/ldm/modules/diffusionmodules/mmdit.py, and fills every weight from a seeded generator, so the key
names and shapes are the ones ComfyUI's model detection reads back: comfy/model_detection.py derives
the MMDiT config from the state dict, hidden size 64 × depth):

    cd $COMFYUI_PATH && $COMFYUI_PYTHON $REPO/tests/e2e/make_tiny_sd3.py models/ [--depth 2] [--clip-from CKPT]

Writes models/diffusion_models/tiny-sd3.safetensors (MMDiT keys, no prefix: UNETLoader's format),
models/loras/tiny-sd3-subject.safetensors (kohya-style lora_up/lora_down/alpha under ComfyUI's generic
`diffusion_model.<module>` names, on every attention and MLP Linear of the joint blocks) and, with
--clip-from an SD 1.x checkpoint, models/text_encoders/tiny-sd3-clip-l.safetensors (its CLIP-L text
encoder in fp16: ComfyUI's SD3 CLIP with clip_l only pads it to the 4096-wide context and a 2048-wide
pooled vector, the real SD3 widths). With --flux, also models/diffusion_models/one-block-flux-dev.safetensors
(see make_flux_dev_shapes). The same arguments give the same files.
"""

import argparse
import math
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONTEXT, POOLED = 4096, 2048  # SD3's text widths (ComfyUI's SD3 CLIP pads to them)


def make_model(depth, seed):
    sys.path.insert(0, os.getcwd())
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as main.py --cpu: model_management must not look for CUDA
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ops

    hidden = 64 * depth
    model = mmdit.MMDiT(patch_size=2, in_channels=16, out_channels=16, depth=depth, adm_in_channels=POOLED,
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": CONTEXT, "out_features": hidden}},
                        pos_embed_max_size=16, num_patches=256, pos_embed_scaling_factor=None, input_size=None,
                        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("bias"):
            value = torch.randn(tensor.shape, generator=generator) * 0.02
        elif tensor.ndim >= 2:
            fan_in = tensor[0].numel() if key != "pos_embed" else tensor.shape[-1]
            value = torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in)
        else:  # norm scales
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        state[key] = value.to(torch.float32).contiguous()
    return state


def make_flux_dev_shapes():
    """A Flux dev diffusion model with one double block and no single block, all zeros in bf16 (0.8 GB):
    ComfyUI's model detection fixes Flux's hidden size (3072) and reads the rest from the keys
    (guidance_in present: dev, comfy/supported_models.py Flux). It is only loaded, never sampled:
    PG must refuse it by name before sampling."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ldm.flux.model as flux
    import comfy.ops

    model = flux.Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                      hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=0, axes_dim=[16, 56, 56],
                      theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, dtype=torch.bfloat16, device="meta",
                      operations=comfy.ops.disable_weight_init)
    return {key: torch.zeros(tensor.shape, dtype=torch.bfloat16) for key, tensor in model.state_dict().items()}


def make_lora(state, rank, seed, relative=0.5):
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for key in sorted(state):
        if not key.startswith("joint_blocks.") or not key.endswith(".weight") or state[key].ndim != 2:
            continue
        if not any(part in key for part in (".attn.qkv.", ".attn.proj.", ".mlp.fc1.", ".mlp.fc2.")):
            continue
        weight = state[key]
        out_features, in_features = weight.shape
        up = torch.randn(out_features, rank, generator=generator)
        down = torch.randn(rank, in_features, generator=generator)
        scale = relative * float(weight.std()) / float((up @ down).std())
        name = "diffusion_model." + key[:-len(".weight")]
        lora[f"{name}.lora_up.weight"] = (up * math.sqrt(scale)).contiguous()
        lora[f"{name}.lora_down.weight"] = (down * math.sqrt(scale)).contiguous()
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora


def write_clip(checkpoint, out):
    prefix = "cond_stage_model.transformer."
    with safe_open(checkpoint, "pt") as f:
        state = {k[len(prefix):]: f.get_tensor(k).to(torch.float16).contiguous()
                 for k in f.keys() if k.startswith(prefix + "text_model.")}
    if "text_model.encoder.layers.0.mlp.fc1.weight" not in state:
        raise SystemExit(f"{checkpoint} has no CLIP-L text encoder under {prefix}text_model.")
    save_file(state, out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--clip-from")
    parser.add_argument("--flux", action="store_true", help="also write a one-block Flux dev (zeros, 0.8 GB)")
    args = parser.parse_args()
    for folder in ("diffusion_models", "loras", "text_encoders"):
        os.makedirs(os.path.join(args.models, folder), exist_ok=True)
    state = make_model(args.depth, args.seed)
    save_file(state, os.path.join(args.models, "diffusion_models", "tiny-sd3.safetensors"))
    save_file(make_lora(state, args.rank, args.seed + 1), os.path.join(args.models, "loras", "tiny-sd3-subject.safetensors"))
    if args.clip_from:
        write_clip(args.clip_from, os.path.join(args.models, "text_encoders", "tiny-sd3-clip-l.safetensors"))
    print(f"tiny SD3: depth {args.depth}, {sum(t.numel() for t in state.values())} parameters")
    if args.flux:
        save_file(make_flux_dev_shapes(), os.path.join(args.models, "diffusion_models", "one-block-flux-dev.safetensors"))


if __name__ == "__main__":
    main()
