"""Fake of webui 1.10.1 extensions-builtin/Lora/lyco_helpers.py: the weight-rebuilding helpers
shared by the LoRA / LyCORIS module types (own implementation of the same math)."""

import math

import torch


# lyco_helpers.py:make_weight_cp
def make_weight_cp(t, wa, wb):
    # t: (i, j, k, l) core, wb: (j, r) -> contract dim 1; wa: (i, p) -> contract dim 0; result (p, r, k, l)
    return torch.einsum('ijkl,jr,ip->prkl', t, wb, wa)


# lyco_helpers.py:rebuild_conventional
def rebuild_conventional(up, down, shape, dyn_dim=None):
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    if dyn_dim is not None:
        up = up[:, :dyn_dim]
        down = down[:dyn_dim, :]
    return torch.matmul(up, down).reshape(shape)


# lyco_helpers.py:rebuild_cp_decomposition
def rebuild_cp_decomposition(up, down, mid):
    up = up.reshape(up.size(0), -1)      # (out, rank)
    down = down.reshape(down.size(0), -1)  # (rank, in)
    # mid: (rank_up, rank_down, kh, kw) -> (out, in, kh, kw)
    return torch.einsum('nmkl,in,mj->ijkl', mid, up, down)


# lyco_helpers.py:factorization
def factorization(dimension: int, factor: int = -1) -> tuple:
    """(m, n) with m * n == dimension and m <= n: ``factor`` itself when it divides dimension,
    else the largest divisor m <= sqrt(dimension) that does not exceed factor (any when factor < 0)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    best = 1
    for m in range(1, math.isqrt(dimension) + 1):
        if dimension % m == 0 and m <= limit:
            best = m
    return best, dimension // best
