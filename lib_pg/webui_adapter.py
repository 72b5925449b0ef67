"""The one module that talks to webui (1.10.1; 1.6+).

Everything here maps webui objects onto the core: which model is live, how
webui reads checkpoint files, how it computes negative-prompt conditioning,
and where a generation can be stopped for real. Forge support would replace
this module, not the core.
"""

import os
import sys
import time

import torch

from lib_pg import settings as pg_settings
from lib_pg.errors import PGError
from lib_pg.guidance import GuidanceRun, WeakModelCache, live_version
from lib_pg.patching import swapped_parameters
from lib_pg.routing import text_encoder_swaps
from lib_pg.weights import build_weak_model

from modules import devices, prompt_parser, script_callbacks, sd_models, sd_samplers, shared  # noqa: E402

# Infotext keys (read back by the script's paste-back fields).
KEY_OMEGA = "PG omega"
KEY_OMEGA_END = "PG omega end"
KEY_SCHEDULE = "PG schedule"
KEY_RANGE = "PG steps"
KEY_BASE = "PG base"
KEY_WEAK_PROMPT = "PG weak prompt"
KEY_SKIPPED = "PG skipped"


def log(message):
    print(f"[Personalization Guidance] {message}", file=sys.stderr if message.startswith("Error") else sys.stdout)


class Controller:
    """PG's webui-side state: the weak-weight cache and the generation in flight.

    One instance per webui process (`CONTROLLER`); its lifetime is bounded by
    the script's: `shutdown()` on script unload frees everything.
    """

    def __init__(self):
        self.cache = WeakModelCache()
        self.active_run = None  # the GuidanceRun of the sampling call in flight, if any

    # -- lifetime -------------------------------------------------------
    def on_model_loaded(self, _sd_model):
        self.cache.clear()

    def shutdown(self):
        self.cache.clear()

    # -- per generation --------------------------------------------------
    def prepare(self, p, script_args):
        """Called from the script's process(): validate, then arrange for the
        weak model to be built and routed around each of p's sampling calls.

        webui's ScriptRunner only logs exceptions raised here, so a problem is
        raised from p.sample instead, which webui does not catch: the
        generation stops before sampling, with the message in the UI, the
        console and the API response.
        """
        try:
            settings = pg_settings.from_script_args(script_args)
        except PGError as error:
            self._fail_on_sample(p, error)
            return
        if not settings.enabled:
            self.cache.clear()  # disabled: the weak weights' memory goes back
            return
        try:
            base_info = self._check_request(p, settings)
        except PGError as error:
            self._fail_on_sample(p, error)
            return
        p.extra_generation_params.update(infotext_params(settings, base_info))
        original_sample = p.sample

        def sample_with_pg(*args, **kwargs):
            return self._sample(p, settings, base_info, original_sample, args, kwargs)

        p.sample = sample_with_pg  # an instance attribute of this generation's p only

    def _fail_on_sample(self, p, error):
        log(f"Error: {error.reason}")

        def refuse(*_args, **_kwargs):
            raise error

        p.sample = refuse

    def _check_request(self, p, settings):
        if not settings.base:
            raise PGError("choose a base checkpoint ('base'): the checkpoint your personalized model was trained from")
        info = sd_models.get_closet_checkpoint_match(settings.base)
        if info is None:
            raise PGError(f"unknown base checkpoint {settings.base!r} ('base'); use a name from webui's checkpoint list")
        model = shared.sd_model
        if getattr(model, "cond_stage_key", None) == "edit":
            raise PGError("InstructPix2Pix-style edit models are not supported: their unconditional branch is an image-conditioned one")
        if getattr(shared.cmd_opts, "lowvram", False):
            raise PGError("--lowvram is not supported: the weak weights would need a second copy of the model on the GPU")
        sd_unet = sys.modules.get("modules.sd_unet")
        if sd_unet is not None and getattr(sd_unet, "current_unet", None) is not None:
            raise PGError("a replacement UNet (SD Unet setting, e.g. TensorRT) is active; PG needs webui's own UNet")
        if not os.path.isfile(info.filename):
            raise PGError(f"base checkpoint file not found: {info.filename}")
        return info

    # -- the sampling call -----------------------------------------------
    def _sample(self, p, settings, base_info, original_sample, args, kwargs):
        model = shared.sd_model
        checkpoint = getattr(model, "sd_checkpoint_info", None)
        try:
            weak = self._weak_model(model, settings, base_info)
        except PGError as error:
            log(f"Error: {error.reason}")
            raise
        unet = model.model.diffusion_model
        texts = WeakConditioning(p, settings, weak, model)
        with GuidanceRun(unet, weak, settings) as run:
            def on_denoiser(params):
                if params.denoiser is None or params.denoiser.p is not p:
                    return
                try:
                    ours = shared.sd_model is model and getattr(shared.sd_model, "sd_checkpoint_info", None) is checkpoint
                    uncond = params.text_uncond
                    weak_rows = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
                    omega = run.begin_step(params.denoiser.step, params.denoiser.total_steps, params.x.shape[0], weak_rows, ours)
                    if omega < 1.0 and texts.needed:
                        params.text_uncond = texts.at(omega, params.denoiser.step)
                except BaseException as error:  # webui would only log it: make the next UNet call raise it
                    run.router.fail(error)

            script_callbacks.on_cfg_denoiser(on_denoiser, name="personalization_guidance")
            self.active_run = run
            try:
                result = original_sample(*args, **kwargs)
            finally:
                self.active_run = None
                script_callbacks.remove_callbacks_for_function(on_denoiser)
        note = skipped_note(run.report, p.extra_generation_params)
        if note:
            p.extra_generation_params[KEY_SKIPPED] = note
        return result

    def _weak_model(self, model, settings, base_info):
        finalize_lora_weights(model)
        unet_param = next(model.model.diffusion_model.parameters())
        device = compute_device(model)
        stat = os.stat(base_info.filename)
        key = (id(model), live_version(model), base_info.filename, stat.st_size, stat.st_mtime,
               settings.omega_key, str(unet_param.dtype), str(device))
        weak = self.cache.get(key)
        if weak is not None:
            return weak
        self.cache.clear()  # free the old weak weights before building new ones
        started = time.perf_counter()
        try:
            base_state = sd_models.read_state_dict(base_info.filename, map_location="cpu")
            weak = build_weak_model(model, base_state, settings.omega_key, base_name=base_info.title,
                                    device_for=lambda p: device if device is not None else p.device)
        except torch.cuda.OutOfMemoryError as error:
            raise PGError(f"not enough GPU memory for the weak weights ({error}); lower the resolution/batch or free memory") from None
        except MemoryError:
            raise PGError("not enough memory to read the base checkpoint and build the weak weights") from None
        finally:
            base_state = None
        self.cache.put(key, weak)
        log(f"built weak model from {base_info.title} ({weak.base_family}) in {time.perf_counter() - started:.2f} s: "
            f"{len(weak.unet)} UNet and {len(weak.text)} text-encoder layers differ, "
            f"extra memory {weak.extra_bytes / 2**20:.1f} MiB")
        return weak


