"""The weights ComfyUI samples a ModelPatcher with, computed as its loader does.

A ComfyUI MODEL (or CLIP) is a ModelPatcher: an nn.Module shared by every clone
plus the clone's own `patches` (key -> list of (strength_patch, adapter or
tuple, strength_model, offset, function)). LoRA loaders only add patches; the
weights are merged into the module when the patcher is loaded
(comfy/model_patcher.py ModelPatcher.patch_weight_to_device: a float32 copy of
the original, comfy.lora.calculate_weight, comfy.float.stochastic_rounding to
the weight's dtype), and the unpatched original is kept in `backup`, a dict
every clone shares. So the weights of any patcher are
merge(patches[key], original) with original = backup[key].weight while some
clone has the key patched, else the module's own tensor.
"""

import torch

from lib_pg.errors import PGError

import comfy.float
import comfy.lora
import comfy.model_patcher


def original_weight(patcher, key):
    """The unpatched tensor of `key` (the shared backup while a clone has it patched)."""
    backup = patcher.backup.get(key)
    if backup is not None:
        return backup.weight
    weight, _set_func, _convert_func = comfy.model_patcher.get_key_weight(patcher.model, key)
    return weight


def patched_weight(patcher, key):
    """The tensor `patcher` samples with for `key`: its patches merged as ComfyUI merges them."""
    original = original_weight(patcher, key)
    patches = patcher.patches.get(key)
    if not patches:
        return original
    weight, set_func, convert_func = comfy.model_patcher.get_key_weight(patcher.model, key)
    if set_func is not None:
        raise PGError(f"the weight {key} is stored in a quantized format that ComfyUI sets through its own function "
                      "(e.g. fp8 scaled or GGUF): PG does not support quantized models")
    merged = original.to(torch.float32, copy=True)
    if convert_func is not None:
        merged = convert_func(merged, inplace=True)
    merged = comfy.lora.calculate_weight(patches, merged, key)
    return comfy.float.stochastic_rounding(merged, weight.dtype, seed=comfy.model_patcher.string_to_seed(key))


def patch_identity(patcher, key):
    """What identifies `key`'s patches (clones copy the lists, not the entries)."""
    return tuple(id(entry) for entry in patcher.patches.get(key, ()))


def shares_module(a, b) -> bool:
    return a.model is b.model


def keys_that_may_differ(live, reference, keys):
    """The keys whose weights the two patchers may sample with differently: over a
    shared module only those whose patches differ; else every key."""
    if not shares_module(live, reference):
        return list(keys)
    return [key for key in keys if patch_identity(live, key) != patch_identity(reference, key)]


def patches_signature(patcher):
    """A hashable summary of a patcher's weights: its module and its patch entries."""
    return (id(patcher.model), tuple(sorted((key, patch_identity(patcher, key)) for key in patcher.patches)))


def module_keys(patcher, prefix):
    """The parameter keys of the patcher's module under `prefix` (as ComfyUI names patches)."""
    return [name for name, _ in patcher.model.named_parameters() if name.startswith(prefix)]
