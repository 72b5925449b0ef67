"""Which webui this is, from the packages it ships (never from version strings), and its Controller.

- reForge (Panchovix/stable-diffusion-webui-reForge): `ldm_patched/` and
  `modules_forge/`, no `backend/`.
- Forge (lllyasviel/stable-diffusion-webui-forge, 2024-08 rewrite on): `backend/`
  and `modules_forge/`, no `ldm_patched/`.
- AUTOMATIC1111's webui: none of them.
"""

import importlib.util

WEBUI, FORGE, REFORGE = "webui", "forge", "reforge"
SUPPORTED_FORKS = (REFORGE, FORGE)  # forks with an adapter of their own


def _present(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def detect():
    if _present("modules_forge"):
        if _present("ldm_patched") and not _present("backend"):
            return REFORGE
        if _present("backend"):
            return FORGE
    return WEBUI


def controller():
    """The Controller for this host (imported lazily: each adapter imports its host's modules)."""
    host = detect()
    if host == REFORGE:
        from lib_pg import reforge_adapter

        return reforge_adapter.CONTROLLER
    if host == FORGE:
        from lib_pg import forge_adapter

        return forge_adapter.CONTROLLER
    from lib_pg import webui_adapter

    return webui_adapter.CONTROLLER
