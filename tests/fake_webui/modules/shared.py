"""Fake of webui 1.10.1 modules/shared.py (with modules/options.py, modules/shared_options.py,
modules/shared_state.py and modules/shared_cmd_options.py folded in).

``opts`` carries the real option names with their real defaults (those the fake pipeline
and extensions read); ``state`` is the job state; ``cmd_opts`` the command-line flags;
``sd_model`` is None until a test sets it (see sd_models.set_model).

Test helper: ``reset()`` puts opts, state, cmd_opts back to defaults and clears sd_model.
"""

import types

from modules import devices


class OptionInfo:
    # modules/options.py:OptionInfo (only what an extension's on_ui_settings needs)
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False, category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    # modules/options.py:OptionInfo.link
    def link(self, label, url):
        return self

    # modules/options.py:OptionInfo.js
    def js(self, label, js_func):
        return self

    # modules/options.py:OptionInfo.info
    def info(self, info):
        return self

    # modules/options.py:OptionInfo.html
    def html(self, html):
        return self

    # modules/options.py:OptionInfo.needs_restart
    def needs_restart(self):
        return self

    # modules/options.py:OptionInfo.needs_reload_ui
    def needs_reload_ui(self):
        return self


# defaults as in modules/shared_options.py (and the built-in Lora extension for lora_functional)
OPTION_DEFAULTS = {
    "sd_model_checkpoint": None,
    "sd_checkpoint_dropdown_use_short": False,
    "disable_mmap_load_safetensors": False,
    "CLIP_stop_at_last_layers": 1,
    "emphasis": "Original",
    "randn_source": "GPU",
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "batch_cond_uncond": True,
    "pad_cond_uncond": False,
    "pad_cond_uncond_v0": False,
    "persistent_cond_cache": True,
    "skip_early_cond": 0.0,
    "s_min_uncond": 0.0,
    "s_min_uncond_all": False,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "eta_noise_seed_delta": 0,
    "always_discard_next_to_last_sigma": False,
    "sgm_noise_multiplier": False,
    "use_old_scheduling": False,
    "use_old_hires_fix_width_height": False,
    "hires_fix_use_firstpass_conds": False,
    "img2img_fix_steps": False,
    "img2img_extra_noise": 0.0,
    "inpainting_mask_weight": 1.0,
    "token_merging_ratio": 0.0,
    "token_merging_ratio_img2img": 0.0,
    "token_merging_ratio_hr": 0.0,
    "face_restoration": False,
    "tiling": False,
    "live_previews_enable": True,
    "live_preview_content": "Prompt",
    "show_progress_every_n_steps": 10,
    "enable_pnginfo": True,
    "add_model_name_to_info": True,
    "add_model_hash_to_info": True,
    "add_vae_name_to_info": True,
    "add_vae_hash_to_info": True,
    "add_user_name_to_info": False,
    "add_version_to_infotext": True,
    "sd_vae_encode_method": "Full",
    "sd_vae_decode_method": "Full",
    "fp8_storage": "Disable",
    "cache_fp16_weight": False,
    "lora_functional": False,
}


class Options:
    # modules/options.py:Options (a plain attribute bag over ``data`` with defaults in ``data_labels``)
    def __init__(self, data_labels, restricted_opts=None):
        object.__setattr__(self, "data_labels", dict(data_labels))
        object.__setattr__(self, "data", {k: v.default for k, v in data_labels.items()})
        object.__setattr__(self, "restricted_opts", restricted_opts or set())
        object.__setattr__(self, "_onchange", {})

    # modules/options.py:Options.__setattr__
    def __setattr__(self, key, value):
        self.data[key] = value

    # modules/options.py:Options.__getattr__
    def __getattr__(self, item):
        data = self.__dict__["data"]
        if item in data:
            return data[item]
        labels = self.__dict__["data_labels"]
        if item in labels:
            return labels[item].default
        raise AttributeError(item)

    # modules/options.py:Options.set
    def set(self, key, value, is_api=False, run_callbacks=True):
        if self.data.get(key, None) == value:
            return False
        setattr(self, key, value)
        func = self._onchange.get(key)
        if run_callbacks and func is not None:
            func()
        return True

    # modules/options.py:Options.get_default
    def get_default(self, key):
        info = self.data_labels.get(key)
        return None if info is None else info.default

    # modules/options.py:Options.add_option
    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data:
            self.data[key] = info.default

    # modules/options.py:Options.onchange
    def onchange(self, key, func, call=True):
        self._onchange[key] = func
        if call:
            func()

    def reset(self):
        """test helper: every option back to its default (options added by add_option included)"""
        self.data.clear()
        self.data.update({k: v.default for k, v in self.data_labels.items()})


