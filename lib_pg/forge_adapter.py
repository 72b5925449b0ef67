"""The Forge host (lllyasviel/stable-diffusion-webui-forge, its `backend/` since 2024-08).

Forge keeps webui's front end (processing, scripts, prompt_parser, the
on_cfg_denoiser callback) but `shared.sd_model` is a ForgeDiffusionEngine, not an
nn.Module: the UNet is `forge_objects.unet.model.diffusion_model` (ldm names)
and the SD 1.x text encoder `forge_objects.clip.cond_stage_model.clip_l`
(`transformer.text_model...`). PG looks at them through an nn.Module view with
ldm's layout (`model.diffusion_model`, `cond_stage_model`), so checkpoint keys
match by name, and reads base checkpoints itself (Forge's
sd_models.read_state_dict is a stub). Sampling is tagged as on reForge
(backend/sampling/sampling_function.py calc_cond_uncond_batch,
`transformer_options["cond_or_uncond"]`).

Supported here: SD 1.x with a base checkpoint, as on reForge.
"""

import os
import time

import torch

from lib_pg import reforge_adapter as fork
from lib_pg import webui_adapter as host
from lib_pg.errors import PGError
from lib_pg.forks import TaggedGuidanceRun, place_like_live
from lib_pg.guidance import UnroutedStep, live_version
from lib_pg.interop import carry_marks
from lib_pg.weights import build_weak_model, live_parameters, read_checkpoint

from modules import script_callbacks, sd_models, shared  # noqa: E402

HOST = "Forge"
SUPPORTED_ENGINES = ("StableDiffusion",)  # backend/diffusion_engine/sd15.py
SKIP_REASON = "Forge ran no unconditional pass: CFG Scale 1, NGMS or Skip Early CFG"

log = host.log


class LdmView(torch.nn.Module):
    """The engine's UNet and text encoder under ldm's names (shares their modules, owns nothing)."""

    def __init__(self, engine):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = engine.forge_objects.unet.model.diffusion_model
        self.cond_stage_model = engine.forge_objects.clip.cond_stage_model.clip_l


def load_text_encoder(engine):
    from backend import memory_management

    memory_management.load_model_gpu(engine.forge_objects.clip.patcher)


def checkpoint_keys(path):
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return set(f.keys())
    return None


class ForgeWeakConditioning(host.WeakConditioning):
    def _compute(self, hires, omega):
        if omega < 1.0 and self.weak.text:
            load_text_encoder(self.model)
            place_like_live(self.weak.text)
        return super()._compute(hires, omega)


