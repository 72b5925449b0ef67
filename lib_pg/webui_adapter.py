"""The one module that talks to webui (1.10.1; 1.6+).

Everything here maps webui objects onto the core: which model is live, how
webui reads checkpoint files, how it computes negative-prompt conditioning,
and where a generation can be stopped for real. Forge support would replace
this module, not the core.
"""

import importlib.util
import math
import os
import sys
import time
from contextlib import nullcontext

import torch

from lib_pg import checkpoints, lowrank
from lib_pg import settings as pg_settings
from lib_pg.checkpoints import FingerprintCache, find_base
from lib_pg.errors import PGError
from lib_pg.guidance import GuidanceRun, UnroutedStep, WeakModelCache, live_version
from lib_pg.inspector import Progress
from lib_pg.interop import carry_marks
from lib_pg.patching import swapped_attributes, swapped_parameters
from lib_pg.routing import corrected_text_layers, text_encoder_swaps
from lib_pg.weights import UNET_PREFIX, LowRankDelta, build_weak_model, live_parameters

from modules import devices, prompt_parser, script_callbacks, sd_models, sd_samplers, shared  # noqa: E402

# Infotext keys (read back by the script's paste-back fields).
KEY_OMEGA = "PG omega"
KEY_OMEGA_END = "PG omega end"
KEY_SCHEDULE = "PG schedule"
KEY_RANGE = "PG steps"
KEY_BASE = "PG base"
KEY_WEAK_PROMPT = "PG weak prompt"
KEY_SKIPPED = "PG skipped"
KEY_STRIP = "PG strip LoRAs"
KEY_WEIGHTS = "PG weights"

KEY_AUTO_DISTANCE = "PG base distance"

# The script's file name (without .py), as other extensions' settings name it,
# and this repository's folder under extensions/.
SCRIPT_NAME = "personalization_guidance"
ADETAILER_HINT = (f"add {SCRIPT_NAME} to Settings → ADetailer → 'Script names to apply to ADetailer' "
                  "(or untick 'Apply only selected scripts to ADetailer')")
ADETAILER_NOTE = f"ADetailer passes (to include them, {ADETAILER_HINT})"
EXTENSION_FOLDER = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INFOTEXT_KEYS = (KEY_OMEGA, KEY_OMEGA_END, KEY_SCHEDULE, KEY_RANGE, KEY_BASE, KEY_WEAK_PROMPT, KEY_SKIPPED, KEY_STRIP,
                 KEY_AUTO_DISTANCE, KEY_WEIGHTS)

# The base choice that picks the checkpoint closest to the active one.
AUTOMATIC = "Automatic"

# Where the XYZ plot's PG axes put their values on p (a dict of settings keys).
XYZ_OVERRIDES = "pg_overrides"


def log(message):
    print(f"[Personalization Guidance] {message}", file=sys.stderr if message.startswith("Error") else sys.stdout)


