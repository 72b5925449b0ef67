"""Mirrors comfy/float.py @ a125cd84 stochastic_rounding for the float dtypes (fp8 left out)."""

import torch


def stochastic_rounding(value, dtype, seed=0):
    return value.to(dtype=dtype)
