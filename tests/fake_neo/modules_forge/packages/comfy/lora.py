"""modules_forge/packages/comfy/lora.py (Neo 2.26): load_lora (:42-108) and the key maps.

Kept: load_lora(lora, to_load) maps each kohya name of `to_load` onto its patch key with the first
weight adapter that loads it (alpha and dora_scale read first), "diff" for `.diff`, and returns
(patch_dict, the keys it did not load). The key maps are tests/fork_lora_keys.py's (the real ones
convert kohya/diffusers names the same way for SD 1.x)."""

from modules_forge.packages.comfy import weight_adapter


def load_lora(lora, to_load):
    patch_dict = {}
    loaded_keys = set()
    for x in to_load:
        alpha_name = f"{x}.alpha"
        alpha = None
        if alpha_name in lora.keys():
            alpha = lora[alpha_name].item()
            loaded_keys.add(alpha_name)
        dora_scale_name = f"{x}.dora_scale"
        dora_scale = None
        if dora_scale_name in lora.keys():
            dora_scale = lora[dora_scale_name]
            loaded_keys.add(dora_scale_name)
        for adapter_cls in weight_adapter.adapters:
            adapter = adapter_cls.load(x, lora, alpha, dora_scale, loaded_keys)
            if adapter is not None:
                patch_dict[to_load[x]] = adapter
                loaded_keys.update(adapter.loaded_keys)
                continue
        diff_weight = lora.get(f"{x}.diff")
        if diff_weight is not None:
            patch_dict[to_load[x]] = ("diff", (diff_weight,))
            loaded_keys.add(f"{x}.diff")
    remaining_dict = {x: y for x, y in lora.items() if x not in loaded_keys}
    return patch_dict, remaining_dict


def model_lora_keys_clip(model, key_map={}):
    from tests.fork_lora_keys import clip_keys

    key_map.update(clip_keys(model))
    return key_map


def model_lora_keys_unet(model, key_map={}):
    from tests.fork_lora_keys import unet_keys

    key_map.update(unet_keys(model))
    return key_map