class Controller:
    """PG's webui-side state: the weak-weight cache and the generation in flight.

    One instance per webui process (`CONTROLLER`); its lifetime is bounded by
    the script's: `shutdown()` on script unload frees everything.
    """

    def __init__(self):
        self.cache = WeakModelCache()
        self.fingerprints = FingerprintCache()  # automatic base detection, per checkpoint file
        self.active_run = None  # the GuidanceRun of the sampling call in flight, if any
        self.exact_sizes = {}  # (active file, base file, element size) -> bytes exact mode holds
        self.weights_note = None  # the infotext's "PG weights" of the last weak model used

    # -- lifetime -------------------------------------------------------
    def on_model_loaded(self, _sd_model):
        self.cache.clear()

    def shutdown(self):
        self.cache.clear()
        self.fingerprints.clear()
        self.exact_sizes.clear()

    def after_generation(self):
        """Called from the script's postprocess(): honour "keep weak weights" off."""
        if not getattr(shared.opts, "pg_keep_weak_weights", True):
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
            settings = pg_settings.from_script_args(script_args, getattr(p, XYZ_OVERRIDES, None))
        except PGError as error:
            self._fail_on_sample(p, error)
            return
        # XYZ plot cells are shallow copies of one p sharing this dict: drop
        # what an earlier cell wrote there. The skipped note describes a
        # sampling run, so an enabled p's note is replaced when its sampling
        # ends (_sample), not here: ADetailer processes a shallow copy of p
        # again after sampling, and that must not erase it.
        for key in INFOTEXT_KEYS:
            if key != KEY_SKIPPED or not settings.enabled:
                p.extra_generation_params.pop(key, None)
        if hasattr(p.sample, "pg_original"):  # a p processed again (e.g. by another script) is wrapped once
            p.sample = p.sample.pg_original
        if not settings.enabled:
            self.cache.clear()  # disabled: the weak weights' memory goes back
            return
        try:
            base_info, distance = self._check_request(p, settings)
        except PGError as error:
            self._fail_on_sample(p, error)
            return
        p.extra_generation_params.update(infotext_params(settings, base_info))
        if distance is not None:
            p.extra_generation_params[KEY_AUTO_DISTANCE] = round(distance, 3)
        original_sample = unwrapped_sample(p)
        passes_without_pg = []
        if adetailer_without_pg(p):
            passes_without_pg.append(ADETAILER_NOTE)
            log(f"ADetailer's inpainting passes will run without PG: {ADETAILER_HINT}")

        def sample_with_pg(*args, **kwargs):
            self.weights_note = None
            result = self._sample(p, settings, base_info, passes_without_pg, original_sample, args, kwargs)
            if self.weights_note:  # how the weak weights were held: known once they are built
                p.extra_generation_params[KEY_WEIGHTS] = self.weights_note
            return result

        sample_with_pg.pg_original = original_sample
        p.sample = sample_with_pg  # an instance attribute of this generation's p only

    def _fail_on_sample(self, p, error):
        log(f"Error: {error.reason}")

        def refuse(*_args, **_kwargs):
            raise error

        refuse.pg_original = unwrapped_sample(p)
        p.sample = refuse

    def _check_request(self, p, settings):
        host = unsupported_host()
        if host is not None:
            raise PGError(UNSUPPORTED_HOST.format(host=host))
        if not settings.base and not settings.strip_loras:
            raise PGError("choose a base checkpoint ('base', the checkpoint your personalized model was trained from) "
                          "or LoRAs to strip ('strip_loras')")
        info, distance = None, None
        model = shared.sd_model
        if settings.base == AUTOMATIC:
            info, distance = self._automatic_base(model)
        elif settings.base:
            info = sd_models.get_closet_checkpoint_match(settings.base)
            if info is None:
                raise PGError(f"unknown base checkpoint {settings.base!r} ('base'); use a name from webui's checkpoint list")
        if getattr(model, "cond_stage_key", None) == "edit":
            raise PGError("InstructPix2Pix-style edit models are not supported: their unconditional branch is an image-conditioned one")
        if getattr(shared.cmd_opts, "lowvram", False):
            raise PGError("--lowvram is not supported: the weak weights would need a second copy of the model on the GPU")
        sd_unet = sys.modules.get("modules.sd_unet")
        if sd_unet is not None and getattr(sd_unet, "current_unet", None) is not None:
            raise PGError("a replacement UNet (SD Unet setting, e.g. TensorRT) is active; PG needs webui's own UNet")
        if info is not None and not os.path.isfile(info.filename):
            raise PGError(f"base checkpoint file not found: {info.filename}")
        return info, distance

    def _automatic_base(self, model):
        """The listed checkpoint closest to the active one in weight space
        (a fixed sample of tensors, read lazily and cached per file)."""
        active = getattr(model, "sd_checkpoint_info", None)
        if active is None or not os.path.isfile(active.filename):
            raise PGError("automatic base detection needs the active model's checkpoint file")
        candidates = [info for info in sd_models.checkpoints_list.values() if info.filename != active.filename]
        best, distance, _ranking = find_base(
            active.filename, [info.filename for info in candidates], cache=self.fingerprints,
            active_hash=getattr(active, "sha256", None), candidate_hashes=[getattr(info, "sha256", None) for info in candidates])
        info = next(info for info in candidates if info.filename == best.path)
        log(f"automatic base: {info.title} (relative distance {distance:.3f})")
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
        note = skipped_note(run.report, passes_without_pg)
        if note:
            p.extra_generation_params[KEY_SKIPPED] = note
        else:
            p.extra_generation_params.pop(KEY_SKIPPED, None)
        return result

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
        weak.description = f"low-rank {plan.lean_budget / 2**20:.0f} MiB, {100 * lean.energy_share:.0f} %"
        log(f"lean weak weights from {base_info.title}: {len(lean.factors)} layers low-rank, {len(lean.exact)} tensors "
            f"exact, {weak.extra_bytes / 2**20:.1f} MiB of a {plan.lean_budget / 2**20:.0f} MiB budget (exact copy: "
            f"{lean.differing_bytes / 2**20:.0f} MiB), {100 * lean.energy_share:.1f} % of the difference's energy; {how}")
        return weak


