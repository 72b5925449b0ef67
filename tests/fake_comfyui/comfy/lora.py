"""Mirrors comfy/lora.py @ a125cd84 calculate_weight for plain "diff" patches (what LoRA adapters
amount to for PG: ComfyUI merges each as weight += strength·Δ in float32)."""


def calculate_weight(patches, weight, key, intermediate_dtype=None, original_weights=None):
    for strength, v, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        if strength_model != 1.0:
            weight *= strength_model
        patch_type, v = ("diff", v) if len(v) == 1 else (v[0], v[1])
        if patch_type != "diff":
            raise NotImplementedError(f"fake ComfyUI: patch type {patch_type}")
        diff = v[0]
        if strength != 0.0 and diff.shape == weight.shape:
            weight += function(strength * diff.to(weight.device, weight.dtype))
    return weight
