"""Fake of webui 1.10.1 extensions-builtin/Lora/network_oft.py: OFT (kohya-ss / new LyCORIS
``oft_blocks`` with Cayley transform and optional ``alpha`` constraint; old LyCORIS ``oft_diag``
rotations used as they are) and LyCORIS BOFT (4-D ``oft_blocks``, butterfly permutations), with
optional ``rescale``.  The einops rearranges of webui are written out as reshape/transpose here."""

import torch

import network


class ModuleTypeOFT(network.ModuleType):
    # network_oft.py:ModuleTypeOFT
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "oft_blocks" in weights.w or "oft_diag" in weights.w:
            return NetworkModuleOFT(net, weights)
        return None


# fake-internal: einops.rearrange(t, '(c g k) ... -> (c k g) ...') and its inverse, as used in NetworkModuleOFT.calc_updown
def _swap_groups(t, k, forward):
    """BOFT butterfly permutation of dim 0: '(c g k) ... -> (c k g) ...' (forward) or back, g = 2."""
    rest = t.shape[1:]
    c = t.shape[0] // (2 * k)
    t = t.reshape(c, 2, k, *rest) if forward else t.reshape(c, k, 2, *rest)
    return t.transpose(1, 2).reshape(-1, *rest)


class NetworkModuleOFT(network.NetworkModule):
    # network_oft.py:NetworkModuleOFT
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)

        self.lin_module = None
        self.org_module = [self.sd_module]

        self.scale = 1.0
        self.is_R = False
        self.is_boft = False

        if "oft_blocks" in weights.w:
            # kohya-ss / new LyCORIS OFT and BOFT: (num_blocks, block_size, block_size) or (m, num_blocks, b, b)
            self.oft_blocks = weights.w["oft_blocks"]
            self.alpha = weights.w.get("alpha", None)  # a tensor here: the norm constraint
            self.dim = self.oft_blocks.shape[0]
        elif "oft_diag" in weights.w:
            # old LyCORIS OFT: the rotation blocks themselves
            self.is_R = True
            self.oft_blocks = weights.w["oft_diag"]
            self.dim = self.oft_blocks.shape[1]

        is_linear = type(self.sd_module) in (torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)
        is_conv = type(self.sd_module) is torch.nn.Conv2d
        is_other_linear = type(self.sd_module) is torch.nn.MultiheadAttention  # unsupported in calc_updown

        if is_linear:
            self.out_dim = self.sd_module.out_features
        elif is_conv:
            self.out_dim = self.sd_module.out_channels
        elif is_other_linear:
            self.out_dim = self.sd_module.embed_dim

        if self.oft_blocks.dim() == 4:
            self.is_boft = True
        self.rescale = weights.w.get('rescale', None)
        if self.rescale is not None and not is_other_linear:
            self.rescale = self.rescale.reshape(-1, *[1] * (self.org_module[0].weight.dim() - 1))

        self.num_blocks = self.dim
        self.block_size = self.out_dim // self.dim
        self.constraint = (0 if self.alpha is None else self.alpha) * self.out_dim
        if self.is_R:
            self.constraint = None
            self.block_size = self.dim
            self.num_blocks = self.out_dim // self.dim
        elif self.is_boft:
            self.boft_m = self.oft_blocks.shape[0]
            self.num_blocks = self.oft_blocks.shape[1]
            self.block_size = self.oft_blocks.shape[2]
            self.boft_b = self.block_size

    # network_oft.py:NetworkModuleOFT.calc_updown
    def calc_updown(self, orig_weight):
        oft_blocks = self.oft_blocks.to(orig_weight.device)
        eye = torch.eye(self.block_size, device=oft_blocks.device)

        if not self.is_R:
            block_Q = oft_blocks - oft_blocks.transpose(-1, -2)  # skew-symmetric
            if self.constraint != 0:
                norm_Q = torch.norm(block_Q.flatten())
                new_norm_Q = torch.clamp(norm_Q, max=self.constraint.to(oft_blocks.device))
                block_Q = block_Q * ((new_norm_Q + 1e-8) / (norm_Q + 1e-8))
            # Cayley transform: orthogonal (I + Q)(I - Q)^-1
            oft_blocks = torch.matmul(eye + block_Q, (eye - block_Q).float().inverse())

        R = oft_blocks.to(orig_weight.device)

        if not self.is_boft:
            rest = orig_weight.shape[1:]
            w = orig_weight.reshape(self.num_blocks, self.block_size, -1)
            merged_weight = torch.einsum('knm,knr->kmr', R, w).reshape(-1, *rest)
        else:
            scale = 1.0  # as webui: no multiplier folded in here
            b = self.boft_b
            r_b = b // 2
            inp = orig_weight
            for i in range(self.boft_m):
                bi = R[i]
                if i == 0:
                    bi = bi * scale + (1 - scale) * eye
                k = 2 ** i * r_b
                rest = inp.shape[1:]
                inp = _swap_groups(inp, k, forward=True)
                inp = torch.einsum('dij,djr->dir', bi, inp.reshape(-1, b, rest.numel())).reshape(-1, *rest)
                inp = _swap_groups(inp, k, forward=False)
            merged_weight = inp

        if self.rescale is not None:
            merged_weight = self.rescale.to(merged_weight) * merged_weight

        updown = merged_weight.to(orig_weight.device) - orig_weight.to(merged_weight.dtype)
        output_shape = orig_weight.shape
        return self.finalize_updown(updown, orig_weight, output_shape)
