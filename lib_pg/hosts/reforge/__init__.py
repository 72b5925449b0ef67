"""Panchovix/stable-diffusion-webui-reForge (`ldm_patched/`): controller.py."""
