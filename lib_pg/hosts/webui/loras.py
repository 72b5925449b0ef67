"""webui's Lora extension (extensions-builtin/Lora) as PG reads it: which
networks are loaded and stripped, and the reference model they imply.

Deltas come from webui's own network modules (`NetworkModule.calc_updown`,
`forward`), never from reading LoRA files, so the weak model strips exactly
what webui applied.
"""

import sys

import torch

from lib_pg.errors import PGError
from lib_pg.hosts.common.networks import lora_networks, network_names, stripped_networks  # noqa: F401 (webui's names too)
from lib_pg.patching import swapped_attributes
from lib_pg.weights import UNET_PREFIX, LowRankDelta, live_parameters

from modules import shared  # noqa: E402


def finalize_lora_weights(model):
    """Bring every layer to the state webui's Lora extension would give it at
    its first forward (merge in the default mode, un-merge in functional mode),
    so the weak weights are built from the weights the conditional rows will use."""
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "network_apply_weights"):
        return
    functional = getattr(shared.opts, "lora_functional", False)
    with torch.no_grad():
        for module in model.modules():
            # webui names every module, containers too; its patched forwards are these layers'
            if getattr(module, "network_layer_name", None) is None or not isinstance(module, NETWORK_LAYER_TYPES):
                continue
            if functional:
                networks.network_restore_weights_from_backup(module)
                networks.network_reset_cached_weight(module)
            else:
                networks.network_apply_weights(module)


# The layer types webui's Lora extension patches (extensions-builtin/Lora/lora_patches.py).
NETWORK_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
# Those whose weights PG can swap; a MultiheadAttention's networks stay at full strength in both branches.
ROUTABLE_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def network_signature():
    """The loaded networks and their multipliers: the weak weights depend on them."""
    networks = lora_networks()
    loaded = networks.loaded_networks if networks is not None else []
    return (tuple((net.name, net.te_multiplier, net.unet_multiplier, net.dyn_dim) for net in loaded),
            bool(getattr(shared.opts, "lora_functional", False)))


def is_low_rank_exact(network_module):
    """A plain LoRA/LoCon module whose functional forward equals its merged delta:
    its correction can run on the weak rows alone, with no weight copy."""
    return (type(network_module).__name__ == "NetworkModuleLora"
            and getattr(network_module, "mid_model", None) is None
            and getattr(network_module, "dora_scale", None) is None
            and getattr(network_module, "bias", None) is None
            and network_module.network.dyn_dim is None)


def low_rank_delta(layer, network_module):
    """A plain LoRA's contribution to `layer`, from webui's NetworkModuleLora."""
    nbytes = sum(w.numel() * w.element_size() for w in (network_module.up_model.weight, network_module.down_model.weight))
    return LowRankDelta(output=lambda x: network_module.forward(x, 0),
                        weight=lambda: network_module.calc_updown(layer.weight)[0], nbytes=nbytes)


