#!/usr/bin/env python
"""Generate tiny, randomly initialised SD1-architecture checkpoints that webui 1.10.1 loads.

Used by the end-to-end tests (tests/e2e/test_webui_e2e.py). Run it with the WEBUI's python,
which has torch, omegaconf, transformers, safetensors and clip; ldm comes from the webui install:

    $SD_WEBUI_PYTHON tests/e2e/make_tiny_checkpoints.py MODELS_DIR --repos $SD_WEBUI_PATH/repositories
        [--clip-dir MODELS_DIR/tiny-clip] [--seed 0]

Writes into MODELS_DIR (deterministically: tensors and JSON header in sorted key order):
    tiny-sd15.safetensors          + tiny-sd15.yaml          (LatentDiffusion, UNet in_channels 4)
    tiny-sd15-ft.safetensors       + tiny-sd15-ft.yaml       (same, UNet + text encoder perturbed:
                                                              a stand-in for a DreamBooth fine-tune)
    tiny-sd15-inpaint.safetensors  + tiny-sd15-inpaint.yaml  (LatentInpaintDiffusion, in_channels 9)
    .tiny-checkpoints.json         (sha256 of this script and of every file written)
and into --clip-dir a Hugging Face CLIPTextModel config + CLIP tokenizer files (no weights: webui
takes the text-encoder weights from the checkpoint). The yamls name the clip folder by absolute path.
"""
import argparse
import copy
import gzip
import importlib.util
import json
import os
import sys

from make_tiny_lora import sha256_file, write_safetensors_file  # stdlib-only sibling

MANIFEST = ".tiny-checkpoints.json"

# ---- architecture -------------------------------------------------------------------------
CLIP_HIDDEN = 32          # text encoder hidden size == UNet context_dim
CLIP_LAYERS = 4
CLIP_HEADS = 4
CLIP_INTERMEDIATE = 64
UNET_CHANNELS = 32        # GroupNorm(32) in ldm: channels must be multiples of 32
UNET_MULT = [1, 2, 2]     # three levels: 32, 64, 64
UNET_ATTN = [1, 2]        # attention at ds 1 and 2 (upper two levels), none at ds 4, like SD1
UNET_HEADS = 2
VAE_CH = 32
VAE_MULT = [1, 1, 1, 1]   # four levels -> 8x downsampling, as webui assumes (opt_f = 8)
VAE_RES_BLOCKS = 1


def clip_config():
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": CLIP_HIDDEN,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": CLIP_INTERMEDIATE,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "num_attention_heads": CLIP_HEADS,
        "num_hidden_layers": CLIP_LAYERS,
        "projection_dim": CLIP_HIDDEN,
        "vocab_size": 49408,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }


def model_config(clip_dir, inpaint=False):
    cfg = {
        "model": {
            "base_learning_rate": 1.0e-04,
            "target": "ldm.models.diffusion.ddpm.LatentInpaintDiffusion" if inpaint
            else "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085,
                "linear_end": 0.0120,
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": 1000,
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": 64,
                "channels": 4,
                "cond_stage_trainable": False,
                "conditioning_key": "hybrid" if inpaint else "crossattn",
                "monitor": "val/loss_simple_ema",
                "scale_factor": 0.18215,
                "use_ema": False,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {
                        "image_size": 32,
                        "in_channels": 9 if inpaint else 4,
                        "out_channels": 4,
                        "model_channels": UNET_CHANNELS,
                        "attention_resolutions": UNET_ATTN,
                        "num_res_blocks": 2,
                        "channel_mult": UNET_MULT,
                        "num_heads": UNET_HEADS,
                        "use_spatial_transformer": True,
                        "transformer_depth": 1,
                        "context_dim": CLIP_HIDDEN,
                        "use_checkpoint": False,
                        "legacy": False,
                    },
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": 4,
                        "monitor": "val/rec_loss",
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": 4,
                            "resolution": 256,
                            "in_channels": 3,
                            "out_ch": 3,
                            "ch": VAE_CH,
                            "ch_mult": VAE_MULT,
                            "num_res_blocks": VAE_RES_BLOCKS,
                            "attn_resolutions": [],
                            "dropout": 0.0,
                        },
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                    "params": {"version": clip_dir},
                },
            },
        }
    }
    if inpaint:
        cfg["model"]["params"]["finetune_keys"] = None  # as v1-inpainting-inference.yaml
    return cfg


# ---- CLIP tokenizer files from the BPE merges shipped by clip-anytorch / open_clip ------------
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def find_bpe():
    for mod in ("clip", "open_clip"):
        spec = importlib.util.find_spec(mod)
        if spec and spec.submodule_search_locations:
            p = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
            if os.path.exists(p):
                return p
    raise SystemExit("bpe_simple_vocab_16e6.txt.gz not found (install clip-anytorch or open_clip_torch)")


def write_clip_dir(clip_dir):
    os.makedirs(clip_dir, exist_ok=True)
    merges = gzip.open(find_bpe()).read().decode("utf-8").split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]          # same slice as CLIP's SimpleTokenizer
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    files = {
        "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "config.json": json.dumps(clip_config(), indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps({
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2, sort_keys=True) + "\n",
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
            "errors": "replace", "add_prefix_space": False,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2, sort_keys=True) + "\n",
    }
    written = []
    for name, text in files.items():
        path = os.path.join(clip_dir, name)
        write_text_atomic(path, text)
        written.append(path)
    return written


