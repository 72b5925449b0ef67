"""webui's Lora extension (extensions-builtin/Lora) as PG reads it: which
networks are loaded and stripped, and the reference model they imply.

Deltas come from webui's own network modules (`NetworkModule.calc_updown`,
`forward`), never from reading LoRA files, so the weak model strips exactly
what webui applied.
"""

import sys
from contextlib import ExitStack, contextmanager

import torch

from lib_pg.errors import PGError
from lib_pg.hosts.common.networks import lora_networks, network_names, stripped_networks  # noqa: F401 (webui's names too)
from lib_pg.patching import LivePatch, swapped_attributes, swapped_parameters
from lib_pg.weights import UNET_PREFIX, LowRankDelta, live_parameters

from modules import shared  # noqa: E402


def finalize_lora_weights(model):
    """Bring every layer to the state webui's Lora extension would give it at
    its first forward (merge in the default mode, un-merge in functional mode),
    so the weak weights are built from the weights the conditional rows will use.

    A MultiheadAttention merges its networks in both modes (networks.py
    network_MultiheadAttention_forward has no functional branch), its out_proj
    included; webui never runs the out_proj Linear's own forward (the attention
    reads out_proj.weight directly), so neither does PG: applying the Linear's
    networks there too would merge the out_proj networks a second time and leave
    the Linear a stale backup that a later generation would restore."""
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "network_apply_weights"):
        return
    functional = getattr(shared.opts, "lora_functional", False)
    fused_outputs = fused_out_projections(model)
    with torch.no_grad():
        for module in model.modules():
            # webui names every module, containers too; its patched forwards are these layers'
            if getattr(module, "network_layer_name", None) is None or not isinstance(module, NETWORK_LAYER_TYPES):
                continue
            if id(module) in fused_outputs:
                continue
            if functional and not isinstance(module, torch.nn.MultiheadAttention):
                networks.network_restore_weights_from_backup(module)
                networks.network_reset_cached_weight(module)
            else:
                networks.network_apply_weights(module)


def fused_out_projections(model):
    """ids of the out_proj Linear of every torch MultiheadAttention (OpenCLIP's
    text encoders): webui's Lora merges their networks through the attention."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}


# The layer types webui's Lora extension patches (extensions-builtin/Lora/lora_patches.py).
NETWORK_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
# Those whose weights PG can swap or correct per layer; MultiheadAttention layers (OpenCLIP) have their own
# path (fused_attention_reference), since webui merges q/k/v/out_proj networks into them as one.
ROUTABLE_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
# networks.py network_apply_weights: a MultiheadAttention `X` takes a network's `X_q_proj`, `X_k_proj`,
# `X_v_proj` and `X_out_proj` modules together, or none of them.
FUSED_ATTENTION_PARTS = ("_q_proj", "_k_proj", "_v_proj", "_out_proj")


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
    Every layer a stripped network changes must be accounted for (an offset, a
    correction, a scope or a fused-attention path), or the generation stops
    (`check_stripped_layers_accounted`).
    """
    networks = lora_networks()
    if networks is None or not networks.loaded_networks:
        return {}
    merged = not getattr(shared.opts, "lora_functional", False)
    prefixes = {}
    for key, (module, name, _) in live_parameters(model).items():
        prefixes.setdefault(id(module), key[: -len(name) - 1])
    accounted = set()
    fused = fused_attention_reference(model, stripped, with_base, prefixes, accounted)
    if merged:
        reference = merged_reference(model, stripped, with_base, prefixes, accounted, networks)
    else:
        reference = functional_reference(model, stripped, accounted)
    reference.setdefault("offsets", {}).update(fused["offsets"])
    reference["text_scope"] = combined_scope(reference.get("text_scope"), fused["text_scope"])
    check_stripped_layers_accounted(model, stripped, accounted)
    return reference


def merged_reference(model, stripped, with_base, prefixes, accounted, networks):
    """Default mode: the networks are merged into the weights (networks.py
    network_apply_weights); the reference subtracts the stripped ones' deltas,
    or holds low-rank corrections for plain LoRAs."""
    error_counts = getattr(getattr(networks, "extra_network_lora", None), "errors", None)
    fused_outputs = fused_out_projections(model)
    offsets, corrections = {}, {}
    with torch.no_grad():
        for module in model.modules():
            layer_name = getattr(module, "network_layer_name", None)
            prefix = prefixes.get(id(module))
            if layer_name is None or prefix is None or not isinstance(module, ROUTABLE_LAYER_TYPES):
                continue
            if id(module) in fused_outputs:
                continue  # merged through its MultiheadAttention (fused_attention_reference)
            touching = [(net, net.modules[layer_name]) for net in stripped if layer_name in net.modules]
            backup = getattr(module, "network_weights_backup", None) if with_base else None
            if not touching and backup is None:
                continue
            accounted.add(id(module))
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
            for net, updown, ex_bias in network_deltas(module, layer_name, True, stripped, error_counts) if touching else ():
                if net not in stripped:
                    continue
                weight_offset -= updown.float().reshape(module.weight.shape)
                if ex_bias is not None and bias_offset is not None:
                    bias_offset -= ex_bias.float()
            offsets[f"{prefix}.weight"] = weight_offset
            if bias_offset is not None:
                offsets[f"{prefix}.bias"] = bias_offset
    return {"offsets": offsets, "corrections": corrections}