class WeakConditioning:
    """The weak branch's text conditioning, where it differs from webui's.

    Needed when the text encoders of base and active model differ (then the
    interpolated text encoder computes it) or the weak prompt is the empty
    prompt. Computed with webui's own prompt_parser.get_learned_conditioning,
    with the same arguments as modules/processing.py setup_conds() /
    calculate_hr_conds(), so prompt editing and SDXL's zeroed empty negative
    prompt behave as in webui. Cached per pass and ω.
    """

    def __init__(self, p, settings, weak, model):
        self.p, self.settings, self.weak, self.model = p, settings, weak, model
        self.needed = weak.text_differs or settings.weak_prompt == "empty"
        self._cache = {}

    def at(self, omega, step):
        hires = bool(getattr(self.p, "is_hr_pass", False))
        te_omega = omega if self.weak.text_differs else 1.0
        key = (hires, te_omega)
        if key not in self._cache:
            self._cache[key] = self._compute(hires, te_omega)
        return prompt_parser.reconstruct_cond_batch(self._cache[key], step)

    def _compute(self, hires, omega):
        p = self.p
        if hires:
            prompts, width, height = p.hr_negative_prompts, p.hr_upscale_to_x, p.hr_upscale_to_y
            config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
            steps = p.hr_second_pass_steps or p.steps
            hires_steps = config.total_steps(steps) if config else steps
        else:
            prompts, width, height, hires_steps = p.negative_prompts, p.width, p.height, None
        if self.settings.weak_prompt == "empty":
            prompts = [""] * len(prompts)
        conditioning = prompt_parser.SdConditioning(list(prompts), width=width, height=height, is_negative_prompt=True)
        swaps = text_encoder_swaps(self.weak.text, omega) if omega < 1.0 else ()
        with swapped_parameters(swaps), devices.autocast():
            return prompt_parser.get_learned_conditioning(self.model, conditioning, p.firstpass_steps, hires_steps,
                                                          shared.opts.use_old_scheduling)


def compute_device(model):
    """Where the UNet runs while sampling: with --medvram webui keeps it on the
    CPU between uses, so the weak weights go to the compute device directly."""
    opts = shared.cmd_opts
    if getattr(opts, "medvram", False) or (getattr(opts, "medvram_sdxl", False) and hasattr(model, "conditioner")):
        return devices.device
    return None


def finalize_lora_weights(model):
    """Bring every layer to the state webui's Lora extension would give it at
    its first forward (merge in the default mode, un-merge in functional mode),
    so the weak weights are built from the weights the conditional rows will use."""
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "network_apply_weights"):
        return
    functional = getattr(shared.opts, "lora_functional", False)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "network_layer_name", None) is None:
                continue
            if functional:
                networks.network_restore_weights_from_backup(module)
                networks.network_reset_cached_weight(module)
            else:
                networks.network_apply_weights(module)


def infotext_params(settings, base_info):
    params = {KEY_OMEGA: settings.omega, KEY_BASE: base_info.title}
    if settings.schedule != "constant":
        params[KEY_SCHEDULE] = settings.schedule
        params[KEY_OMEGA_END] = settings.omega_end
    if (settings.start, settings.end) != (0.0, 1.0):
        params[KEY_RANGE] = f"{settings.start:g}-{settings.end:g}"
    if settings.weak_prompt != "negative":
        params[KEY_WEAK_PROMPT] = settings.weak_prompt
    return params


def skipped_note(report, generation_params):
    parts = []
    if report.steps_without_uncond:
        why = [k for k in ("Skip Early CFG", "NGMS") if k in generation_params] or ["webui skipped the unconditional pass"]
        parts.append(f"{report.steps_without_uncond} steps without unconditional pass ({'/'.join(why)})")
    if report.steps_other_model:
        parts.append(f"{report.steps_other_model} steps on another checkpoint (refiner/hires)")
    return "; ".join(parts)


CONTROLLER = Controller()
