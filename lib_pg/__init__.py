"""Personalization guidance (Park et al., ICCV 2025) for stable-diffusion-webui.

The core of this package is plain torch + safetensors + numpy and never imports
webui; `lib_pg.webui_adapter` is the one module that talks to webui.
"""

from lib_pg.errors import PGError

__all__ = ["PGError"]
