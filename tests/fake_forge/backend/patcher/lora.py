"""backend/patcher/lora.py: merge_lora_to_weight, LoraLoader.refresh, the key maps and load_lora.

Kept from the real code (@ dfdcbab6): merge_lora_to_weight (:84-322) for the "lora" (up, down,
alpha, mid, dora_scale) and "diff" patch types: the weight cloned (or cast) to float32, entries
applied in order (`weight *= strength_model` first when it is not 1; alpha / rank; the result cast
back); LoraLoader.refresh (:351-447): nothing when the patch keys equal the loaded ones, else the
backups put back, the entries of every LoRA concatenated per (key, online_mode) in `lora_patches`
order, the original kept in `backup[key]` on the offload device (the same Parameter when it is
there already), a new Parameter set; online entries go to `layer.forge_online_loras` instead.
The key maps are tests/fork_lora_keys.py's (the real ones convert kohya/diffusers names the same
way for SD 1.x); load_lora reads kohya "lora_down/lora_up/alpha" and "diff" keys.
"""

import torch

from backend import utils


def model_lora_keys_unet(model, key_map={}):
    from tests.fork_lora_keys import unet_keys

    key_map = dict(key_map)
    key_map.update(unet_keys(model))
    return key_map


def model_lora_keys_clip(model, key_map={}):
    from tests.fork_lora_keys import clip_keys

    key_map = dict(key_map)
    key_map.update(clip_keys(model))
    return key_map


def load_lora(lora, to_load):
    patch_dict, loaded = {}, set()
    for name, key in to_load.items():
        up, down = lora.get(f"{name}.lora_up.weight"), lora.get(f"{name}.lora_down.weight")
        if up is not None and down is not None:
            alpha = lora.get(f"{name}.alpha")
            patch_dict[key] = ("lora", (up, down, alpha.item() if alpha is not None else None, None, None))
            loaded.update(k for k in (f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha") if k in lora)
        diff = lora.get(f"{name}.diff")
        if diff is not None:
            patch_dict[key] = ("diff", (diff,))
            loaded.add(f"{name}.diff")
    remaining = {k: v for k, v in lora.items() if k not in loaded}
    return patch_dict, remaining


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight_dtype_backup = None
    if computation_dtype == weight.dtype:
        weight = weight.clone()
    else:
        weight_dtype_backup = weight.dtype
        weight = weight.to(dtype=computation_dtype)
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
        patch_type, v = v
        if patch_type == "diff":
            if strength != 0.0:
                weight += strength * v[0].to(weight.device, weight.dtype)
        elif patch_type == "lora":
            mat1 = v[0].to(weight.device, computation_dtype)
            mat2 = v[1].to(weight.device, computation_dtype)
            alpha = v[2] / mat2.shape[0] if v[2] is not None else 1.0
            lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
            weight += function(((strength * alpha) * lora_diff).type(weight.dtype))
        else:
            raise ValueError(f"fake merge_lora_to_weight: patch type {patch_type} not faked")
        if old_weight is not None:
            weight = old_weight
    if weight_dtype_backup is not None:
        weight = weight.to(dtype=weight_dtype_backup)
    return weight


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])
        self.refreshes = 0  # fake-only: how many times patches were merged

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.refreshes += 1
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current_patches in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current_patches
        for m in set(self.online_backup):
            del m.forge_online_loras
        self.online_backup = []
        for k, w in self.backup.items():
            if not isinstance(w, torch.nn.Parameter):
                w = torch.nn.Parameter(w, requires_grad=False)
            utils.set_attr_raw(self.model, k, w)
        self.backup = {}
        for (key, online_mode), current_patches in all_patches.items():
            parent_layer, child_key, weight = utils.get_attr_with_parent(self.model, key)
            assert isinstance(weight, torch.nn.Parameter)
            if online_mode:
                if not hasattr(parent_layer, "forge_online_loras"):
                    parent_layer.forge_online_loras = {}
                parent_layer.forge_online_loras[child_key] = current_patches
                self.online_backup.append(parent_layer)
                continue
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            weight = merge_lora_to_weight(current_patches, weight, key, computation_dtype=torch.float32)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(weight, requires_grad=False))
        self.loaded_hash = hashes
