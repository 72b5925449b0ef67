"""ldm_patched/float.py: stochastic_rounding (a plain cast for fp32/fp16/bf16, the only dtypes faked)."""

import torch


def stochastic_rounding(value, dtype, seed=0):
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return value.to(dtype=dtype)
    raise NotImplementedError("fake stochastic_rounding: fp8 not faked")