def functional_reference(model, stripped, accounted):
    """With webui's `lora_functional` option the networks are added in each
    layer's forward (networks.py network_forward) from their multipliers: the
    weak rows run that same forward with the stripped networks' multipliers
    scaled by ω, exactly webui's own result at ω·m, for every network type.
    (MultiheadAttention layers merge in this mode too: fused_attention_reference.)"""
    if not stripped:
        return {}
    multipliers = [(net, net.te_multiplier, net.unet_multiplier) for net in stripped]

    def scope(omega):
        return swapped_attributes([change for net, te, unet in multipliers
                                   for change in ((net, "te_multiplier", te * omega), (net, "unet_multiplier", unet * omega))])

    layer_names = set().union(*(net.modules for net in stripped))
    fused_outputs = fused_out_projections(model)
    unet_modules, text_modules = [], []
    for key, (module, _name, _param) in live_parameters(model).items():
        if id(module) in fused_outputs:
            continue  # merged through its MultiheadAttention, whatever the mode
        if getattr(module, "network_layer_name", None) in layer_names and isinstance(module, ROUTABLE_LAYER_TYPES):
            modules = unet_modules if key.startswith(UNET_PREFIX) else text_modules
            if module not in modules:
                modules.append(module)
    accounted.update(id(m) for m in unet_modules + text_modules)
    return {"scope": scope, "scoped_modules": unet_modules, "text_scope": scope if text_modules else None}


# -- fused attention (torch.nn.MultiheadAttention: OpenCLIP in SD 2.x and SDXL's second text encoder) ----------

def fused_attention_parts(net, layer_name):
    """The network's q, k, v and out_proj modules for the MultiheadAttention
    `layer_name`, as networks.py network_apply_weights looks them up; None unless
    all four are there (webui then merges none of them)."""
    parts = tuple(net.modules.get(layer_name + suffix) for suffix in FUSED_ATTENTION_PARTS)
    return parts if all(part is not None for part in parts) else None


def fused_attention_weights(attention, multipliers):
    """(in_proj_weight, out_proj.weight, out_proj.bias) of a MultiheadAttention
    as networks.py network_apply_weights merges the loaded networks into it: from
    its backup, in load order, q/k/v from the chunks of in_proj_weight, with
    `multipliers[net]` = (te, unet) in place of a network's own (0: left out).
    New tensors: the live parameters are not touched."""
    networks = lora_networks()
    weights_backup = attention.network_weights_backup
    bias_backup = getattr(attention, "network_bias_backup", None)
    in_proj = torch.empty_like(attention.in_proj_weight).copy_(weights_backup[0])
    out_weight = torch.empty_like(attention.out_proj.weight).copy_(weights_backup[1])
    live_bias = attention.out_proj.bias
    out_bias = None if bias_backup is None else torch.empty_like(live_bias).copy_(bias_backup)
    layer_name = attention.network_layer_name
    with torch.no_grad():
        for net in networks.loaded_networks:
            parts = fused_attention_parts(net, layer_name)
            if parts is None:
                continue
            te, unet = multipliers.get(net, (net.te_multiplier, net.unet_multiplier))
            if te == 0 and unet == 0:
                continue  # webui's result without this network
            module_q, module_k, module_v, module_out = parts
            with swapped_attributes(((net, "te_multiplier", te), (net, "unet_multiplier", unet))):
                try:
                    qw, kw, vw = in_proj.chunk(3, 0)
                    updown_q, _ = module_q.calc_updown(qw)
                    updown_k, _ = module_k.calc_updown(kw)
                    updown_v, _ = module_v.calc_updown(vw)
                    updown_qkv = torch.vstack([updown_q, updown_k, updown_v])
                    updown_out, ex_bias = module_out.calc_updown(out_weight)
                    in_proj += updown_qkv
                    out_weight += updown_out
                except RuntimeError:  # webui skipped (and counted) this network here too
                    continue
            if ex_bias is not None:
                out_bias = ex_bias.to(out_weight.dtype).clone() if out_bias is None else out_bias + ex_bias
    return in_proj, out_weight, out_bias


