"""Fake of webui 1.10.1 extensions-builtin/Lora/lora_patches.py (with the bit of
modules/patches.py it needs): class-level patches of torch.nn layer forwards and
_load_from_state_dict, keeping the originals so they can be called and restored."""

import torch

import networks

_originals = {}  # modules/patches.py:originals ({(key, obj, field): original})


# modules/patches.py:patch
def patch(key, obj, field, replacement):
    patch_key = (obj, field)
    if patch_key in _originals.setdefault(key, {}):
        raise RuntimeError(f"patch for {field} is already applied")
    original = getattr(obj, field)
    _originals[key][patch_key] = original
    setattr(obj, field, replacement)
    return original


# modules/patches.py:undo
def undo(key, obj, field):
    patch_key = (obj, field)
    if patch_key not in _originals.get(key, {}):
        raise RuntimeError(f"there is no patch for {field} to undo")
    original = _originals[key].pop(patch_key)
    setattr(obj, field, original)
    return None


_PATCHED = [
    ("Linear", torch.nn.Linear), ("Conv2d", torch.nn.Conv2d), ("GroupNorm", torch.nn.GroupNorm),
    ("LayerNorm", torch.nn.LayerNorm), ("MultiheadAttention", torch.nn.MultiheadAttention),
]


class LoraPatches:
    # lora_patches.py:LoraPatches (attributes <Layer>_forward / <Layer>_load_state_dict hold the originals)
    def __init__(self):
        for name, cls in _PATCHED:
            setattr(self, f"{name}_forward", patch(__name__, cls, 'forward', getattr(networks, f"network_{name}_forward")))
            setattr(self, f"{name}_load_state_dict", patch(__name__, cls, '_load_from_state_dict', getattr(networks, f"network_{name}_load_state_dict")))

    # lora_patches.py:LoraPatches.undo
    def undo(self):
        for name, cls in _PATCHED:
            setattr(self, f"{name}_forward", undo(__name__, cls, 'forward'))
            setattr(self, f"{name}_load_state_dict", undo(__name__, cls, '_load_from_state_dict'))
