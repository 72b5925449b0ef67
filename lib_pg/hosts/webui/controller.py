"""PG on AUTOMATIC1111's webui 1.10.1 (1.6+): the request checks webui needs,
the weak weights from webui's model and Lora state (exact or lean), and the
sampling call routed through webui's CFGDenoiser (lib_pg.guidance.GuidanceRun
finds the weak rows by their conditioning)."""

import os
import sys
import time

import torch

from lib_pg import checkpoints, lowrank
from lib_pg.errors import PGError
from lib_pg.guidance import GuidanceRun, UnroutedStep, live_version
from lib_pg.hosts import UNSUPPORTED_HOST, unsupported_host
from lib_pg.hosts.common.conditioning import WeakConditioning
from lib_pg.hosts.common.controller import Controller
from lib_pg.hosts.common.frontend import check_memory_budget, log, memory_budget_bytes, mib_text, record_skipped
from lib_pg.hosts.common.lean import (GPU_MARGIN_BYTES, GPU_MARGIN_SHARE, WeightsPlan, active_file, factor_with_progress,
                                      lean_cache_path, lean_dtype, weights_plan)
from lib_pg.hosts.webui.loras import finalize_lora_weights, lora_reference, network_signature, stripped_networks
from lib_pg.hosts.webui.sampling import sampling_hooks, step_conditioning, webui_skips_uncond
from lib_pg.interop import carry_marks
from lib_pg.weights import build_weak_model

from modules import devices, script_callbacks, sd_models, shared  # noqa: E402


