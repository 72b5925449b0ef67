"""The LoRA key maps both fork fakes use: kohya names (tests/lora_files.py) -> the forks' patch keys.

Stands in for the forks' model_lora_keys_unet / model_lora_keys_clip (Forge backend/patcher/lora.py,
reForge ldm_patched/modules/lora.py), which map kohya/diffusers names onto the parameter names
of the patcher's model: `diffusion_model.<ldm path>.weight` for the UNet (KModel / BaseModel) and
`clip_l.transformer.text_model.<path>.weight` for the SD 1.x text encoder; with a `clip_g` (SDXL)
the kohya names are `lora_te1_...` (clip_l) and `lora_te2_...` (clip_g), as both forks map them
(reForge ldm_patched/modules/lora.py model_lora_keys_clip, Forge backend/patcher/lora.py).
"""

import torch

from tests.lora_files import kohya_te_name, kohya_unet_name


def unet_keys(model):
    """{kohya name: patch key} for a patcher model with `.diffusion_model`."""
    unet = model.diffusion_model
    found = {}
    for path, module in unet.named_modules():
        if not path or getattr(module, "weight", None) is None:
            continue
        try:
            name = kohya_unet_name(unet, path)
        except (ValueError, KeyError, AssertionError, IndexError):
            continue
        found[name] = f"diffusion_model.{path}.weight"
    return found


def clip_keys(model):
    """{kohya name: patch key} for a text-encoder patcher model {"clip_l": module with .transformer[, "clip_g": ...]}."""
    found = {}
    sdxl = any(path.startswith("clip_g.") for path, _ in model.named_modules())
    for path, module in model.named_modules():
        encoder = path.split(".", 1)[0]
        if encoder not in ("clip_l", "clip_g") or not path.startswith(f"{encoder}.transformer.text_model.") \
                or getattr(module, "weight", None) is None or not isinstance(module.weight, torch.Tensor):
            continue
        name = kohya_te_name(path[len(encoder) + 1:])
        if sdxl:
            name = name.replace("lora_te_", "lora_te1_" if encoder == "clip_l" else "lora_te2_", 1)
        found[name] = f"{path}.weight"
    return found
