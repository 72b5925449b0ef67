"""What Forge changes in webui's front end, on top of the fake webui.

- modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward (Forge): B rows in the step's params,
  the callback first, then NGMS / Skip Early CFG set cond_scale = 1, then
  backend/sampling/sampling_function.py sampling_function evaluates [cond entries, uncond entry]
  (reading `text_uncond` back from the params).
- backend/diffusion_engine/sd15.py StableDiffusion: not an nn.Module; `forge_objects.unet.model`
  is a KModel around `diffusion_model`, `forge_objects.clip.cond_stage_model.clip_l` the text
  encoder (an IntegratedCLIP: `.transformer` plus its own `logit_scale`).
"""

import torch

from backend import memory_management
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.sampling.sampling_function import sampling_function_inner, sampling_prepare
from modules import processing, prompt_parser, sd_samplers_cfg_denoiser, sd_samplers_common, shared
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback


class KModel(torch.nn.Module):
    # backend/modules/k_model.py KModel.apply_model (eps prediction)
    def __init__(self, diffusion_model, sigma_to_t):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.storage_dtype = torch.float32
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


def _model_conds(cond):
    # backend/sampling/condition.py compile_conditions (:104-113): SDXL's dict gives the
    # cross-attention and `y` (the pooled vector)
    if isinstance(cond, dict):
        return {"c_crossattn": cond["crossattn"], "y": cond["vector"]}
    return {"c_crossattn": cond}


def forge_forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond, **kwargs):
    # modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward (Forge @ dfdcbab6, :150-230)
    state, opts = shared.state, shared.opts
    if state.interrupted or state.skipped:
        raise sd_samplers_common.InterruptedException
    if self.p.cfg_scale == 1:  # modules/processing.py setup_conds (Forge): no negative conditioning at CFG 1
        uncond = None
    cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
    uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
    params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self)
    cfg_denoiser_callback(params)
    if opts.skip_early_cond != 0. and self.step / self.total_steps <= opts.skip_early_cond:
        cond_scale = 1.0
    elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
        cond_scale = 1.0
    engine = shared.sd_model
    unet = engine.forge_objects.unet
    # backend/sampling/sampling_function.py sampling_function: compile_conditions
    uncond_entries = [{"model_conds": _model_conds(params.text_uncond)}]
    cond_entries = []
    for cond_pre in map(list, zip(*cond_composition)):
        indices = [i for i, _w in cond_pre]
        text_cond = params.text_cond
        feed = {k: v[indices] for k, v in text_cond.items()} if isinstance(text_cond, dict) else text_cond[indices]
        cond_entries.append({"model_conds": _model_conds(feed), "strength": cond_pre[-1][1]})
    denoised = sampling_function_inner(unet.model, x, sigma, uncond_entries, cond_entries, cond_scale, unet.model_options)
    self.step += 1
    return denoised


class CLIPEmbeddingForTextualInversion(torch.nn.Module):
    # backend/text_processing/classic_engine.py: wraps the token embedding and registers its
    # weight as its own `weight` too; the forward reads the wrapped embedding's.
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class _ForgeUNetForward:
    # backend/nn/unet.py IntegratedUNet2DConditionModel.forward's signature
    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return super().forward(x, timesteps, context=context, y=y)


class IntegratedCLIP(torch.nn.Module):
    # backend/nn/clip.py:5-12: the HF text model as `.transformer`, with `add_text_projection` a Linear
    # `transformer.text_projection` (backend/loader.py:62-78 leaves it as built when the file has none),
    # and its own logit_scale
    def __init__(self, transformer, add_text_projection=False):
        super().__init__()
        self.transformer = transformer
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))
        if add_text_projection:
            width = transformer.text_model.final_layer_norm.weight.shape[0]
            self.transformer.text_projection = torch.nn.Linear(width, width, bias=False)
            with torch.no_grad():
                self.transformer.text_projection.weight.copy_(torch.eye(width))


