"""Mirrors comfy/ops.py @ a125cd84: disable_weight_init.Linear / Conv2d (torch's layers, no init; forward
casts the weight to the input first when comfy_cast_weights), manual_cast's subclasses (comfy_cast_weights)."""

import torch


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


class disable_weight_init:  # noqa: N801 (ComfyUI's name)
    class Linear(torch.nn.Linear, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward(self, input):
            if self.comfy_cast_weights:
                bias = None if self.bias is None else self.bias.to(input.dtype)
                return torch.nn.functional.linear(input, self.weight.to(input.dtype), bias)
            return super().forward(input)

    class Conv2d(torch.nn.Conv2d, CastWeightBiasOp):
        def reset_parameters(self):
            return None


class manual_cast(disable_weight_init):  # noqa: N801
    class Linear(disable_weight_init.Linear):
        comfy_cast_weights = True

    class Conv2d(disable_weight_init.Conv2d):
        comfy_cast_weights = True
