"""Fake of webui 1.10.1 extensions-builtin/Lora/network_lokr.py: LyCORIS LoKr
(dW = kron(w1, w2), each factor full or low-rank a @ b, w2 optionally CP with lokr_t2)."""

import torch

import lyco_helpers
import network


class ModuleTypeLokr(network.ModuleType):
    # network_lokr.py:ModuleTypeLokr
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        has_1 = "lokr_w1" in weights.w or ("lokr_w1_a" in weights.w and "lokr_w1_b" in weights.w)
        has_2 = "lokr_w2" in weights.w or ("lokr_w2_a" in weights.w and "lokr_w2_b" in weights.w)
        if has_1 and has_2:
            return NetworkModuleLokr(net, weights)
        return None


# network_lokr.py:make_kron
def make_kron(orig_shape, w1, w2):
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(orig_shape)


class NetworkModuleLokr(network.NetworkModule):
    # network_lokr.py:NetworkModuleLokr
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)

        self.w1 = weights.w.get("lokr_w1")
        self.w1a = weights.w.get("lokr_w1_a")
        self.w1b = weights.w.get("lokr_w1_b")
        if self.w1b is not None:
            self.dim = self.w1b.shape[0]
        self.w2 = weights.w.get("lokr_w2")
        self.w2a = weights.w.get("lokr_w2_a")
        self.w2b = weights.w.get("lokr_w2_b")
        if self.w2b is not None:
            self.dim = self.w2b.shape[0]
        self.t2 = weights.w.get("lokr_t2")

    # network_lokr.py:NetworkModuleLokr.calc_updown
    def calc_updown(self, orig_weight):
        dev = orig_weight.device
        if self.w1 is not None:
            w1 = self.w1.to(dev)
        else:
            w1 = self.w1a.to(dev) @ self.w1b.to(dev)

        if self.w2 is not None:
            w2 = self.w2.to(dev)
        elif self.t2 is None:
            w2 = self.w2a.to(dev) @ self.w2b.to(dev)
        else:
            w2 = lyco_helpers.make_weight_cp(self.t2.to(dev), self.w2a.to(dev), self.w2b.to(dev))

        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(orig_weight.shape) == 4:
            output_shape = orig_weight.shape

        updown = make_kron(output_shape, w1, w2)

        return self.finalize_updown(updown, orig_weight, output_shape)