def write_text_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- deterministic safetensors writer ---------------------------------------------------------
def save_sorted_safetensors(state_dict, path):
    import torch
    dtypes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.bool: "BOOL", torch.float64: "F64"}
    header, blobs, offset = {}, [], 0
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[k] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    write_safetensors_file(path, header, blobs, {"format": "pt"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", help="webui's models/Stable-diffusion folder")
    ap.add_argument("--repos", required=True, help="the webui install's repositories folder (holds stable-diffusion-stability-ai)")
    ap.add_argument("--clip-dir", default=None, help="where the text-encoder config/tokenizer go (default: OUTDIR/tiny-clip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ft-scale", type=float, default=0.2, help="perturbation, relative to each tensor's std")
    a = ap.parse_args()
    outdir = os.path.abspath(a.outdir)
    clip_dir = os.path.abspath(a.clip_dir or os.path.join(outdir, "tiny-clip"))
    os.makedirs(outdir, exist_ok=True)
    ldm_root = os.path.join(os.path.abspath(a.repos), "stable-diffusion-stability-ai")
    if not os.path.isdir(os.path.join(ldm_root, "ldm")):
        raise SystemExit(f"ldm not found under {ldm_root}")
    sys.path.insert(0, ldm_root)
    manifest_path = os.path.join(outdir, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # stale until every file below is written again
    written = []

    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    import transformers
    import ldm.modules.encoders.modules as enc
    from ldm.util import instantiate_from_config

    written += write_clip_dir(clip_dir)
    # FrozenCLIPEmbedder calls CLIPTextModel.from_pretrained(version); the folder has no weights
    # (webui does the same: config only, weights from the checkpoint), so build from the config.
    enc.CLIPTextModel = type("CLIPTextModelFromConfig", (transformers.CLIPTextModel,), {
        "from_pretrained": classmethod(lambda cls, p, *args, **kw:
                                       transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(p)))})

    torch.use_deterministic_algorithms(True)

    def build(cfg, seed):
        torch.manual_seed(seed)
        m = instantiate_from_config(OmegaConf.create(cfg).model)
        return m.eval()

    def pretend_trained(m, seed):
        """Fresh ldm init leaves constant tensors: zero_module convs (UNet output == 0, so prompts
        have no effect), norm weights 1 / biases 0. With LayerNorm bias 0 the text encoder output
        has mean ~0 and webui's emphasis renormalisation (z * mean_before / mean_after) gives 0/0
        = NaN for some prompts. Jitter every constant parameter, give final_layer_norm a bias."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(m.named_parameters()):
                if p.is_floating_point() and p.numel() > 0 and bool((p == p.flatten()[0]).all()):
                    c = p.flatten()[0].item()
                    p.add_((0.1 if c != 0 else 0.05) * torch.randn(p.shape, generator=g, dtype=p.dtype))
            m.cond_stage_model.transformer.text_model.final_layer_norm.bias.add_(0.05)
        return m

    def state(m):
        return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}

    def emit(name, cfg, sd):
        yaml_path = os.path.join(outdir, name + ".yaml")
        write_text_atomic(yaml_path, OmegaConf.to_yaml(OmegaConf.create(cfg)))
        st_path = os.path.join(outdir, name + ".safetensors")
        save_sorted_safetensors(sd, st_path)
        # verify: the key set loads strictly into a fresh instance built from the written yaml
        m2 = build(OmegaConf.to_container(OmegaConf.load(yaml_path)), 12345)
        loaded = load_file(st_path)
        m2.load_state_dict(loaded, strict=True)
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
        written.extend([yaml_path, st_path])
        h = sha256_file(st_path)
        n = sum(v.numel() for v in sd.values())
        print(f"{name}: {len(sd)} tensors, {n} params, {os.path.getsize(st_path)} bytes, sha256 {h[:10]}")

    base_cfg = model_config(clip_dir)
    base = state(pretend_trained(build(base_cfg, a.seed), a.seed + 100))
    emit("tiny-sd15", base_cfg, base)

    # fake "DreamBooth" fine-tune: perturb every floating UNet and text-encoder tensor
    g = torch.Generator().manual_seed(a.seed + 1)
    ft = {}
    for k, v in base.items():
        if v.is_floating_point() and (k.startswith("model.diffusion_model.") or k.startswith("cond_stage_model.")):
            scale = a.ft_scale * (v.float().std().item() if v.numel() > 1 else 0.0) or a.ft_scale * 0.1
            v = v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
        ft[k] = v
    changed = [k for k in base if not torch.equal(base[k], ft[k])]
    assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in changed)
    emit("tiny-sd15-ft", copy.deepcopy(base_cfg), ft)

    inp_cfg = model_config(clip_dir, inpaint=True)
    emit("tiny-sd15-inpaint", inp_cfg, state(pretend_trained(build(inp_cfg, a.seed + 2), a.seed + 102)))

    manifest = {
        "generator_sha256": sha256_file(os.path.abspath(__file__)),
        "files": {os.path.relpath(p, outdir): sha256_file(p) for p in sorted(written)},
    }
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(written)} files and {MANIFEST} into {outdir}")


if __name__ == "__main__":
    main()
