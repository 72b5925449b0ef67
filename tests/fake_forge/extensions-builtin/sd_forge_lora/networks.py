"""extensions-builtin/sd_forge_lora/networks.py: load_networks and load_lora_for_models (Forge @ dfdcbab6).

Kept from the real code: Network objects without multipliers (network.py:90-100);
compiled_lora_targets = [[filename, unet_mult, te_mult, online_mode]] (:107-109), its str() in
`current_lora_hash` (nothing redone when it is unchanged, :113-114); the patchers restart from
`forge_objects_original` (:117-118); each LoRA's UNet and text-encoder patches added to clones
with its filename (load_lora_for_models :15-53); the result kept as
`forge_objects_after_applying_lora` (:126). Online mode only when the UNet's storage dtype is not
fp32/fp16/bf16 (:102-105; fake: `ONLINE`). Loaded as the module `networks` by tests/test_forge.py.
"""

import functools
import os

import torch

from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from modules import shared

loaded_networks = []
available_networks = {}
ONLINE = False  # fake-only: dynamic_args['online_lora']


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name, self.filename, self.alias = name, filename, name


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.mentioned_name = None


def register(path, name=None):
    """fake-only: what list_available_networks finds in models/Lora."""
    name = name or os.path.splitext(os.path.basename(path))[0]
    available_networks[name] = NetworkOnDisk(name, str(path))


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    from safetensors.torch import load_file

    return load_file(filename)


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default", online_mode=False):
    unet_keys = model_lora_keys_unet(model.model) if model is not None else {}
    clip_keys = model_lora_keys_clip(clip.cond_stage_model) if clip is not None else {}
    lora_unet, lora_unmatch = load_lora(lora, unet_keys)
    lora_clip, lora_unmatch = load_lora(lora_unmatch, clip_keys)
    if len(lora_unmatch) > 12:
        return model, clip
    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    if new_model is not None and len(lora_unet) > 0:
        loaded_keys = new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model, online_mode=online_mode)
        if len([k for k in lora_unet if k not in loaded_keys]) <= 12:
            model = new_model
    if new_clip is not None and len(lora_clip) > 0:
        loaded_keys = new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip, online_mode=online_mode)
        if len([k for k in lora_clip if k not in loaded_keys]) <= 12:
            clip = new_clip
    return model, clip


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    current_sd = shared.sd_model
    loaded_networks.clear()
    networks_on_disk = [available_networks[name] for name in names]
    for network_on_disk, name in zip(networks_on_disk, names):
        net = Network(name, network_on_disk)
        net.mentioned_name = name
        loaded_networks.append(net)
    online_mode = ONLINE
    if current_sd.forge_objects.unet.model.storage_dtype in [torch.float32, torch.float16, torch.bfloat16] and not ONLINE:
        online_mode = False
    compiled_lora_targets = []
    for a, b, c in zip(networks_on_disk, unet_multipliers or [], te_multipliers or []):
        compiled_lora_targets.append([a.filename, b, c, online_mode])
    compiled_lora_targets_hash = str(compiled_lora_targets)
    if current_sd.current_lora_hash == compiled_lora_targets_hash:
        return
    current_sd.current_lora_hash = compiled_lora_targets_hash
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip, online_mode in compiled_lora_targets:
        lora_sd = load_lora_state_dict(filename)
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet, current_sd.forge_objects.clip, lora_sd, strength_model, strength_clip,
            filename=filename, online_mode=online_mode)
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()
