"""Mirrors comfy/model_base.py @ a125cd84 BaseModel: apply_model runs the APPLY_MODEL wrappers, then
_apply_model calls the diffusion model by keyword with `transformer_options` (eps prediction, k-diffusion
scaling), passing the other model conditioning (SDXL's `y`) on by keyword; extra_conds turns `cross_attn`
into model_conds["c_crossattn"] and, for SDXL, encode_adm the pooled output and image sizes into `y`."""

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
        extra = {name: value for name, value in kwargs.items() if name != "transformer_options"}
        eps = self.diffusion_model(xc, timestep, context=c_crossattn, control=control, transformer_options=transformer_options, **extra)
        return x - eps * sigma

    def encode_adm(self, **kwargs):
        return None

    def extra_conds(self, **kwargs):
        out = {}
        adm = self.encode_adm(**kwargs)
        if adm is not None:
            out["y"] = comfy.conds.CONDRegular(adm)
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:
            out["c_crossattn"] = comfy.conds.CONDCrossAttn(cross_attn)
        return out


class SDXL(BaseModel):
    """encode_adm: the pooled text embedding and the size embeddings (height, width), (crop 0, 0),
    (target height, width), as model_base.SDXL.encode_adm; `size_embedders` stand in for its Timestep."""

    def __init__(self, diffusion_model, size_embedders):
        super().__init__(diffusion_model)
        self.size_embedders = size_embedders

    def encode_adm(self, **kwargs):
        pooled = kwargs["pooled_output"]
        width, height = kwargs.get("width", 768), kwargs.get("height", 768)
        sizes = [torch.tensor([[height, width]]), torch.tensor([[0, 0]]), torch.tensor([[height, width]])]
        return torch.cat([pooled] + [emb(s).to(pooled.dtype) for emb, s in zip(self.size_embedders, sizes)], dim=1)
