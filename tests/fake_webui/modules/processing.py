"""Fake of webui 1.10.1 modules/processing.py: StableDiffusionProcessing(Txt2Img), Processed,
create_infotext, process_images and process_images_inner.

The order of work is webui's: scripts.before_process -> (override settings) ->
process_images_inner: fill_fields_from_opts, setup_prompts, seeds, scripts.process,
p.init, then per n_iter batch: prompts/negative_prompts/seeds slices, p.rng,
scripts.before_process_batch, extra-network parsing, scripts.process_batch,
p.setup_conds(), p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=...,
subseeds=..., subseed_strength=..., prompts=...) under torch.no_grad(),
scripts.post_sample, postprocess_batch(_list), infotexts; then scripts.postprocess.
Differences: no VAE decode, no image files: ``Processed.images`` are the final latents
(one (C, H/8, W/8) tensor per image); hires fix upscales latents ("Latent" upscaler).

Test hook: ``switch_checkpoint_hook`` (None or a callable taking a checkpoint title and
returning the model to switch to); sd_models.reload_model_weights calls it whenever webui
would load another checkpoint (hires checkpoint before the second pass, the main one
again at the start of the next batch / generation).
"""

from __future__ import annotations

import random
import re

import torch

from modules import devices, errors, infotext_utils, prompt_parser, rng, scripts, sd_models, sd_samplers, shared
from modules.shared import opts, state

opt_C = 4
opt_f = 8

switch_checkpoint_hook = None
"""test hook: callable(checkpoint_title) -> sd_model, called by sd_models.reload_model_weights"""


# modules/processing.py:txt2img_image_conditioning
def txt2img_image_conditioning(sd_model, x, width, height):
    if sd_model.model.conditioning_key in {'hybrid', 'concat'} or getattr(sd_model, "is_sdxl_inpaint", False):
        # webui VAE-encodes a 0.5-grey image; the fake uses a zero latent under the all-ones mask
        cond = x.new_zeros(x.shape[0], 4, x.shape[2], x.shape[3])
        return torch.nn.functional.pad(cond, (0, 0, 0, 0, 1, 0), value=1.0)
    if sd_model.model.conditioning_key == "crossattn-adm":
        return x.new_zeros(x.shape[0], 2 * sd_model.noise_augmentor.time_embed.dim)
    return x.new_zeros(x.shape[0], 5, 1, 1, dtype=x.dtype, device=x.device)


# modules/processing.py:get_fixed_seed
def get_fixed_seed(seed):
    if seed == '' or seed is None:
        seed = -1
    elif isinstance(seed, str):
        try:
            seed = int(seed)
        except ValueError:
            seed = -1
    return int(random.randrange(4294967294)) if seed == -1 else seed


# modules/processing.py:fix_seed
def fix_seed(p):
    p.seed = get_fixed_seed(p.seed)
    p.subseed = get_fixed_seed(p.subseed)


# modules/processing.py:program_version
def program_version():
    return None


re_extra_net = re.compile(r"<(\w+):([^>]+)>")  # modules/extra_networks.py:re_extra_net


def parse_prompts(prompts):
    # modules/extra_networks.py:parse_prompts (strips <name:args>, returns the first prompt's data)
    res, extra = [], None
    for prompt in prompts:
        data = {}

        def found(m):
            data.setdefault(m.group(1), []).append(m.group(2).split(":"))
            return ""

        res.append(re.sub(re_extra_net, found, prompt))
        extra = data if extra is None else extra
    return res, extra


def clear_cond_cache():
    """test helper: forget the cached conds (webui keeps them while opts.persistent_cond_cache)"""
    StableDiffusionProcessing.cached_c = [None, None]
    StableDiffusionProcessing.cached_uc = [None, None]
    StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
    StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]


