"""backend/patcher/base.py: ModelPatcher (ComfyUI's, v0.27.1), as far as LoRAs and PG go (Neo 2.26).

Kept from the real code: `patches` = {key: [(strength_patch, v, strength_model, offset, function,
online_mode)]} appended in LoRA order with no LoRA file named (add_patches :414-435 takes
`filename` and drops it; a new `patches_uuid` each time); clone() copying the lists and sharing
`backup` (:221-241); patch_weight_to_device (:466-495): the original kept as
`backup[key] = (weight, inplace_update)`, a copy of the weight cast to
memory_management.lora_compute_dtype(device_to) merged by merge_lora_to_weight, then
backend/float.py stochastic_rounding(..., weight.dtype, seed=string_to_seed(key)) and set as a new
Parameter; load (:542-676): a patched key with online_mode, or every patched key of a module in low
VRAM (fake: memory_management.LOWVRAM), gives the module `weight_function = [LowVramPatch(key,
patches)]` instead of a merge; partially_load (:810-834) unpatches first when the model carries
another patches_uuid; unpatch_model (:693-730) puts the backups back and wipes the low-VRAM
functions. Memory accounting, pinning, object patches and weight wrappers are left out.
"""

import collections
import uuid

import torch

from backend import memory_management, utils
from backend.float import stochastic_rounding
from backend.patcher.lora import merge_lora_to_weight, string_to_seed


class LowVramPatch:
    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key = key
        self.patches = patches

    def __call__(self, weight):
        return merge_lora_to_weight(self.patches[self.key], weight, self.key, computation_dtype=weight.dtype)


def wipe_lowvram_weight(m):
    if hasattr(m, "weight_function"):
        m.weight_function = []
    if hasattr(m, "bias_function"):
        m.bias_function = []


class ModelPatcher:
    def __init__(self, model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"), size=0, *, current_device=None,
                 weight_inplace_update=False):
        self.size = size
        self.model = model
        self.model.device = current_device
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

    def has_online_lora(self):
        return any(any(patch[-1] for patch in patches) for patches in self.patches.values())

    def use_online_lora(self, key):
        patches = self.patches.get(key)
        return patches is not None and any(patch[-1] for patch in patches)

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size, current_device=self.model.device,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: self.patches[k][:] for k in self.patches}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = {**self.model_options, "transformer_options": dict(self.model_options["transformer_options"])}
        n.parent = self
        n.backup = self.backup
        return n

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None):
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
                current_patches.append((strength_patch, patches[k], strength_model, offset, function, online_mode))
                self.patches[key] = current_patches
        self.patches_uuid = uuid.uuid4()
        return list(p)

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False):
        weight = utils.get_attr(self.model, key)
        if key not in self.patches:
            return weight
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup and not return_weight:
            self.backup[key] = collections.namedtuple("Dimension", ["weight", "inplace_update"])(
                weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        temp_dtype = memory_management.lora_compute_dtype(device_to)
        if device_to is not None:
            temp_weight = memory_management.cast_to_device(weight, device_to, temp_dtype, copy=True)
        else:
            temp_weight = weight.to(temp_dtype, copy=True)
        out_weight = merge_lora_to_weight(self.patches[key], temp_weight, key)
        out_weight = stochastic_rounding(out_weight, weight.dtype, seed=string_to_seed(key))
        if return_weight:
            return out_weight
        if inplace_update:
            utils.copy_to_param(self.model, key, out_weight)
        else:
            utils.set_attr(self.model, key, out_weight)

    def load(self, device_to=None, lowvram=False):
        for key in self.patches:
            if lowvram or self.use_online_lora(key):
                module = utils.get_attr(self.model, key.rsplit(".", 1)[0])
                setattr(module, "weight_function" if key.endswith(".weight") else "bias_function", [LowVramPatch(key, self.patches)])
            else:
                self.patch_weight_to_device(key, device_to=device_to)
        self.model.model_lowvram = lowvram
        self.model.device = device_to
        self.model.current_weight_patches_uuid = self.patches_uuid

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for m in self.model.modules():
                wipe_lowvram_weight(m)
            self.model.model_lowvram = False
            for k in list(self.backup.keys()):
                bk = self.backup[k]
                if bk.inplace_update:
                    utils.copy_to_param(self.model, k, bk.weight)
                else:
                    utils.set_attr(self.model, k, bk.weight)
            self.model.current_weight_patches_uuid = None
            self.backup.clear()

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False, lowvram=False):
        current = self.model.current_weight_patches_uuid
        if current is not None and current != self.patches_uuid:
            self.unpatch_model(self.offload_device)
        if self.model.current_weight_patches_uuid == self.patches_uuid:
            return 0
        self.load(device_to, lowvram=lowvram)
        return 0