# The GPU memory auto mode leaves free for sampling (activations, VAE decode).
GPU_MARGIN_BYTES = 2 * 2**30
GPU_MARGIN_SHARE = 0.15


class WeightsPlan:
    """Exact copies (lean_budget None) or lean factors within lean_budget bytes."""

    def __init__(self, lean_budget=None):
        self.lean_budget = lean_budget

    @property
    def key(self):
        return ("lean", self.lean_budget) if self.lean_budget is not None else ("exact",)


def weights_plan(settings, exact_bytes, available_bytes):
    """Exact where they fit: a forced lean budget no smaller than the exact
    copy gets the exact copy (exact mode's result, bit for bit); automatic
    mode takes the exact copy within the memory available (None: no limit),
    else lean factors within the lean budget, at most what is available."""
    requested = int(settings.lean_budget_mb * 2**20) if settings.lean_budget_mb else lowrank.default_budget(exact_bytes)
    if settings.weights == "lean":
        return WeightsPlan() if requested >= exact_bytes else WeightsPlan(requested)
    if available_bytes is None or exact_bytes <= available_bytes:
        return WeightsPlan()
    if requested <= available_bytes:
        return WeightsPlan(requested)
    # Free memory moves a little between generations: a power of two MiB keeps
    # the budget (and so the cached factors) the same across them.
    return WeightsPlan(2 ** max(int(math.log2(max(available_bytes, 2**20))), 20))


def memory_budget_bytes():
    budget_mb = float(getattr(shared.opts, "pg_memory_budget_mb", 0) or 0)
    return int(budget_mb * 2**20) if budget_mb > 0 else None


def check_memory_budget(weak):
    budget = memory_budget_bytes()
    if budget is not None and weak.extra_bytes > budget:
        raise PGError(f"the weak weights need {weak.extra_bytes / 2**20:.0f} MiB, above the memory budget of "
                      f"{budget / 2**20:.0f} MiB (Settings → Personalization Guidance; or lean weights with a smaller budget)")


def lean_dtype(live_dtype):
    """Factors are stored in the live dtype; fp8 weight storage keeps them in fp16."""
    return live_dtype if live_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16


def active_file(model):
    info = getattr(model, "sd_checkpoint_info", None)
    if info is None or not os.path.isfile(info.filename):
        raise PGError("lean weak weights need the active model's checkpoint file")
    return info.filename


def file_hash(info):
    """webui's sha256 of a checkpoint (computed once and kept in webui's hash cache)."""
    if not getattr(info, "sha256", None):
        info.calculate_shorthash()
    return info.sha256


def lean_cache_folder():
    """PG's own folder under webui's models folder (next to Stable-diffusion/)."""
    return os.path.join(os.path.dirname(os.path.abspath(sd_models.model_path)), "PersonalizationGuidance")


def lean_cache_path(active_info, base_info, budget_bytes, dtype):
    """One file per (active hash, base hash, budget, dtype): reused across restarts."""
    name = (f"lean-{file_hash(active_info)[:12]}-{file_hash(base_info)[:12]}-{budget_bytes}B-"
            f"{str(dtype).replace('torch.', '')}.safetensors")
    return os.path.join(lean_cache_folder(), name)


