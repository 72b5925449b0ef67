"""Fake of webui 1.10.1 extensions-builtin/Lora/network_ia3.py: LyCORIS (IA)^3
(dW = W * w, w scaling output rows, or input columns when on_input)."""

import network


class ModuleTypeIa3(network.ModuleType):
    # network_ia3.py:ModuleTypeIa3
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "weight" in weights.w:
            return NetworkModuleIa3(net, weights)
        return None


class NetworkModuleIa3(network.NetworkModule):
    # network_ia3.py:NetworkModuleIa3
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)

        self.w = weights.w["weight"]
        self.on_input = weights.w["on_input"].item()

    # network_ia3.py:NetworkModuleIa3.calc_updown
    def calc_updown(self, orig_weight):
        w = self.w.to(orig_weight.device)

        output_shape = [w.size(0), orig_weight.size(1)]
        if self.on_input:
            output_shape.reverse()
        else:
            w = w.reshape(-1, 1)

        updown = orig_weight * w

        return self.finalize_updown(updown, orig_weight, output_shape)
