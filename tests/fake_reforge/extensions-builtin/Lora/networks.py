"""extensions-builtin/Lora/networks.py: load_networks (reForge @ 3b56b268, :51-105).

Kept: compiled_lora_targets = [[filename, unet_mult, te_mult]] (:85-88), its str() in
`current_lora_hash` (nothing redone when unchanged, :91-92); the patchers restart from
`forge_objects_original` (:95-96); each LoRA through ldm_patched/modules/sd.py
load_lora_for_models; the result kept as `forge_objects_after_applying_lora` (:104); the
state dicts from the lru-cached load_lora_state_dict (:19-21). Loaded as the module `networks`
by tests/test_reforge.py.
"""

import functools
import os

from ldm_patched.modules.sd import load_lora_for_models
from ldm_patched.modules.utils import load_torch_file
from modules import shared

loaded_networks = []
available_networks = {}


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
    return load_torch_file(filename, safe_load=True)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    current_sd = shared.sd_model
    loaded_networks.clear()
    networks_on_disk = [available_networks[name] for name in names]
    for network_on_disk, name in zip(networks_on_disk, names):
        net = Network(name, network_on_disk)
        net.mentioned_name = name
        loaded_networks.append(net)
    compiled_lora_targets = []
    for a, b, c in zip(networks_on_disk, unet_multipliers or [], te_multipliers or []):
        compiled_lora_targets.append([a.filename, b, c])
    compiled_lora_targets_hash = str(compiled_lora_targets)
    if current_sd.current_lora_hash == compiled_lora_targets_hash:
        return
    current_sd.current_lora_hash = compiled_lora_targets_hash
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip in compiled_lora_targets:
        lora_sd = load_lora_state_dict(filename)
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet, current_sd.forge_objects.clip, lora_sd, strength_model, strength_clip,
            filename=filename)
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()