class StableDiffusionProcessing:
    # modules/processing.py:StableDiffusionProcessing (a dataclass in webui; same init fields and order)
    cached_uc = [None, None]
    cached_c = [None, None]
    token_merging_ratio = 0
    token_merging_ratio_hr = 0

    # modules/processing.py:StableDiffusionProcessing.__init__ (the dataclass-generated init; + keyword-only scripts/script_args)
    def __init__(self, sd_model=None, outpath_samples=None, outpath_grids=None, prompt="", prompt_for_display=None,
                 negative_prompt="", styles=None, seed=-1, subseed=-1, subseed_strength=0, seed_resize_from_h=-1,
                 seed_resize_from_w=-1, seed_enable_extras=True, sampler_name=None, scheduler=None, batch_size=1,
                 n_iter=1, steps=50, cfg_scale=7.0, width=512, height=512, restore_faces=None, tiling=None,
                 do_not_save_samples=False, do_not_save_grid=False, extra_generation_params=None, overlay_images=None,
                 eta=None, do_not_reload_embeddings=False, denoising_strength=None, ddim_discretize=None,
                 s_min_uncond=None, s_churn=None, s_tmax=None, s_tmin=None, s_noise=None, override_settings=None,
                 override_settings_restore_afterwards=True, sampler_index=None, refiner_checkpoint=None,
                 refiner_switch_at=None, disable_extra_networks=False, firstpass_image=None, comments=None,
                 *, scripts=None, script_args=None):
        self.outpath_samples, self.outpath_grids = outpath_samples, outpath_grids
        self.prompt, self.prompt_for_display, self.negative_prompt = prompt, prompt_for_display, negative_prompt
        self.styles = styles if styles is not None else []
        self.seed, self.subseed, self.subseed_strength = seed, subseed, subseed_strength
        self.seed_resize_from_h, self.seed_resize_from_w = seed_resize_from_h, seed_resize_from_w
        self.seed_enable_extras = seed_enable_extras
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.batch_size, self.n_iter, self.steps, self.cfg_scale = batch_size, n_iter, steps, cfg_scale
        self.width, self.height = width, height
        self.restore_faces, self.tiling = restore_faces, tiling
        self.do_not_save_samples, self.do_not_save_grid = do_not_save_samples, do_not_save_grid
        self.extra_generation_params = extra_generation_params or {}
        self.overlay_images, self.eta = overlay_images, eta
        self.do_not_reload_embeddings = do_not_reload_embeddings
        self.denoising_strength, self.ddim_discretize = denoising_strength, ddim_discretize
        self.s_min_uncond, self.s_churn, self.s_tmax, self.s_tmin, self.s_noise = s_min_uncond, s_churn, s_tmax, s_tmin, s_noise
        self.override_settings = override_settings or {}
        self.override_settings_restore_afterwards = override_settings_restore_afterwards
        self.sampler_index = sampler_index
        self.refiner_checkpoint, self.refiner_switch_at = refiner_checkpoint, refiner_switch_at
        self.disable_extra_networks, self.firstpass_image = disable_extra_networks, firstpass_image
        self.comments = {}

        # init=False fields of the webui dataclass
        self.scripts_value = None
        self.script_args_value = None
        self.scripts_setup_complete = False
        self.sampler = None
        self.is_using_inpainting_conditioning = False
        self.paste_to = None
        self.is_hr_pass = False
        self.c = None
        self.uc = None
        self.rng = None
        self.step_multiplier = 1
        self.color_corrections = None
        self.all_prompts = self.all_negative_prompts = self.all_seeds = self.all_subseeds = None
        self.iteration = 0
        self.main_prompt = self.main_negative_prompt = None
        self.prompts = self.negative_prompts = self.seeds = self.subseeds = None
        self.extra_network_data = None
        self.user = None
        self.sd_model_name = self.sd_model_hash = self.sd_vae_name = self.sd_vae_hash = None
        self.is_api = False
        self.firstpass_steps = None
        self.sampler_noise_scheduler_override = None
        self.refiner_checkpoint_info = None

        if not self.seed_enable_extras:
            self.subseed, self.subseed_strength, self.seed_resize_from_h, self.seed_resize_from_w = -1, 0, 0, 0

        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

        self.script_args = script_args or {}
        self.scripts = scripts

    # modules/processing.py:StableDiffusionProcessing.sd_model (reads shared.sd_model; the setter ignores values)
    @property
    def sd_model(self):
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass

    # modules/processing.py:StableDiffusionProcessing.scripts
    @property
    def scripts(self):
        return self.scripts_value

    @scripts.setter
    def scripts(self, value):
        self.scripts_value = value
        if self.scripts_value and self.script_args_value and not self.scripts_setup_complete:
            self.setup_scripts()

    # modules/processing.py:StableDiffusionProcessing.script_args
    @property
    def script_args(self):
        return self.script_args_value

    @script_args.setter
    def script_args(self, value):
        self.script_args_value = value
        if self.scripts_value and self.script_args_value and not self.scripts_setup_complete:
            self.setup_scripts()

    # modules/processing.py:StableDiffusionProcessing.setup_scripts
    def setup_scripts(self):
        self.scripts_setup_complete = True
        self.scripts.setup_scrips(self, is_ui=not self.is_api)

    # modules/processing.py:StableDiffusionProcessing.comment
    def comment(self, text):
        self.comments[text] = 1

    # modules/processing.py:StableDiffusionProcessing.fill_fields_from_opts
    def fill_fields_from_opts(self):
        self.s_min_uncond = self.s_min_uncond if self.s_min_uncond is not None else opts.s_min_uncond
        self.s_churn = self.s_churn if self.s_churn is not None else opts.s_churn
        self.s_tmin = self.s_tmin if self.s_tmin is not None else opts.s_tmin
        self.s_tmax = (self.s_tmax if self.s_tmax is not None else opts.s_tmax) or float('inf')
        self.s_noise = self.s_noise if self.s_noise is not None else opts.s_noise

    # modules/processing.py:StableDiffusionProcessing.txt2img_image_conditioning
    def txt2img_image_conditioning(self, x, width=None, height=None):
        self.is_using_inpainting_conditioning = self.sd_model.model.conditioning_key in {'hybrid', 'concat'}
        return txt2img_image_conditioning(self.sd_model, x, width or self.width, height or self.height)

    # modules/processing.py:StableDiffusionProcessing.init
    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    # modules/processing.py:StableDiffusionProcessing.sample
    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        raise NotImplementedError()

    # modules/processing.py:StableDiffusionProcessing.close
    def close(self):
        self.sampler = None
        self.c = None
        self.uc = None
        if not opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    # modules/processing.py:StableDiffusionProcessing.get_token_merging_ratio
    def get_token_merging_ratio(self, for_hr=False):
        if for_hr:
            return self.token_merging_ratio_hr or opts.token_merging_ratio_hr or self.token_merging_ratio or opts.token_merging_ratio
        return self.token_merging_ratio or opts.token_merging_ratio

    # modules/processing.py:StableDiffusionProcessing.setup_prompts
    def setup_prompts(self):
        if isinstance(self.prompt, list):
            self.all_prompts = self.prompt
        elif isinstance(self.negative_prompt, list):
            self.all_prompts = [self.prompt] * len(self.negative_prompt)
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]

        if isinstance(self.negative_prompt, list):
            self.all_negative_prompts = self.negative_prompt
        else:
            self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)

        if len(self.all_prompts) != len(self.all_negative_prompts):
            raise RuntimeError(f"Received a different number of prompts ({len(self.all_prompts)}) and negative prompts ({len(self.all_negative_prompts)})")

        self.all_prompts = [shared.prompt_styles.apply_styles_to_prompt(x, self.styles) for x in self.all_prompts]
        self.all_negative_prompts = [shared.prompt_styles.apply_negative_styles_to_prompt(x, self.styles) for x in self.all_negative_prompts]
        self.main_prompt = self.all_prompts[0]
        self.main_negative_prompt = self.all_negative_prompts[0]

    # modules/processing.py:StableDiffusionProcessing.cached_params (plus the model's identity)
    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        return (list(required_prompts), getattr(required_prompts, "is_negative_prompt", False), steps, hires_steps,
                use_old_scheduling, opts.CLIP_stop_at_last_layers, id(shared.sd_model),
                getattr(shared.sd_model, "sd_checkpoint_info", None), extra_network_data,
                opts.sdxl_crop_left, opts.sdxl_crop_top, self.width, self.height, opts.emphasis)

    # modules/processing.py:StableDiffusionProcessing.get_conds_with_caching
    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        if opts.use_old_scheduling:
            old = prompt_parser.get_learned_conditioning_prompt_schedules(required_prompts, steps, hires_steps, False)
            new = prompt_parser.get_learned_conditioning_prompt_schedules(required_prompts, steps, hires_steps, True)
            if old != new:
                self.extra_generation_params["Old prompt editing timelines"] = True

        key = self.cached_params(required_prompts, steps, extra_network_data, hires_steps, opts.use_old_scheduling)
        for cache in caches:
            if cache[0] is not None and cache[0] == key:
                return cache[1]

        cache = caches[0]
        with devices.autocast():
            cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, opts.use_old_scheduling)
        cache[0] = key
        return cache[1]

    # modules/processing.py:StableDiffusionProcessing.setup_conds
    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative_prompts = prompt_parser.SdConditioning(self.negative_prompts, width=self.width, height=self.height, is_negative_prompt=True)

        config = sd_samplers.find_sampler_config(self.sampler_name)
        total_steps = config.total_steps(self.steps) if config else self.steps
        self.step_multiplier = total_steps // self.steps
        self.firstpass_steps = total_steps

        self.uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, negative_prompts, total_steps, [self.cached_uc], self.extra_network_data)
        self.c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, prompts, total_steps, [self.cached_c], self.extra_network_data)

    # modules/processing.py:StableDiffusionProcessing.get_conds
    def get_conds(self):
        return self.c, self.uc

    # modules/processing.py:StableDiffusionProcessing.parse_extra_network_prompts
    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = parse_prompts(self.prompts)

    # modules/processing.py:StableDiffusionProcessing.save_samples
    def save_samples(self) -> bool:
        return False


