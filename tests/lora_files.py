"""Writers of real LoRA / LyCORIS safetensors files for the ldm-layout SD1 models of
tests/ldm_models.py (key names as kohya-ss sd-scripts and LyCORIS write them for SD1: diffusers
layer names with '.' -> '_', prefixed lora_unet_ / lora_te_).

Every writer returns ``targets``: {kohya layer name: path of the targeted module in the model}
(e.g. "lora_unet_down_blocks_0_attentions_0_proj_in" ->
"model.diffusion_model.input_blocks.1.1.proj_in"), so a test knows which layers a file touches.
Files are deterministic (seeded generator, keys sorted) and the deltas small (~1e-2 per element
at multiplier 1) but clearly non-zero.

The compvis -> diffusers naming assumes SD1's block layout (2 ResBlocks per level, a
downsampler on every level but the last): true of make_sd1("tiny") and make_sd1("sd15").
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

__all__ = ["write_kohya_lora", "write_lycoris", "LYCORIS_KINDS", "kohya_unet_name", "kohya_te_name",
           "attention_targets", "resnet_targets", "norm_targets", "text_encoder_targets", "sdxl_layers"]

LYCORIS_KINDS = ("loha", "lokr", "ia3", "oft", "boft", "oft_diag", "glora", "full", "norm")

_RESNET_SUFFIX = {  # ldm ResBlock child -> diffusers ResnetBlock2D child
    "in_layers.2": "conv1", "out_layers.3": "conv2", "in_layers.0": "norm1", "out_layers.0": "norm2",
    "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut",
}
_ATTN_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def _inner(model):
    """the ldm-layout model (a FakeSdModel's wrapped model, or the model itself)"""
    return model.__dict__.get("inner", model)


def _unet(model):
    return _inner(model).model.diffusion_model


def _check_layout(unet):
    if any(n != 2 for n in unet.num_res_blocks):
        raise ValueError("kohya/diffusers names are only defined here for SD1's layout (num_res_blocks 2)")


def kohya_unet_name(unet, path):
    """diffusers-style kohya name of the UNet module at ``path`` (relative to diffusion_model,
    e.g. "input_blocks.1.1.transformer_blocks.0.attn1.to_q")."""
    _check_layout(unet)
    parts = path.split(".")
    if parts[0] == "time_embed":
        return f"lora_unet_time_embedding_linear_{int(parts[1]) // 2 + 1}"
    if parts[:2] == ["input_blocks", "0"]:
        return "lora_unet_conv_in"
    if parts[:2] == ["out", "2"]:
        return "lora_unet_conv_out"
    if parts[:2] == ["out", "0"]:
        return "lora_unet_conv_norm_out"  # diffusers' name; webui's converter has no rule for it
    if parts[0] == "input_blocks":
        n, child, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
        level, j = (n - 1) // 3, (n - 1) % 3
        if j == 2:
            assert child == 0 and rest == "op", path
            return f"lora_unet_down_blocks_{level}_downsamplers_0_conv"
        block = f"lora_unet_down_blocks_{level}"
        return _block_child_name(block, "attentions" if child == 1 else "resnets", j, rest)
    if parts[0] == "middle_block":
        child, rest = int(parts[1]), ".".join(parts[2:])
        if child == 1:
            return _block_child_name("lora_unet_mid_block", "attentions", 0, rest)
        return _block_child_name("lora_unet_mid_block", "resnets", child // 2, rest)
    if parts[0] == "output_blocks":
        n, child, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
        level, j = n // 3, n % 3
        kind = type(unet.output_blocks[n][child]).__name__
        if kind == "Upsample":
            return f"lora_unet_up_blocks_{level}_upsamplers_0_conv"
        block = f"lora_unet_up_blocks_{level}"
        return _block_child_name(block, "attentions" if kind == "SpatialTransformer" else "resnets", j, rest)
    raise ValueError(f"no diffusers name for {path}")


def _block_child_name(block, kind, index, rest):
    if kind == "resnets":
        rest = _RESNET_SUFFIX[rest]
    return f"{block}_{kind}_{index}_{rest.replace('.', '_')}"


def kohya_te_name(path):
    """kohya name of a text-encoder module at ``path`` relative to cond_stage_model
    (e.g. "transformer.text_model.encoder.layers.0.self_attn.q_proj")."""
    assert path.startswith("transformer.text_model."), path
    return "lora_te_" + path[len("transformer."):].replace(".", "_")


def _transformers(unet, mid):
    blocks = [("input_blocks", unet.input_blocks), ("output_blocks", unet.output_blocks)]
    found = []
    for prefix, seq in blocks:
        for n, block in enumerate(seq):
            for c, child in enumerate(block):
                if type(child).__name__ == "SpatialTransformer":
                    found.append((f"{prefix}.{n}.{c}", child))
    if mid:
        found.append(("middle_block.1", unet.middle_block[1]))
    return sorted(found, key=lambda x: x[0])


def _resblocks(unet, mid):
    found = []
    for prefix, seq in (("input_blocks", unet.input_blocks), ("output_blocks", unet.output_blocks)):
        for n, block in enumerate(seq):
            for c, child in enumerate(block):
                if type(child).__name__ in ("ResBlock", "Downsample", "Upsample"):
                    found.append((f"{prefix}.{n}.{c}", child))
    if mid:
        found += [("middle_block.0", unet.middle_block[0]), ("middle_block.2", unet.middle_block[2])]
    return found


def attention_targets(model, mid=False):
    """UNet paths (relative to diffusion_model) of kohya's default LoRA targets: proj_in/proj_out and
    every attention / feed-forward projection of each SpatialTransformer (middle block with mid)."""
    paths = []
    for prefix, st in _transformers(_unet(model), mid):
        paths += [f"{prefix}.proj_in", f"{prefix}.proj_out"]
        for b in range(len(st.transformer_blocks)):
            paths += [f"{prefix}.transformer_blocks.{b}.{layer}" for layer in _ATTN_LAYERS]
    return paths


def resnet_targets(model, mid=False):
    """UNet paths of LoCon's extra targets: ResBlock conv1/conv2/conv_shortcut/time_emb_proj,
    downsampler and upsampler convs (middle-block ResBlocks with mid)."""
    paths = []
    for prefix, m in _resblocks(_unet(model), mid):
        name = type(m).__name__
        if name == "Downsample":
            paths.append(f"{prefix}.op")
        elif name == "Upsample":
            paths.append(f"{prefix}.conv")
        else:
            paths += [f"{prefix}.in_layers.2", f"{prefix}.out_layers.3", f"{prefix}.emb_layers.1"]
            if isinstance(m.skip_connection, nn.Conv2d):
                paths.append(f"{prefix}.skip_connection")
    return paths


def norm_targets(model, mid=False, resnets=False):
    """UNet paths of the GroupNorm/LayerNorm layers of the SpatialTransformers (and ResBlocks)."""
    unet = _unet(model)
    paths = []
    for prefix, st in _transformers(unet, mid):
        paths.append(f"{prefix}.norm")
        for b in range(len(st.transformer_blocks)):
            paths += [f"{prefix}.transformer_blocks.{b}.norm{i}" for i in (1, 2, 3)]
    if resnets:
        for prefix, m in _resblocks(unet, mid):
            if type(m).__name__ == "ResBlock":
                paths += [f"{prefix}.in_layers.0", f"{prefix}.out_layers.0"]
    return paths


def text_encoder_targets(model, norms=False):
    """cond_stage_model paths of kohya's text-encoder targets (self_attn q/k/v/out_proj, mlp fc1/fc2;
    layer_norm1/2 with norms)."""
    cond = _inner(model).cond_stage_model
    if cond is None:
        return []
    paths = []
    for i in range(len(cond.transformer.text_model.encoder.layers)):
        base = f"transformer.text_model.encoder.layers.{i}"
        if norms:
            paths += [f"{base}.layer_norm1", f"{base}.layer_norm2"]
        else:
            paths += [f"{base}.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
            paths += [f"{base}.mlp.fc1", f"{base}.mlp.fc2"]
    return paths


class _ProjectionShape(nn.Module):
    """Stands for one of q/k/v of a torch MultiheadAttention (one third of its in_proj_weight) when
    a writer asks for a target's weight shape: kohya writes those as separate layers."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight
        self.bias = None


def sdxl_layers(model, unet=True, te1=True, te2=True, norms=False):
    """{kohya name: (module path, module)} of an SDXL model's kohya targets, as kohya-ss sd-scripts
    names them for SDXL: ``lora_unet_<compvis path>`` (every SpatialTransformer's attention and
    feed-forward projections, proj_in/proj_out), ``lora_te1_text_model_encoder_layers_N_…``
    (CLIP-L: self_attn q/k/v/out_proj, mlp fc1/fc2) and ``lora_te2_text_model_encoder_layers_N_…``
    (OpenCLIP-bigG: the same HF names; q/k/v/out_proj are parts of one torch MultiheadAttention,
    which webui's Lora extension merges through in_proj_weight and out_proj).  With norms: the text
    encoders' layer norms instead of the projections (``norm`` networks)."""
    inner = _inner(model)
    out = {}
    if unet:
        dm = inner.model.diffusion_model
        for prefix, st in _transformers(dm, mid=True):
            paths = [f"{prefix}.norm"] if norms else [f"{prefix}.proj_in", f"{prefix}.proj_out"]
            for b in range(len(st.transformer_blocks)):
                layers = [f"norm{i}" for i in (1, 2, 3)] if norms else _ATTN_LAYERS
                paths += [f"{prefix}.transformer_blocks.{b}.{layer}" for layer in layers]
            for p in paths:
                out["lora_unet_" + p.replace(".", "_")] = ("model.diffusion_model." + p, dm.get_submodule(p))
    embedders = inner.conditioner.embedders
    if te1:
        clip_l = embedders[0]
        for i, layer in enumerate(clip_l.transformer.text_model.encoder.layers):
            base = f"transformer.text_model.encoder.layers.{i}"
            children = ("layer_norm1", "layer_norm2") if norms else ("self_attn.q_proj", "self_attn.k_proj",
                                                                   "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
            for c in children:
                out[f"lora_te1_text_model_encoder_layers_{i}_{c.replace('.', '_')}"] = (
                    f"conditioner.embedders.0.{base}.{c}", clip_l.get_submodule(f"{base}.{c}"))
    if te2:
        clip_g = embedders[1]
        for i, block in enumerate(clip_g.model.transformer.resblocks):
            base = f"model.transformer.resblocks.{i}"
            name = f"lora_te2_text_model_encoder_layers_{i}"
            path = f"conditioner.embedders.1.{base}"
            if norms:
                out[f"{name}_layer_norm1"] = (f"{path}.ln_1", block.ln_1)
                out[f"{name}_layer_norm2"] = (f"{path}.ln_2", block.ln_2)
                continue
            for part, weight in zip("qkv", block.attn.in_proj_weight.chunk(3, 0)):
                out[f"{name}_self_attn_{part}_proj"] = (f"{path}.attn.in_proj_weight[{part}]", _ProjectionShape(weight))
            out[f"{name}_self_attn_out_proj"] = (f"{path}.attn.out_proj", block.attn.out_proj)
            out[f"{name}_mlp_fc1"] = (f"{path}.mlp.c_fc", block.mlp.c_fc)
            out[f"{name}_mlp_fc2"] = (f"{path}.mlp.c_proj", block.mlp.c_proj)
    return dict(sorted(out.items()))


def _collect(model, unet_paths, te_paths):
    """{kohya name: (full module path, module)} sorted by kohya name"""
    inner = _inner(model)
    unet = inner.model.diffusion_model
    out = {}
    for p in unet_paths:
        out[kohya_unet_name(unet, p)] = ("model.diffusion_model." + p, unet.get_submodule(p))
    for p in te_paths:
        out[kohya_te_name(p)] = ("cond_stage_model." + p, inner.cond_stage_model.get_submodule(p))
    return dict(sorted(out.items()))


def _save(path, tensors, metadata):
    from safetensors.torch import save_file
    out = {k: tensors[k].detach().to("cpu").contiguous().clone() for k in sorted(tensors)}
    save_file(out, os.fspath(path), metadata=metadata)


def _factorization(dim):
    """(m, n), m * n == dim, m the largest divisor <= sqrt(dim) (LyCORIS' default factor -1)"""
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


def _randn(g, *shape, std):
    return torch.randn(*shape, generator=g, dtype=torch.float32) * std


def _dora_scale(weight, g):
    """per-input-column norm of the layer's weight, shaped as webui's apply_weight_decompose wants
    ((1, in) / (1, in, 1, 1)), times 1 + N(0, 0.05)"""
    w = weight.detach().float().cpu()
    n_in = w.shape[1]
    norm = w.transpose(0, 1).reshape(n_in, -1).norm(dim=1).reshape(1, n_in, *[1] * (w.dim() - 2))
    return norm * (1.0 + _randn(g, *norm.shape, std=0.05))


def write_kohya_lora(path, model, rank=4, seed=0, text_encoder=True, alpha=None, conv=False, mid=False, dora=False,
                     cp=False, metadata=None, layers=None):
    """A kohya-ss LoRA (LoCon with conv=True) for ``model`` at ``path``.

    Keys "<name>.lora_down.weight" / ".lora_up.weight" (+ ".alpha" when alpha is given, else no alpha:
    scale 1; + ".dora_scale" with dora; + ".lora_mid.weight" for 3x3 convs with cp, LyCORIS CP-LoCon).
    Targets: attention_targets(mid) [+ resnet_targets(mid) with conv] [+ text_encoder_targets with
    text_encoder], or ``layers`` ({kohya name: (path, module)}, e.g. sdxl_layers()).  Returns targets
    {kohya name: module path}."""
    if layers is None:
        unet_paths = attention_targets(model, mid) + (resnet_targets(model, mid) if conv else [])
        layers = _collect(model, unet_paths, text_encoder_targets(model) if text_encoder else [])
    g = torch.Generator().manual_seed(seed)
    std = math.sqrt(0.01 / math.sqrt(rank))  # up @ down elements ~ N(0, 0.01^2)
    tensors = {}
    for name, (_, module) in layers.items():
        w = module.weight
        out_dim, in_dim = w.shape[0], w.shape[1]
        if w.dim() == 4:
            kh, kw = w.shape[2:]
            if cp and (kh, kw) != (1, 1):
                tensors[f"{name}.lora_down.weight"] = _randn(g, rank, in_dim, 1, 1, std=std)
                tensors[f"{name}.lora_mid.weight"] = _randn(g, rank, rank, kh, kw, std=1.0 / math.sqrt(rank * kh * kw))
            else:
                tensors[f"{name}.lora_down.weight"] = _randn(g, rank, in_dim, kh, kw, std=std / math.sqrt(kh * kw))
            tensors[f"{name}.lora_up.weight"] = _randn(g, out_dim, rank, 1, 1, std=std)
        else:
            tensors[f"{name}.lora_down.weight"] = _randn(g, rank, in_dim, std=std)
            tensors[f"{name}.lora_up.weight"] = _randn(g, out_dim, rank, std=std)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        if dora:
            tensors[f"{name}.dora_scale"] = _dora_scale(w, g)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)}
    meta.update(metadata or {})
    _save(path, tensors, meta)
    return {k: v[0] for k, v in layers.items()}


def write_lycoris(path, model, kind, seed=0, rank=4, text_encoder=True, conv=False, mid=False, alpha=None,
                  cp=False, metadata=None, layers=None):
    """A LyCORIS file of ``kind`` for ``model`` at ``path``; returns targets {kohya name: module path}.

    loha:  hada_w1_a/_b, hada_w2_a/_b, alpha (default rank); cp=True adds hada_t1/t2 on 3x3 convs
    lokr:  lokr_w1 (full), lokr_w2_a/_b (rank; full 4-D lokr_w2 on convs), alpha (default rank)
    ia3:   weight, on_input (to_k/to_v/k_proj/v_proj on outputs, ff_net_2/mlp_fc2 on inputs); Linear only
    oft:   oft_blocks (4 blocks; kohya/new LyCORIS OFT), alpha only when given (norm constraint)
    boft:  oft_blocks (2, out/4, 4, 4) (LyCORIS BOFT)
    oft_diag: oft_diag (old LyCORIS OFT: orthogonal blocks of size 8)
    glora: a1/a2/b1/b2.weight, alpha (default rank); Linear layers only
    full:  diff (+ diff_b for layers with a bias)
    norm:  w_norm, b_norm on GroupNorm/LayerNorm (transformer norms; ResBlock norms with conv; TE layer norms)
    Layers: attention_targets(mid) [+ resnet_targets(mid) with conv] [+ text encoder], or ``layers``
    ({kohya name: (path, module)}, e.g. sdxl_layers()), filtered to what the kind supports."""
    if kind not in LYCORIS_KINDS:
        raise ValueError(f"unknown LyCORIS kind {kind!r} (one of {LYCORIS_KINDS})")
    if kind in ("ia3", "glora") and conv:
        raise ValueError(f"{kind}: webui supports it on Linear layers only")
    if layers is not None:
        if kind == "ia3":
            layers = {k: v for k, v in layers.items() if k.endswith(("to_k", "to_v", "ff_net_2", "k_proj", "v_proj", "mlp_fc2"))}
    elif kind == "norm":
        unet_paths = norm_targets(model, mid, resnets=conv)
        te_paths = text_encoder_targets(model, norms=True) if text_encoder else []
    else:
        unet_paths = attention_targets(model, mid) + (resnet_targets(model, mid) if conv else [])
        te_paths = text_encoder_targets(model) if text_encoder else []
        if kind == "ia3":
            keep = ("to_k", "to_v", "ff.net.2", "k_proj", "v_proj", "mlp.fc2")
            unet_paths = [p for p in unet_paths if p.endswith(keep)]
            te_paths = [p for p in te_paths if p.endswith(keep)]
    if layers is None:
        layers = _collect(model, unet_paths, te_paths)
    if kind == "glora":
        layers = {k: v for k, v in layers.items() if isinstance(v[1], (nn.Linear, _ProjectionShape))}

    g = torch.Generator().manual_seed(seed)
    a = float(rank if alpha is None else alpha)
    tensors = {}
    for name, (_, module) in layers.items():
        w = module.weight
        shape = tuple(w.shape)
        out_dim = shape[0]
        in_flat = int(w[0].numel())
        t = {}
        if kind == "loha":
            std = math.sqrt(0.08 / math.sqrt(rank))  # each product ~0.08, their Hadamard product ~0.0064
            if cp and len(shape) == 4 and shape[2:] != (1, 1):
                kh, kw = shape[2:]
                for i in (1, 2):
                    t[f"hada_t{i}"] = _randn(g, rank, rank, kh, kw, std=1.0 / math.sqrt(rank * kh * kw))
                    t[f"hada_w{i}_a"] = _randn(g, rank, out_dim, std=std)
                    t[f"hada_w{i}_b"] = _randn(g, rank, shape[1], std=std)
            else:
                for i in (1, 2):
                    t[f"hada_w{i}_a"] = _randn(g, out_dim, rank, std=std)
                    t[f"hada_w{i}_b"] = _randn(g, rank, in_flat, std=std)
            t["alpha"] = torch.tensor(a)
        elif kind == "lokr":
            out_l, out_k = _factorization(out_dim)
            in_m, in_n = _factorization(shape[1])
            t["lokr_w1"] = _randn(g, out_l, in_m, std=0.1)
            if len(shape) == 4:
                t["lokr_w2"] = _randn(g, out_k, in_n, *shape[2:], std=0.1)
            else:
                std = math.sqrt(0.1 / math.sqrt(rank))
                t["lokr_w2_a"] = _randn(g, out_k, rank, std=std)
                t["lokr_w2_b"] = _randn(g, rank, in_n, std=std)
            t["alpha"] = torch.tensor(a)
        elif kind == "ia3":
            on_input = name.endswith(("ff_net_2", "mlp_fc2"))
            t["weight"] = _randn(g, shape[1] if on_input else out_dim, std=0.05)
            t["on_input"] = torch.tensor(on_input)
        elif kind == "oft":
            t["oft_blocks"] = _randn(g, 4, out_dim // 4, out_dim // 4, std=0.01)
            if alpha is not None:
                t["alpha"] = torch.tensor(a)
        elif kind == "boft":
            t["oft_blocks"] = _randn(g, 2, out_dim // 4, 4, 4, std=0.01)
        elif kind == "oft_diag":
            q = _randn(g, out_dim // 8, 8, 8, std=0.01)
            q = q - q.transpose(-1, -2)
            eye = torch.eye(8)
            t["oft_diag"] = (eye + q) @ torch.linalg.inv(eye - q)
        elif kind == "glora":
            std = math.sqrt(0.01 / math.sqrt(rank))
            t["a1.weight"] = _randn(g, rank, shape[1], std=std)
            t["a2.weight"] = _randn(g, shape[1], rank, std=0.07)
            t["b1.weight"] = _randn(g, rank, shape[1], std=std)
            t["b2.weight"] = _randn(g, out_dim, rank, std=std)
            t["alpha"] = torch.tensor(a)
        elif kind == "full":
            t["diff"] = _randn(g, *shape, std=0.01)
            if getattr(module, "bias", None) is not None:
                t["diff_b"] = _randn(g, out_dim, std=0.01)
        elif kind == "norm":
            t["w_norm"] = _randn(g, *shape, std=0.01)
            t["b_norm"] = _randn(g, *shape, std=0.01)
        for suffix, value in t.items():
            tensors[f"{name}.{suffix}"] = value
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{kind}"}}'}
    meta.update(metadata or {})
    _save(path, tensors, meta)
    return {k: v[0] for k, v in layers.items()}
