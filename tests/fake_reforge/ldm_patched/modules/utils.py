"""ldm_patched/modules/utils.py: get_attr, set_attr, set_attr_param, copy_to_param, load_torch_file."""

import torch


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj, attr, value):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    prev = getattr(obj, attrs[-1])
    setattr(obj, attrs[-1], value)
    return prev


def set_attr_param(obj, attr, value):
    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj, attr, value):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    getattr(obj, attrs[-1]).data.copy_(value)


def load_torch_file(ckpt, safe_load=False, device=None):
    from safetensors.torch import load_file

    return load_file(ckpt)