class Processed:
    # modules/processing.py:Processed (the fields extensions and tests read)
    def __init__(self, p: StableDiffusionProcessing, images_list, seed=-1, info="", subseed=None, all_prompts=None,
                 all_negative_prompts=None, all_seeds=None, all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):
        self.images = images_list
        self.prompt = p.prompt if not isinstance(p.prompt, list) else p.prompt[0]
        self.negative_prompt = p.negative_prompt if not isinstance(p.negative_prompt, list) else p.negative_prompt[0]
        self.seed = int(seed if not isinstance(seed, list) else seed[0]) if seed is not None else -1
        self.subseed = int(subseed if not isinstance(subseed, list) else subseed[0]) if subseed is not None else -1
        self.subseed_strength = p.subseed_strength
        self.info = info
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.width, self.height = p.width, p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale = p.cfg_scale
        self.steps = p.steps
        self.batch_size = p.batch_size
        self.sd_model_name, self.sd_model_hash = p.sd_model_name, p.sd_model_hash
        self.denoising_strength = getattr(p, 'denoising_strength', None)
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.styles = p.styles
        self.s_min_uncond = p.s_min_uncond
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_negative_prompts = all_negative_prompts or p.all_negative_prompts or [self.negative_prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.all_subseeds = all_subseeds or p.all_subseeds or [self.subseed]
        self.infotexts = infotexts or [info] * len(images_list)

    # modules/processing.py:Processed.infotext
    def infotext(self, p: StableDiffusionProcessing, index):
        return create_infotext(p, self.all_prompts, self.all_seeds, self.all_subseeds, comments=[],
                               position_in_batch=index % self.batch_size, iteration=index // self.batch_size)


# modules/processing.py:create_infotext (webui's keys that apply to the fake pipeline)
def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0, use_main_prompt=False, index=None, all_negative_prompts=None):
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts

    clip_skip = getattr(p, 'clip_skip', opts.CLIP_stop_at_last_layers)
    enable_hr = getattr(p, 'enable_hr', False)
    token_merging_ratio = p.get_token_merging_ratio()
    token_merging_ratio_hr = p.get_token_merging_ratio(for_hr=True)
    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative_prompt = p.main_negative_prompt if use_main_prompt else all_negative_prompts[index]

    generation_params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "Schedule type": p.scheduler,
        "CFG scale": p.cfg_scale,
        "Image CFG scale": getattr(p, 'image_cfg_scale', None),
        "Seed": p.all_seeds[0] if use_main_prompt else all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model_hash if opts.add_model_hash_to_info else None,
        "Model": p.sd_model_name if opts.add_model_name_to_info else None,
        "Variation seed": None if p.subseed_strength == 0 else (p.all_subseeds[0] if use_main_prompt else all_subseeds[index]),
        "Variation seed strength": None if p.subseed_strength == 0 else p.subseed_strength,
        "Seed resize from": None if p.seed_resize_from_w <= 0 or p.seed_resize_from_h <= 0 else f"{p.seed_resize_from_w}x{p.seed_resize_from_h}",
        "Denoising strength": p.extra_generation_params.get("Denoising strength"),
        "Clip skip": None if clip_skip <= 1 else clip_skip,
        "Token merging ratio": None if token_merging_ratio == 0 else token_merging_ratio,
        "Token merging ratio hr": None if not enable_hr or token_merging_ratio_hr == 0 else token_merging_ratio_hr,
        "Tiling": "True" if p.tiling else None,
        **p.extra_generation_params,
        "Version": program_version() if opts.add_version_to_infotext else None,
    }

    call_locals = dict(locals())
    for key, value in list(generation_params.items()):
        try:
            if isinstance(value, list):
                generation_params[key] = value[index]
            elif callable(value):
                generation_params[key] = value(**call_locals)
        except Exception:
            errors.report(f'Error creating infotext for key "{key}"', exc_info=True)
            generation_params[key] = None

    text = ", ".join(k if k == v else f'{k}: {infotext_utils.quote(v)}' for k, v in generation_params.items() if v is not None)
    negative_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative_text}\n{text}".strip()


