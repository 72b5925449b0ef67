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
- backend/diffusion_engine/sdxl.py StableDiffusionXL (:15-77): `forge_objects.clip.cond_stage_model`
  a JointTextEncoder {"clip_l", "clip_g"} of IntegratedCLIPs converted at load by the guess's
  process_clip_state_dict (backend/loader.py split_state_dict :823-880, model_list.py:211-217),
  bigG's pooled output through the Linear `clip_g.transformer.text_projection`
  (classic_engine.py:119-120), conditioning {"crossattn", "vector"} that
  backend/sampling/condition.py compile_conditions (:107-110) feeds as c_crossattn and `y`.
"""

import torch

from backend import memory_management
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.sampling.sampling_function import sampling_function_inner, sampling_prepare
from modules import processing, prompt_parser, sd_samplers_cfg_denoiser, sd_samplers_common, shared
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback


class KModel(torch.nn.Module):
    # backend/modules/k_model.py KModel (:9-58; the fake webui's sigma -> t) with its predictor's
    # calculate_denoised (backend/modules/k_prediction.py:73-78): eps, or v-prediction (sigma_data 1)
    def __init__(self, diffusion_model, sigma_to_t, prediction_type="epsilon"):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.storage_dtype = diffusion_model.storage_dtype
        self.computation_dtype = diffusion_model.computation_dtype
        self._sigma_to_t = sigma_to_t
        self.prediction_type = prediction_type

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5
        timestep = self._sigma_to_t(sigma).to(x.dtype)
        out = self.diffusion_model(xc, timestep, context=c_crossattn, control=control, transformer_options=transformer_options,
                                   **kwargs).float()
        s = sigma[:, None, None, None]
        if self.prediction_type == "v_prediction":
            return x / (s ** 2 + 1) - out * s / (s ** 2 + 1) ** 0.5
        return x - out * s


class ForgeObjects:
    # backend/diffusion_engine/base.py ForgeObjects
    def __init__(self, unet, clip):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, None, None

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip)


def _model_conds(cond):
    # backend/sampling/condition.py compile_conditions (:94-110): SDXL's dict gives the cross-attention
    # and `y` (the pooled vector)
    if isinstance(cond, dict):
        return {"c_crossattn": cond["crossattn"], "y": cond["vector"]}
    return {"c_crossattn": cond}


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
    # sampling_function (:326-334): compile_conditions / compile_weighted_conditions
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
    # backend/text_processing/classic_engine.py :22-30: wraps the token embedding and registers its
    # weight as its own `weight` too; the forward reads the wrapped embedding's.
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class IntegratedCLIP(torch.nn.Module):
    # backend/nn/clip.py:4-12: the HF text model as `.transformer`, its own logit_scale, and with
    # `add_text_projection` (backend/loader.py:153, both SDXL encoders) a Linear
    # `transformer.text_projection` (load_state_dict ignores its absence, :155: clip_l's keeps its init)
    def __init__(self, transformer, add_text_projection=False):
        super().__init__()
        self.transformer = transformer
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))
        if add_text_projection:
            width = transformer.text_model.final_layer_norm.weight.shape[0]
            self.transformer.text_projection = torch.nn.Linear(width, width, bias=False)
            with torch.no_grad():
                self.transformer.text_projection.weight.copy_(torch.eye(width))


def make_sdxl_model(state, checkpoint_info=None, v_prediction=False):
    """An SDXL checkpoint (sgm keys) as Neo loads it: backend/loader.py split_state_dict converts the
    text encoders with the guess's process_clip_state_dict (model_list.py:211-217) and loads each into
    an IntegratedCLIP (loader.py:140-156); sdxl.py:19 joins them as {"clip_l", "clip_g"} and
    classic_engine.py wraps their token embeddings; bigG's pooled output goes through the Linear
    `clip_g.transformer.text_projection` (classic_engine.py:119-120). The engine keeps the guess as
    `model_config` (backend/diffusion_engine/base.py:35), its model type read from the file
    (model_list.py:205-209: a `v_pred` key)."""
    from huggingface_guess import model_list
    from tests.fork_sdxl_models import ForkSDXL, hf_text_model, text_state, tiny_unet

    config = model_list.SDXL()
    config.model_type = config.model_type({"v_pred": None} if v_prediction else state)  # loader.py:852
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


class _NeoUNetForward:
    # backend/nn/unet.py IntegratedUNet2DConditionModel.forward's signature (:657)
    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return super().forward(x, timesteps, context=context, y=y)


def install(sd_model, monkeypatch, engine_name=None, networks=None):
    """Make the fake webui's loaded `sd_model` look like Neo's engine, for one test; with
    `networks` (the fake sd_forge_lora networks module) the prompt's <lora:...> are activated.
    An SDXL model from `make_sdxl_model` brings its own text encoders (engine "StableDiffusionXL",
    the default for it; "StableDiffusion" otherwise)."""
    unet = sd_model.model.diffusion_model
    monkeypatch.setattr(unet, "__class__", type("IntegratedUNet2DConditionModel", (_NeoUNetForward, type(unet)), {}))
    d_unet = unet.__dict__
    d_unet["storage_dtype"] = next(unet.parameters()).dtype  # backend/loader.py: model.storage_dtype / computation_dtype
    d_unet["computation_dtype"] = next(unet.parameters()).dtype
    if getattr(sd_model, "is_sdxl", False):
        text_encoders = dict(sd_model.text_encoders.items())
        engine_name = engine_name or "StableDiffusionXL"
    else:
        embeddings = sd_model.cond_stage_model.transformer.text_model.embeddings
        monkeypatch.setattr(embeddings, "token_embedding", CLIPEmbeddingForTextualInversion(embeddings.token_embedding))
        clip_l = torch.nn.Module()
        clip_l.transformer = sd_model.cond_stage_model.transformer
        clip_l.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))
        text_encoders = {"clip_l": clip_l}
    engine_name = engine_name or "StableDiffusion"
    wrap = sd_samplers_common.CompVisDenoiserLike(sd_model)
    # backend/loader.py:933-941: the scheduler's prediction type from the guess's model type
    model_type = getattr(getattr(sd_model, "model_config", None), "model_type", None)
    prediction = "v_prediction" if getattr(model_type, "name", None) == "V_PREDICTION" else "epsilon"
    forge_objects = ForgeObjects(UnetPatcher(KModel(unet, wrap.sigma_to_t, prediction)), CLIP(text_encoders))
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
