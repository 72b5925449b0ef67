"""ldm_patched/modules/model_base.py: BaseModel.apply_model / _apply_model (eps prediction)."""

import torch


class BaseModel(torch.nn.Module):
    def __init__(self, diffusion_model, model_config, sigma_to_t):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_config = model_config
        self._sigma_to_t = sigma_to_t  # fake-only: model_sampling.timestep

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return self._apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5  # model_sampling.calculate_input
        if c_concat is not None:
            xc = torch.cat([xc] + [c_concat], dim=1)
        timestep = self._sigma_to_t(sigma).to(x.dtype)
        eps = self.diffusion_model(xc, timestep, context=c_crossattn, control=control, transformer_options=transformer_options,
                                   **kwargs).float()
        return x - eps * sigma[:, None, None, None]  # model_sampling.calculate_denoised