def factor_with_progress(active_path, base_path, budget_bytes, dtype):
    """Factor on the compute device (the GPU when there is one), with webui's
    progress bar and a console one; Interrupt stops it between tensors."""
    device = devices.device if devices.device.type == "cuda" else devices.cpu
    state = shared.state
    state.textinfo = "Personalization Guidance: factoring the weak weights"
    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = Progress("[Personalization Guidance] factoring the weak weights", total, sys.stdout, min_total=0)
        bar.advance(done - bar.done)
        state.sampling_step, state.sampling_steps = int(100 * done / max(total, 1)), 100

    def should_stop():
        return bool(state.interrupted or getattr(state, "stopping_generation", False))

    try:
        with checkpoints.open_checkpoint(active_path, "active checkpoint") as active, \
                checkpoints.open_checkpoint(base_path, "base checkpoint") as base:
            return lowrank.factor_pair(active, base, budget_bytes, dtype, device, progress, should_stop)
    except lowrank.FactoringInterrupted:
        raise PGError("interrupted while factoring the weak weights (nothing was cached)") from None
    finally:
        if bar is not None:
            bar.finish()
        state.sampling_step, state.sampling_steps = 0, 0
        state.textinfo = None


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
        weak_text = omega < 1.0
        swaps = text_encoder_swaps(self.weak.text, omega) if weak_text else ()
        corrected = corrected_text_layers(self.weak.text, omega) if weak_text else nullcontext()
        scope = self.weak.text_scope(omega) if self.weak.text_scope is not None and weak_text else nullcontext()
        with swapped_parameters(swaps), corrected, scope, devices.autocast():
            return prompt_parser.get_learned_conditioning(self.model, conditioning, p.firstpass_steps, hires_steps,
                                                          shared.opts.use_old_scheduling)


# Forks of webui that keep its modules/ (so this extension loads there) but
# sample through a backend of their own, found by the packages they add:
# Forge's backend/ and reForge's ldm_patched/ (both also add modules_forge/).
FORK_PACKAGES = (("backend", "Forge"), ("ldm_patched", "reForge"), ("modules_forge", "a Forge-based fork"))
UNSUPPORTED_HOST = ("this webui is {host}, which PG does not support yet (it samples through its own backend, where PG "
                    "cannot find the unconditional rows); use AUTOMATIC1111's webui 1.6–1.10, or disable PG")


def unsupported_host():
    """The name of the webui fork this is, if PG does not support it; None on webui
    and on the forks PG supports (lib_pg.hosts; they have adapters of their own)."""
    from lib_pg import hosts  # noqa: PLC0415

    if hosts.detect() in hosts.SUPPORTED_FORKS:
        return None
    for package, name in FORK_PACKAGES:
        try:
            if importlib.util.find_spec(package) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def unwrapped_sample(p):
    """p.sample without PG's wrapper, if an earlier prepare() put one there."""
    return getattr(p.sample, "pg_original", p.sample)


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
            # webui names every module, containers too; its patched forwards are these layers'
            if getattr(module, "network_layer_name", None) is None or not isinstance(module, NETWORK_LAYER_TYPES):
                continue
            if functional:
                networks.network_restore_weights_from_backup(module)
                networks.network_reset_cached_weight(module)
            else:
                networks.network_apply_weights(module)


# The layer types webui's Lora extension patches (extensions-builtin/Lora/lora_patches.py).
NETWORK_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
# Those whose weights PG can swap; a MultiheadAttention's networks stay at full strength in both branches.
ROUTABLE_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def lora_networks():
    """webui's Lora extension module (`networks`), if it is loaded."""
    networks = sys.modules.get("networks")
    return networks if networks is not None and hasattr(networks, "loaded_networks") else None


def network_signature():
    """The loaded networks and their multipliers: the weak weights depend on them."""
    networks = lora_networks()
    loaded = networks.loaded_networks if networks is not None else []
    return (tuple((net.name, net.te_multiplier, net.unet_multiplier, net.dyn_dim) for net in loaded),
            bool(getattr(shared.opts, "lora_functional", False)))


