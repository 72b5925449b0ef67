"""backend/utils.py (Neo 2.26 :127-165): the attribute helpers the patcher uses. set_attr wraps the
value in a new Parameter; copy_to_param copies into the existing one."""

import torch

ATTR_UNSET = object()


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def resolve_attr(obj, attr):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    return obj, attrs[-1]


def set_attr_raw(obj, attr, value):
    obj, name = resolve_attr(obj, attr)
    prev = getattr(obj, name, ATTR_UNSET)
    if value is ATTR_UNSET:
        delattr(obj, name)
    else:
        setattr(obj, name, value)
    return prev


def set_attr(obj, attr, value):
    set_attr_raw(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj, attr, value):
    get_attr(obj, attr).data.copy_(value)


def tensor2parameter(x):
    if isinstance(x, torch.nn.Parameter):
        return x
    return torch.nn.Parameter(x, requires_grad=False)
