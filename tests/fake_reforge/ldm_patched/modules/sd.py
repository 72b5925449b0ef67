"""ldm_patched/modules/sd.py: load_lora_for_models (:89-140) and CLIP (clone, add_patches).

Kept: a key map only for the parts with a non-zero strength (nothing at all when both are 0),
convert_lora, load_lora, then `clone().add_patches(loaded, strength)` for the UNet and the
text encoder."""

import ldm_patched.modules.lora
import ldm_patched.modules.lora_convert
from ldm_patched.modules.model_patcher import ModelPatcher


class CLIP:
    def __init__(self, cond_stage_model=None, no_init=False):
        if no_init:
            return
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model)

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default"):
    key_map = {}
    if model is not None and strength_model != 0:
        key_map = ldm_patched.modules.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None and strength_clip != 0:
        key_map = ldm_patched.modules.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    if not key_map:
        return (model, clip)
    lora = ldm_patched.modules.lora_convert.convert_lora(lora)
    loaded = ldm_patched.modules.lora.load_lora(lora, key_map)
    new_modelpatcher = model.clone()
    new_modelpatcher.add_patches(loaded, strength_model)
    new_clip = clip.clone()
    new_clip.add_patches(loaded, strength_clip)
    return (new_modelpatcher, new_clip)
