"""Fake of webui 1.10.1 extensions-builtin/Lora/network_full.py: LyCORIS "full" (dW = diff,
d_bias = diff_b)."""

import network


class ModuleTypeFull(network.ModuleType):
    # network_full.py:ModuleTypeFull
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "diff" in weights.w:
            return NetworkModuleFull(net, weights)
        return None


class NetworkModuleFull(network.NetworkModule):
    # network_full.py:NetworkModuleFull
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)

        self.weight = weights.w.get("diff")
        self.ex_bias = weights.w.get("diff_b")

    # network_full.py:NetworkModuleFull.calc_updown
    def calc_updown(self, orig_weight):
        output_shape = self.weight.shape
        updown = self.weight.to(orig_weight.device)
        ex_bias = self.ex_bias.to(orig_weight.device) if self.ex_bias is not None else None

        return self.finalize_updown(updown, orig_weight, output_shape, ex_bias)
