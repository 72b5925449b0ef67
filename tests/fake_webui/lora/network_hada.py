"""Fake of webui 1.10.1 extensions-builtin/Lora/network_hada.py: LyCORIS LoHa
(dW = (w1a @ w1b) * (w2a @ w2b), optional CP cores hada_t1 / hada_t2)."""

import lyco_helpers
import network


class ModuleTypeHada(network.ModuleType):
    # network_hada.py:ModuleTypeHada
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if all(x in weights.w for x in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            return NetworkModuleHada(net, weights)
        return None


class NetworkModuleHada(network.NetworkModule):
    # network_hada.py:NetworkModuleHada
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)

        if hasattr(self.sd_module, 'weight'):
            self.shape = self.sd_module.weight.shape

        self.w1a = weights.w["hada_w1_a"]
        self.w1b = weights.w["hada_w1_b"]
        self.dim = self.w1b.shape[0]
        self.w2a = weights.w["hada_w2_a"]
        self.w2b = weights.w["hada_w2_b"]

        self.t1 = weights.w.get("hada_t1")
        self.t2 = weights.w.get("hada_t2")

    # network_hada.py:NetworkModuleHada.calc_updown
    def calc_updown(self, orig_weight):
        dev = orig_weight.device
        w1a, w1b, w2a, w2b = (t.to(dev) for t in (self.w1a, self.w1b, self.w2a, self.w2b))

        output_shape = [w1a.size(0), w1b.size(1)]

        if self.t1 is not None:
            # CP: w1a is (rank, out), w1b (rank, in)
            output_shape = [w1a.size(1), w1b.size(1)]
            t1 = self.t1.to(dev)
            updown1 = lyco_helpers.make_weight_cp(t1, w1a, w1b)
            output_shape += t1.shape[2:]
        else:
            if len(w1b.shape) == 4:
                output_shape += w1b.shape[2:]
            updown1 = lyco_helpers.rebuild_conventional(w1a, w1b, output_shape)

        if self.t2 is not None:
            updown2 = lyco_helpers.make_weight_cp(self.t2.to(dev), w2a, w2b)
        else:
            updown2 = lyco_helpers.rebuild_conventional(w2a, w2b, output_shape)

        return self.finalize_updown(updown1 * updown2, orig_weight, output_shape)