def fused_attention_reference(model, stripped, with_base, prefixes, accounted):
    """The reference of every MultiheadAttention webui merged networks into (in
    both Lora modes). With a base checkpoint: offsets onto the base, the
    non-stripped networks' merge (from webui's backup); without: no copy is kept,
    the weak text encoder's call recomputes the attention's weights with the
    stripped networks at ω·m (`fused_attention_weights`, webui's own merge) and
    swaps them in for that call only."""
    offsets = {}
    transient = []
    attentions = []
    without = {net: (0.0, 0.0) for net in stripped}
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, torch.nn.MultiheadAttention):
                continue
            layer_name = getattr(module, "network_layer_name", None)
            if layer_name is None or getattr(module, "network_weights_backup", None) is None:
                continue  # webui merged nothing here
            touched = any(fused_attention_parts(net, layer_name) is not None for net in stripped)
            prefix = prefixes.get(id(module))
            out_prefix = prefixes.get(id(module.out_proj))
            if not touched and not with_base or prefix is None or out_prefix is None:
                continue
            attentions.append(module)
            accounted.add(id(module))
            if not with_base:
                transient.append(module)
                continue
            in_proj, out_weight, out_bias = fused_attention_weights(module, without)
            backup_in, backup_out = module.network_weights_backup
            offsets[f"{prefix}.in_proj_weight"] = in_proj.float() - backup_in.to(in_proj.device).float()
            offsets[f"{out_prefix}.weight"] = out_weight.float() - backup_out.to(out_weight.device).float()
            bias_backup = getattr(module, "network_bias_backup", None)
            if out_bias is not None and bias_backup is not None:
                offsets[f"{out_prefix}.bias"] = out_bias.float() - bias_backup.to(out_bias.device).float()
    multipliers = [(net, net.te_multiplier, net.unet_multiplier) for net in stripped]

    def text_scope(omega):
        at_omega = {net: (te * omega, unet * omega) for net, te, unet in multipliers}
        return weak_fused_attention(attentions, set(map(id, transient)), at_omega)

    return {"offsets": offsets, "text_scope": text_scope if attentions else None}


def webui_wanted_names():
    """The loaded networks as networks.py network_apply_weights compares them
    with a layer's `network_current_names`."""
    return tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in lora_networks().loaded_networks)


@contextmanager
def weak_fused_attention(attentions, transient, multipliers):
    """While the weak text conditioning is computed: each MultiheadAttention
    runs on its weak weights (those in `transient` recomputed from webui's backup
    at the stripped networks' ω·m for its call; the others are swapped in by the
    weak text encoder's swaps), and webui's own merge in its forward is kept from
    re-merging into them when the stripped multipliers are scaled (functional
    mode's scope): its current names are the wanted ones for the call."""
    with LivePatch() as patch:
        for attention in attentions:
            weak_weights = (lambda a=attention: fused_attention_weights(a, multipliers)) if id(attention) in transient else None
            patch.set_attribute(attention, "forward", _weak_attention_forward(attention, attention.forward, weak_weights))
        yield


def _weak_attention_forward(attention, original, weak_weights):
    def forward(*args, **kwargs):
        swaps = ()
        if weak_weights is not None:
            in_proj, out_weight, out_bias = weak_weights()
            swaps = ((attention, "in_proj_weight", in_proj), (attention.out_proj, "weight", out_weight),
                     (attention.out_proj, "bias", out_bias))
        with swapped_parameters(swaps), swapped_attributes(((attention, "network_current_names", webui_wanted_names()),)):
            return original(*args, **kwargs)

    return forward


def combined_scope(*scopes):
    """ω -> one context manager entering every given scope (None: none)."""
    scopes = [scope for scope in scopes if scope is not None]
    if not scopes:
        return None
    if len(scopes) == 1:
        return scopes[0]

    def scope(omega):
        stack = ExitStack()
        for each in scopes:
            stack.enter_context(each(omega))
        return stack

    return scope


# -- the guard: every layer a stripped network changes has a reference ---------------------------------------

def applied_layer(model, net, key, network_module):
    """The live layer webui's Lora merges (or adds in forward) the network's
    module `key` into, or None where it applies it nowhere (networks.py
    network_apply_weights / network_forward): q/k/v/out_proj of a
    MultiheadAttention go into the attention when all four are there."""
    mapping = getattr(model, "network_layer_mapping", None) or {}
    for suffix in FUSED_ATTENTION_PARTS:
        if key.endswith(suffix):
            attention = mapping.get(key[: -len(suffix)])
            if isinstance(attention, torch.nn.MultiheadAttention):
                return attention if fused_attention_parts(net, attention.network_layer_name) is not None else None
    layer = getattr(network_module, "sd_module", None)
    if layer is None:
        layer = mapping.get(key)
    if isinstance(layer, torch.nn.MultiheadAttention) or not isinstance(layer, NETWORK_LAYER_TYPES):
        return None  # an attention takes only q/k/v/out_proj parts; other module types are not patched
    return layer


def check_stripped_layers_accounted(model, stripped, accounted):
    """Stop before sampling when a stripped network changes a layer for which
    the weak model has no reference: that layer would keep the network at full
    strength in the weak branch, with nothing to show for it."""
    for net in stripped:
        for key, network_module in net.modules.items():
            layer = applied_layer(model, net, key, network_module)
            if layer is not None and id(layer) not in accounted:
                raise PGError(f"LoRA {net.name!r} changes layer {getattr(layer, 'network_layer_name', key)} "
                              f"({type(layer).__name__}), which PG's weak model does not strip: the weak branch would "
                              "keep it at full strength. Remove this LoRA from 'strip_loras'")


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
