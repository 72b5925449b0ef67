"""Mirrors comfy/model_base.py @ a125cd84 BaseModel: apply_model runs the APPLY_MODEL wrappers, then
_apply_model calls the diffusion model by keyword with `transformer_options` (eps prediction, k-diffusion
scaling); extra_conds turns `cross_attn` into model_conds["c_crossattn"]."""

import torch

import comfy.conds
import comfy.patcher_extension


class BaseModel(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.device = torch.device("cpu")

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._apply_model, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, transformer_options),
        ).execute(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t.reshape(-1, 1, 1, 1)
        xc = x / (sigma ** 2 + 1) ** 0.5
        timestep = sigma.reshape(-1) * 100.0
        eps = self.diffusion_model(xc, timestep, context=c_crossattn, control=control, transformer_options=transformer_options)
        return x - eps * sigma

    def extra_conds(self, **kwargs):
        out = {}
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:
            out["c_crossattn"] = comfy.conds.CONDCrossAttn(cross_attn)
        return out