def stripped_networks(settings):
    """The loaded networks (LoRAs of this batch's prompt) that the weak model strips."""
    if not settings.strip_loras:
        return []
    networks = lora_networks()
    loaded = list(networks.loaded_networks) if networks is not None else []
    if not loaded:
        raise PGError("'strip_loras' is set but no LoRA is active: add one to the prompt as <lora:name:weight> "
                      "(or check the console: webui could not load it)")
    if settings.strips_all_loras:
        return loaded
    chosen = []
    for wanted in settings.strip_loras:
        matches = [net for net in loaded if wanted in network_names(net)]
        if not matches:
            names = ", ".join(net.name for net in loaded)
            raise PGError(f"LoRA {wanted!r} in 'strip_loras' is not active in this prompt (active: {names})")
        chosen += [net for net in matches if net not in chosen]
    return chosen


def network_names(net):
    on_disk = getattr(net, "network_on_disk", None)
    return {net.name, getattr(net, "mentioned_name", None), getattr(on_disk, "alias", None), getattr(on_disk, "name", None)} - {None}


def is_low_rank_exact(network_module):
    """A plain LoRA/LoCon module whose functional forward equals its merged delta:
    its correction can run on the weak rows alone, with no weight copy."""
    return (type(network_module).__name__ == "NetworkModuleLora"
            and getattr(network_module, "mid_model", None) is None
            and getattr(network_module, "dora_scale", None) is None
            and getattr(network_module, "bias", None) is None
            and network_module.network.dyn_dim is None)


def low_rank_delta(layer, network_module):
    """A plain LoRA's contribution to `layer`, from webui's NetworkModuleLora."""
    nbytes = sum(w.numel() * w.element_size() for w in (network_module.up_model.weight, network_module.down_model.weight))
    return LowRankDelta(output=lambda x: network_module.forward(x, 0),
                        weight=lambda: network_module.calc_updown(layer.weight)[0], nbytes=nbytes)


def lora_reference(model, stripped, with_base):
    """The reference θ_ref as offsets to add (per checkpoint key), and the
    low-rank corrections, from webui's Lora extension state.

    θ_ref is the model with the stripped networks removed; with a base
    checkpoint, the base with the same non-stripped networks (style LoRAs) the
    live model has. Deltas come from webui's own network modules
    (`NetworkModule.calc_updown`, `forward`), never from reading LoRA files.
    """
    networks = lora_networks()
    if networks is None or not networks.loaded_networks:
        return {}
    merged = not getattr(shared.opts, "lora_functional", False)
    if not merged:
        return functional_reference(model, stripped)
    prefixes = {}
    for key, (module, name, _) in live_parameters(model).items():
        prefixes.setdefault(id(module), key[: -len(name) - 1])
    error_counts = getattr(getattr(networks, "extra_network_lora", None), "errors", None)
    offsets, corrections = {}, {}
    with torch.no_grad():
        for module in model.modules():
            layer_name = getattr(module, "network_layer_name", None)
            prefix = prefixes.get(id(module))
            if layer_name is None or prefix is None or not isinstance(module, ROUTABLE_LAYER_TYPES):
                continue
            touching = [(net, net.modules[layer_name]) for net in stripped if layer_name in net.modules]
            backup = getattr(module, "network_weights_backup", None) if merged and with_base else None
            if not touching and backup is None:
                continue
            if touching and not with_base and all(is_low_rank_exact(m) for _, m in touching):
                corrections[module] = [low_rank_delta(module, m) for _, m in touching]
                continue
            weight_offset = torch.zeros_like(module.weight, dtype=torch.float32)
            bias = getattr(module, "bias", None)
            bias_offset = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
            if backup is not None:  # merged networks, non-stripped ones included, go onto the base too
                weight_offset += module.weight.float() - backup.to(module.weight.device).float()
                bias_backup = getattr(module, "network_bias_backup", None)
                if bias_offset is not None and bias_backup is not None:
                    bias_offset += bias.float() - bias_backup.to(bias.device).float()
            for net, updown, ex_bias in network_deltas(module, layer_name, merged, stripped, error_counts) if touching else ():
                if net not in stripped:
                    continue
                weight_offset -= updown.float().reshape(module.weight.shape)
                if ex_bias is not None and bias_offset is not None:
                    bias_offset -= ex_bias.float()
            offsets[f"{prefix}.weight"] = weight_offset
            if bias_offset is not None:
                offsets[f"{prefix}.bias"] = bias_offset
    return {"offsets": offsets, "corrections": corrections}


