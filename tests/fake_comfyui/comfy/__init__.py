"""Fake of ComfyUI's `comfy` package (Comfy-Org/ComfyUI @ a125cd84): see ../README.md."""
