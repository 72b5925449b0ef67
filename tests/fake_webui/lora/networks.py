"""Fake of webui 1.10.1 extensions-builtin/Lora/networks.py (CoderBotics-ai/stable-diffusion-webui @
82a973c0; the MultiheadAttention paths checked against it for issue 15: load_network's re_x_proj
match of q/k/v onto the attention, network_apply_weights' fused branch (q/k/v from the chunks of
in_proj_weight, out_proj and its ex_bias, tuple backups), network_MultiheadAttention_forward merging
in both modes, out_proj's own forward never called by the attention): the registry of networks on disk,
loading a LoRA/LyCORIS file into per-layer network modules, and applying the loaded networks to
torch layers, merged into the weights (default) or in the forward (opts.lora_functional).

Own implementation mirroring the real names, signatures and behaviour.  Differences: no bundled
textual-inversion embeddings (their keys are kept in ``Network.bundle_embeddings`` unregistered),
no SD3 (QkvLinear), no gradio warnings, no infotext-pasting hook.

Test helpers (fake-only): ``install_patches()`` / ``uninstall_patches()`` (what webui's
lora_script.py does at start-up / unload: class-level patches of torch.nn layers, kept in
``originals``, plus ``extra_network_lora``), ``register_network(filename, name=None)``,
``reset()``.  ``list_available_networks()`` scans ``shared.cmd_opts.lora_dir`` when a test sets
it; without it the registry keeps what ``register_network`` put there.

convert_diffusers_name_to_compvis assumes SD1's block layout, as the real one does: every
level has 2 ResBlocks (diffusers down_blocks.i / up_blocks.i -> input_blocks 1+3i+j /
output_blocks 3i+j), every level but the last has a downsampler (input_blocks 3+3i), and
only the lowest-resolution level has no attention, so up_blocks.0's upsampler is at index 1
of its output block and every other up block's at index 2.  The tiny SD1 of tests/ldm_models.py
(channel_mult (1, 2, 2), attention_resolutions (2, 1), num_res_blocks 2) satisfies all of it,
so its diffusers names map exactly like SD1's.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Union

import torch

import network
import network_full
import network_glora
import network_hada
import network_ia3
import network_lokr
import network_lora
import network_norm
import network_oft
from modules import devices, errors, sd_models, shared

# networks.py:module_types (same order: the first type accepting a layer's keys wins)
module_types = [
    network_lora.ModuleTypeLora(),
    network_hada.ModuleTypeHada(),
    network_ia3.ModuleTypeIa3(),
    network_lokr.ModuleTypeLokr(),
    network_full.ModuleTypeFull(),
    network_norm.ModuleTypeNorm(),
    network_glora.ModuleTypeGLora(),
    network_oft.ModuleTypeOFT(),
]

re_digits = re.compile(r"\d+")  # networks.py:re_digits
re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")  # networks.py:re_x_proj
re_compiled = {}  # networks.py:re_compiled

# networks.py:suffix_conversion (diffusers ResnetBlock2D child -> ldm ResBlock child)
suffix_conversion = {
    "attentions": {},
    "resnets": {
        "conv1": "in_layers_2",
        "conv2": "out_layers_3",
        "norm1": "in_layers_0",
        "norm2": "out_layers_0",
        "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection",
    },
}


# networks.py:convert_diffusers_name_to_compvis (kohya/diffusers layer name -> network_layer_name; SD1 layout, see module doc)
def convert_diffusers_name_to_compvis(key, is_sd2):
    def match(regex_text):
        regex = re_compiled.get(regex_text)
        if regex is None:
            regex = re_compiled[regex_text] = re.compile(regex_text)
        r = regex.match(key)
        if not r:
            return None
        return [int(x) if re_digits.match(x) else x for x in r.groups()]

    if (m := match(r"lora_unet_conv_in(.*)")) is not None:
        return f'diffusion_model_input_blocks_0_0{m[0]}'

    if (m := match(r"lora_unet_conv_out(.*)")) is not None:
        return f'diffusion_model_out_2{m[0]}'

    if (m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"

    if (m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        block, kind, index, rest = m
        suffix = suffix_conversion.get(kind, {}).get(rest, rest)
        return f"diffusion_model_input_blocks_{1 + block * 3 + index}_{1 if kind == 'attentions' else 0}_{suffix}"

    if (m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        kind, index, rest = m
        suffix = suffix_conversion.get(kind, {}).get(rest, rest)
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else index * 2}_{suffix}"

    if (m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        block, kind, index, rest = m
        suffix = suffix_conversion.get(kind, {}).get(rest, rest)
        return f"diffusion_model_output_blocks_{block * 3 + index}_{1 if kind == 'attentions' else 0}_{suffix}"

    if (m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"

    if (m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        # up_blocks.0 (lowest resolution) has no attention: its Upsample is child 1, else child 2
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"

    if (m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        layer, rest = m
        if is_sd2:
            if 'mlp_fc1' in rest:
                return f"model_transformer_resblocks_{layer}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
            if 'mlp_fc2' in rest:
                return f"model_transformer_resblocks_{layer}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
            return f"model_transformer_resblocks_{layer}_{rest.replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{layer}_{rest}"

    if (m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        layer, rest = m
        if 'mlp_fc1' in rest:
            return f"1_model_transformer_resblocks_{layer}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
        if 'mlp_fc2' in rest:
            return f"1_model_transformer_resblocks_{layer}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{layer}_{rest.replace('self_attn', 'attn')}"

    return key


# fake-internal: the text-encoder part of assign_network_names_to_compvis_modules
def _text_encoder_roots(model):
    """(prefix, module) of the text encoder(s) webui names: cond_stage_model(.wrapped) for SD1/SD2,
    conditioner.embedders[i](.wrapped) for SDXL.  The fake has no sd_hijack wrappers, so an SDXL
    embedder without ``wrapped`` counts when it is a text encoder (has ``transformer``/``model``)."""
    if getattr(model, "is_sdxl", hasattr(model, "conditioner")):
        roots = []
        for i, embedder in enumerate(model.conditioner.embedders):
            wrapped = getattr(embedder, "wrapped", None)
            if wrapped is None and (hasattr(embedder, "transformer") or hasattr(embedder, "model")):
                wrapped = embedder
            if wrapped is not None:
                roots.append((f"{i}_", wrapped))
        return roots
    cond = getattr(model, "cond_stage_model", None)
    if cond is None:
        return []
    return [("", getattr(cond, "wrapped", cond))]


# networks.py:assign_network_names_to_compvis_modules (names every submodule of the text encoder(s) and of sd_model.model)
def assign_network_names_to_compvis_modules(sd_model):
    network_layer_mapping = {}
    model = shared.sd_model if shared.sd_model is not None else sd_model  # webui reads shared.sd_model

    for prefix, root in _text_encoder_roots(model):
        for name, module in root.named_modules():
            network_name = prefix + name.replace(".", "_")
            network_layer_mapping[network_name] = module
            module.network_layer_name = network_name

    for name, module in model.model.named_modules():
        network_name = name.replace(".", "_")
        network_layer_mapping[network_name] = module
        module.network_layer_name = network_name

    sd_model.network_layer_mapping = network_layer_mapping


# networks.py:load_network (reads the file, matches its keys to layers, builds one module per layer)
def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)

    sd = sd_models.read_state_dict(network_on_disk.filename)

    if not hasattr(shared.sd_model, 'network_layer_mapping'):
        assign_network_names_to_compvis_modules(shared.sd_model)

    keys_failed_to_match = {}
    is_sd2 = 'model_transformer_resblocks' in shared.sd_model.network_layer_mapping
    if hasattr(shared.sd_model, 'diffusers_weight_map'):
        diffusers_weight_map = shared.sd_model.diffusers_weight_map
    elif hasattr(shared.sd_model, 'diffusers_weight_mapping'):
        diffusers_weight_map = dict(shared.sd_model.diffusers_weight_mapping())
        shared.sd_model.diffusers_weight_map = diffusers_weight_map
    else:
        diffusers_weight_map = None

    matched_networks = {}
    bundle_embeddings = {}
    mapping = shared.sd_model.network_layer_mapping

    for key_network, weight in sd.items():
        if diffusers_weight_map:
            key_network_without_network_parts, network_name, network_weight = key_network.rsplit(".", 2)
            network_part = network_name + '.' + network_weight
        else:
            key_network_without_network_parts, _, network_part = key_network.partition(".")

        if key_network_without_network_parts == "bundle_emb":
            # kept raw; the fake does not register bundled embeddings (the key also fails to match, as in webui)
            emb_name, vec_name = network_part.split(".", 1)
            bundle_embeddings.setdefault(emb_name, {})[vec_name] = weight

        if diffusers_weight_map:
            key = diffusers_weight_map.get(key_network_without_network_parts, key_network_without_network_parts)
        else:
            key = convert_diffusers_name_to_compvis(key_network_without_network_parts, is_sd2)

        sd_module = mapping.get(key, None)

        if sd_module is None:
            m = re_x_proj.match(key)
            if m:
                sd_module = mapping.get(m.group(1), None)

        # SDXL (and some SD1) files already use compvis names
        if sd_module is None and "lora_unet" in key_network_without_network_parts:
            key = key_network_without_network_parts.replace("lora_unet", "diffusion_model")
            sd_module = mapping.get(key, None)
        elif sd_module is None and "lora_te1_text_model" in key_network_without_network_parts:
            key = key_network_without_network_parts.replace("lora_te1_text_model", "0_transformer_text_model")
            sd_module = mapping.get(key, None)
            if sd_module is None:
                key = key_network_without_network_parts.replace("lora_te1_text_model", "transformer_text_model")
                sd_module = mapping.get(key, None)
        elif sd_module is None and "oft_unet" in key_network_without_network_parts:
            # kohya-ss OFT
            key = key_network_without_network_parts.replace("oft_unet", "diffusion_model")
            sd_module = mapping.get(key, None)

        if sd_module is None and "oft_diag" in key:
            # KohakuBlueleaf OFT (as in webui, only the te1 replacement survives)
            key = key_network_without_network_parts.replace("lora_te1_text_model", "0_transformer_text_model")
            sd_module = mapping.get(key, None)

        if sd_module is None:
            keys_failed_to_match[key_network] = key
            continue

        if key not in matched_networks:
            matched_networks[key] = network.NetworkWeights(network_key=key_network, sd_key=key, w={}, sd_module=sd_module)

        matched_networks[key].w[network_part] = weight

    for key, weights in matched_networks.items():
        net_module = None
        for nettype in module_types:
            net_module = nettype.create_module(net, weights)
            if net_module is not None:
                break

        if net_module is None:
            raise AssertionError(f"Could not find a module type (out of {', '.join(x.__class__.__name__ for x in module_types)}) that would accept those keys: {', '.join(weights.w)}")

        net.modules[key] = net_module

    net.bundle_embeddings = bundle_embeddings
    net.keys_failed_to_match = keys_failed_to_match

    if keys_failed_to_match:
        logging.debug(f"Network {network_on_disk.filename} didn't match keys: {keys_failed_to_match}")

    return net


# networks.py:purge_networks_from_memory
def purge_networks_from_memory():
    limit = getattr(shared.opts, "lora_in_memory_limit", 0)
    while len(networks_in_memory) > limit and len(networks_in_memory) > 0:
        networks_in_memory.pop(next(iter(networks_in_memory)), None)

    devices.torch_gc()


# fake-internal: the name -> NetworkOnDisk lookup inlined twice in networks.py:load_networks
def _on_disk(name):
    if name.lower() in forbidden_network_aliases:
        return available_networks.get(name, None)
    return available_network_aliases.get(name, None)


# networks.py:load_networks (replaces loaded_networks; missing multipliers default to 1.0, dyn_dim to 1.0 as in webui)
def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}

    loaded_networks.clear()

    unavailable_networks = []
    for name in names:
        if name.lower() in forbidden_network_aliases:
            if available_networks.get(name) is None:
                unavailable_networks.append(name)
        elif available_network_aliases.get(name) is None:
            unavailable_networks.append(name)
    if unavailable_networks:
        update_available_networks_by_names(unavailable_networks)

    networks_on_disk = [_on_disk(name) for name in names]
    if any(x is None for x in networks_on_disk):
        list_available_networks()
        networks_on_disk = [_on_disk(name) for name in names]

    failed_to_load_networks = []

    for i, (network_on_disk, name) in enumerate(zip(networks_on_disk, names)):
        net = already_loaded.get(name, None)

        if network_on_disk is not None:
            if net is None:
                net = networks_in_memory.get(name)

            if net is None or os.path.getmtime(network_on_disk.filename) > net.mtime:
                try:
                    net = load_network(name, network_on_disk)

                    networks_in_memory.pop(name, None)
                    networks_in_memory[name] = net
                except Exception as e:
                    errors.display(e, f"loading network {network_on_disk.filename}")
                    continue

            net.mentioned_name = name

            network_on_disk.read_hash()

        if net is None:
            failed_to_load_networks.append(name)
            logging.info(f"Couldn't find network with name {name}")
            continue

        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0  # sic: webui's default (a float) breaks LoRA's rebuild
        loaded_networks.append(net)

    if failed_to_load_networks:
        # webui appends this to sd_hijack.model_hijack.comments (shown under the image)
        comments.append(f'Lora not found: {", ".join(failed_to_load_networks)}')

    purge_networks_from_memory()


# networks.py:allowed_layer_without_weight
def allowed_layer_without_weight(layer):
    return isinstance(layer, torch.nn.LayerNorm) and not layer.elementwise_affine


# networks.py:store_weights_backup (a CPU copy)
def store_weights_backup(weight):
    if weight is None:
        return None
    return weight.to(devices.cpu, copy=True)


# networks.py:restore_weights_backup
def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


_Layer = Union[torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention]


# networks.py:network_restore_weights_from_backup
def network_restore_weights_from_backup(self: _Layer):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)

    if weights_backup is None and bias_backup is None:
        return

    if weights_backup is not None:
        if isinstance(self, torch.nn.MultiheadAttention):
            restore_weights_backup(self, 'in_proj_weight', weights_backup[0])
            restore_weights_backup(self.out_proj, 'weight', weights_backup[1])
        else:
            restore_weights_backup(self, 'weight', weights_backup)

    if isinstance(self, torch.nn.MultiheadAttention):
        restore_weights_backup(self.out_proj, 'bias', bias_backup)
    else:
        restore_weights_backup(self, 'bias', bias_backup)


# fake-internal: the error counting repeated in networks.py:network_apply_weights
def _count_error(net, network_layer_name, e):
    logging.debug(f"Network {net.name} layer {network_layer_name}: {e}")
    extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1


# networks.py:network_apply_weights (merge mode)
def network_apply_weights(self: _Layer):
    """
    Applies the currently selected set of networks to the weights of torch layer self.
    If weights already have this particular set of networks applied, does nothing.
    If not, restores original weights from backup and alters weights according to networks.
    """
    network_layer_name = getattr(self, 'network_layer_name', None)
    if network_layer_name is None:
        return

    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)

    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        if current_names != () and not allowed_layer_without_weight(self):
            raise RuntimeError(f"{network_layer_name} - no backup weights found and current weights are not unchanged")

        if isinstance(self, torch.nn.MultiheadAttention):
            weights_backup = (store_weights_backup(self.in_proj_weight), store_weights_backup(self.out_proj.weight))
        else:
            weights_backup = store_weights_backup(self.weight)

        self.network_weights_backup = weights_backup

    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != ():
        if isinstance(self, torch.nn.MultiheadAttention) and self.out_proj.bias is not None:
            bias_backup = store_weights_backup(self.out_proj.bias)
        elif getattr(self, 'bias', None) is not None:
            bias_backup = store_weights_backup(self.bias)
        else:
            bias_backup = None

        # only a layer that has a bias can tell that it was changed without a backup
        if bias_backup is not None and current_names != ():
            raise RuntimeError("no backup bias found and current bias are not unchanged")

        self.network_bias_backup = bias_backup

    if current_names != wanted_names:
        network_restore_weights_from_backup(self)

        for net in loaded_networks:
            module = net.modules.get(network_layer_name, None)
            if module is not None and hasattr(self, 'weight'):
                try:
                    with torch.no_grad():
                        if getattr(self, 'fp16_weight', None) is None:
                            weight = self.weight
                            bias = self.bias
                        else:
                            weight = self.fp16_weight.clone().to(self.weight.device)
                            bias = getattr(self, 'fp16_bias', None)
                            if bias is not None:
                                bias = bias.clone().to(self.bias.device)
                        updown, ex_bias = module.calc_updown(weight)

                        if len(weight.shape) == 4 and weight.shape[1] == 9:
                            # inpainting UNet: the delta has 4 input channels, zero-pad them to 9
                            updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))

                        self.weight.copy_((weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
                        if ex_bias is not None and hasattr(self, 'bias'):
                            if self.bias is None:
                                self.bias = torch.nn.Parameter(ex_bias).to(self.weight.dtype)
                            else:
                                self.bias.copy_((bias + ex_bias).to(dtype=self.bias.dtype))
                except RuntimeError as e:
                    _count_error(net, network_layer_name, e)

                continue

            module_q = net.modules.get(network_layer_name + "_q_proj", None)
            module_k = net.modules.get(network_layer_name + "_k_proj", None)
            module_v = net.modules.get(network_layer_name + "_v_proj", None)
            module_out = net.modules.get(network_layer_name + "_out_proj", None)

            if isinstance(self, torch.nn.MultiheadAttention) and module_q and module_k and module_v and module_out:
                try:
                    with torch.no_grad():
                        qw, kw, vw = self.in_proj_weight.chunk(3, 0)
                        updown_q, _ = module_q.calc_updown(qw)
                        updown_k, _ = module_k.calc_updown(kw)
                        updown_v, _ = module_v.calc_updown(vw)
                        del qw, kw, vw
                        updown_qkv = torch.vstack([updown_q, updown_k, updown_v])
                        updown_out, ex_bias = module_out.calc_updown(self.out_proj.weight)

                        self.in_proj_weight += updown_qkv
                        self.out_proj.weight += updown_out
                    if ex_bias is not None:
                        if self.out_proj.bias is None:
                            self.out_proj.bias = torch.nn.Parameter(ex_bias)
                        else:
                            self.out_proj.bias += ex_bias
                except RuntimeError as e:
                    _count_error(net, network_layer_name, e)

                continue

            if module is None:
                continue

            # a module for a layer without .weight and not a complete MHA set
            logging.debug(f"Network {net.name} layer {network_layer_name}: couldn't find supported operation")
            extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1

        self.network_current_names = wanted_names


# networks.py:network_forward (functional mode: original forward on the unmerged weights, plus each network's forward)
def network_forward(org_module, input, original_forward):
    """
    Old way of applying Lora by executing operations during layer's forward.
    Stacking many loras this way results in big performance degradation.
    """
    if len(loaded_networks) == 0:
        return original_forward(org_module, input)

    input = devices.cond_cast_unet(input)

    network_restore_weights_from_backup(org_module)
    network_reset_cached_weight(org_module)

    y = original_forward(org_module, input)

    network_layer_name = getattr(org_module, 'network_layer_name', None)
    for lora in loaded_networks:
        module = lora.modules.get(network_layer_name, None)
        if module is None:
            continue

        y = module.forward(input, y)

    return y


# networks.py:network_reset_cached_weight
def network_reset_cached_weight(self: Union[torch.nn.Conv2d, torch.nn.Linear]):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


# networks.py:network_Linear_forward
def network_Linear_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, originals.Linear_forward)

    network_apply_weights(self)

    return originals.Linear_forward(self, input)


# networks.py:network_Linear_load_state_dict
def network_Linear_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)

    return originals.Linear_load_state_dict(self, *args, **kwargs)


# networks.py:network_Conv2d_forward
def network_Conv2d_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, originals.Conv2d_forward)

    network_apply_weights(self)

    return originals.Conv2d_forward(self, input)


# networks.py:network_Conv2d_load_state_dict
def network_Conv2d_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)

    return originals.Conv2d_load_state_dict(self, *args, **kwargs)


# networks.py:network_GroupNorm_forward
def network_GroupNorm_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, originals.GroupNorm_forward)

    network_apply_weights(self)

    return originals.GroupNorm_forward(self, input)


# networks.py:network_GroupNorm_load_state_dict
def network_GroupNorm_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)

    return originals.GroupNorm_load_state_dict(self, *args, **kwargs)


# networks.py:network_LayerNorm_forward
def network_LayerNorm_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, originals.LayerNorm_forward)

    network_apply_weights(self)

    return originals.LayerNorm_forward(self, input)


# networks.py:network_LayerNorm_load_state_dict
def network_LayerNorm_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)

    return originals.LayerNorm_load_state_dict(self, *args, **kwargs)


# networks.py:network_MultiheadAttention_forward (merge mode only, as in webui)
def network_MultiheadAttention_forward(self, *args, **kwargs):
    network_apply_weights(self)

    return originals.MultiheadAttention_forward(self, *args, **kwargs)


# networks.py:network_MultiheadAttention_load_state_dict
def network_MultiheadAttention_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)

    return originals.MultiheadAttention_load_state_dict(self, *args, **kwargs)


# modules/shared.py:walk_files (sorted; missing folder -> nothing)
def _walk_files(path, allowed_extensions):
    if not path or not os.path.isdir(path):
        return
    for root, _, files in sorted(os.walk(path, followlinks=True)):
        for filename in sorted(files):
            if os.path.splitext(filename)[1].lower() in allowed_extensions:
                yield os.path.join(root, filename)


# networks.py:process_network_files (scans shared.cmd_opts.lora_dir / lyco_dir_backcompat when set)
def process_network_files(names: list[str] | None = None):
    exts = [".pt", ".ckpt", ".safetensors"]
    candidates = list(_walk_files(getattr(shared.cmd_opts, "lora_dir", None), exts))
    candidates += list(_walk_files(getattr(shared.cmd_opts, "lyco_dir_backcompat", None), exts))
    for filename in candidates:
        name = os.path.splitext(os.path.basename(filename))[0]
        if names and name not in names:
            continue
        try:
            entry = network.NetworkOnDisk(name, filename)
        except OSError:
            errors.report(f"Failed to load network {name} from {filename}", exc_info=True)
            continue
        _add_available(name, entry)


# fake-internal: the registration at the end of networks.py:process_network_files
def _add_available(name, entry):
    available_networks[name] = entry

    if entry.alias in available_network_aliases:
        forbidden_network_aliases[entry.alias.lower()] = 1

    available_network_aliases[name] = entry
    available_network_aliases[entry.alias] = entry


# networks.py:update_available_networks_by_names
def update_available_networks_by_names(names: list[str]):
    process_network_files(names)


# networks.py:list_available_networks (fake: without cmd_opts.lora_dir it keeps the registered networks)
def list_available_networks():
    if not getattr(shared.cmd_opts, "lora_dir", None):
        return

    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})

    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)

    process_network_files()


# fake-only test helper
def register_network(filename, name=None):
    """test helper: make the file ``filename`` available as network ``name`` (default: its
    basename without extension), like a file found in the Lora folder.  Returns its NetworkOnDisk."""
    if name is None:
        name = os.path.splitext(os.path.basename(filename))[0]
    entry = network.NetworkOnDisk(name, os.fspath(filename))
    _add_available(name, entry)
    return entry


# fake-only test helper (lora_script.py's start-up: networks.originals = lora_patches.LoraPatches() etc.)
def install_patches(on_model_loaded=False):
    """test helper: what webui's Lora script does when it loads: patch torch.nn.Linear/Conv2d/
    GroupNorm/LayerNorm/MultiheadAttention forward and _load_from_state_dict at class level
    (originals kept in ``networks.originals``), create ``extra_network_lora`` (whose ``errors``
    counts per-network failures), make sure ``opts.lora_functional`` exists (default False), and,
    with on_model_loaded=True, register assign_network_names_to_compvis_modules as an
    on_model_loaded callback.  Idempotent; returns ``originals``."""
    global originals, extra_network_lora
    if "lora_functional" not in shared.opts.data_labels:
        shared.opts.add_option("lora_functional", shared.OptionInfo(False, "Lora/Networks: use old method that takes longer when you have multiple Loras active and produces same results as kohya-ss/sd-webui-additional-networks extension"))
    if extra_network_lora is None:
        import extra_networks_lora
        extra_network_lora = extra_networks_lora.ExtraNetworkLora()
    if on_model_loaded:
        from modules import script_callbacks
        script_callbacks.on_model_loaded(assign_network_names_to_compvis_modules, name="lora")
    if originals is None:
        import lora_patches
        originals = lora_patches.LoraPatches()
    return originals


# fake-only test helper (lora_script.py's on_script_unloaded: networks.originals.undo())
def uninstall_patches():
    """test helper: undo install_patches' class-level patches (torch.nn back to the originals)."""
    global originals
    if originals is not None:
        originals.undo()
        originals = None


# fake-only test helper
def reset():
    """test helper: no network loaded, in memory or available; error counters and comments cleared.
    (Layers keep their backups: restore them with network_apply_weights after load_networks([]).)"""
    loaded_networks.clear()
    networks_in_memory.clear()
    available_networks.clear()
    available_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    comments.clear()
    if extra_network_lora is not None:
        extra_network_lora.errors.clear()


originals = None  # networks.py:originals (a lora_patches.LoraPatches while installed)

extra_network_lora = None  # networks.py:extra_network_lora (an extra_networks_lora.ExtraNetworkLora once installed)

available_networks = {}  # networks.py:available_networks
available_network_aliases = {}  # networks.py:available_network_aliases
loaded_networks = []  # networks.py:loaded_networks
loaded_bundle_embeddings = {}  # networks.py:loaded_bundle_embeddings
networks_in_memory = {}  # networks.py:networks_in_memory
available_network_hash_lookup = {}  # networks.py:available_network_hash_lookup
forbidden_network_aliases = {"none": 1, "Addams": 1}  # networks.py:forbidden_network_aliases
comments = []
"""fake-only: what webui would add to sd_hijack.model_hijack.comments ("Lora not found: ...")"""

list_available_networks()
