#!/usr/bin/env python
"""Generate a random, full-size SDXL 1.0 checkpoint and a "fine-tuned" copy for the fork e2e tests.

Forge and reForge detect the model family from tensor shapes, so only real shapes load there.
These files have SDXL 1.0's key names and shapes (sgm's `model.diffusion_model.`, the CLIP-L text
encoder under `conditioner.embedders.0.transformer.`, OpenCLIP bigG under
`conditioner.embedders.1.model.`, ldm's AutoencoderKL under `first_stage_model.`): the UNet and the
text encoders from tests/ldm_models.py (its stand-ins carry sgm's / open_clip's names and shapes),
the VAE from ldm itself. Every weight random (`init_random_`), in fp16.

The "fine-tune" differs from the base only in a subset of layers (the UNet's weight differences with
a decaying spectrum, as a real fine-tune's; the rest white noise): a few UNet blocks (label_emb,
which takes the pooled `y` vector, input_blocks.4, middle_block.0, output_blocks.4 and .8: about
100 M parameters), CLIP-L's encoder layer 9 (read by SDXL's penultimate-layer context), bigG's layers
29 (context and pooled output) and 31 (pooled only) and its text_projection (pooled only). A fork
holds an SDXL in fp32 on the CPU (about 16 GiB); exact weak weights for all of it would not fit
next to it on a 24 GiB machine, these take about 0.6 GB.

Run it with a fork's python that has ldm in its repositories (reForge's):

    $REFORGE_PYTHON tests/e2e/make_sdxl_checkpoints.py MODELS_DIR --repos $REFORGE/repositories [--seed 0]

Writes into MODELS_DIR (about 6.9 GB each; 7–8 GB of RAM, a few minutes on 2 cores):
    rand-sdxl.safetensors      the "base"
    rand-sdxl-ft.safetensors   the base with the layers above perturbed
    .rand-sdxl.json            sha256 of this script (the files are regenerated when it changes)
"""
import argparse
import hashlib
import json
import os
import struct
import sys

MANIFEST = ".rand-sdxl.json"
NAMES = ("rand-sdxl", "rand-sdxl-ft")
HERE = os.path.dirname(os.path.abspath(__file__))
UNET = "model.diffusion_model."
TUNED_PREFIXES = tuple(UNET + p for p in ("label_emb.", "input_blocks.4.", "middle_block.0.", "output_blocks.4.",
                                          "output_blocks.8.")) + (
    "conditioner.embedders.0.transformer.text_model.encoder.layers.9.",
    "conditioner.embedders.1.model.transformer.resblocks.29.",
    "conditioner.embedders.1.model.transformer.resblocks.31.",
    "conditioner.embedders.1.model.text_projection",
)


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

    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from tests.ldm_models import init_random_, make_sdxl

    model = make_sdxl("sdxl", seed=seed * 10, dtype=torch.float16)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("first_stage_model.")}
    del model
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                    num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    vae = AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=4)
    init_random_(vae, seed * 10 + 1)
    for key, tensor in vae.state_dict().items():
        state["first_stage_model." + key] = tensor.to(torch.float16)
    return state


# The UNet's weight differences have a decaying spectrum, as a real fine-tune's do (white noise is the
# worst case for lean factors): a rank-RANK product with singular values falling as 1/k, plus a little
# noise so that no finite rank holds it exactly.
RANK = 16


def fine_tune(state, seed):
    """The perturbed tensors only (the rest is the base's)."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1000)
    tuned = {}
    for key in sorted(state):
        tensor = state[key]
        if not (key.startswith(TUNED_PREFIXES) and tensor.is_floating_point()):
            continue
        weight = tensor.float()
        scale = 0.15 * weight.std().clamp_min(1e-3)
        noise = torch.randn(tensor.shape, generator=generator)
        if key.startswith(UNET) and tensor.dim() >= 2:
            rows, cols = tensor.shape[0], tensor[0].numel()
            rank = min(RANK, rows, cols)
            up = torch.randn(rows, rank, generator=generator) / (torch.arange(rank) + 1.0)
            down = torch.randn(rank, cols, generator=generator)
            structured = (up @ down).reshape(tensor.shape)
            delta = structured / structured.std().clamp_min(1e-12) + 0.1 * noise
        else:
            delta = noise
        tuned[key] = (weight + scale * delta).to(tensor.dtype)
    return tuned


DTYPES = {"torch.float16": "F16", "torch.float32": "F32", "torch.int64": "I64", "torch.int32": "I32"}


def save(state, path, overrides=None):
    """A safetensors file written tensor by tensor (no second copy of the model in memory)."""
    overrides = overrides or {}
    keys = sorted(state)
    header, offset = {}, 0
    for key in keys:
        tensor = overrides.get(key, state[key])
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": DTYPES[str(tensor.dtype)], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in keys:
            tensor = overrides.get(key, state[key]).contiguous()
            f.write(tensor.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    os.replace(tmp, path)


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
        save(state, os.path.join(args.models_dir, "rand-sdxl.safetensors"))
        tuned = fine_tune(state, args.seed)
        print(f"fine-tune: {len(tuned)} tensors, {sum(t.numel() for t in tuned.values()) / 1e6:.1f} M parameters differ")
        save(state, os.path.join(args.models_dir, "rand-sdxl-ft.safetensors"), tuned)
    with open(os.path.join(args.models_dir, MANIFEST), "w") as f:
        json.dump({"script": script_hash()}, f)
    print("written")


if __name__ == "__main__":
    main()