class WebuiController(Controller):
    # -- the request ------------------------------------------------------
    def _check_request(self, p, settings):
        host = unsupported_host()
        if host is not None:
            raise PGError(UNSUPPORTED_HOST.format(host=host))
        if not settings.base and not settings.strip_loras:
            raise PGError("choose a base checkpoint ('base', the checkpoint your personalized model was trained from) "
                          "or LoRAs to strip ('strip_loras')")
        model = shared.sd_model
        info, distance = self._chosen_base(settings, model)
        if getattr(model, "cond_stage_key", None) == "edit":
            raise PGError("InstructPix2Pix-style edit models are not supported: their unconditional branch is an image-conditioned one")
        if getattr(shared.cmd_opts, "lowvram", False):
            raise PGError("--lowvram is not supported: the weak weights would need a second copy of the model on the GPU")
        sd_unet = sys.modules.get("modules.sd_unet")
        if sd_unet is not None and getattr(sd_unet, "current_unet", None) is not None:
            raise PGError("a replacement UNet (SD Unet setting, e.g. TensorRT) is active; PG needs webui's own UNet")
        return info, distance

    # -- the sampling call -----------------------------------------------
    def _sample(self, p, settings, base_info, passes_without_pg, original_sample, args, kwargs):
        model = shared.sd_model
        checkpoint = getattr(model, "sd_checkpoint_info", None)
        try:
            weak = self._weak_model(model, settings, base_info)
        except PGError as error:
            log(f"Error: {error.reason}")
            raise
        unet = model.model.diffusion_model
        texts = WeakConditioning(p, settings, weak, model)
        seen = {}  # the denoiser of the last step, to name what hooks it if a step goes unrouted
        with GuidanceRun(unet, weak, settings) as run:
            def on_denoiser(params):
                if params.denoiser is None or params.denoiser.p is not p:
                    return
                try:
                    seen["denoiser"] = params.denoiser
                    ours = shared.sd_model is model and getattr(shared.sd_model, "sd_checkpoint_info", None) is checkpoint
                    omega = run.begin_step(params.denoiser.step, params.denoiser.total_steps, lambda: step_conditioning(params),
                                           ours, webui_skips_uncond(params))
                    if omega < 1.0 and texts.needed:
                        params.text_uncond = carry_marks(params.text_uncond, texts.at(omega, params.denoiser.step))
                except BaseException as error:  # webui would only log it: make the next UNet call raise it
                    run.router.fail(error)

            script_callbacks.on_cfg_denoiser(on_denoiser, name="personalization_guidance")
            self.active_run = run
            try:
                result = original_sample(*args, **kwargs)
            except UnroutedStep as error:
                hooks = sampling_hooks(unet, seen.get("denoiser"))
                raise PGError(f"{error.reason}{' (' + ', '.join(hooks) + ')' if hooks else ''}. PG stops the generation "
                              "rather than run without guidance") from None
            finally:
                self.active_run = None
                script_callbacks.remove_callbacks_for_function(on_denoiser)
        record_skipped(p, run.report, passes_without_pg)
        return result

    # -- the weak weights -------------------------------------------------
    def _weak_model(self, model, settings, base_info):
        finalize_lora_weights(model)
        stripped = stripped_networks(settings)
        unet_param = next(model.model.diffusion_model.parameters())
        device = compute_device(model)
        plan = self._weights_plan(model, settings, base_info, stripped, unet_param.dtype)
        base_key = None
        if base_info is not None:
            stat = os.stat(base_info.filename)
            base_key = (base_info.filename, stat.st_size, stat.st_mtime)
        key = (id(model), live_version(model), base_key, settings.omega_key, str(unet_param.dtype), str(device),
               network_signature(), tuple(id(net) for net in stripped), plan.key)
        weak = self.cache.get(key)
        if weak is None:
            self.cache.clear()  # free the old weak weights before building new ones
            device_for = lambda p: device if device is not None else p.device  # noqa: E731
            try:
                if plan.lean_budget is not None:
                    weak = self._build_lean(model, settings, base_info, plan, device_for)
                else:
                    weak = self._build_exact(model, settings, base_info, stripped, device_for)
            except torch.cuda.OutOfMemoryError as error:
                raise PGError(f"not enough GPU memory for the weak weights ({error}); lower the resolution/batch or free memory") from None
            except MemoryError:
                raise PGError("not enough memory to read the base checkpoint and build the weak weights") from None
            self.cache.put(key, weak)
        try:
            check_memory_budget(weak)  # on every generation: a kept weak model too
        except PGError:
            self.cache.clear()
            raise
        self.weights_note = weak.description if base_info is not None else None
        return weak

    def _build_exact(self, model, settings, base_info, stripped, device_for):
        started = time.perf_counter()
        base_state = None
        try:
            reference = lora_reference(model, stripped, with_base=base_info is not None)
            if base_info is not None:
                base_state = sd_models.read_state_dict(base_info.filename, map_location="cpu")
            weak = build_weak_model(model, base_state, settings.omega_key,
                                    base_name=base_info.title if base_info is not None else "",
                                    device_for=device_for, **reference)
        finally:
            base_state = None
        weak.description = "exact"
        source = base_info.title if base_info is not None else "the active model"
        if stripped:
            source += f" without LoRA {', '.join(net.name for net in stripped)}"
        low_rank = sum(1 for layer in weak.unet if layer.corrections)
        log(f"built weak model from {source} in {time.perf_counter() - started:.2f} s: "
            f"{len(weak.unet)} UNet ({low_rank} low-rank) and {len(weak.text)} text-encoder layers differ, "
            f"extra memory {weak.extra_bytes / 2**20:.1f} MiB")
        return weak

    # -- lean weak weights ----------------------------------------------------
    def _weights_plan(self, model, settings, base_info, stripped, live_dtype):
        """Exact copies or lean factors, and the lean budget (see `weights_plan`)."""
        if base_info is None or settings.weights == "exact":
            return WeightsPlan()
        if stripped:
            if settings.weights == "lean":
                raise PGError("lean weak weights ('weights': 'lean') factor a base checkpoint's difference; "
                              "they cannot be combined with LoRAs to strip")
            return WeightsPlan()
        element_size = torch.empty((), dtype=lean_dtype(live_dtype)).element_size()
        exact_bytes = self._exact_bytes(active_file(model), base_info.filename, element_size)
        available = None if settings.weights == "lean" else self._available_bytes(model)
        return weights_plan(settings, exact_bytes, available)

    def _exact_bytes(self, active_path, base_path, element_size):
        key = (checkpoints.file_identity(active_path), checkpoints.file_identity(base_path), element_size)
        if key not in self.exact_sizes:
            with checkpoints.open_checkpoint(active_path, "active checkpoint") as active, \
                    checkpoints.open_checkpoint(base_path, "base checkpoint") as base:
                self.exact_sizes[key] = lowrank.estimated_differing_bytes(active, base, element_size)
        return self.exact_sizes[key]

    def _available_bytes(self, model):
        """The memory the weak weights may take: Settings' budget, else on a GPU
        its free memory (plus what the kept weak weights hold) less a margin for
        sampling; None (no limit) on a CPU."""
        budget = memory_budget_bytes()
        if budget is not None:
            return budget
        device = compute_device(model) or next(model.model.diffusion_model.parameters()).device
        if device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(device)
        held = self.cache.weak.extra_bytes if self.cache.weak is not None else 0
        return max(free + held - max(GPU_MARGIN_BYTES, int(GPU_MARGIN_SHARE * total)), 0)

    def _build_lean(self, model, settings, base_info, plan, device_for):
        started = time.perf_counter()
        dtype = lean_dtype(next(model.model.diffusion_model.parameters()).dtype)
        active_info = model.sd_checkpoint_info
        path = lean_cache_path(active_info, base_info, plan.lean_budget, dtype)
        if os.path.isfile(path):
            lean = lowrank.read_lean_file(path)
            how = f"read {path} in {(time.perf_counter() - started) * 1000:.0f} ms"
        else:
            lean = factor_with_progress(active_info.filename, base_info.filename, plan.lean_budget, dtype)
            how = f"factored in {time.perf_counter() - started:.1f} s"
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                lowrank.write_lean_file(lean, path, {"pg_active": active_info.title, "pg_base": base_info.title})
                how += f", cached as {path}"
            except OSError as error:
                how += f" (not cached: {error})"
        weak = lowrank.build_lean_weak_model(model, lean, settings.omega_key, device_for=device_for)
        weak.description = f"low-rank {mib_text(plan.lean_budget)} MiB, {100 * lean.energy_share:.0f} %"
        log(f"lean weak weights from {base_info.title}: {len(lean.factors)} layers low-rank, {len(lean.exact)} tensors "
            f"exact, {mib_text(weak.extra_bytes)} MiB of a {mib_text(plan.lean_budget)} MiB budget (exact copy: "
            f"{mib_text(lean.differing_bytes)} MiB), {100 * lean.energy_share:.1f} % of the difference's energy; {how}")
        return weak


def compute_device(model):
    """Where the UNet runs while sampling: with --medvram webui keeps it on the
    CPU between uses, so the weak weights go to the compute device directly."""
    opts = shared.cmd_opts
    if getattr(opts, "medvram", False) or (getattr(opts, "medvram_sdxl", False) and hasattr(model, "conditioner")):
        return devices.device
    return None


CONTROLLER = WebuiController()

if unsupported_host() is not None:
    log("Error: " + UNSUPPORTED_HOST.format(host=unsupported_host()) + "; generations with PG enabled will stop with this message")
