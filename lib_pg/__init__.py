"""Personalization guidance (Park et al., ICCV 2025) for stable-diffusion-webui.

The core of this package is plain torch + safetensors + numpy and never imports
a host; `lib_pg.hosts` holds the code that talks to one (a folder per host:
webui, Forge, reForge, and what they share).
"""

from lib_pg.errors import PGError

__all__ = ["PGError"]
