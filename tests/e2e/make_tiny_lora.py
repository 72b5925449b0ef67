#!/usr/bin/env python
"""Write a real kohya-format LoRA for the e2e tiny checkpoint (tests/e2e/make_tiny_checkpoints.py).

Stdlib only (the e2e tests run under any python): layer names and shapes come from the
checkpoint's safetensors header, values from a seeded generator, so the file is byte-identical
on every run.

    python tests/e2e/make_tiny_lora.py CHECKPOINT.safetensors OUT.safetensors [--rank 4] [--seed 0]

Targets (kohya-ss sd-scripts' defaults for SD1): every >= 2-D weight of each SpatialTransformer
(proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2; middle block
included) and of each CLIP encoder layer (self_attn q/k/v/out_proj, mlp fc1/fc2). Names are
diffusers-style with '.' -> '_' (lora_unet_down_blocks_{i}_attentions_{j}_..., lora_te_text_model_
encoder_layers_{n}_...), derived from the ldm names for SD1's block layout (num_res_blocks 2,
attention at index 1 of a block) and checked with a copy of webui 1.10.1's
extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis: every name must land on a
module of the checkpoint (webui only logs unmatched keys at debug level).
"""

import argparse
import array
import hashlib
import json
import math
import os
import random
import re
import struct
import sys

UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model.encoder.layers."


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_f32(path, header, data_start, key):
    info = header[key]
    if info["dtype"] != "F32":
        raise ValueError(f"{key}: expected F32, got {info['dtype']}")
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        values = array.array("f")
        values.frombytes(f.read(end - begin))
    if sys.byteorder != "little":
        values.byteswap()
    return values


def kohya_name(module_path):
    """kohya name of an ldm module path ("model.diffusion_model.input_blocks.1.1.proj_in",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj")."""
    if module_path.startswith("cond_stage_model.transformer.text_model."):
        return "lora_te_" + module_path[len("cond_stage_model.transformer."):].replace(".", "_")
    assert module_path.startswith(UNET), module_path
    parts = module_path[len(UNET):].split(".")
    rest = "_".join(parts[3:] if parts[0] != "middle_block" else parts[2:])
    if parts[0] == "input_blocks":
        n, child = int(parts[1]), int(parts[2])
        assert child == 1 and n >= 1, module_path
        return f"lora_unet_down_blocks_{(n - 1) // 3}_attentions_{(n - 1) % 3}_{rest}"
    if parts[0] == "output_blocks":
        n, child = int(parts[1]), int(parts[2])
        assert child == 1, module_path
        return f"lora_unet_up_blocks_{n // 3}_attentions_{n % 3}_{rest}"
    if parts[0] == "middle_block":
        assert parts[1] == "1", module_path
        return f"lora_unet_mid_block_attentions_0_{rest}"
    raise ValueError(f"no kohya name for {module_path}")


def webui_compvis_name(key):
    """webui 1.10.1's convert_diffusers_name_to_compvis (SD1; the attention/text-encoder rules)."""
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, suffix = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + i * 3 + j}_{1 if kind == 'attentions' else 0}_{suffix}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{m[3]}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, suffix = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{i * 3 + j}_{1 if kind == 'attentions' else 0}_{suffix}"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return None


def webui_layer_name(module_path):
    """The name webui's assign_network_names_to_compvis_modules gives the module."""
    if module_path.startswith("cond_stage_model."):
        return module_path[len("cond_stage_model."):].replace(".", "_")
    return module_path[len("model."):].replace(".", "_")


def targets(header):
    """{kohya name: (module path, weight shape)}, sorted."""
    transformers = sorted(k[:-len(".proj_in.weight")] for k in header
                          if k.startswith(UNET) and k.endswith(".proj_in.weight"))
    found = {}
    for key, info in header.items():
        if not key.endswith(".weight") or len(info["shape"]) < 2:
            continue
        module = key[:-len(".weight")]
        in_transformer = any(module.startswith(t + ".") for t in transformers)
        if in_transformer or (key.startswith(TEXT) and (".self_attn." in key or ".mlp." in key)):
            if len(info["shape"]) == 4 and info["shape"][2:] != [1, 1]:
                continue  # only 1x1 convs (proj_in/proj_out of a conv-projection transformer)
            found[kohya_name(module)] = (module, info["shape"])
    if not transformers or not any(n.startswith("lora_te_") for n in found):
        raise ValueError("no SpatialTransformer / text-encoder layers found: not an SD1 ldm checkpoint?")
    # the names must map, through webui's converter, onto modules of this model
    modules = {webui_layer_name(k[:-len(".weight")]) for k in header if k.endswith(".weight")}
    bad = {name: webui_compvis_name(name) for name, _ in found.items() if webui_compvis_name(name) not in modules}
    if bad:
        raise ValueError(f"LoRA names webui would not match: {bad}")
    return dict(sorted(found.items()))


def write_lora(checkpoint, out, rank=4, seed=0, relative=0.5, name=None):
    """Each layer's delta up @ down has elements ~ N(0, (relative * std(weight))^2); alpha = rank
    (scale 1). Returns {kohya name: module path}."""
    header, data_start = read_header(checkpoint)
    layers = targets(header)
    rng = random.Random(seed)
    tensors = {}
    for name, (module, shape) in layers.items():
        w = read_f32(checkpoint, header, data_start, module + ".weight")
        mean = sum(w) / len(w)
        std = math.sqrt(sum((v - mean) ** 2 for v in w) / max(1, len(w) - 1))
        s = math.sqrt(relative * std / math.sqrt(rank))  # sum of rank products of two N(0, s^2)
        out_dim, in_dim = shape[0], shape[1]
        tail = [1, 1] if len(shape) == 4 else []
        tensors[f"{name}.lora_down.weight"] = ([rank, in_dim, *tail], [rng.gauss(0.0, s) for _ in range(rank * in_dim)])
        tensors[f"{name}.lora_up.weight"] = ([out_dim, rank, *tail], [rng.gauss(0.0, s) for _ in range(out_dim * rank)])
        tensors[f"{name}.alpha"] = ([], [float(rank)])
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                "ss_base_model_version": "sd_v1", "ss_output_name": name or os.path.splitext(os.path.basename(out))[0]}
    save_safetensors(out, tensors, metadata)
    return {name: module for name, (module, _) in layers.items()}


def save_safetensors(path, tensors, metadata):
    header, blobs, offset = {}, [], 0
    for key in sorted(tensors):
        shape, values = tensors[key]
        data = array.array("f", values)
        if sys.byteorder != "little":
            data.byteswap()
        raw = data.tobytes()
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    write_safetensors_file(path, header, blobs, metadata)


def write_safetensors_file(path, header, blobs, metadata):
    """A safetensors file from its header entries (sorted keys) and raw tensor bytes, written
    atomically; the same tensors always give the same bytes. Shared with make_tiny_checkpoints.py."""
    header = dict(header, __metadata__=metadata)
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
