"""lllyasviel/stable-diffusion-webui-forge (`backend/`, 2024-08 on): controller.py."""
