"""ldm_patched/modules/model_patcher.py (Classic @ 1f95d717): stands for the early-2024 ldm_patched
(3-tuple patches, ModelPatcher.calculate_weight, tensor backups). Nothing here is imported by PG;
the file only makes the folder what Classic ships (no lora_convert.py, no ../float.py)."""
