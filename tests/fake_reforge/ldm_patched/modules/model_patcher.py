"""ldm_patched/modules/model_patcher.py: ModelPatcher as far as LoRAs and PG go (reForge @ 3b56b268).

Kept: `patches` = {key: [(strength_patch, v, strength_model, offset, function)]} appended in
LoRA order with no LoRA identity (add_patches :502-524, a new `patches_uuid` each time); clone()
copying the lists and sharing `backup` (:270-326); patch_weight_to_device (:559-587): the original
kept as `backup[key].weight`, the merge `calculate_weight(patches[key], weight.float() copy, key)`
cast back with `stochastic_rounding(..., seed=string_to_seed(key))` and set as a new Parameter;
loading (:604-708 via partially_load :831-854) unpatches first when the model carries another
patches_uuid, then patches every key (full load) or, in low VRAM (fake: model_management.LOWVRAM),
gives the module `weight_function = [LowVramPatch(key, patches)]` instead; unpatch_model
(:727-764) puts the backups back and wipes the low-VRAM functions.
"""

import collections
import uuid

import torch

import ldm_patched.float
import ldm_patched.modules.lora
import ldm_patched.modules.utils


def string_to_seed(data):
    crc = 0xFFFFFFFF
    for byte in data:
        if isinstance(byte, str):
            byte = ord(byte)
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


class LowVramPatch:
    def __init__(self, key, patches):
        self.key = key
        self.patches = patches

    def __call__(self, weight):
        return ldm_patched.modules.lora.calculate_weight(self.patches[self.key], weight, self.key, intermediate_dtype=weight.dtype)


def wipe_lowvram_weight(m):
    if hasattr(m, "weight_function"):
        m.weight_function = []
    if hasattr(m, "bias_function"):
        m.bias_function = []


class ModelPatcher:
    is_unet = False  # fake-only: which patcher model_management.LOWVRAM applies to

    def __init__(self, model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"), size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        if not hasattr(self.model, "current_weight_patches_uuid"):
            self.model.current_weight_patches_uuid = None
        if not hasattr(self.model, "model_lowvram"):
            self.model.model_lowvram = False

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size, weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: self.patches[k][:] for k in self.patches}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = {**self.model_options, "transformer_options": dict(self.model_options["transformer_options"])}
        n.backup = self.backup
        n.parent = self
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        p = set()
        model_sd = self.model.state_dict()
        for k in patches:
            offset = None
            function = None
            if isinstance(k, str):
                key = k
            else:
                offset = k[1]
                key = k[0]
                if len(k) > 2:
                    function = k[2]
            if key in model_sd:
                p.add(k)
                current_patches = self.patches.get(key, [])
                current_patches.append((strength_patch, patches[k], strength_model, offset, function))
                self.patches[key] = current_patches
        self.patches_uuid = uuid.uuid4()
        return list(p)

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        weight = ldm_patched.modules.utils.get_attr(self.model, key)
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup:
            backup_weight = weight.to(device=self.offload_device, copy=inplace_update)
            self.backup[key] = collections.namedtuple("Dimension", ["weight", "inplace_update"])(backup_weight, inplace_update)
        temp_weight = weight.to(torch.float32, copy=True)
        out_weight = ldm_patched.modules.lora.calculate_weight(self.patches[key], temp_weight, key)
        out_weight = ldm_patched.float.stochastic_rounding(out_weight, weight.dtype, seed=string_to_seed(key))
        if inplace_update:
            ldm_patched.modules.utils.copy_to_param(self.model, key, out_weight)
        else:
            ldm_patched.modules.utils.set_attr_param(self.model, key, out_weight)

    def load(self, device_to=None, lowvram=False):
        for key in self.patches:
            if lowvram:
                module = ldm_patched.modules.utils.get_attr(self.model, key.rsplit(".", 1)[0])
                setattr(module, "weight_function" if key.endswith(".weight") else "bias_function", [LowVramPatch(key, self.patches)])
            else:
                self.patch_weight_to_device(key, device_to=device_to)
        self.model.model_lowvram = lowvram
        self.model.current_weight_patches_uuid = self.patches_uuid

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            if self.model.model_lowvram:
                for m in self.model.modules():
                    wipe_lowvram_weight(m)
                self.model.model_lowvram = False
            for k in list(self.backup.keys()):
                bk = self.backup[k]
                if bk.inplace_update:
                    ldm_patched.modules.utils.copy_to_param(self.model, k, bk.weight)
                else:
                    ldm_patched.modules.utils.set_attr_param(self.model, k, bk.weight)
            self.model.current_weight_patches_uuid = None
            self.backup.clear()

    def partially_load(self, device_to, lowvram=False):
        current = self.model.current_weight_patches_uuid
        if current is not None and current != self.patches_uuid:
            self.unpatch_model(self.offload_device)
        if self.model.current_weight_patches_uuid == self.patches_uuid:
            return
        self.load(device_to, lowvram=lowvram)
