#!/usr/bin/env python
"""Write a random kohya LoRA of SD 1.5 shapes for the fork e2e tests (tests/e2e/fork_e2e.py).

The layers are tests/e2e/make_tiny_lora.py's (kohya-ss sd-scripts' SD1 defaults: every attention
and feed-forward projection and proj_in/proj_out of each SpatialTransformer, and every CLIP encoder
layer's q/k/v/out_proj and mlp fc1/fc2), read from the checkpoint's safetensors header; values from
a seeded torch generator: each layer's up @ down has elements of about `relative` times the
weight's own standard deviation (alpha = rank, scale 1). Run it with the fork's python (torch,
safetensors):

    $FORK_PYTHON tests/e2e/make_sd15_lora.py CHECKPOINT.safetensors OUT.safetensors [--rank 4] [--seed 0]

The same arguments give the same file.
"""

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make_tiny_lora  # noqa: E402


def write_lora(checkpoint, out, rank=4, seed=0, relative=0.5, name=None):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    header, _ = make_tiny_lora.read_header(checkpoint)
    layers = make_tiny_lora.targets(header)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(checkpoint, framework="pt", device="cpu") as f:
        for layer, (module, shape) in layers.items():
            std = f.get_tensor(module + ".weight").float().std().item()
            s = math.sqrt(relative * std / math.sqrt(rank))
            out_dim, in_dim = shape[0], shape[1]
            tail = [1, 1] if len(shape) == 4 else []
            tensors[f"{layer}.lora_down.weight"] = (torch.randn([rank, in_dim, *tail], generator=generator) * s).contiguous()
            tensors[f"{layer}.lora_up.weight"] = (torch.randn([out_dim, rank, *tail], generator=generator) * s).contiguous()
            tensors[f"{layer}.alpha"] = torch.tensor(float(rank))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                "ss_base_model_version": "sd_v1", "ss_output_name": name or os.path.splitext(os.path.basename(out))[0]}
    tmp = out + ".part"
    save_file(dict(sorted(tensors.items())), tmp, metadata=metadata)
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
    print(f"wrote {a.out}: {len(layers)} layers "
          f"({sum(n.startswith('lora_unet_') for n in layers)} UNet, {sum(n.startswith('lora_te_') for n in layers)} text encoder)")


if __name__ == "__main__":
    main()