opts = Options({k: OptionInfo(v) for k, v in OPTION_DEFAULTS.items()})


class State:
    # modules/shared_state.py:State
    def __init__(self):
        self.reset()

    def reset(self):
        """test helper: back to an idle, not interrupted state"""
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.processing_has_refined_job_count = False
        self.job_timestamp = "0"
        self.sampling_step = 0
        self.sampling_steps = 0
        self.current_latent = None
        self.current_image = None
        self.textinfo = None

    # modules/shared_state.py:State.skip
    def skip(self):
        self.skipped = True

    # modules/shared_state.py:State.interrupt
    def interrupt(self):
        self.interrupted = True

    # modules/shared_state.py:State.stop_generating
    def stop_generating(self):
        self.stopping_generation = True

    # modules/shared_state.py:State.nextjob
    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0

    # modules/shared_state.py:State.begin
    def begin(self, job: str = "(unknown)"):
        self.reset()
        self.job = job
        self.job_count = -1

    # modules/shared_state.py:State.end
    def end(self):
        self.job = ""
        self.job_count = 0


state = State()

_CMD_DEFAULTS = dict(lowvram=False, medvram=False, medvram_sdxl=False, ckpt_dir=None, ckpt=None, no_half=False,
                     no_half_vae=False, no_hashing=False, freeze_settings=False, api=False, nowebui=False,
                     no_prompt_history=True, embeddings_dir="embeddings")
cmd_opts = types.SimpleNamespace(**_CMD_DEFAULTS)  # modules/shared_cmd_options.py:cmd_opts

sd_model = None  # modules/shared.py:sd_model (a property over sd_models.model_data in webui)
device = devices.device  # modules/shared.py:device
weight_load_location = None  # modules/shared.py:weight_load_location
parallel_processing_allowed = True
latent_upscale_default_mode = "Latent"
latent_upscale_modes = {"Latent": {"mode": "nearest", "antialias": False}}  # subset of modules/shared.py:latent_upscale_modes


class _TotalTQDM:
    # modules/shared_total_tqdm.py:TotalTQDM (no output)
    def reset(self):
        pass

    # modules/shared_total_tqdm.py:TotalTQDM.update
    def update(self):
        pass

    # modules/shared_total_tqdm.py:TotalTQDM.updateTotal
    def updateTotal(self, new_total):
        pass

    # modules/shared_total_tqdm.py:TotalTQDM.clear
    def clear(self):
        pass


total_tqdm = _TotalTQDM()


class _PromptStyles:
    # modules/styles.py:StyleDatabase (no styles)
    def apply_styles_to_prompt(self, prompt, styles):
        return prompt

    # modules/styles.py:StyleDatabase.apply_negative_styles_to_prompt
    def apply_negative_styles_to_prompt(self, prompt, styles):
        return prompt


prompt_styles = _PromptStyles()


def reset():
    """test helper: opts, state and cmd_opts back to defaults; sd_model None"""
    global sd_model
    opts.reset()
    state.reset()
    cmd_opts.__dict__.clear()
    cmd_opts.__dict__.update(_CMD_DEFAULTS)
    sd_model = None
