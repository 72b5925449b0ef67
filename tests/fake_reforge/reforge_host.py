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

from ldm_patched.modules import model_base, model_management, supported_models
from ldm_patched.modules.samplers import sampling_function
from ldm_patched.modules.sd import CLIP
from modules import processing, prompt_parser, sd_samplers_cfg_denoiser, sd_samplers_common, shared
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback
from modules_forge import forge_sampler
from modules_forge.unet_patcher import UnetPatcher


class ForgeObjects:
    # modules_forge/forge_loader.py ForgeSD
    def __init__(self, unet, clip):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, None, None

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip)


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


class SDClipModel(torch.nn.Module):
    # ldm_patched/modules/sd1_clip.py SDClipModel (:81-165): the HF text model as `.transformer`, a bare
    # `text_projection` Parameter (the identity until a checkpoint sets it, :151) and `logit_scale` (:152)
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        width = transformer.text_model.final_layer_norm.weight.shape[0]
        self.text_projection = torch.nn.Parameter(torch.eye(width))
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))


class SDXLClipModel(torch.nn.Module):
    # ldm_patched/modules/sdxl_clip.py SDXLClipModel (:43-49): clip_l and clip_g
    def __init__(self, clip_l, clip_g):
        super().__init__()
        self.clip_l, self.clip_g = clip_l, clip_g

    def __getitem__(self, name):  # fake-only: ForkSDXL reads encoders by name
        return getattr(self, name)


def make_sdxl_model(state, checkpoint_info=None):
    """An SDXL checkpoint (sgm keys) as reForge loads it: load_checkpoint_guess_config converts the text
    encoders with model_config.process_clip_state_dict (supported_models.py:227-243) and loads them whole
    into the SDXLClipModel (sd.py:305-309, strict=False). The front end (modules_forge/forge_loader.py:459-483)
    keeps sgm's conditioner, whose bigG embedder gets the backend's transformer and registers clip_g's
    bare `text_projection` Parameter as its own; the pooled output is projected through that registration
    (modules_forge/forge_clip.py:120-123: `pooled @ self.wrapped.text_projection`)."""
    from tests.fork_sdxl_models import ForkSDXL, hf_text_model, text_state, tiny_unet

    config = supported_models.SDXL()
    converted = config.process_clip_state_dict(text_state(state))
    encoders = SDXLClipModel(SDClipModel(hf_text_model("clip_l")), SDClipModel(hf_text_model("clip_g")))
    with torch.no_grad():
        missing = [k for k in encoders.load_state_dict(converted, strict=False).missing_keys if not k.endswith("position_ids")]
    assert set(missing) <= {"clip_l.text_projection", "clip_l.logit_scale"}, missing
    conditioner = torch.nn.Module()
    clip_l_embedder, clip_g_embedder = torch.nn.Module(), torch.nn.Module()
    clip_l_embedder.wrapped = torch.nn.Module()
    clip_l_embedder.wrapped.transformer = encoders.clip_l.transformer
    clip_g_embedder.wrapped = torch.nn.Module()  # FrozenOpenCLIPEmbedder2, wrapped by CLIP_SD_XL_G
    clip_g_embedder.wrapped.transformer = encoders.clip_g.transformer
    clip_g_embedder.wrapped.text_projection = encoders.clip_g.text_projection
    conditioner.embedders = torch.nn.ModuleList([clip_l_embedder, clip_g_embedder])

    def project(pooled):
        text_projection = conditioner.embedders[1].wrapped.text_projection
        return pooled.float().to(text_projection.device) @ text_projection.float()

    inner = ForkSDXL(tiny_unet(state), encoders, project, conditioner=conditioner)
    from modules import sd_models

    return sd_models.FakeSdModel(inner, checkpoint_info)


def install(sd_model, monkeypatch, family=supported_models.SD15, networks=None):
    """Make the fake webui's loaded `sd_model` (a FakeSdModel) look like reForge's, for one test;
    with `networks` (the fake Lora networks module) the prompt's <lora:...> are activated. An SDXL
    model from `make_sdxl_model` brings its text encoders (family supported_models.SDXL)."""
    unet = sd_model.model.diffusion_model
    monkeypatch.setattr(unet, "__class__", type("ReForgeUNetModel", (_ReForgeUNetForward, type(unet)), {}))
    wrap = sd_samplers_common.CompVisDenoiserLike(sd_model)
    if getattr(sd_model, "is_sdxl", False):
        family = supported_models.SDXL if family is supported_models.SD15 else family
        text_encoders = sd_model.text_encoders
    else:
        clip_l = torch.nn.Module()  # ldm_patched/modules/sd1_clip.py SD1ClipModel.clip_l: the text model as `.transformer`
        clip_l.transformer = sd_model.cond_stage_model.transformer
        text_encoders = torch.nn.ModuleDict({"clip_l": clip_l})
    base_model = model_base.BaseModel(unet, family(), wrap.sigma_to_t)
    forge_objects = ForgeObjects(UnetPatcher(base_model), CLIP(text_encoders))
    d = sd_model.__dict__
    d["forge_objects"] = forge_objects
    d["forge_objects_original"] = forge_objects.shallow_copy()
    d["forge_objects_after_applying_lora"] = forge_objects.shallow_copy()
    d["current_lora_hash"] = str([])
    encode = sd_model.get_learned_conditioning

    def get_learned_conditioning(prompts):
        # modules_forge/forge_clip.py move_clip_to_gpu before encoding: the text encoder's patcher is
        # loaded (its LoRA patches merged)
        model_management.load_model_gpu(sd_model.forge_objects.clip.patcher)
        return encode(prompts)

    d["get_learned_conditioning"] = get_learned_conditioning
    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", reforge_forward)
    sample_with_sigmas = sd_samplers_common.FakeEulerSampler.sample_with_sigmas

    def prepare_then_sample(self, p, x, *args, **kwargs):
        # modules/sd_samplers_kdiffusion.py KDiffusionSampler.sample/sample_img2img (reForge :196, :261)
        forge_sampler.sampling_prepare(shared.sd_model.forge_objects.unet, x)
        return sample_with_sigmas(self, p, x, *args, **kwargs)

    monkeypatch.setattr(sd_samplers_common.FakeEulerSampler, "sample_with_sigmas", prepare_then_sample)
    if networks is not None:
        setup_conds = processing.StableDiffusionProcessing.setup_conds

        def activate_then_setup_conds(self):
            # modules/processing.py process_images_inner (reForge :1021-1045): forge_objects from the
            # original, the prompt's LoRAs activated (Lora networks.load_networks), the LoRA copy taken
            self.sd_model.forge_objects = self.sd_model.forge_objects_original.shallow_copy()
            args = (self.extra_network_data or {}).get("lora", [])
            multipliers = [float(a[1]) if len(a) > 1 else 1.0 for a in args]
            networks.load_networks([a[0] for a in args], multipliers, multipliers)
            self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
            return setup_conds(self)

        monkeypatch.setattr(processing.StableDiffusionProcessing, "setup_conds", activate_then_setup_conds)
    return forge_objects
