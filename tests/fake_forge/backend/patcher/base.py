"""backend/patcher/base.py: ModelPatcher, as far as LoRAs and PG go.

Kept from the real code (@ dfdcbab6, :51-127): `lora_patches` = {(filename, strength_patch,
strength_model, online_mode): {key: [[strength, v, strength_model, offset, function]]}} (a
LoRA's entries identified by its file), the LoraLoader shared by every patcher of one model
(`model.lora_loader`), `clone()` copying `lora_patches` and `model_options`, `add_patches` keeping
only keys the model has, `refresh_loras` handing the patches to the loader.
"""

import copy

import torch

from backend.patcher.lora import LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"), size=0, current_device=None, **kwargs):
        self.size = size
        self.model = model
        self.lora_patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader
        self.current_device = offload_device if current_device is None else current_device

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        lora_identifier = (filename, strength_patch, strength_model, online_mode)
        this_patches = {}
        p = set()
        model_keys = set(k for k, _ in self.model.named_parameters())
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
            if key in model_keys:
                p.add(k)
                current_patches = this_patches.get(key, [])
                current_patches.append([strength_patch, patches[k], strength_model, offset, function])
                this_patches[key] = current_patches
        self.lora_patches[lora_identifier] = this_patches
        return p

    def has_online_lora(self):
        return any(online_mode for (_f, _s, _m, online_mode) in self.lora_patches)

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function
