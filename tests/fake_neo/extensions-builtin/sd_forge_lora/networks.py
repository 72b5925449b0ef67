"""extensions-builtin/sd_forge_lora/networks.py: load_lora_for_models and load_networks (Neo 2.26).

Kept from the real code: load_lora_for_models (:39-85): UNet keys, then text-encoder keys from what
is left; nothing at all when more than half the file's keys match neither; each part's entries added
to a clone (add_patches with the filename, which the patcher drops) kept only when at most a quarter
of its keys were skipped; compiled_lora_targets = [[filename, unet_mult, te_mult, online_mode]]
(:128-132) with online_mode from dynamic_args.online_lora, its str() in `current_lora_hash` (nothing
redone when it is unchanged, :134-136); the patchers restart from `forge_objects_original`
(:139-140); "lora_unet__" keys renamed (:147-148); the result kept as
`forge_objects_after_applying_lora` (:151). load_lora_state_dict reads the file each time (:25).
Loaded as the module `networks` by tests/test_neo.py.
"""

import os

from backend.args import dynamic_args
from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from backend.state_dict import state_dict_prefix_replace
from modules import shared

loaded_networks = []
available_networks = {}
reads = []  # fake-only: the files load_lora_state_dict read


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


def load_lora_state_dict(filename):
    from safetensors.torch import load_file

    reads.append(filename)
    return load_file(filename)


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default", online_mode=False):
    unet_keys = model_lora_keys_unet(model.model, {}) if model is not None else {}
    clip_keys = model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    lora_unmatch = lora
    lora_unet, lora_unmatch = load_lora(lora_unmatch, unet_keys)
    lora_clip, lora_unmatch = load_lora(lora_unmatch, clip_keys)
    if len(lora_unmatch) / len(lora) > 0.5:
        return model, clip
    if model is not None and len(lora_unet) > 0:
        new_model = model.clone()
        loaded_keys = new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model, online_mode=online_mode)
        skipped_keys = [item for item in lora_unet if item not in loaded_keys]
        if len(skipped_keys) / len(lora_unet) <= 0.25:
            model = new_model
    if clip is not None and len(lora_clip) > 0:
        new_clip = clip.clone()
        loaded_keys = new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip, online_mode=online_mode)
        skipped_keys = [item for item in lora_clip if item not in loaded_keys]
        if len(skipped_keys) / len(lora_clip) <= 0.25:
            clip = new_clip
    return model, clip


def load_networks(names, te_multipliers=None, unet_multipliers=None):
    current_sd = shared.sd_model
    loaded_networks.clear()
    networks_on_disk = [available_networks[name] for name in names]
    for network_on_disk, name in zip(networks_on_disk, names):
        net = Network(name, network_on_disk)
        net.mentioned_name = name
        loaded_networks.append(net)
    online_mode = dynamic_args.online_lora or False
    compiled_lora_targets = []
    for n, u, t in zip(networks_on_disk, unet_multipliers or [], te_multipliers or []):
        compiled_lora_targets.append([n.filename, u, t, online_mode])
    compiled_lora_targets_hash = str(compiled_lora_targets)
    if current_sd.current_lora_hash == compiled_lora_targets_hash:
        return
    current_sd.current_lora_hash = compiled_lora_targets_hash
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip, online_mode in compiled_lora_targets:
        lora_sd = load_lora_state_dict(filename)
        if any(key.startswith("lora_unet__") for key in lora_sd):
            lora_sd = state_dict_prefix_replace(lora_sd, {"lora_unet__": "lora_unet_"})
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet, current_sd.forge_objects.clip, lora_sd, strength_model, strength_clip,
            filename=filename, online_mode=online_mode)
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()
