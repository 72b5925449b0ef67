"""What Forge Neo changes in webui's front end, on top of the fake webui (Neo 2.26).

- modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward (Neo :100-149): the fast refiner check
  (sd_samplers_common.apply_refiner, not faked: PG refuses it by name before sampling), B rows in
  the step's params, the callback first, then NGMS / Skip Early CFG set cond_scale = 1, then
  backend/sampling/sampling_function.py sampling_function evaluates [cond entries, uncond entry]
  (reading `text_uncond` back from the params). The same as Forge's for SD 1.x: forge_host's.
- backend/diffusion_engine/sd15.py StableDiffusion: not an nn.Module; `forge_objects.unet` a
  UnetPatcher over a KModel (backend/modules/k_model.py: `diffusion_model`, `storage_dtype`,
  `computation_dtype`), `forge_objects.clip.cond_stage_model.clip_l` the text encoder (an
  IntegratedCLIP, backend/nn/clip.py: `.transformer` plus its own `logit_scale`) whose token
  embedding is wrapped by backend/text_processing/classic_engine.py CLIPEmbeddingForTextualInversion.
"""

import torch

from backend import memory_management
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.sampling.sampling_function import sampling_function_inner, sampling_prepare
from modules import processing, prompt_parser, sd_samplers_cfg_denoiser, sd_samplers_common, shared
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback


class KModel(torch.nn.Module):
    # backend/modules/k_model.py KModel (eps prediction; the fake webui's sigma -> t)
    def __init__(self, diffusion_model, sigma_to_t):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.storage_dtype = diffusion_model.storage_dtype
        self.computation_dtype = diffusion_model.computation_dtype
        self._sigma_to_t = sigma_to_t

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5
        timestep = self._sigma_to_t(sigma).to(x.dtype)
        eps = self.diffusion_model(xc, timestep, context=c_crossattn, control=control, transformer_options=transformer_options,
                                   **kwargs).float()
        return x - eps * sigma[:, None, None, None]


class ForgeObjects:
    # backend/diffusion_engine/base.py ForgeObjects
    def __init__(self, unet, clip):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, None, None

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip)


def neo_forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond, **kwargs):
    # modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward (Neo 2.26 :100-190)
    state, opts = shared.state, shared.opts
    if state.interrupted or state.skipped:
        raise sd_samplers_common.InterruptedException
    if self.p.cfg_scale == 1:  # modules/processing.py setup_conds: no negative conditioning at CFG 1
        uncond = None
    cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
    uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
    params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self)
    cfg_denoiser_callback(params)
    if 0 < self.step / self.total_steps <= opts.skip_early_cond:
        cond_scale = 1.0
    elif (self.step % 2 or opts.s_min_uncond_all) and (0 < sigma[0] < s_min_uncond):
        cond_scale = 1.0
    unet = shared.sd_model.forge_objects.unet
    uncond_entries = [{"model_conds": {"c_crossattn": params.text_uncond}}]
    cond_entries = []
    for cond_pre in map(list, zip(*cond_composition)):
        indices = [i for i, _w in cond_pre]
        cond_entries.append({"model_conds": {"c_crossattn": params.text_cond[indices]}, "strength": cond_pre[-1][1]})
    denoised = sampling_function_inner(unet.model, x, sigma, uncond_entries, cond_entries, cond_scale, unet.model_options)
    self.step += 1
    return denoised


class CLIPEmbeddingForTextualInversion(torch.nn.Module):
    # backend/text_processing/classic_engine.py :22-30: wraps the token embedding and registers its
    # weight as its own `weight` too; the forward reads the wrapped embedding's.
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class _NeoUNetForward:
    # backend/nn/unet.py IntegratedUNet2DConditionModel.forward's signature (:657)
    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return super().forward(x, timesteps, context=context, y=y)


