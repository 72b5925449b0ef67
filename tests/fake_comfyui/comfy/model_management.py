"""Mirrors comfy/model_management.py @ a125cd84: get_free_memory / get_total_memory (FREE_MEMORY / TOTAL_MEMORY
here), processing_interrupted (INTERRUPTED), and what load_models_gpu does to weights: a patcher whose
module is patched for another clone (other patches) is unpatched first, then the patcher's own patches
are merged in; a loaded model stays loaded (patched) after sampling."""

import torch

current_loaded_models = []  # ModelPatchers whose patches are in their module now


def get_torch_device():
    return torch.device("cpu")


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False):
    for patcher in models:
        loaded = [m for m in current_loaded_models if m.model is patcher.model]
        if loaded and loaded[0].patches_uuid == patcher.patches_uuid and loaded[0] is patcher:
            continue
        for other in loaded:
            other.unpatch_model()
            current_loaded_models.remove(other)
        patcher.patch_model()
        current_loaded_models.insert(0, patcher)


def unload_all_models():
    while current_loaded_models:
        current_loaded_models.pop().unpatch_model()


def throw_exception_if_processing_interrupted():
    pass


FREE_MEMORY = {"bytes": 0}
TOTAL_MEMORY = {"bytes": 0}
INTERRUPTED = {"value": False}


def get_free_memory(dev=None, torch_free_too=False):
    return FREE_MEMORY["bytes"]


def get_total_memory(dev=None, torch_total_too=False):
    return TOTAL_MEMORY["bytes"]


def processing_interrupted():
    return INTERRUPTED["value"]