def lora_reference(model, stripped, with_base):
    """The reference θ_ref as offsets to add (per checkpoint key), and the
    low-rank corrections, from webui's Lora extension state.

    θ_ref is the model with the stripped networks removed; with a base
    checkpoint, the base with the same non-stripped networks (style LoRAs) the
    live model has. Deltas come from webui's own network modules
    (`NetworkModule.calc_updown`, `forward`), never from reading LoRA files.
    """
    networks = lora_networks()
    if networks is None or not networks.loaded_networks:
        return {}
    merged = not getattr(shared.opts, "lora_functional", False)
    if not merged:
        return functional_reference(model, stripped)
    prefixes = {}
    for key, (module, name, _) in live_parameters(model).items():
        prefixes.setdefault(id(module), key[: -len(name) - 1])
    error_counts = getattr(getattr(networks, "extra_network_lora", None), "errors", None)
    offsets, corrections = {}, {}
    with torch.no_grad():
        for module in model.modules():
            layer_name = getattr(module, "network_layer_name", None)
            prefix = prefixes.get(id(module))
            if layer_name is None or prefix is None or not isinstance(module, ROUTABLE_LAYER_TYPES):
                continue
            touching = [(net, net.modules[layer_name]) for net in stripped if layer_name in net.modules]
            backup = getattr(module, "network_weights_backup", None) if merged and with_base else None
            if not touching and backup is None:
                continue
            if touching and not with_base and all(is_low_rank_exact(m) for _, m in touching):
                corrections[module] = [low_rank_delta(module, m) for _, m in touching]
                continue
            weight_offset = torch.zeros_like(module.weight, dtype=torch.float32)
            bias = getattr(module, "bias", None)
            bias_offset = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
            if backup is not None:  # merged networks, non-stripped ones included, go onto the base too
                weight_offset += module.weight.float() - backup.to(module.weight.device).float()
                bias_backup = getattr(module, "network_bias_backup", None)
                if bias_offset is not None and bias_backup is not None:
                    bias_offset += bias.float() - bias_backup.to(bias.device).float()
            for net, updown, ex_bias in network_deltas(module, layer_name, merged, stripped, error_counts) if touching else ():
                if net not in stripped:
                    continue
                weight_offset -= updown.float().reshape(module.weight.shape)
                if ex_bias is not None and bias_offset is not None:
                    bias_offset -= ex_bias.float()
            offsets[f"{prefix}.weight"] = weight_offset
            if bias_offset is not None:
                offsets[f"{prefix}.bias"] = bias_offset
    return {"offsets": offsets, "corrections": corrections}


def functional_reference(model, stripped):
    """With webui's `lora_functional` option the networks are added in each
    layer's forward (networks.py network_forward) from their multipliers: the
    weak rows run that same forward with the stripped networks' multipliers
    scaled by ω, exactly webui's own result at ω·m, for every network type."""
    if not stripped:
        return {}
    multipliers = [(net, net.te_multiplier, net.unet_multiplier) for net in stripped]

    def scope(omega):
        return swapped_attributes([change for net, te, unet in multipliers
                                   for change in ((net, "te_multiplier", te * omega), (net, "unet_multiplier", unet * omega))])

    layer_names = set().union(*(net.modules for net in stripped))
    unet_modules, text_touched = [], False
    for key, (module, _name, _param) in live_parameters(model).items():
        if getattr(module, "network_layer_name", None) in layer_names and isinstance(module, ROUTABLE_LAYER_TYPES):
            if key.startswith(UNET_PREFIX):
                if module not in unet_modules:
                    unet_modules.append(module)
            else:
                text_touched = True
    return {"scope": scope, "scoped_modules": unet_modules, "text_scope": scope if text_touched else None}


def network_deltas(module, layer_name, merged, stripped, error_counts):
    """(network, weight delta, bias delta) of every loaded network on this layer,
    as webui computes them: merged mode chains them from the backed-up original
    weight in load order (networks.py network_apply_weights), functional mode
    computes each from the live weight (NetworkModule.forward)."""
    networks = lora_networks()
    backup = getattr(module, "network_weights_backup", None) if merged else None
    weight = backup.to(module.weight.device) if backup is not None else module.weight
    deltas = []
    for net in networks.loaded_networks:
        network_module = net.modules.get(layer_name)
        if network_module is None:
            continue
        try:
            updown, ex_bias = network_module.calc_updown(weight)
        except RuntimeError as error:  # webui skipped (and counted) this layer too
            if net in stripped and error_counts is not None:
                error_counts[net.name] = error_counts.get(net.name, 0) + 1
            continue
        if updown.dim() == 4 and weight.dim() == 4 and updown.shape[1] == 4 and weight.shape[1] == 9:
            updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))  # inpainting UNet, as webui pads
        deltas.append((net, updown, ex_bias))
        if merged:
            weight = (weight.to(dtype=updown.dtype) + updown.reshape(weight.shape)).to(dtype=module.weight.dtype)
    return deltas
