"""The hosts PG runs in: one folder per host, and what they share.

- `webui/`: AUTOMATIC1111's stable-diffusion-webui 1.10.1 (1.6+): its CFGDenoiser
  stacks a step's rows, its Lora extension patches the layers.
- `forge/`: lllyasviel/stable-diffusion-webui-forge (`backend/`, 2024-08 on).
- `reforge/`: Panchovix/stable-diffusion-webui-reForge (`ldm_patched/`).
- `common/`: what all three share. Both forks keep webui's front end
  (modules/processing.py, scripts, prompt_parser, sd_models, the
  on_cfg_denoiser callback), so the script, the request checks, infotext,
  paste-back, the weak negative conditioning and the lean-weights cache are
  written once (`common/controller.py`, `frontend.py`, `conditioning.py`,
  `lean.py`); the two forks also share their sampling (`common/forks.py`:
  rows tagged by the backend, lib_pg.forks).

Each host folder is the only code that imports that host's own modules; this
module imports none (detection looks for packages without importing them).
The host is told by the packages it ships, never by version strings:
reForge has `ldm_patched/` and `modules_forge/` and no `backend/`; Forge has
`backend/` and `modules_forge/` and no `ldm_patched/`; webui none of them.
"""

import importlib.util

WEBUI, FORGE, REFORGE = "webui", "forge", "reforge"
SUPPORTED_FORKS = (REFORGE, FORGE)  # forks with a folder of their own here

# Forks of webui that keep its modules/ (so this extension loads there) but
# sample through a backend of their own, found by the packages they add.
FORK_PACKAGES = (("backend", "Forge"), ("ldm_patched", "reForge"), ("modules_forge", "a Forge-based fork"))
UNSUPPORTED_HOST = ("this webui is {host}, which PG does not support yet (it samples through its own backend, where PG "
                    "cannot find the unconditional rows); use AUTOMATIC1111's webui 1.6–1.10, or disable PG")


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


def unsupported_host():
    """The name of the webui fork this is, if PG does not support it; None on
    webui and on the forks PG supports."""
    if detect() in SUPPORTED_FORKS:
        return None
    for package, name in FORK_PACKAGES:
        if _present(package):
            return name
    return None


def controller():
    """The Controller for this host (imported lazily: each host folder imports its host's modules)."""
    host = detect()
    if host == REFORGE:
        from lib_pg.hosts.reforge import controller as reforge

        return reforge.CONTROLLER
    if host == FORGE:
        from lib_pg.hosts.forge import controller as forge

        return forge.CONTROLLER
    from lib_pg.hosts.webui import controller as webui

    return webui.CONTROLLER
