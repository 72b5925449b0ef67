"""ldm_patched/modules/model_management.py: load_models_gpu / load_model_gpu (records its calls).

Kept: loading a patcher goes through LoadedModel.model_load -> ModelPatcher.partially_load
(:498-535), which merges its LoRA patches, or in low VRAM (fake switch LOWVRAM) leaves them to the
modules' weight_function."""

import torch

loaded = []  # fake-only: the patchers loaded, in order
LOWVRAM = False  # fake-only: the UNet does not fit (lowvram_model_memory > 0)


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False):
    for model in models:
        loaded.append(model)
        model.partially_load(torch.device("cpu"), lowvram=LOWVRAM and model.is_unet)


def load_model_gpu(model):
    return load_models_gpu([model])