def make_sdxl_model(state, checkpoint_info=None):
    """An SDXL checkpoint (sgm keys) as Forge loads it: backend/loader.py split_state_dict converts the
    text encoders with the guess's process_clip_state_dict (huggingface_guess model_list.py:292-302) and
    loads each into an IntegratedCLIP (:62-78); backend/diffusion_engine/sdxl.py:25-33 joins them as
    `{"clip_l", "clip_g"}`, wraps their token embeddings (classic_engine.py) and projects bigG's pooled
    output through the Linear `clip_g.transformer.text_projection` (classic_engine.py:141-147). The
    engine keeps the guess as `model_config` (backend/diffusion_engine/base.py:27)."""
    from huggingface_guess import model_list
    from tests.fork_sdxl_models import ForkSDXL, hf_text_model, text_state, tiny_unet

    config = model_list.SDXL()
    converted = config.process_clip_state_dict(text_state(state))
    encoders = torch.nn.ModuleDict({"clip_l": IntegratedCLIP(hf_text_model("clip_l"), add_text_projection=True),
                                    "clip_g": IntegratedCLIP(hf_text_model("clip_g"), add_text_projection=True)})
    with torch.no_grad():
        missing = [k for k in encoders.load_state_dict(converted, strict=False).missing_keys if not k.endswith("position_ids")]
    assert set(missing) <= {"clip_l.transformer.text_projection.weight", "clip_l.logit_scale", "clip_g.logit_scale"}, missing
    for encoder in encoders.values():
        embeddings = encoder.transformer.text_model.embeddings
        embeddings.token_embedding = CLIPEmbeddingForTextualInversion(embeddings.token_embedding)
    clip_g = encoders["clip_g"]
    inner = ForkSDXL(tiny_unet(state), encoders, lambda pooled: clip_g.transformer.text_projection(pooled))
    from modules import sd_models

    model = sd_models.FakeSdModel(inner, checkpoint_info)
    model.__dict__["model_config"] = config
    return model


def install(sd_model, monkeypatch, engine_name="StableDiffusion", networks=None):
    """Make the fake webui's loaded `sd_model` look like Forge's engine, for one test; with
    `networks` (the fake sd_forge_lora networks module) the prompt's <lora:...> are activated.
    An SDXL model from `make_sdxl_model` brings its own text encoders (engine "StableDiffusionXL")."""
    unet = sd_model.model.diffusion_model
    monkeypatch.setattr(unet, "__class__", type("IntegratedUNet2DConditionModel", (_ForgeUNetForward, type(unet)), {}))
    if getattr(sd_model, "is_sdxl", False):
        text_encoders = dict(sd_model.text_encoders.items())
    else:
        embeddings = sd_model.cond_stage_model.transformer.text_model.embeddings
        monkeypatch.setattr(embeddings, "token_embedding", CLIPEmbeddingForTextualInversion(embeddings.token_embedding))
        clip_l = torch.nn.Module()  # backend/nn/clip.py IntegratedCLIP: the HF model as `.transformer`, and its own logit_scale
        clip_l.transformer = sd_model.cond_stage_model.transformer
        clip_l.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))
        text_encoders = {"clip_l": clip_l}
    wrap = sd_samplers_common.CompVisDenoiserLike(sd_model)
    forge_objects = ForgeObjects(UnetPatcher(KModel(unet, wrap.sigma_to_t)), CLIP(text_encoders))
    d = sd_model.__dict__
    d["forge_objects"] = forge_objects
    d["forge_objects_original"] = forge_objects.shallow_copy()
    d["forge_objects_after_applying_lora"] = forge_objects.shallow_copy()
    d["current_lora_hash"] = str([])
    encode = sd_model.get_learned_conditioning

    def get_learned_conditioning(prompts):
        # backend/diffusion_engine/sd15.py StableDiffusion.get_learned_conditioning: the text encoder is
        # loaded first (its LoRA patches merged: memory_management.LoadedModel.model_load)
        memory_management.load_model_gpu(sd_model.forge_objects.clip.patcher)
        return encode(prompts)

    d["get_learned_conditioning"] = get_learned_conditioning
    monkeypatch.setattr(sd_model, "__class__", type(engine_name, (type(sd_model),), {}))
    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", forge_forward)
    sample_with_sigmas = sd_samplers_common.FakeEulerSampler.sample_with_sigmas

    def prepare_then_sample(self, p, x, *args, **kwargs):
        # modules/sd_samplers_kdiffusion.py KDiffusionSampler.sample/sample_img2img (Forge :138, :198):
        # sampling_prepare(unet, x) loads the UNet (merging its LoRA patches) before sampling
        sampling_prepare(shared.sd_model.forge_objects.unet, x)
        return sample_with_sigmas(self, p, x, *args, **kwargs)

    monkeypatch.setattr(sd_samplers_common.FakeEulerSampler, "sample_with_sigmas", prepare_then_sample)
    if networks is not None:
        setup_conds = processing.StableDiffusionProcessing.setup_conds

        def activate_then_setup_conds(self):
            # modules/processing.py process_images_inner (Forge :937-962): forge_objects from the
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
