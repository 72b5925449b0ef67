#!/usr/bin/env python
"""Write a random kohya SDXL LoRA with UNet, te1 and te2 layers for the fork SDXL e2e tests
(tests/e2e/fork_sdxl_e2e.py).

kohya-ss sd-scripts' SDXL names: `lora_unet_<ldm path with _>` for the UNet (sgm's names, which both
forks' model_lora_keys_unet map from their parameter names), `lora_te1_text_model_encoder_layers_N_*`
for CLIP-L and `lora_te2_text_model_encoder_layers_N_*` for OpenCLIP bigG in Hugging Face layout
(q/k/v/out_proj, mlp_fc1/fc2; reForge ldm_patched/modules/lora.py model_lora_keys_clip and Forge
backend/patcher/lora.py map them onto clip_l / clip_g). A subset of layers keeps the forks' LoRA
backups small enough for a 24 GiB machine: every attention and feed-forward projection of the
640-channel transformers input_blocks.4.1 and output_blocks.4.1, CLIP-L layers 0-10 and bigG layers
20-30 (self-attention and MLP), all of which reach the image (SDXL reads both encoders' penultimate
layer). Shapes and each layer's weight scale come from the checkpoint; values from a seeded torch
generator (alpha = rank, scale 1). Run it with a fork's python (torch, safetensors):

    $FORK_PYTHON tests/e2e/make_sdxl_lora.py CHECKPOINT.safetensors OUT.safetensors [--rank 4] [--seed 0]
"""

import argparse
import math
import os

UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers."
TE2 = "conditioner.embedders.1.model.transformer.resblocks."
UNET_BLOCKS = ("input_blocks.4.1.transformer_blocks.", "output_blocks.4.1.transformer_blocks.")
UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TE1_LAYERS = range(0, 11)
TE2_LAYERS = range(20, 31)
HF_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def targets(keys):
    """{kohya name: (checkpoint key of the weight it scales with, row slice or None)}."""
    found = {}
    for key in keys:
        if key.startswith(UNET) and key.endswith(".weight") and any(b in key for b in UNET_BLOCKS):
            module = key[len(UNET):-len(".weight")]
            if module.split(".transformer_blocks.")[1].split(".", 1)[1] in UNET_LAYERS:
                found["lora_unet_" + module.replace(".", "_")] = (key, None)
    for i in TE1_LAYERS:
        for layer in HF_LAYERS:
            found[f"lora_te1_text_model_encoder_layers_{i}_{layer.replace('.', '_')}"] = (f"{TE1}{i}.{layer}.weight", None)
    for i in TE2_LAYERS:
        for n, part in enumerate(("q_proj", "k_proj", "v_proj")):  # OpenCLIP's fused in_proj, split as the forks do
            found[f"lora_te2_text_model_encoder_layers_{i}_self_attn_{part}"] = (f"{TE2}{i}.attn.in_proj_weight", n)
        found[f"lora_te2_text_model_encoder_layers_{i}_self_attn_out_proj"] = (f"{TE2}{i}.attn.out_proj.weight", None)
        found[f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1"] = (f"{TE2}{i}.mlp.c_fc.weight", None)
        found[f"lora_te2_text_model_encoder_layers_{i}_mlp_fc2"] = (f"{TE2}{i}.mlp.c_proj.weight", None)
    return dict(sorted(found.items()))


def write_lora(checkpoint, out, rank=4, seed=0, relative=0.5):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(checkpoint, framework="pt", device="cpu") as f:
        layers = targets(f.keys())
        for name, (key, part) in layers.items():
            weight = f.get_tensor(key).float()
            if part is not None:
                rows = weight.shape[0] // 3
                weight = weight[part * rows:(part + 1) * rows]
            std = weight.std().item()
            s = math.sqrt(relative * std / math.sqrt(rank))
            out_dim, in_dim = weight.shape[0], weight.shape[1]
            tensors[f"{name}.lora_down.weight"] = (torch.randn([rank, in_dim], generator=generator) * s).contiguous()
            tensors[f"{name}.lora_up.weight"] = (torch.randn([out_dim, rank], generator=generator) * s).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                "ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": os.path.splitext(os.path.basename(out))[0]}
    tmp = out + ".part"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, out)
    return layers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--relative", type=float, default=0.5)
    a = ap.parse_args()
    layers = write_lora(a.checkpoint, a.out, a.rank, a.seed, a.relative)
    print(f"wrote {a.out}: {len(layers)} layers ({sum(n.startswith('lora_unet_') for n in layers)} UNet, "
          f"{sum(n.startswith('lora_te1_') for n in layers)} te1, {sum(n.startswith('lora_te2_') for n in layers)} te2)")


if __name__ == "__main__":
    main()
