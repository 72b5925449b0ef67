"""The reForge host (Panchovix/stable-diffusion-webui-reForge, ldm_patched backend).

reForge keeps webui's front end (modules/processing.py, scripts, prompt_parser,
sd_models.read_state_dict, the on_cfg_denoiser callback) and an ldm-shaped
`shared.sd_model` whose `model.diffusion_model` is the backend's own UNet
module (modules_forge/forge_loader.py load_model_for_a1111) and whose
`cond_stage_model.wrapped.transformer` is the backend's CLIP text model. So
parameter names and base checkpoints work as on webui (ldm keys), and only
sampling differs: the CFG denoiser hands B rows to
ldm_patched/modules/samplers.py sampling_function, whose calc_cond_batch tags
each chunk of a UNet call in transformer_options["cond_or_uncond"]
(lib_pg.forks reads the weak rows from those tags).

Supported here: SD 1.x models with a base checkpoint. Refused by name: other
families (their text encoders are converted at load, so ldm keys no longer
match them), LoRAs to strip and LoRAs in the prompt (reForge merges them into
the weights when it loads the model for sampling, after PG would have built the
weak weights), a compiled UNet.
"""

import os
import time

import torch

from lib_pg import webui_adapter as host
from lib_pg.errors import PGError
from lib_pg.forks import TaggedGuidanceRun, place_like_live
from lib_pg.guidance import UnroutedStep, live_version
from lib_pg.interop import carry_marks
from lib_pg.weights import build_weak_model, live_parameters

from modules import script_callbacks, sd_models, shared  # noqa: E402

HOST = "reForge"
# reForge's backend model classes (ldm_patched/modules/supported_models.py) PG supports.
SUPPORTED_FAMILIES = ("SD15",)
SKIP_REASON = "reForge ran no unconditional pass: CFG Scale 1, NGMS or Skip Early CFG"
# Parameters reForge's CLIP text model has that no SD 1.x checkpoint holds
# (ldm_patched/modules/clip_model.py CLIPTextModel.text_projection): the same in
# the live and the base model, so they are taken from the live model.
SYNTHESIZED_SUFFIXES = (".transformer.text_projection.weight",)

log = host.log


