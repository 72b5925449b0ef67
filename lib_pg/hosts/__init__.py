"""The hosts PG runs in: one folder per host, and what they share.

- `webui/`: AUTOMATIC1111's stable-diffusion-webui 1.10.1 (1.6+): its CFGDenoiser
  stacks a step's rows, its Lora extension patches the layers.
- `forge/`: lllyasviel/stable-diffusion-webui-forge (`backend/`, 2024-08 on).
- `neo/`: Haoming02's Forge Neo (`backend/` rewritten ComfyUI-style, 2.x).
- `reforge/`: Panchovix/stable-diffusion-webui-reForge (`ldm_patched/`).
- `common/`: what they all share. Both forks keep webui's front end
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
Two forks ship the same top-level packages as one of those, and are told
apart by what those packages provide (files found, nothing imported):
- Forge Neo has Forge's `backend/` + `modules_forge/`, but its model patcher
  was rewritten ComfyUI-style: it ships ComfyUI's LoRA weight adapters
  (`modules_forge/packages/comfy/weight_adapter/`), the objects its per-key
  patch lists hold and the code PG's Neo adapter reads them with. Forge has
  no such folder (its patches are `("lora", tuple)` entries per LoRA file).
  `modules_forge/forge_version.py` would say "neo" too, but it is a version
  string that forks and copies rewrite freely; the folder is what PG uses.
- Forge Classic has reForge's `ldm_patched/` + `modules_forge/`, but an
  early-2024 `ldm_patched` without the modules PG's reForge adapter merges
  LoRAs with (`ldm_patched/float.py` stochastic rounding,
  `ldm_patched/modules/lora_convert.py`): without both it is not reForge to
  PG, and enabled generations are refused naming Forge Classic.
"""

import importlib.util
import os

WEBUI, FORGE, REFORGE, NEO, CLASSIC = "webui", "forge", "reforge", "neo", "classic"
SUPPORTED_FORKS = (REFORGE, FORGE, NEO)  # forks with a folder of their own here
FORK_NAMES = {FORGE: "Forge", REFORGE: "reForge", NEO: "Forge Neo", CLASSIC: "Forge Classic"}
# What a package must provide for the fork (paths inside it; see above).
NEO_PROVIDES = ("modules_forge", "packages", "comfy", "weight_adapter")
REFORGE_PROVIDES = (("ldm_patched", "float.py"), ("ldm_patched", "modules", "lora_convert.py"))

# Forks of webui that keep its modules/ (so this extension loads there) but
# sample through a backend of their own, found by the packages they add.
FORK_PACKAGES = (("backend", "Forge"), ("ldm_patched", "reForge"), ("modules_forge", "a Forge-based fork"))
UNSUPPORTED_HOST = ("this webui is {host}, which PG does not support yet (it samples and patches LoRAs through a backend "
                    "PG has no adapter for); use AUTOMATIC1111's webui 1.6–1.10, Forge, reForge or Forge Neo, or disable PG")


def _present(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _provides(package, *path):
    """Whether the installed package (found, not imported) has this file or folder."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    locations = getattr(spec, "submodule_search_locations", None) or ()
    return any(os.path.exists(os.path.join(location, *path)) for location in locations)


def detect():
    if _present("modules_forge"):
        if _present("ldm_patched") and not _present("backend"):
            return REFORGE if all(_provides(*path) for path in REFORGE_PROVIDES) else CLASSIC
        if _present("backend"):
            return NEO if _provides(*NEO_PROVIDES) else FORGE
    return WEBUI


def unsupported_host():
    """The name of the webui fork this is, if PG does not support it; None on
    webui and on the forks PG supports."""
    host = detect()
    if host in SUPPORTED_FORKS:
        return None
    if host in FORK_NAMES:
        return FORK_NAMES[host]
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
    if host == NEO:
        from lib_pg.hosts.neo import controller as neo

        return neo.CONTROLLER
    from lib_pg.hosts.webui import controller as webui

    return webui.CONTROLLER
