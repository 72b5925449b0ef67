"""lllyasviel/huggingface_guess (@ 84826248, the commit Forge pins): the model classes Forge's engines
keep as `model_config` (only what PG calls: SDXL/SD20 process_clip_state_dict)."""
