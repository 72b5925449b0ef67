"""backend/float.py stochastic_rounding (Neo 2.26 :39-52): a plain cast to fp32 / fp16 / bf16; fp8
rounds stochastically with a generator seeded by `seed` (comfy_kitchen's kernel, not faked: PG
refuses fp8 storage before anything is merged)."""

import torch


def stochastic_rounding(value, dtype, seed=0):
    if dtype is torch.float32:
        return value.to(dtype=torch.float32)
    if dtype is torch.float16:
        return value.to(dtype=torch.float16)
    if dtype is torch.bfloat16:
        return value.to(dtype=torch.bfloat16)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise NotImplementedError("fake backend/float.py: fp8 stochastic rounding is not faked")
    return value.to(dtype=dtype)
