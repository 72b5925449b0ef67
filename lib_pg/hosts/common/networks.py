"""The Lora extension's loaded networks, as every host lists them.

webui's extensions-builtin/Lora, Forge's extensions-builtin/sd_forge_lora and
reForge's extensions-builtin/Lora all keep the prompt's networks in
`networks.loaded_networks` (Network objects with `name`, `mentioned_name` and
`network_on_disk` (`filename`, `alias`, `name`)): which of them the weak model
strips is decided the same way on every host.
"""

import sys

from lib_pg.errors import PGError


def lora_networks():
    """The host's Lora extension module (`networks`), if it is loaded."""
    networks = sys.modules.get("networks")
    return networks if networks is not None and hasattr(networks, "loaded_networks") else None


def stripped_networks(settings):
    """The loaded networks (LoRAs of this batch's prompt) that the weak model strips."""
    if not settings.strip_loras:
        return []
    networks = lora_networks()
    loaded = list(networks.loaded_networks) if networks is not None else []
    if not loaded:
        raise PGError("'strip_loras' is set but no LoRA is active: add one to the prompt as <lora:name:weight> "
                      "(or check the console: webui could not load it)")
    if settings.strips_all_loras:
        return loaded
    chosen = []
    for wanted in settings.strip_loras:
        matches = [net for net in loaded if wanted in network_names(net)]
        if not matches:
            names = ", ".join(net.name for net in loaded)
            raise PGError(f"LoRA {wanted!r} in 'strip_loras' is not active in this prompt (active: {names})")
        chosen += [net for net in matches if net not in chosen]
    return chosen


def network_names(net):
    on_disk = getattr(net, "network_on_disk", None)
    return {net.name, getattr(net, "mentioned_name", None), getattr(on_disk, "alias", None), getattr(on_disk, "name", None)} - {None}


def network_file(net):
    """The file a loaded network was read from."""
    return getattr(getattr(net, "network_on_disk", None), "filename", None)