def functional_reference(model, stripped):
    """With webui's `lora_functional` option the networks are added in each
    layer's forward (networks.py network_forward) from their multipliers: the
    weak rows run that same forward with the stripped networks' multipliers
    scaled by ω, exactly webui's own result at ω·m, for every network type."""
    if not stripped:
        return {}
    multipliers = [(net, net.te_multiplier, net.unet_multiplier) for net in stripped]

    def scope(omega):
        return swapped_attributes([change for net, te, unet in multipliers
                                   for change in ((net, "te_multiplier", te * omega), (net, "unet_multiplier", unet * omega))])

    layer_names = set().union(*(net.modules for net in stripped))
    unet_modules, text_touched = [], False
    for key, (module, _name, _param) in live_parameters(model).items():
        if getattr(module, "network_layer_name", None) in layer_names and isinstance(module, ROUTABLE_LAYER_TYPES):
            if key.startswith(UNET_PREFIX):
                if module not in unet_modules:
                    unet_modules.append(module)
            else:
                text_touched = True
    return {"scope": scope, "scoped_modules": unet_modules, "text_scope": scope if text_touched else None}


def network_deltas(module, layer_name, merged, stripped, error_counts):
    """(network, weight delta, bias delta) of every loaded network on this layer,
    as webui computes them: merged mode chains them from the backed-up original
    weight in load order (networks.py network_apply_weights), functional mode
    computes each from the live weight (NetworkModule.forward)."""
    networks = lora_networks()
    backup = getattr(module, "network_weights_backup", None) if merged else None
    weight = backup.to(module.weight.device) if backup is not None else module.weight
    deltas = []
    for net in networks.loaded_networks:
        network_module = net.modules.get(layer_name)
        if network_module is None:
            continue
        try:
            updown, ex_bias = network_module.calc_updown(weight)
        except RuntimeError as error:  # webui skipped (and counted) this layer too
            if net in stripped and error_counts is not None:
                error_counts[net.name] = error_counts.get(net.name, 0) + 1
            continue
        if updown.dim() == 4 and weight.dim() == 4 and updown.shape[1] == 4 and weight.shape[1] == 9:
            updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))  # inpainting UNet, as webui pads
        deltas.append((net, updown, ex_bias))
        if merged:
            weight = (weight.to(dtype=updown.dtype) + updown.reshape(weight.shape)).to(dtype=module.weight.dtype)
    return deltas


def weights_from_infotext(text):
    """(weights mode, lean budget MiB) of a "PG weights" infotext value: "exact",
    "low-rank 256 MiB, 91 %"; absent: automatic."""
    text = str(text or "").strip()
    if text.startswith("low-rank"):
        try:
            return "lean", float(text.split()[1])
        except (IndexError, ValueError):
            return "lean", 0.0
    return ("exact", 0.0) if text == "exact" else ("auto", 0.0)


def weights_from_text(text):
    """(weights mode, lean budget MiB) of an XYZ value: "auto", "exact", "lean", "lean 256"."""
    words = str(text).lower().replace("mib", "").split()
    if not words or words[0] not in pg_settings.WEIGHTS or (len(words) > 1 and words[0] != "lean") or len(words) > 2:
        raise ValueError(f"{text!r} is not auto, exact, lean or lean <MiB>")
    try:
        budget = float(words[1]) if len(words) > 1 else 0.0
    except ValueError:
        raise ValueError(f"{text!r}: the budget must be a number of MiB") from None
    return words[0], budget


def infotext_params(settings, base_info):
    params = {KEY_OMEGA: settings.omega}
    if base_info is not None:
        params[KEY_BASE] = base_info.title
    if settings.strip_loras:
        params[KEY_STRIP] = pg_settings.describe_strip(settings)
    if settings.schedule != "constant":
        params[KEY_SCHEDULE] = settings.schedule
        params[KEY_OMEGA_END] = settings.omega_end
    if (settings.start, settings.end) != (0.0, 1.0):
        params[KEY_RANGE] = f"{settings.start:g}-{settings.end:g}"
    if settings.weak_prompt != "negative":
        params[KEY_WEAK_PROMPT] = settings.weak_prompt
    return params


