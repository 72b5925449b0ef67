"""Fake of webui 1.10.1 extensions-builtin/Lora/network_lora.py: kohya/LyCORIS LoRA and LoCon
(lora_up/lora_down, optional CP lora_mid; also PEFT-style lora_A/lora_B)."""

import torch

import lyco_helpers
import network
from modules import devices


class ModuleTypeLora(network.ModuleType):
    # network_lora.py:ModuleTypeLora
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "lora_up.weight" in weights.w and "lora_down.weight" in weights.w:
            return NetworkModuleLora(net, weights)

        if "lora_A.weight" in weights.w and "lora_B.weight" in weights.w:
            w = dict(weights.w)
            weights.w.clear()
            weights.w["lora_up.weight"] = w["lora_B.weight"]
            weights.w["lora_down.weight"] = w["lora_A.weight"]
            return NetworkModuleLora(net, weights)

        return None


_LINEAR_TYPES = (torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear, torch.nn.MultiheadAttention)


class NetworkModuleLora(network.NetworkModule):
    # network_lora.py:NetworkModuleLora
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)

        self.up_model = self.create_module(weights.w, "lora_up.weight")
        self.down_model = self.create_module(weights.w, "lora_down.weight")
        self.mid_model = self.create_module(weights.w, "lora_mid.weight", none_ok=True)

        self.dim = weights.w["lora_down.weight"].shape[0]

    # network_lora.py:NetworkModuleLora.create_module (the factor as an nn.Linear / nn.Conv2d without bias)
    def create_module(self, weights, key, none_ok=False):
        weight = weights.get(key)

        if weight is None and none_ok:
            return None

        is_linear = type(self.sd_module) in _LINEAR_TYPES
        is_conv = type(self.sd_module) is torch.nn.Conv2d

        if is_linear:
            weight = weight.reshape(weight.shape[0], -1)
            module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif (is_conv and key == "lora_down.weight") or key == "dyn_up":
            if weight.dim() == 2:
                weight = weight.reshape(weight.shape[0], -1, 1, 1)
            if weight.shape[2] != 1 or weight.shape[3] != 1:
                # a full-kernel down projection takes the layer's kernel, stride and padding
                module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], self.sd_module.kernel_size,
                                         self.sd_module.stride, self.sd_module.padding, bias=False)
            else:
                module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
        elif is_conv and key == "lora_mid.weight":
            module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], self.sd_module.kernel_size,
                                     self.sd_module.stride, self.sd_module.padding, bias=False)
        elif (is_conv and key == "lora_up.weight") or key == "dyn_down":
            module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
        else:
            raise AssertionError(f'Lora layer {self.network_key} matched a layer with unsupported type: {type(self.sd_module).__name__}')

        with torch.no_grad():
            if weight.shape != module.weight.shape:
                weight = weight.reshape(module.weight.shape)
            module.weight.copy_(weight)

        module.to(device=devices.cpu, dtype=devices.dtype)
        module.weight.requires_grad_(False)

        return module

    # network_lora.py:NetworkModuleLora.calc_updown
    def calc_updown(self, orig_weight):
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)

        output_shape = [up.size(0), down.size(1)]
        if self.mid_model is not None:
            # CP decomposition: down 1x1, mid k x k, up 1x1
            mid = self.mid_model.weight.to(orig_weight.device)
            updown = lyco_helpers.rebuild_cp_decomposition(up, down, mid)
            output_shape += mid.shape[2:]
        else:
            if len(down.shape) == 4:
                output_shape += down.shape[2:]
            updown = lyco_helpers.rebuild_conventional(up, down, output_shape, self.network.dyn_dim)

        return self.finalize_updown(updown, orig_weight, output_shape)

    # network_lora.py:NetworkModuleLora.forward (functional mode; like webui it ignores lora_mid, bias, dyn_dim and DoRA)
    def forward(self, x, y):
        self.up_model.to(device=devices.device)
        self.down_model.to(device=devices.device)

        return y + self.up_model(self.down_model(x)) * self.multiplier() * self.calc_scale()
