"""Mirrors comfy/conds.py @ a125cd84 CONDRegular / CONDCrossAttn (concat only; no padding of lengths)."""

import torch


class CONDRegular:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, **kwargs):
        return self.__class__(self.cond.repeat(batch_size // self.cond.shape[0], *([1] * (self.cond.ndim - 1))))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [o.cond for o in others])


class CONDCrossAttn(CONDRegular):
    pass