def skipped_note(report, passes=()):
    """The infotext's account of what ran without PG: steps, calls, and other
    extensions' passes (`passes`: their notes); empty when nothing did."""
    parts = []
    if report.steps_without_uncond:
        parts.append(f"{report.steps_without_uncond} steps without unconditional pass ({'/'.join(report.skip_reasons)})")
    if report.steps_other_model:
        parts.append(f"{report.steps_other_model} steps on another checkpoint (refiner/hires)")
    if report.unrecognised_calls:
        parts.append(f"{report.unrecognised_calls} UNet calls with another extension's conditioning (run without PG)")
    parts.extend(passes)
    return "; ".join(parts)


def step_conditioning(params):
    """The step's (cond, uncond) text conditioning as the UNet will see it
    (SDXL's dict conditioning: its cross-attention tensor)."""
    def crossattn(c):
        return c["crossattn"] if isinstance(c, dict) else c

    return crossattn(params.text_cond), crossattn(params.text_uncond)


def webui_skips_uncond(params):
    """webui's name for skipping this step's unconditional pass, or None:
    the rule of modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward
    (Skip Early CFG, then NGMS), evaluated on the same inputs."""
    denoiser, opts = params.denoiser, shared.opts
    skip_early = getattr(opts, "skip_early_cond", 0) or 0
    if skip_early != 0 and denoiser.total_steps and denoiser.step / denoiser.total_steps <= skip_early:
        return "Skip Early CFG"
    s_min_uncond = getattr(denoiser.p, "s_min_uncond", 0) or 0
    if (denoiser.step % 2 or getattr(opts, "s_min_uncond_all", False)) and s_min_uncond > 0 and bool(params.sigma[0] < s_min_uncond):
        return "NGMS"
    return None


def _extension_of(function):
    """The extensions/ folder name a function comes from, or None."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    parts = os.path.normpath(code.co_filename).split(os.sep) if code is not None else []
    for marker in ("extensions", "extensions-builtin"):
        if marker in parts[:-1]:
            return parts[parts.index(marker) + 1]
    return None


def sampling_hooks(unet, denoiser=None):
    """Extensions that replaced a sampling or UNet forward (Tiled Diffusion
    replaces the denoiser's inner model forward, ControlNet the UNet's), or
    listen to the denoiser's steps: the candidates for evaluating rows where
    PG cannot see them."""
    found = []
    inner = getattr(denoiser, "model_wrap", None)  # webui's CFGDenoiserKDiffusion/Timesteps: the wrapped model, once built
    candidates = [unet.__dict__.get("forward"), getattr(shared.sd_model, "__dict__", {}).get("apply_model"),
                  getattr(inner, "__dict__", {}).get("forward")]
    for name in ("callbacks_cfg_denoiser", "callbacks_cfg_denoised", "callbacks_cfg_after_cfg"):
        candidates += [c.callback for c in script_callbacks.callback_map.get(name, ())]
    for function in candidates:
        extension = _extension_of(function) if function is not None else None
        if extension and extension != EXTENSION_FOLDER and extension not in found:
            found.append(extension)
    return found


def adetailer_without_pg(p):
    """ADetailer (Bing-su/adetailer) runs its inpainting passes with only the
    always-on scripts that its setting 'Script names to apply to ADetailer'
    names (scripts/!adetailer.py, script_filter). Whether it will run them
    for this p without PG: then the infotext says what to set."""
    if getattr(p, "_ad_inner", False):
        return False  # this p is one of its passes, and PG is in it
    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", ()):
        if os.path.splitext(os.path.basename(getattr(script, "filename", "") or ""))[0] != "!adetailer":
            continue
        try:
            enabled = script.is_ad_enabled(*p.script_args[script.args_from:script.args_to])
        except Exception:  # its arguments or API changed: assume its passes run
            enabled = True
        data = shared.opts.data
        selected_only = data.get("ad_only_selected_scripts", True)
        names = {name.strip() for name in str(data.get("ad_script_names", "")).split(",")}
        return bool(enabled) and bool(selected_only) and SCRIPT_NAME not in names
    return False


CONTROLLER = Controller()

if unsupported_host() is not None:
    log("Error: " + UNSUPPORTED_HOST.format(host=unsupported_host()) + "; generations with PG enabled will stop with this message")
