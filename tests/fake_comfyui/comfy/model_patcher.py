"""Mirrors comfy/model_patcher.py @ a125cd84: ModelPatcher (clones share the module and the `backup`
dict; patches are merged into the module at load, in float32, the original kept in `backup` and put
back at unpatch), get_key_weight, string_to_seed, add_wrapper_with_key, is_clone. Loading to a device,
low-VRAM partial loads, hooks, injections and object patches are left out."""

import collections
import copy
import uuid

import torch

import comfy.float
import comfy.lora
import comfy.utils
from comfy.patcher_extension import WrappersMP

_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])


def string_to_seed(data):
    crc = 0xFFFFFFFF
    for byte in data:
        if isinstance(byte, str):
            byte = ord(byte)
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def get_key_weight(model, key):
    set_func = convert_func = None
    op_keys = key.rsplit(".", 1)
    if len(op_keys) < 2:
        return comfy.utils.get_attr(model, key), None, None
    op = comfy.utils.get_attr(model, op_keys[0])
    set_func = getattr(op, f"set_{op_keys[1]}", None)
    convert_func = getattr(op, f"convert_{op_keys[1]}", None)
    return getattr(op, op_keys[1]), set_func, convert_func


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        self.wrappers = WrappersMP.init_wrappers()
        for name, value in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0), ("model_lowvram", False),
                            ("current_weight_patches_uuid", None)):
            if not hasattr(self.model, name):
                setattr(self.model, name, value)

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size, weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.backup = self.backup
        n.object_patches_backup = self.object_patches_backup
        n.parent = self
        n.wrappers = {k: {k1: w1.copy() for k1, w1 in w.items()} for k, w in self.wrappers.items()}
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def model_dtype(self):
        return next(self.model.parameters()).dtype

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        added = set()
        model_sd = self.model.state_dict()
        for key in patches:
            if key in model_sd:
                added.add(key)
                self.patches.setdefault(key, []).append((strength_patch, patches[key], strength_model, None, None))
        self.patches_uuid = uuid.uuid4()
        return list(added)

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        weight, set_func, convert_func = get_key_weight(self.model, key)
        if key not in self.backup:
            self.backup[key] = _Backup(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        temp_weight = weight.to(torch.float32, copy=True)
        out_weight = comfy.lora.calculate_weight(self.patches[key], temp_weight, key)
        out_weight = comfy.float.stochastic_rounding(out_weight, weight.dtype, seed=string_to_seed(key))
        comfy.utils.set_attr_param(self.model, key, out_weight)

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for key in self.patches:
            self.patch_weight_to_device(key, device_to)
        self.model.current_weight_patches_uuid = self.patches_uuid
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        for key, backup in self.backup.items():
            comfy.utils.set_attr_param(self.model, key, backup.weight)
        self.backup.clear()
        self.model.current_weight_patches_uuid = None

    def pre_run(self):
        pass

    def cleanup(self):
        pass
