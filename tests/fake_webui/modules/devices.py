"""Fake of webui 1.10.1 modules/devices.py for a CPU-only, float32 run.

The real autocast() returns contextlib.nullcontext() when dtype is float32 (the CPU case),
so the fake's autocast/without_autocast are always no-op context managers.
"""

import contextlib

import torch

cpu: torch.device = torch.device("cpu")
device: torch.device = torch.device("cpu")
device_interrogate: torch.device = cpu
device_gfpgan: torch.device = cpu
device_esrgan: torch.device = cpu
device_codeformer: torch.device = cpu
dtype: torch.dtype = torch.float32
dtype_vae: torch.dtype = torch.float32
dtype_unet: torch.dtype = torch.float32
dtype_inference: torch.dtype = torch.float32
unet_needs_upcast = False
fp8 = False
force_fp16 = False


# modules/devices.py:get_optimal_device_name
def get_optimal_device_name():
    return "cpu"


# modules/devices.py:get_optimal_device
def get_optimal_device():
    return torch.device(get_optimal_device_name())


# modules/devices.py:get_device_for
def get_device_for(task):
    return get_optimal_device()


# modules/devices.py:torch_gc
def torch_gc():
    pass


# modules/devices.py:autocast
def autocast(disable=False):
    return contextlib.nullcontext()


# modules/devices.py:without_autocast
def without_autocast(disable=False):
    return contextlib.nullcontext()


# modules/devices.py:cond_cast_unet
def cond_cast_unet(input):
    return input.to(dtype_unet) if unet_needs_upcast else input


# modules/devices.py:cond_cast_float
def cond_cast_float(input):
    return input.float() if unet_needs_upcast else input


class NansException(Exception):
    # modules/devices.py:NansException
    pass


# modules/devices.py:test_for_nans
def test_for_nans(x, where):
    if torch.isnan(x).all().item():
        raise NansException(f"A tensor with all NaNs was produced in {where}.")
