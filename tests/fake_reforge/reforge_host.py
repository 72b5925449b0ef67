"""What reForge changes in webui's front end, on top of the fake webui.

- modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward (reForge): the step's
  params carry B rows (x is not stacked), the callback runs first, then NGMS /
  Skip Early CFG decide `skip_uncond`, and ldm_patched's sampling_function
  evaluates [cond entries, uncond entry] (reading `text_uncond` back from the
  params) and combines them.
- modules_forge/forge_loader.py load_model_for_a1111: `sd_model.forge_objects`
  (unet: a UnetPatcher whose `.model` is the BaseModel around the very
  `sd_model.model.diffusion_model`; clip with its patcher), `is_sd1/...`.
"""

import torch

from ldm_patched.modules import model_base, supported_models
from ldm_patched.modules.samplers import sampling_function
from modules import prompt_parser, sd_samplers_cfg_denoiser, sd_samplers_common, shared
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback
from modules_forge import forge_sampler


class UnetPatcher:
    # modules_forge/unet_patcher.py UnetPatcher (the fields PG reads)
    def __init__(self, model):
        self.model = model
        self.patches = {}
        self.model_options = {"transformer_options": {}}
        self.compiled = False
        self.controlnet_linked_list = None
        self.extra_concat_condition = None


class ModelPatcher:
    # ldm_patched/modules/model_patcher.py ModelPatcher (patches: key -> list of LoRA patches)
    def __init__(self, model):
        self.model = model
        self.patches = {}


class CLIP:
    # ldm_patched/modules/sd.py CLIP
    def __init__(self, cond_stage_model):
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model)


class ForgeObjects:
    # modules_forge/forge_loader.py ForgeSD
    def __init__(self, unet, clip):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, None, None


def reforge_forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond, **kwargs):
    # modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward (reForge @ 3b56b268, :99-300)
    state = shared.state
    opts = shared.opts
    if state.interrupted or state.skipped:
        raise sd_samplers_common.InterruptedException
    cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
    uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
    denoiser_params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self)
    cfg_denoiser_callback(denoiser_params)
    skip_uncond = False
    s_min_uncond = getattr(opts, "s_min_uncond", 0.0) or 0.0
    if s_min_uncond > 0 and sigma[0] < s_min_uncond:
        if self.step % 2 == 0 or opts.s_min_uncond_all:
            skip_uncond = True
    if not skip_uncond:
        if self.step < opts.skip_early_cond:
            skip_uncond = True
        elif opts.skip_early_cond != 0. and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
    model = shared.sd_model.forge_objects.unet.model
    model_options = shared.sd_model.forge_objects.unet.model_options
    uncond_patched = forge_sampler.cond_from_a1111_to_patched_ldm(denoiser_params.text_uncond)
    cond_patched = forge_sampler.cond_from_a1111_to_patched_ldm_weighted(denoiser_params.text_cond, cond_composition)
    if isinstance(image_cond, torch.Tensor) and image_cond.shape[0] == x.shape[0] and image_cond.shape[2:] == x.shape[2:]:
        for entry in uncond_patched + cond_patched:  # inpainting models: c_concat
            entry["model_conds"]["c_concat"] = image_cond
    if skip_uncond:
        denoised = sampling_function(model, x, sigma, None, cond_patched, 1.0, model_options, self.p.seeds[0])
    else:
        denoised = sampling_function(model, x, sigma, uncond_patched, cond_patched, cond_scale, model_options, self.p.seeds[0])
    self.step += 1
    return denoised


class _ReForgeUNetForward:
    # ldm_patched/ldm/modules/diffusionmodules/openaimodel.py UNetModel.forward's signature
    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return super().forward(x, timesteps, context=context, y=y)


def install(sd_model, monkeypatch, family=supported_models.SD15):
    """Make the fake webui's loaded `sd_model` (a FakeSdModel) look like reForge's, for one test."""
    unet = sd_model.model.diffusion_model
    monkeypatch.setattr(unet, "__class__", type("ReForgeUNetModel", (_ReForgeUNetForward, type(unet)), {}))
    wrap = sd_samplers_common.CompVisDenoiserLike(sd_model)
    base_model = model_base.BaseModel(unet, family(), wrap.sigma_to_t)
    forge_objects = ForgeObjects(UnetPatcher(base_model), CLIP(sd_model.cond_stage_model))
    sd_model.__dict__["forge_objects"] = forge_objects
    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", reforge_forward)
    return forge_objects