class ForgeController(fork.ReForgeController):
    def _check_request(self, p, settings):
        if not settings.base and not settings.strip_loras:
            raise PGError("choose a base checkpoint ('base', the checkpoint your personalized model was trained from)")
        if settings.strip_loras:
            raise PGError(f"'strip_loras' (LoRAs to strip) is not supported on {HOST} yet; "
                          "use a base checkpoint, or AUTOMATIC1111's webui for LoRA stripping")
        engine = shared.sd_model
        family = type(engine).__name__
        if family not in SUPPORTED_ENGINES or getattr(engine, "is_inpaint", False):
            raise PGError(f"this model's family ({family}{' inpainting' if getattr(engine, 'is_inpaint', False) else ''}) "
                          f"is not supported by PG on {HOST}; supported: SD 1.x")
        storage = getattr(engine.forge_objects.unet.model, "storage_dtype", None)
        if str(storage) in ("nf4", "fp4", "gguf"):
            raise PGError(f"a quantized UNet ({storage}) is not supported by PG on {HOST}")
        info, distance = None, None
        if settings.base == host.AUTOMATIC:
            info, distance = self._automatic_base(engine)
        else:
            info = sd_models.get_closet_checkpoint_match(settings.base)
            if info is None:
                raise PGError(f"unknown base checkpoint {settings.base!r} ('base'); use a name from the checkpoint list")
        if not os.path.isfile(info.filename):
            raise PGError(f"base checkpoint file not found: {info.filename}")
        return info, distance

    def _sample(self, p, settings, base_info, passes_without_pg, original_sample, args, kwargs):
        engine = shared.sd_model
        checkpoint = getattr(engine, "sd_checkpoint_info", None)
        try:
            weak = self._weak_model(engine, settings, base_info)
        except PGError as error:
            log(f"Error: {error.reason}")
            raise
        unet = engine.forge_objects.unet.model.diffusion_model
        texts = ForgeWeakConditioning(p, settings, weak, engine)
        with TaggedGuidanceRun(unet, weak, settings, skip_reason=SKIP_REASON) as run:
            if texts.needed and settings.schedule == "constant" and settings.omega < 1.0:
                texts.at(settings.omega, 0)

            def on_denoiser(params):
                if params.denoiser is None or params.denoiser.p is not p:
                    return
                try:
                    ours = shared.sd_model is engine and getattr(shared.sd_model, "sd_checkpoint_info", None) is checkpoint
                    omega = run.begin_step(params.denoiser.step, params.denoiser.total_steps, params.x.shape[0], ours)
                    if omega < 1.0 and texts.needed and params.text_uncond is not None:  # None: no negative prompt at CFG 1 (Forge)
                        params.text_uncond = carry_marks(params.text_uncond, texts.at(omega, params.denoiser.step))
                except BaseException as error:
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

    def _weak_model(self, engine, settings, base_info):
        unet_patcher = engine.forge_objects.unet
        if getattr(unet_patcher, "lora_patches", None) or getattr(engine.forge_objects.clip.patcher, "lora_patches", None):
            raise PGError(f"LoRAs in the prompt are not supported by PG on {HOST} yet; remove them, or use AUTOMATIC1111's webui")
        view = LdmView(engine)
        unet_param = next(view.model.diffusion_model.parameters())
        stat = os.stat(base_info.filename)
        key = (id(engine), id(unet_patcher.model), live_version(view), (base_info.filename, stat.st_size, stat.st_mtime),
               settings.omega_key, str(unet_param.dtype))
        weak = self.cache.get(key)
        if weak is not None:
            return weak
        self.cache.clear()
        started = time.perf_counter()
        base_state = None
        try:
            base_state = read_checkpoint(base_info.filename)
            active = getattr(engine, "sd_checkpoint_info", None)
            active_keys = checkpoint_keys(active.filename) if active is not None and os.path.isfile(active.filename) else None
            for live_key, (_module, _name, param) in live_parameters(view).items():
                if live_key not in base_state:
                    if active_keys is not None and live_key not in active_keys:
                        base_state[live_key] = param.detach()  # Forge's own parameter (logit_scale): no file has it
                elif base_state[live_key].dtype == param.dtype:
                    base_state[live_key] = base_state[live_key].clone()  # aligned, like the live weights (see reforge_adapter)
            weak = build_weak_model(view, base_state, settings.omega_key, base_name=base_info.title)
        except MemoryError:
            raise PGError("not enough memory to read the base checkpoint and build the weak weights") from None
        finally:
            base_state = None
        for layer in weak.text:
            # backend/text_processing/classic_engine.py CLIPEmbeddingForTextualInversion registers the
            # embedding's weight as its own parameter too; the forward reads the wrapped one's.
            if type(layer.module).__name__ == "CLIPEmbeddingForTextualInversion":
                layer.module = layer.module.wrapped
                layer._fixed_swaps = None
        budget_mb = float(getattr(shared.opts, "pg_memory_budget_mb", 0) or 0)
        if budget_mb > 0 and weak.extra_bytes > budget_mb * 2**20:
            raise PGError(f"the weak weights need {weak.extra_bytes / 2**20:.0f} MiB, above the memory budget of "
                          f"{budget_mb:.0f} MiB (Settings → Personalization Guidance)")
        self.cache.put(key, weak)
        log(f"built weak model from {base_info.title} in {time.perf_counter() - started:.2f} s: "
            f"{len(weak.unet)} UNet and {len(weak.text)} text-encoder layers differ, "
            f"extra memory {weak.extra_bytes / 2**20:.1f} MiB")
        return weak


CONTROLLER = ForgeController()
