"""ldm_patched/modules/lora_convert.py: convert_lora (kohya SD 1.x files pass through unchanged)."""


def convert_lora(sd):
    return sd
