"""Fake of webui 1.10.1 extensions-builtin/Lora/network.py: the network-on-disk record, the loaded
network and the base class of every per-layer network module (own implementation mirroring the
real names, signatures and math; no SD3 QkvLinear support)."""

from __future__ import annotations

import enum
import hashlib
import os
from collections import namedtuple

import torch.nn as nn
import torch.nn.functional as F

from modules import errors, sd_models, shared

# network.py:NetworkWeights
NetworkWeights = namedtuple('NetworkWeights', ['network_key', 'sd_key', 'w', 'sd_module'])

# network.py:metadata_tags_order
metadata_tags_order = {"ss_sd_model_name": 1, "ss_resolution": 2, "ss_clip_skip": 3, "ss_num_train_images": 10, "ss_tag_frequency": 20}


class SdVersion(enum.Enum):
    # network.py:SdVersion
    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4


# modules/hashes.py:addnet_hash_safetensors (sha256 of everything after the safetensors header)
def _addnet_hash_safetensors(filename):
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# modules/hashes.py:calculate_sha256
def _sha256_file(filename):
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class NetworkOnDisk:
    # network.py:NetworkOnDisk (no hash cache: hash is '' until read_hash() computes it)
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.metadata = {}
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"

        if self.is_safetensors:
            try:
                self.metadata = sd_models.read_metadata_from_safetensors(filename)
            except Exception as e:
                errors.display(e, f"reading lora {filename}")

        if self.metadata:
            self.metadata = dict(sorted(self.metadata.items(), key=lambda kv: metadata_tags_order.get(kv[0], 999)))

        self.alias = self.metadata.get('ss_output_name', self.name)

        self.hash = None
        self.shorthash = None
        self.set_hash(self.metadata.get('sshs_model_hash') or '')

        self.sd_version = self.detect_version()

    # network.py:NetworkOnDisk.detect_version
    def detect_version(self):
        if str(self.metadata.get('ss_base_model_version', "")).startswith("sdxl_"):
            return SdVersion.SDXL
        if str(self.metadata.get('ss_v2', "")) == "True":
            return SdVersion.SD2
        if len(self.metadata):
            return SdVersion.SD1
        return SdVersion.Unknown

    # network.py:NetworkOnDisk.set_hash
    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]

        if self.shorthash:
            import networks
            networks.available_network_hash_lookup[self.shorthash] = self

    # network.py:NetworkOnDisk.read_hash (addnet hash for safetensors, like hashes.sha256(use_addnet_hash=True))
    def read_hash(self):
        if not self.hash:
            if not os.path.exists(self.filename):
                self.set_hash('')
            elif self.is_safetensors:
                self.set_hash(_addnet_hash_safetensors(self.filename))
            else:
                self.set_hash(_sha256_file(self.filename))

    # network.py:NetworkOnDisk.get_alias
    def get_alias(self):
        import networks
        if getattr(shared.opts, "lora_preferred_name", "Alias from file") == "Filename" or self.alias.lower() in networks.forbidden_network_aliases:
            return self.name
        return self.alias


class Network:  # LoraModule
    # network.py:Network
    def __init__(self, name, network_on_disk: NetworkOnDisk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.bundle_embeddings = {}
        self.mtime = None

        self.mentioned_name = None
        """the text that was used to add the network to prompt - can be either name or an alias"""

        self.keys_failed_to_match = {}
        """fake-only: {file key: converted key} of the file's keys that matched no layer (webui only logs them)"""


class ModuleType:
    # network.py:ModuleType
    def create_module(self, net: Network, weights: NetworkWeights) -> Network | None:
        return None


class NetworkModule:
    # network.py:NetworkModule
    def __init__(self, net: Network, weights: NetworkWeights):
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module

        if hasattr(self.sd_module, 'weight'):
            self.shape = self.sd_module.weight.shape
        elif isinstance(self.sd_module, nn.MultiheadAttention):
            # only self-attention uses torch's MHA: q/k/v/out projections share one shape
            self.shape = self.sd_module.out_proj.weight.shape
        else:
            self.shape = None

        self.ops = None
        self.extra_kwargs = {}
        if isinstance(self.sd_module, nn.Conv2d):
            self.ops = F.conv2d
            self.extra_kwargs = {'stride': self.sd_module.stride, 'padding': self.sd_module.padding}
        elif isinstance(self.sd_module, nn.Linear):
            self.ops = F.linear
        elif isinstance(self.sd_module, nn.LayerNorm):
            self.ops = F.layer_norm
            self.extra_kwargs = {'normalized_shape': self.sd_module.normalized_shape, 'eps': self.sd_module.eps}
        elif isinstance(self.sd_module, nn.GroupNorm):
            self.ops = F.group_norm
            self.extra_kwargs = {'num_groups': self.sd_module.num_groups, 'eps': self.sd_module.eps}

        self.dim = None
        self.bias = weights.w.get("bias")
        self.alpha = weights.w["alpha"].item() if "alpha" in weights.w else None
        self.scale = weights.w["scale"].item() if "scale" in weights.w else None

        self.dora_scale = weights.w.get("dora_scale", None)
        self.dora_norm_dims = len(self.shape) - 1

    # network.py:NetworkModule.multiplier
    def multiplier(self):
        if 'transformer' in self.sd_key[:20]:
            return self.network.te_multiplier
        return self.network.unet_multiplier

    # network.py:NetworkModule.calc_scale
    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    # network.py:NetworkModule.apply_weight_decompose (DoRA: rescale W + dW to dora_scale's per-input-column norm)
    def apply_weight_decompose(self, updown, orig_weight):
        orig_weight = orig_weight.to(updown.dtype)
        dora_scale = self.dora_scale.to(device=orig_weight.device, dtype=updown.dtype)
        updown = updown.to(orig_weight.device)

        merged = updown + orig_weight
        n_in = merged.shape[1]
        # norm over everything but dim 1, shaped (1, in, 1, ...)
        norm = merged.transpose(0, 1).reshape(n_in, -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(n_in, *[1] * self.dora_norm_dims).transpose(0, 1)

        return merged * (dora_scale / norm) - orig_weight

    # network.py:NetworkModule.finalize_updown
    def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
        if self.bias is not None:
            updown = updown.reshape(self.bias.shape)
            updown += self.bias.to(orig_weight.device, dtype=updown.dtype)
            updown = updown.reshape(output_shape)

        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)

        if orig_weight.size().numel() == updown.size().numel():
            updown = updown.reshape(orig_weight.shape)

        if ex_bias is not None:
            ex_bias = ex_bias * self.multiplier()

        updown = updown * self.calc_scale()

        if self.dora_scale is not None:
            updown = self.apply_weight_decompose(updown, orig_weight)

        return updown * self.multiplier(), ex_bias

    # network.py:NetworkModule.calc_updown
    def calc_updown(self, target):
        raise NotImplementedError()

    # network.py:NetworkModule.forward (functional mode: y + op(x, dW, d_bias))
    def forward(self, x, y):
        """A general forward implementation for all modules"""
        if self.ops is None:
            raise NotImplementedError()
        updown, ex_bias = self.calc_updown(self.sd_module.weight)
        return y + self.ops(x, weight=updown, bias=ex_bias, **self.extra_kwargs)
