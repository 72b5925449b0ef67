"""Mirrors comfy/utils.py @ a125cd84: get_attr, set_attr_param, ProgressBar (its hook is what the UI shows)."""

import torch

PROGRESS_BAR_HOOK = None
UPDATES = []  # (current, total) of every ProgressBar update: the tests' view of the UI's progress bar


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr_param(obj, attr, value):
    *path, name = attr.split(".")
    for part in path:
        obj = getattr(obj, part)
    prev = getattr(obj, name)
    setattr(obj, name, torch.nn.Parameter(value, requires_grad=False))
    return prev


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        UPDATES.append((self.current, self.total))

    def update(self, value):
        self.update_absolute(self.current + value)