def backend_family(model):
    unet = getattr(getattr(model, "forge_objects", None), "unet", None)
    config = getattr(getattr(unet, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else None


def lora_patch_count(model):
    """How many weights reForge's LoRA loading has patches for (UNet and text encoder)."""
    objects = getattr(model, "forge_objects", None)
    unet = getattr(objects, "unet", None)
    clip = getattr(objects, "clip", None)
    patcher = getattr(clip, "patcher", None)
    return len(getattr(unet, "patches", {}) or {}) + len(getattr(patcher, "patches", {}) or {})


def load_text_encoder(model):
    """Load the text encoder the way reForge does before encoding
    (modules_forge/forge_clip.py move_clip_to_gpu): after this, swapping its
    parameters for a call cannot be undone by a load inside that call."""
    from ldm_patched.modules import model_management

    model_management.load_model_gpu(model.forge_objects.clip.patcher)


class ReForgeWeakConditioning(host.WeakConditioning):
    def _compute(self, hires, omega):
        if omega < 1.0 and self.weak.text:
            load_text_encoder(self.model)
            place_like_live(self.weak.text)
        return super()._compute(hires, omega)


class ReForgeController(host.Controller):
    def _check_request(self, p, settings):
        if not settings.base and not settings.strip_loras:
            raise PGError("choose a base checkpoint ('base', the checkpoint your personalized model was trained from)")
        if settings.strip_loras:
            raise PGError(f"'strip_loras' (LoRAs to strip) is not supported on {HOST} yet; "
                          "use a base checkpoint, or AUTOMATIC1111's webui for LoRA stripping")
        model = shared.sd_model
        family = backend_family(model)
        if getattr(model, "is_sd3", False) or family not in SUPPORTED_FAMILIES:
            raise PGError(f"this model's family ({family or 'unknown'}) is not supported by PG on {HOST}; "
                          "supported: SD 1.x")
        if getattr(model, "cond_stage_key", None) == "edit":
            raise PGError("InstructPix2Pix-style edit models are not supported: their unconditional branch is an image-conditioned one")
        if getattr(model.forge_objects.unet, "compiled", False):
            raise PGError(f"a compiled UNet (--torch-compile) is not supported by PG on {HOST}")
        info, distance = None, None
        if settings.base == host.AUTOMATIC:
            info, distance = self._automatic_base(model)
        else:
            info = sd_models.get_closet_checkpoint_match(settings.base)
            if info is None:
                raise PGError(f"unknown base checkpoint {settings.base!r} ('base'); use a name from the checkpoint list")
        if not os.path.isfile(info.filename):
            raise PGError(f"base checkpoint file not found: {info.filename}")
        return info, distance

    def _sample(self, p, settings, base_info, passes_without_pg, original_sample, args, kwargs):
        model = shared.sd_model
        checkpoint = getattr(model, "sd_checkpoint_info", None)
        try:
            weak = self._weak_model(model, settings, base_info)
        except PGError as error:
            log(f"Error: {error.reason}")
            raise
        unet = model.model.diffusion_model
        texts = ReForgeWeakConditioning(p, settings, weak, model)
        with TaggedGuidanceRun(unet, weak, settings, skip_reason=SKIP_REASON) as run:
            if texts.needed and settings.schedule == "constant" and settings.omega < 1.0:
                # Before sampling: encoding loads the text encoder, which may move the UNet.
                texts.at(settings.omega, 0)

            def on_denoiser(params):
                if params.denoiser is None or params.denoiser.p is not p:
                    return
                try:
                    ours = shared.sd_model is model and getattr(shared.sd_model, "sd_checkpoint_info", None) is checkpoint
                    omega = run.begin_step(params.denoiser.step, params.denoiser.total_steps, params.x.shape[0], ours)
                    if omega < 1.0 and texts.needed and params.text_uncond is not None:  # None: no negative prompt at CFG 1 (Forge)
                        params.text_uncond = carry_marks(params.text_uncond, texts.at(omega, params.denoiser.step))
                except BaseException as error:  # the host would only log it: the next UNet call raises it
                    run.router.fail(error)

            script_callbacks.on_cfg_denoiser(on_denoiser, name="personalization_guidance")
            self.active_run = run
            try:
                result = original_sample(*args, **kwargs)
            except UnroutedStep as error:
                raise PGError(f"{error.reason}. PG stops the generation rather than run without guidance") from None
            finally:
                self.active_run = None
                script_callbacks.remove_callbacks_for_function(on_denoiser)
        note = host.skipped_note(run.report, passes_without_pg)
        if note:
            p.extra_generation_params[host.KEY_SKIPPED] = note
        return result

    def _weak_model(self, model, settings, base_info):
        if lora_patch_count(model):
            raise PGError(f"LoRAs in the prompt are not supported by PG on {HOST} yet (it merges them only when sampling "
                          "starts); remove them, or use AUTOMATIC1111's webui")
        unet_param = next(model.model.diffusion_model.parameters())
        stat = os.stat(base_info.filename)
        key = (id(model), live_version(model), (base_info.filename, stat.st_size, stat.st_mtime), settings.omega_key,
               str(unet_param.dtype))
        weak = self.cache.get(key)
        if weak is not None:
            return weak
        self.cache.clear()
        started = time.perf_counter()
        base_state = None
        try:
            base_state = sd_models.read_state_dict(base_info.filename, map_location="cpu")
            for live_key, (_module, _name, param) in live_parameters(model).items():
                if live_key not in base_state and live_key.endswith(SYNTHESIZED_SUFFIXES):
                    base_state[live_key] = param.detach()
                elif live_key in base_state and base_state[live_key].dtype == param.dtype:
                    # A tensor read from the file may sit at any offset of its buffer; BLAS kernels
                    # can round differently on unaligned memory, so ω = 0 would not be the base
                    # model bit for bit. A copy is freshly (aligned) allocated, like the live weights.
                    base_state[live_key] = base_state[live_key].clone()
            weak = build_weak_model(model, base_state, settings.omega_key, base_name=base_info.title)
        except torch.cuda.OutOfMemoryError as error:
            raise PGError(f"not enough GPU memory for the weak weights ({error}); lower the resolution/batch or free memory") from None
        except MemoryError:
            raise PGError("not enough memory to read the base checkpoint and build the weak weights") from None
        finally:
            base_state = None
        budget_mb = float(getattr(shared.opts, "pg_memory_budget_mb", 0) or 0)
        if budget_mb > 0 and weak.extra_bytes > budget_mb * 2**20:
            needed = weak.extra_bytes / 2**20
            raise PGError(f"the weak weights need {needed:.0f} MiB, above the memory budget of {budget_mb:.0f} MiB "
                          "(Settings → Personalization Guidance)")
        self.cache.put(key, weak)
        log(f"built weak model from {base_info.title} in {time.perf_counter() - started:.2f} s: "
            f"{len(weak.unet)} UNet and {len(weak.text)} text-encoder layers differ, "
            f"extra memory {weak.extra_bytes / 2**20:.1f} MiB")
        return weak


CONTROLLER = ReForgeController()
