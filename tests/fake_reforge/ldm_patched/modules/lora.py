"""ldm_patched/modules/lora.py: load_lora (:37-95), the key maps (:97, :175), calculate_weight (:331-420).

Kept: load_lora maps each kohya name of `to_load` onto its patch key with the first weight
adapter that loads it, else "diff"; calculate_weight applies the entries in order to the weight
it is given, in place (`weight *= strength_model` first when it is not 1), adapters through their
calculate_weight, "diff" as strength * diff. The key maps are tests/fork_lora_keys.py's.
"""

from ldm_patched.modules import weight_adapter


def load_lora(lora, to_load, log_missing=True):
    patch_dict = {}
    loaded_keys = set()
    for x in to_load:
        alpha_name = f"{x}.alpha"
        alpha = None
        if alpha_name in lora.keys():
            alpha = lora[alpha_name].item()
            loaded_keys.add(alpha_name)
        for adapter_cls in weight_adapter.adapters:
            adapter = adapter_cls.load(x, lora, alpha, None, loaded_keys)
            if adapter is not None:
                patch_dict[to_load[x]] = adapter
                loaded_keys.update(adapter.loaded_keys)
                continue
        diff_weight = lora.get(f"{x}.diff")
        if diff_weight is not None:
            patch_dict[to_load[x]] = ("diff", (diff_weight,))
            loaded_keys.add(f"{x}.diff")
    if log_missing:
        missing = [x for x in lora.keys() if x not in loaded_keys]
        if missing:
            print(f"lora key not loaded: {missing[:3]}")
    return patch_dict


def model_lora_keys_clip(model, key_map={}):
    from tests.fork_lora_keys import clip_keys

    key_map.update(clip_keys(model))
    return key_map


def model_lora_keys_unet(model, key_map={}):
    from tests.fork_lora_keys import unet_keys

    key_map.update(unet_keys(model))
    return key_map


def calculate_weight(patches, weight, key, intermediate_dtype=None, original_weights=None):
    import torch

    intermediate_dtype = intermediate_dtype or torch.float32
    for p in patches:
        strength, v, strength_model, offset, function = p[0], p[1], p[2], p[3], p[4]
        if function is None:
            function = lambda a: a  # noqa: E731
        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, weight_adapter.WeightAdapterBase):
            weight = v.calculate_weight(weight, key, strength, strength_model, offset, function, intermediate_dtype, original_weights)
            if old_weight is not None:
                weight = old_weight
            continue
        patch_type, v = v
        if patch_type == "diff":
            if strength != 0.0:
                weight += function(strength * v[0].to(weight.device, weight.dtype))
        else:
            raise ValueError(f"fake calculate_weight: patch type {patch_type} not faked")
        if old_weight is not None:
            weight = old_weight
    return weight
