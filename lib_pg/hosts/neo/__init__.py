"""Haoming02's Forge Neo (Forge's `backend/` rewritten ComfyUI-style, 2.x): controller.py."""
