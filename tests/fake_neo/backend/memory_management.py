"""backend/memory_management.py: load_models_gpu / load_model_gpu (records its calls), the LoRA
compute dtype and cast_to_device.

Kept from the real code (Neo 2.26): loading a patcher goes through LoadedModel.model_load
(:476-492) -> ModelPatcher.partially_load, which unpatches a model carrying another patches_uuid
and merges the LoRA patches, or, in low VRAM (fake switch LOWVRAM, for the UNet), leaves them to
the modules' weight_function; lora_compute_dtype (:1327-1337) is fp32 on a CPU (fp16 where
should_use_fp16 says so: fake switch LORA_FP16); cast_to_device (:1021) casts with an optional copy."""

import torch

loaded = []  # fake-only: the patchers loaded, in order
LOWVRAM = False  # fake-only: the UNet does not fit (lowvram_model_memory > 0)
LORA_FP16 = False  # fake-only: should_use_fp16(device) on the load device


def lora_compute_dtype(device):
    return torch.float16 if LORA_FP16 else torch.float32


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False):
    for model in models:
        loaded.append(model)
        model.partially_load(model.load_device, lowvram=LOWVRAM and getattr(model, "is_unet", False))


def load_model_gpu(model):
    return load_models_gpu([model])
