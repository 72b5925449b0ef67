"""backend/patcher/lora.py (Neo 2.26): string_to_seed (:20-31), merge_lora_to_weight (:58-118), and
the re-exported ComfyUI loader (`load_lora`, `model_lora_keys_*`, `weight_adapter`, :9-14).

Kept: merge_lora_to_weight changes the weight it is given in place (the caller passes a copy),
entries applied in order (`weight *= strength_model` first when it is not 1), weight adapters through
their calculate_weight, "diff" as strength * diff, "set" as a copy."""

import torch

from backend import memory_management
from modules_forge.packages.comfy.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet, weight_adapter  # noqa: F401


def string_to_seed(data):
    crc = 0xFFFFFFFF
    for byte in data:
        if isinstance(byte, str):
            byte = ord(byte)
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key, computation_dtype=torch.float32):
    for p in patches:
        strength, v, strength_model, offset, function = p[0], p[1], p[2], p[3], p[4]
        if function is None:
            function = lambda a: a  # noqa: E731
        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, weight_adapter.WeightAdapterBase):
            output = v.calculate_weight(weight, key, strength, strength_model, offset, function, computation_dtype)
            if output is not None:
                weight = output
                if old_weight is not None:
                    weight = old_weight
            continue
        patch_type, v = (("diff", v) if len(v) == 1 else v)
        if patch_type == "diff":
            if strength != 0.0:
                weight += function(strength * memory_management.cast_to_device(v[0], weight.device, weight.dtype))
        elif patch_type == "set":
            weight.copy_(v[0])
        else:
            raise ValueError(f"fake merge_lora_to_weight: patch type {patch_type} not faked")
        if old_weight is not None:
            weight = old_weight
    return weight