def install(sd_model, monkeypatch, engine_name="StableDiffusion", networks=None):
    """Make the fake webui's loaded `sd_model` look like Neo's engine, for one test; with
    `networks` (the fake sd_forge_lora networks module) the prompt's <lora:...> are activated."""
    unet = sd_model.model.diffusion_model
    monkeypatch.setattr(unet, "__class__", type("IntegratedUNet2DConditionModel", (_NeoUNetForward, type(unet)), {}))
    d_unet = unet.__dict__
    d_unet["storage_dtype"] = next(unet.parameters()).dtype  # backend/loader.py: model.storage_dtype / computation_dtype
    d_unet["computation_dtype"] = next(unet.parameters()).dtype
    embeddings = sd_model.cond_stage_model.transformer.text_model.embeddings
    monkeypatch.setattr(embeddings, "token_embedding", CLIPEmbeddingForTextualInversion(embeddings.token_embedding))
    clip_l = torch.nn.Module()
    clip_l.transformer = sd_model.cond_stage_model.transformer
    clip_l.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))
    wrap = sd_samplers_common.CompVisDenoiserLike(sd_model)
    forge_objects = ForgeObjects(UnetPatcher(KModel(unet, wrap.sigma_to_t)), CLIP({"clip_l": clip_l}))
    d = sd_model.__dict__
    d["forge_objects"] = forge_objects
    d["forge_objects_original"] = forge_objects.shallow_copy()
    d["forge_objects_after_applying_lora"] = forge_objects.shallow_copy()
    d["current_lora_hash"] = str([])
    d["is_inpaint"] = False
    encode = sd_model.get_learned_conditioning

    def get_learned_conditioning(prompts):
        # backend/diffusion_engine/sd15.py StableDiffusion.get_learned_conditioning: the text encoder is
        # loaded first (its LoRA patches merged)
        memory_management.load_model_gpu(sd_model.forge_objects.clip.patcher)
        return encode(prompts)

    d["get_learned_conditioning"] = get_learned_conditioning
    monkeypatch.setattr(sd_model, "__class__", type(engine_name, (type(sd_model),), {}))
    # modules/prompt_parser.py get_learned_conditioning(model, prompts, steps, hires_steps=None) (Neo :163):
    # Neo dropped the use_old_scheduling argument and its option
    monkeypatch.delitem(shared.opts.data, "use_old_scheduling", raising=False)
    monkeypatch.delitem(shared.opts.data_labels, "use_old_scheduling", raising=False)
    learned_conditioning = prompt_parser.get_learned_conditioning

    def neo_learned_conditioning(model, prompts, steps, hires_steps=None):
        return learned_conditioning(model, prompts, steps, hires_steps)

    def neo_multicond_learned_conditioning(model, prompts, steps, hires_steps=None):  # prompt_parser.py :252
        res_indexes, flat, _ = prompt_parser.get_multicond_prompt_list(prompts)
        learned = learned_conditioning(model, flat, steps, hires_steps)
        batch = [[prompt_parser.ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in entry] for entry in res_indexes]
        return prompt_parser.MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)

    def neo_get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        # modules/processing.py StableDiffusionProcessing.get_conds_with_caching (Neo :431-459): no old scheduling
        key = self.cached_params(required_prompts, steps, extra_network_data, hires_steps)
        for cache in caches:
            if cache[0] is not None and cache[0] == key:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps)
        cache[0] = key
        return cache[1]

    monkeypatch.setattr(prompt_parser, "get_learned_conditioning", neo_learned_conditioning)
    monkeypatch.setattr(prompt_parser, "get_multicond_learned_conditioning", neo_multicond_learned_conditioning)
    monkeypatch.setattr(processing.StableDiffusionProcessing, "get_conds_with_caching", neo_get_conds_with_caching)
    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", neo_forward)
    sample_with_sigmas = sd_samplers_common.FakeEulerSampler.sample_with_sigmas

    def prepare_then_sample(self, p, x, *args, **kwargs):
        # modules/sd_samplers_kdiffusion.py KDiffusionSampler.sample/sample_img2img (Neo :143, :208):
        # sampling_prepare(unet, x) loads the UNet (merging its LoRA patches) before sampling
        sampling_prepare(shared.sd_model.forge_objects.unet, x)
        return sample_with_sigmas(self, p, x, *args, **kwargs)

    monkeypatch.setattr(sd_samplers_common.FakeEulerSampler, "sample_with_sigmas", prepare_then_sample)
    if networks is not None:
        setup_conds = processing.StableDiffusionProcessing.setup_conds

        def activate_then_setup_conds(self):
            # modules/processing.py process_images_inner (Neo :950-975): forge_objects from the
            # original, the prompt's extra networks activated (sd_forge_lora load_networks), the LoRA
            # copy taken, then setup_conds
            self.sd_model.forge_objects = self.sd_model.forge_objects_original.shallow_copy()
            args = (self.extra_network_data or {}).get("lora", [])
            multipliers = [float(a[1]) if len(a) > 1 else 1.0 for a in args]
            networks.load_networks([a[0] for a in args], multipliers, multipliers)
            self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
            return setup_conds(self)

        monkeypatch.setattr(processing.StableDiffusionProcessing, "setup_conds", activate_then_setup_conds)
    return forge_objects
