"""Fake of webui 1.10.1 extensions-builtin/Lora/network_norm.py: LyCORIS norm-layer training
(GroupNorm/LayerNorm: d_weight = w_norm, d_bias = b_norm)."""

import network


class ModuleTypeNorm(network.ModuleType):
    # network_norm.py:ModuleTypeNorm
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "w_norm" in weights.w and "b_norm" in weights.w:
            return NetworkModuleNorm(net, weights)
        return None


class NetworkModuleNorm(network.NetworkModule):
    # network_norm.py:NetworkModuleNorm
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)

        self.w_norm = weights.w.get("w_norm")
        self.b_norm = weights.w.get("b_norm")

    # network_norm.py:NetworkModuleNorm.calc_updown
    def calc_updown(self, orig_weight):
        output_shape = self.w_norm.shape
        updown = self.w_norm.to(orig_weight.device)
        ex_bias = self.b_norm.to(orig_weight.device) if self.b_norm is not None else None

        return self.finalize_updown(updown, orig_weight, output_shape, ex_bias)