# modules/processing.py:process_images
def process_images(p: StableDiffusionProcessing) -> Processed:
    """Test convenience: when p.scripts is set but p.script_args is empty, the runner's ui() defaults
    are used (what webui's API does with init_default_script_args)."""
    if p.scripts is not None and not p.script_args:
        p.script_args = p.scripts.make_script_args()

    if p.scripts is not None:
        p.scripts.before_process(p)

    stored = {k: opts.data.get(k, opts.get_default(k)) for k in p.override_settings}
    try:
        if sd_models.checkpoint_aliases.get(p.override_settings.get('sd_model_checkpoint')) is None:
            p.override_settings.pop('sd_model_checkpoint', None)
            sd_models.reload_model_weights()

        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
            if k == 'sd_model_checkpoint':
                sd_models.reload_model_weights()

        res = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored.items():
                setattr(opts, k, v)
    return res


# modules/processing.py:process_images_inner
def process_images_inner(p: StableDiffusionProcessing) -> Processed:
    if isinstance(p.prompt, list):
        assert len(p.prompt) > 0
    else:
        assert p.prompt is not None

    seed = get_fixed_seed(p.seed)
    subseed = get_fixed_seed(p.subseed)

    if p.restore_faces is None:
        p.restore_faces = opts.face_restoration
    if p.tiling is None:
        p.tiling = opts.tiling

    if p.refiner_checkpoint not in (None, "", "None", "none"):
        p.refiner_checkpoint_info = sd_models.get_closet_checkpoint_match(p.refiner_checkpoint)
        if p.refiner_checkpoint_info is None:
            raise Exception(f'Could not find checkpoint with name {p.refiner_checkpoint}')

    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    p.sd_model_name = info.name_for_extra if info is not None else None
    p.sd_model_hash = getattr(shared.sd_model, "sd_model_hash", None)

    p.fill_fields_from_opts()
    p.setup_prompts()

    p.all_seeds = seed if isinstance(seed, list) else [int(seed) + (x if p.subseed_strength == 0 else 0) for x in range(len(p.all_prompts))]
    p.all_subseeds = subseed if isinstance(subseed, list) else [int(subseed) + x for x in range(len(p.all_prompts))]

    if p.scripts is not None:
        p.scripts.process(p)

    infotexts = []
    output_images = []
    with torch.no_grad(), p.sd_model.ema_scope():
        with devices.autocast():
            p.init(p.all_prompts, p.all_seeds, p.all_subseeds)

        if state.job_count == -1:
            state.job_count = p.n_iter

        for n in range(p.n_iter):
            p.iteration = n

            if state.skipped:
                state.skipped = False
            if state.interrupted or state.stopping_generation:
                break

            sd_models.reload_model_weights()  # the model can have been changed by hires fix / refiner

            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
            p.subseeds = p.all_subseeds[n * p.batch_size:(n + 1) * p.batch_size]

            latent_channels = getattr(shared.sd_model, 'latent_channels', opt_C)
            p.rng = rng.ImageRNG((latent_channels, p.height // opt_f, p.width // opt_f), p.seeds, subseeds=p.subseeds,
                                 subseed_strength=p.subseed_strength, seed_resize_from_h=p.seed_resize_from_h,
                                 seed_resize_from_w=p.seed_resize_from_w)

            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)

            if len(p.prompts) == 0:
                break

            p.parse_extra_network_prompts()

            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)

            p.setup_conds()

            with devices.without_autocast() if devices.unet_needs_upcast else devices.autocast():
                samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.subseeds,
                                   subseed_strength=p.subseed_strength, prompts=p.prompts)

            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples)
                p.scripts.post_sample(p, ps)
                samples = ps.samples

            state.nextjob()

            batch_images = list(samples)
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, samples, batch_number=n)
                p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
                p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
                batch_params = scripts.PostprocessBatchListArgs(batch_images)
                p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
                batch_images = batch_params.images

            for i, image in enumerate(batch_images):
                p.batch_index = i
                if p.scripts is not None:
                    pp = scripts.PostprocessImageArgs(image)
                    p.scripts.postprocess_image(p, pp)
                    image = pp.image
                infotexts.append(create_infotext(p, p.prompts, p.seeds, p.subseeds, index=i, all_negative_prompts=p.negative_prompts))
                output_images.append(image)

        if not infotexts:
            infotexts.append(Processed(p, []).infotext(p, 0))

        p.color_corrections = None

    res = Processed(p, images_list=output_images, seed=p.all_seeds[0], info=infotexts[0], subseed=p.all_subseeds[0],
                    index_of_first_image=0, infotexts=infotexts)

    if p.scripts is not None:
        p.scripts.postprocess(p, res)

    return res


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    # modules/processing.py:StableDiffusionProcessingTxt2Img (latent hires fix only)
    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]

    # modules/processing.py:StableDiffusionProcessingTxt2Img.__init__ (dataclass init incl. base fields; + keyword-only scripts/script_args)
    def __init__(self, sd_model=None, outpath_samples=None, outpath_grids=None, prompt="", prompt_for_display=None,
                 negative_prompt="", styles=None, seed=-1, subseed=-1, subseed_strength=0, seed_resize_from_h=-1,
                 seed_resize_from_w=-1, seed_enable_extras=True, sampler_name=None, scheduler=None, batch_size=1,
                 n_iter=1, steps=50, cfg_scale=7.0, width=512, height=512, restore_faces=None, tiling=None,
                 do_not_save_samples=False, do_not_save_grid=False, extra_generation_params=None, overlay_images=None,
                 eta=None, do_not_reload_embeddings=False, denoising_strength=0.75, ddim_discretize=None,
                 s_min_uncond=None, s_churn=None, s_tmax=None, s_tmin=None, s_noise=None, override_settings=None,
                 override_settings_restore_afterwards=True, sampler_index=None, refiner_checkpoint=None,
                 refiner_switch_at=None, disable_extra_networks=False, firstpass_image=None, comments=None,
                 enable_hr=False, firstphase_width=0, firstphase_height=0, hr_scale=2.0, hr_upscaler=None,
                 hr_second_pass_steps=0, hr_resize_x=0, hr_resize_y=0, hr_checkpoint_name=None, hr_sampler_name=None,
                 hr_scheduler=None, hr_prompt='', hr_negative_prompt='', force_task_id=None,
                 *, scripts=None, script_args=None):
        super().__init__(sd_model, outpath_samples, outpath_grids, prompt, prompt_for_display, negative_prompt, styles,
                         seed, subseed, subseed_strength, seed_resize_from_h, seed_resize_from_w, seed_enable_extras,
                         sampler_name, scheduler, batch_size, n_iter, steps, cfg_scale, width, height, restore_faces,
                         tiling, do_not_save_samples, do_not_save_grid, extra_generation_params, overlay_images, eta,
                         do_not_reload_embeddings, denoising_strength, ddim_discretize, s_min_uncond, s_churn, s_tmax,
                         s_tmin, s_noise, override_settings, override_settings_restore_afterwards, sampler_index,
                         refiner_checkpoint, refiner_switch_at, disable_extra_networks, firstpass_image, comments,
                         scripts=None, script_args=None)
        self.enable_hr = enable_hr
        self.firstphase_width, self.firstphase_height = firstphase_width, firstphase_height
        self.hr_scale, self.hr_upscaler, self.hr_second_pass_steps = hr_scale, hr_upscaler, hr_second_pass_steps
        self.hr_resize_x, self.hr_resize_y = hr_resize_x, hr_resize_y
        self.hr_checkpoint_name, self.hr_sampler_name, self.hr_scheduler = hr_checkpoint_name, hr_sampler_name, hr_scheduler
        self.hr_prompt, self.hr_negative_prompt = hr_prompt, hr_negative_prompt
        self.force_task_id = force_task_id

        self.hr_checkpoint_info = None
        self.hr_upscale_to_x = self.hr_upscale_to_y = 0
        self.truncate_x = self.truncate_y = 0
        self.applied_old_hires_behavior_to = None
        self.latent_scale_mode = None
        self.hr_c = self.hr_uc = None
        self.all_hr_prompts = self.all_hr_negative_prompts = None
        self.hr_prompts = self.hr_negative_prompts = None
        self.hr_extra_network_data = None

        if self.firstphase_width != 0 or self.firstphase_height != 0:
            self.hr_upscale_to_x, self.hr_upscale_to_y = self.width, self.height
            self.width, self.height = self.firstphase_width, self.firstphase_height

        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

        self.script_args = script_args or {}
        self.scripts = scripts

    # modules/processing.py:StableDiffusionProcessingTxt2Img.calculate_target_resolution
    def calculate_target_resolution(self):
        if self.hr_resize_x == 0 and self.hr_resize_y == 0:
            self.extra_generation_params["Hires upscale"] = self.hr_scale
            self.hr_upscale_to_x = int(self.width * self.hr_scale)
            self.hr_upscale_to_y = int(self.height * self.hr_scale)
            return

        self.extra_generation_params["Hires resize"] = f"{self.hr_resize_x}x{self.hr_resize_y}"
        if self.hr_resize_y == 0:
            self.hr_upscale_to_x, self.hr_upscale_to_y = self.hr_resize_x, self.hr_resize_x * self.height // self.width
        elif self.hr_resize_x == 0:
            self.hr_upscale_to_x, self.hr_upscale_to_y = self.hr_resize_y * self.width // self.height, self.hr_resize_y
        else:
            if self.width / self.height < self.hr_resize_x / self.hr_resize_y:
                self.hr_upscale_to_x, self.hr_upscale_to_y = self.hr_resize_x, self.hr_resize_x * self.height // self.width
            else:
                self.hr_upscale_to_x, self.hr_upscale_to_y = self.hr_resize_y * self.width // self.height, self.hr_resize_y
            self.truncate_x = (self.hr_upscale_to_x - self.hr_resize_x) // opt_f
            self.truncate_y = (self.hr_upscale_to_y - self.hr_resize_y) // opt_f

    # modules/processing.py:StableDiffusionProcessingTxt2Img.init
    def init(self, all_prompts, all_seeds, all_subseeds):
        if not self.enable_hr:
            return
        self.extra_generation_params["Denoising strength"] = self.denoising_strength

        if self.hr_checkpoint_name and self.hr_checkpoint_name != 'Use same checkpoint':
            self.hr_checkpoint_info = sd_models.get_closet_checkpoint_match(self.hr_checkpoint_name)
            if self.hr_checkpoint_info is None:
                raise Exception(f'Could not find checkpoint with name {self.hr_checkpoint_name}')
            self.extra_generation_params["Hires checkpoint"] = self.hr_checkpoint_info.short_title

        if self.hr_sampler_name is not None and self.hr_sampler_name != self.sampler_name:
            self.extra_generation_params["Hires sampler"] = self.hr_sampler_name

        def get_hr_prompt(p, index, prompt_text, **kwargs):
            hr_prompt = p.all_hr_prompts[index]
            return hr_prompt if hr_prompt != prompt_text else None

        def get_hr_negative_prompt(p, index, negative_prompt, **kwargs):
            hr_negative_prompt = p.all_hr_negative_prompts[index]
            return hr_negative_prompt if hr_negative_prompt != negative_prompt else None

        self.extra_generation_params["Hires prompt"] = get_hr_prompt
        self.extra_generation_params["Hires negative prompt"] = get_hr_negative_prompt
        self.extra_generation_params["Hires schedule type"] = None

        if self.hr_scheduler is None:
            self.hr_scheduler = self.scheduler

        upscaler = self.hr_upscaler if self.hr_upscaler is not None else shared.latent_upscale_default_mode
        self.latent_scale_mode = shared.latent_upscale_modes.get(upscaler, None)
        if self.latent_scale_mode is None:
            raise Exception(f"could not find upscaler named {self.hr_upscaler} (the fake has only latent upscalers)")

        self.calculate_target_resolution()

        if self.hr_second_pass_steps:
            self.extra_generation_params["Hires steps"] = self.hr_second_pass_steps
        if self.hr_upscaler is not None:
            self.extra_generation_params["Hires upscaler"] = self.hr_upscaler

    # modules/processing.py:StableDiffusionProcessingTxt2Img.sample
    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)

        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)

        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning, image_conditioning=self.txt2img_image_conditioning(x))
        del x

        if not self.enable_hr:
            return samples

        with sd_models.SkipWritingToConfig():
            sd_models.reload_model_weights(info=self.hr_checkpoint_info)

        return self.sample_hr_pass(samples, None, seeds, subseeds, subseed_strength, prompts)

    # modules/processing.py:StableDiffusionProcessingTxt2Img.sample_hr_pass (latent upscale path)
    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        if state.interrupted:
            return samples

        self.is_hr_pass = True
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)

        size = (self.hr_upscale_to_y // opt_f, self.hr_upscale_to_x // opt_f)
        samples = torch.nn.functional.interpolate(samples, size=size, mode=self.latent_scale_mode["mode"],
                                                  antialias=self.latent_scale_mode["antialias"])
        image_conditioning = self.txt2img_image_conditioning(samples)

        state.nextjob()

        samples = samples[:, :, self.truncate_y // 2:samples.shape[2] - (self.truncate_y + 1) // 2,
                          self.truncate_x // 2:samples.shape[3] - (self.truncate_x + 1) // 2]

        self.rng = rng.ImageRNG(samples.shape[1:], self.seeds, subseeds=self.subseeds, subseed_strength=self.subseed_strength,
                                seed_resize_from_h=self.seed_resize_from_h, seed_resize_from_w=self.seed_resize_from_w)
        noise = self.rng.next()

        with devices.autocast():
            self.calculate_hr_conds()

        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)

        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc, steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=image_conditioning)
        self.sampler = None
        self.is_hr_pass = False
        return samples

    # modules/processing.py:StableDiffusionProcessingTxt2Img.close
    def close(self):
        super().close()
        self.hr_c = None
        self.hr_uc = None
        if not opts.persistent_cond_cache:
            StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
            StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]

    # modules/processing.py:StableDiffusionProcessingTxt2Img.setup_prompts
    def setup_prompts(self):
        super().setup_prompts()
        if not self.enable_hr:
            return
        if self.hr_prompt == '':
            self.hr_prompt = self.prompt
        if self.hr_negative_prompt == '':
            self.hr_negative_prompt = self.negative_prompt
        n = self.batch_size * self.n_iter
        self.all_hr_prompts = self.hr_prompt if isinstance(self.hr_prompt, list) else n * [self.hr_prompt]
        self.all_hr_negative_prompts = self.hr_negative_prompt if isinstance(self.hr_negative_prompt, list) else n * [self.hr_negative_prompt]
        self.all_hr_prompts = [shared.prompt_styles.apply_styles_to_prompt(x, self.styles) for x in self.all_hr_prompts]
        self.all_hr_negative_prompts = [shared.prompt_styles.apply_negative_styles_to_prompt(x, self.styles) for x in self.all_hr_negative_prompts]

    # modules/processing.py:StableDiffusionProcessingTxt2Img.calculate_hr_conds
    def calculate_hr_conds(self):
        if self.hr_c is not None:
            return

        hr_prompts = prompt_parser.SdConditioning(self.hr_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y)
        hr_negative_prompts = prompt_parser.SdConditioning(self.hr_negative_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y, is_negative_prompt=True)

        config = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name)
        steps = self.hr_second_pass_steps or self.steps
        total_steps = config.total_steps(steps) if config else steps

        self.hr_uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, hr_negative_prompts, self.firstpass_steps, [self.cached_hr_uc, self.cached_uc], self.hr_extra_network_data, total_steps)
        self.hr_c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, hr_prompts, self.firstpass_steps, [self.cached_hr_c, self.cached_c], self.hr_extra_network_data, total_steps)

    # modules/processing.py:StableDiffusionProcessingTxt2Img.setup_conds
    def setup_conds(self):
        if self.is_hr_pass:
            self.hr_c = None
            self.calculate_hr_conds()
            return

        super().setup_conds()
        self.hr_uc = None
        self.hr_c = None
        if self.enable_hr and self.hr_checkpoint_info is None and opts.hires_fix_use_firstpass_conds:
            self.calculate_hr_conds()

    # modules/processing.py:StableDiffusionProcessingTxt2Img.get_conds
    def get_conds(self):
        if self.is_hr_pass:
            return self.hr_c, self.hr_uc
        return super().get_conds()

    # modules/processing.py:StableDiffusionProcessingTxt2Img.parse_extra_network_prompts
    def parse_extra_network_prompts(self):
        res = super().parse_extra_network_prompts()
        if self.enable_hr:
            a, b = self.iteration * self.batch_size, (self.iteration + 1) * self.batch_size
            self.hr_prompts = self.all_hr_prompts[a:b]
            self.hr_negative_prompts = self.all_hr_negative_prompts[a:b]
            self.hr_prompts, self.hr_extra_network_data = parse_prompts(self.hr_prompts)
        return res
