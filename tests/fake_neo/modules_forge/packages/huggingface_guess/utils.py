"""modules_forge/packages/huggingface_guess/utils.py (Neo 2.26): what process_clip_state_dict uses,
re-written for the fake with the real behaviour: state_dict_prefix_replace (:5-15; with filter_keys a
fresh dict of the renamed keys only), _transformers_convert (:18-58; OpenCLIP names to Hugging Face
names, the fused `attn.in_proj_*` split into q/k/v row blocks) and clip_text_transformers_convert
(:61-71; the projection kept as `text_projection.weight` when it is one already, else transposed)."""

OPENCLIP_TOP = {"positional_embedding": "embeddings.position_embedding.weight",
                "token_embedding.weight": "embeddings.token_embedding.weight",
                "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}


def state_dict_prefix_replace(state_dict, replace_prefix, filter_keys=False):
    out = {} if filter_keys else state_dict
    for old, new in replace_prefix.items():
        for key in [k for k in state_dict if k.startswith(old)]:
            out[new + key[len(old):]] = state_dict.pop(key)
    return out


def _transformers_convert(sd, prefix_from, prefix_to, number):
    for old, new in OPENCLIP_TOP.items():
        if prefix_from + old in sd:
            sd[prefix_to + new] = sd.pop(prefix_from + old)
    for block in range(number):
        source, target = f"{prefix_from}transformer.resblocks.{block}.", f"{prefix_to}encoder.layers.{block}."
        for old, new in OPENCLIP_BLOCK.items():
            for kind in ("weight", "bias"):
                if f"{source}{old}.{kind}" in sd:
                    sd[f"{target}{new}.{kind}"] = sd.pop(f"{source}{old}.{kind}")
        for kind in ("weight", "bias"):
            fused = sd.pop(f"{source}attn.in_proj_{kind}", None)
            if fused is not None:
                rows = fused.shape[0] // 3
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    sd[f"{target}self_attn.{name}.{kind}"] = fused[rows * i:rows * (i + 1)]
    return sd


def clip_text_transformers_convert(sd, prefix_from, prefix_to):
    sd = _transformers_convert(sd, prefix_from, f"{prefix_to}text_model.", 32)
    if f"{prefix_from}text_projection.weight" in sd:
        sd[f"{prefix_to}text_projection.weight"] = sd.pop(f"{prefix_from}text_projection.weight")
    if f"{prefix_from}text_projection" in sd:
        sd[f"{prefix_to}text_projection.weight"] = sd.pop(f"{prefix_from}text_projection").transpose(0, 1).contiguous()
    return sd
