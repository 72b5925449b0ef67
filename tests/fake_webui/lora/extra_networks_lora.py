"""Fake of webui 1.10.1 extensions-builtin/Lora/extra_networks_lora.py: the ``<lora:name:te:unet:dyn>``
extra network.  Uses modules.extra_networks when the fake has it, else the small stand-ins below
for modules/extra_networks.py's ExtraNetwork and ExtraNetworkParams."""

import networks
from modules import shared

try:
    from modules import extra_networks
except ImportError:  # the fake modules package has no extra_networks.py
    extra_networks = None


class _ExtraNetwork:
    # modules/extra_networks.py:ExtraNetwork
    def __init__(self, name):
        self.name = name

    # modules/extra_networks.py:ExtraNetwork.activate
    def activate(self, p, params_list):
        raise NotImplementedError

    # modules/extra_networks.py:ExtraNetwork.deactivate
    def deactivate(self, p):
        raise NotImplementedError


class ExtraNetworkParams:
    # modules/extra_networks.py:ExtraNetworkParams ("k=v" items are named, the rest positional)
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}

        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    # modules/extra_networks.py:ExtraNetworkParams.__eq__
    def __eq__(self, other):
        return self.items == other.items


if extra_networks is not None:
    ExtraNetwork = extra_networks.ExtraNetwork
    ExtraNetworkParams = extra_networks.ExtraNetworkParams
else:
    ExtraNetwork = _ExtraNetwork


class ExtraNetworkLora(ExtraNetwork):
    # extra_networks_lora.py:ExtraNetworkLora
    def __init__(self):
        super().__init__('lora')

        self.errors = {}
        """mapping of network names to the number of errors the network had during operation"""

    remove_symbols = str.maketrans('', '', ":,")

    # extra_networks_lora.py:ExtraNetworkLora.activate (positional: name, te multiplier, unet multiplier (default te), dyn dim; named te=, unet=, dyn=)
    def activate(self, p, params_list):
        additional = getattr(shared.opts, "sd_lora", "None")
        default_multiplier = getattr(shared.opts, "extra_networks_default_multiplier", 1.0)

        self.errors.clear()

        if additional != "None" and additional in networks.available_networks and not any(x for x in params_list if x.items[0] == additional):
            p.all_prompts = [x + f"<lora:{additional}:{default_multiplier}>" for x in p.all_prompts]
            params_list.append(ExtraNetworkParams(items=[additional, default_multiplier]))

        names = []
        te_multipliers = []
        unet_multipliers = []
        dyn_dims = []
        for params in params_list:
            assert params.items

            names.append(params.positional[0])

            te_multiplier = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te_multiplier = float(params.named.get("te", te_multiplier))

            unet_multiplier = float(params.positional[2]) if len(params.positional) > 2 else te_multiplier
            unet_multiplier = float(params.named.get("unet", unet_multiplier))

            dyn_dim = int(params.positional[3]) if len(params.positional) > 3 else None
            dyn_dim = int(params.named["dyn"]) if "dyn" in params.named else dyn_dim

            te_multipliers.append(te_multiplier)
            unet_multipliers.append(unet_multiplier)
            dyn_dims.append(dyn_dim)

        networks.load_networks(names, te_multipliers, unet_multipliers, dyn_dims)

        if getattr(shared.opts, "lora_add_hashes_to_infotext", True):
            if not getattr(p, "is_hr_pass", False) or not hasattr(p, "lora_hashes"):
                p.lora_hashes = {}

            for item in networks.loaded_networks:
                if item.network_on_disk.shorthash and item.mentioned_name:
                    p.lora_hashes[item.mentioned_name.translate(self.remove_symbols)] = item.network_on_disk.shorthash

            if p.lora_hashes:
                p.extra_generation_params["Lora hashes"] = ', '.join(f'{k}: {v}' for k, v in p.lora_hashes.items())

    # extra_networks_lora.py:ExtraNetworkLora.deactivate
    def deactivate(self, p):
        if self.errors:
            p.comment("Networks with errors: " + ", ".join(f"{k} ({v})" for k, v in self.errors.items()))

            self.errors.clear()
