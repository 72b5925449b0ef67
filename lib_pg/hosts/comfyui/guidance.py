"""PG inside ComfyUI's sampling: the weak branch in the same UNet call.

The Personalization Guidance node returns a clone of the user's MODEL with four
wrappers (comfy/patcher_extension.py WrappersMP, registered on the clone with
ModelPatcher.add_wrapper_with_key, so they exist only on that clone):

- OUTER_SAMPLE (CFGGuider.sample, before the model is loaded): refuses guiders
  whose conditioning index 1 is not the unconditional branch and conditioning
  with ComfyUI hooks, and encodes the weak negative prompts the run will need
  (lib_pg.hosts.comfyui.text), before the UNet is loaded;
- SAMPLER_SAMPLE (CFGGuider.inner_sample, the model loaded and patched): builds
  (or reuses) the weak weights and installs the routing for exactly the
  sampler's run (lib_pg.forks.TaggedGuidanceRun, through lib_pg.patching: every
  routed forward and hook is removed when the run ends, however it ends);
- PREDICT_NOISE (once per model evaluation): starts the step, ω from the
  step's sigma in `sample_sigmas`;
- CALC_COND_BATCH: puts the weak negative conditioning in the unconditional
  entries where the negative was encoded by the PG text-encode node.

In the UNet call ComfyUI tags each chunk of rows in
transformer_options["cond_or_uncond"] (comfy/samplers.py _calc_cond_batch: the
index into [cond, uncond]); TaggedGuidanceRun reads the tags in a pre-hook on
the diffusion model and routes the unconditional rows to the weak weights in
every personalized layer, as on Forge and reForge.
"""

import logging
import os
import time

import torch

from lib_pg import checkpoints, lowrank
from lib_pg.errors import PGError
from lib_pg.forks import TaggedGuidanceRun
from lib_pg.guidance import UnroutedStep, WeakModelCache
from lib_pg.lean_plan import LEAN_CACHE_FOLDER, UNetPart, WeightsPlan, gpu_available_bytes, lean_dtype, lean_file_name, weights_plan
from lib_pg.schedule import omega_at
from lib_pg.weights import WeakModel, aligned, build_weak_model

from lib_pg.hosts.comfyui import files
from lib_pg.hosts.comfyui.patchers import keys_that_may_differ, module_keys, patched_weight, patches_signature
from lib_pg.hosts.comfyui.text import WEAK_TEXT_KEY

import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import folder_paths
from comfy.patcher_extension import WrappersMP

LOG = logging.getLogger("personalization_guidance")
# ComfyUI's Linear layers compute x·Wᵀ + b (comfy/ops.py disable_weight_init.Linear; manual_cast.Linear
# casts the weight to the input's dtype first): lean factors can correct their weak rows, no copy.
COMFY_LINEAR_TYPES = (comfy.ops.disable_weight_init.Linear, comfy.ops.manual_cast.Linear)


def correctable_layer(module) -> bool:
    return lowrank.torch_correctable(module) or type(module) in COMFY_LINEAR_TYPES

WRAPPER_KEY = "personalization_guidance"
UNET_PREFIX = "diffusion_model."

# Model classes (comfy/model_base.py) whose diffusion model PG routes: SD 1.x/2.x, SDXL, and SD 3/3.5
# (MMDiT: every layer's input has the batch first, called with transformer_options like the UNet; the
# positional embedding is a buffer, never a weight PG swaps). Checked by class name, not isinstance:
# Chroma subclasses Flux but has real CFG.
SUPPORTED_MODELS = {"BaseModel": "SD 1.x/2.x", "SD21UNCLIP": "SD 2.1 unCLIP", "SDXL": "SDXL", "SDXLRefiner": "SDXL refiner",
                    "SSD1B": "SSD-1B", "Koala": "Koala", "SD3": "SD 3/3.5"}
# Guidance-distilled families: sampled at CFG 1, no unconditional branch to replace.
DISTILLED_MODELS = {"Flux": "Flux (dev/schnell)", "FluxInpaint": "Flux Fill", "HunyuanVideo": "HunyuanVideo",
                    "HunyuanVideoI2V": "HunyuanVideo", "HunyuanVideoSkyreelsI2V": "HunyuanVideo",
                    "HunyuanImage21": "HunyuanImage 2.1", "Kontext": "Flux Kontext"}


def log(message):
    LOG.info(f"Personalization Guidance: {message}")


def check_model_family(patcher):
    """Raise PGError for a model family PG does not run on in ComfyUI."""
    name = type(patcher.model).__name__
    if name in DISTILLED_MODELS:
        raise PGError(f"{DISTILLED_MODELS[name]} is guidance-distilled: it samples at CFG 1 without an unconditional "
                      "branch, so there is nothing for PG to replace")
    if name not in SUPPORTED_MODELS:
        raise PGError(f"the model family {name} is not supported in ComfyUI yet (supported: SD 1.x, SD 2.x, SDXL, SD 3/3.5)")


def check_guider(guider):
    """PG replaces conditioning index 1 of CFGGuider.predict_noise (comfy/samplers.py
    sampling_function: conds = [cond, uncond]). A guider with its own predict_noise
    (DualCFGGuider, PerpNegGuider, BasicGuider, ...) lays its conditioning out otherwise."""
    if type(guider).predict_noise is not comfy.samplers.CFGGuider.predict_noise:
        raise PGError(f"the guider {type(guider).__name__} computes guidance its own way (its conditioning index 1 is not "
                      "the negative prompt's unconditional branch); use KSampler, KSamplerAdvanced, or SamplerCustom(Advanced) "
                      "with the CFGGuider")


def check_no_hooks(conds):
    for name, entries in conds.items():
        for entry in entries or ():
            if entry.get("hooks") is not None:
                raise PGError(f"the {name} conditioning carries ComfyUI hooks (e.g. CreateHookModelAsLora): they switch "
                              "weights per conditioning group, which PG's weak weights cannot follow; remove the hooks or "
                              "the Personalization Guidance node")


def step_of(sample_sigmas, sigma):
    """(step index, total steps) of a model evaluation at `sigma` in a run over
    `sample_sigmas` (descending; a second-order sampler's intermediate sigma
    counts for the step it lies in)."""
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return 0, 1
    total = len(sample_sigmas) - 1
    s = float(sigma.reshape(-1)[0])
    later = [float(v) for v in sample_sigmas[1:]]
    step = sum(1 for v in later if v >= s * (1.0 - 1e-6))
    return min(step, total - 1), total


def check_weights_in_place(unet):
    """ComfyUI in low-VRAM mode leaves a layer's patches to its forward
    (comfy/model_patcher.py LowVramPatch in `weight_function`): the layer's
    weight is then not what it samples with (PG would take the unpatched
    weight for the live one) and the patch would be applied again on top of
    the weak weight."""
    for module in unet.modules():
        if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
            raise PGError("ComfyUI loaded the model in low-VRAM mode and applies its LoRAs in each layer's forward: PG "
                          "cannot swap weights there; free memory (e.g. --normalvram / a smaller resolution) or drop the LoRAs")


class _LdmView(torch.nn.Module):
    """An ldm-named view (`model.diffusion_model.…`) over ComfyUI's BaseModel for the core's key names."""

    def __init__(self, base_model):
        super().__init__()
        self.model = base_model


CACHE = WeakModelCache()  # the last weak weights, across runs (one generation at a time in ComfyUI)
EXACT_SIZES = {}  # (active file, base file, element size) -> bytes exact mode holds for the UNet


def file_identity(path):
    stat = os.stat(path)
    return (path, stat.st_size, stat.st_mtime)


class BaseCheckpoint:
    """A base checkpoint from ComfyUI's checkpoints folder, loaded with ComfyUI's own
    loader only when weak weights must be built from it, and freed afterwards."""

    def __init__(self, name, path, automatic_distance=None):
        self.name, self.path = name, path
        self.automatic_distance = automatic_distance  # set when "Automatic" picked it

    def identity(self):
        return ("file",) + file_identity(self.path)

    def load(self):
        import comfy.sd  # noqa: PLC0415 (heavy: only when building)

        try:
            model, *_ = comfy.sd.load_checkpoint_guess_config(self.path, output_vae=False, output_clip=False,
                                                              output_clipvision=False)
        except Exception as error:  # ComfyUI's loader names no field: say which input it was
            raise PGError(f"could not load the base checkpoint '{self.name}': {error}") from None
        if model is None:
            raise PGError(f"the base checkpoint '{self.name}' holds no diffusion model")
        return model


class ReferenceModel:
    """The reference given as a MODEL input (e.g. the model before its LoRA loader)."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.name = "the reference model"

    def identity(self):
        return ("model",) + patches_signature(self.patcher)

    def load(self):
        return self.patcher


def build_weak_weights(live, reference, settings, name, progress=None):
    """The weak UNet layers: θ_ref + ω·(θ_live − θ_ref) of every layer whose weights
    differ, θ_live being what `live` samples with now (loaded and patched) and θ_ref
    what `reference` would sample with (its patches merged as ComfyUI does)."""
    keys = module_keys(live, UNET_PREFIX)
    live_params = dict(live.model.named_parameters())
    ref_params = dict(reference.model.named_parameters())
    candidates = set(keys_that_may_differ(live, reference, keys))
    base_state = {}
    bar = comfy.utils.ProgressBar(len(keys)) if progress is None else progress
    for key in keys:
        if key in candidates:
            ref = ref_params.get(key)
            if ref is not None and tuple(ref.shape) == tuple(live_params[key].shape):
                # aligned: a weight read from a file may sit anywhere in its buffer (see lib_pg.weights.aligned)
                base_state["model." + key] = aligned(patched_weight(reference, key).detach())
        else:
            base_state["model." + key] = live_params[key].detach()
        bar.update(1)
    return build_weak_model(_LdmView(live.model), base_state, settings.omega_key, base_name=name, choose_copies=False)


class GuidedModel:
    """PG's settings and reference for one patched MODEL, and the wrappers that
    run it in each sampling call (state of one run: `run`, `omega`)."""

    def __init__(self, settings, reference):
        self.settings = settings
        self.reference = reference
        self.run = None
        self.omega = 1.0
        self.sampling_inputs = {}
        self._weak_entries = {}

    def install(self, patcher):
        for kind, wrapper in ((WrappersMP.OUTER_SAMPLE, self.outer_sample), (WrappersMP.SAMPLER_SAMPLE, self.sampler_sample),
                              (WrappersMP.PREDICT_NOISE, self.predict_noise), (WrappersMP.CALC_COND_BATCH, self.calc_cond_batch)):
            patcher.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
        return patcher

    def omega_plan(self, total_steps):
        s = self.settings
        return [omega_at(step / total_steps, s.omega, s.omega_end, s.schedule, s.start, s.end) for step in range(total_steps)]

    # -- wrappers ----------------------------------------------------------
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        check_guider(guider)
        conds = getattr(guider, "conds", {}) or {}
        check_no_hooks(conds)
        total = max(len(sigmas) - 1, 1)
        omegas = sorted({omega for omega in self.omega_plan(total) if omega < 1.0})
        texts = [entry[WEAK_TEXT_KEY] for entry in conds.get("negative", []) if WEAK_TEXT_KEY in entry]
        for text in texts:  # before the UNet is loaded: encoding loads the text encoder
            for omega in omegas:
                text.at(omega)
        return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def sampler_sample(self, executor, guider, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                       *args, **kwargs):
        live = guider.model_patcher
        check_weights_in_place(live.model.diffusion_model)
        weak = self.weak_model(live)
        weak_texts = any(WEAK_TEXT_KEY in entry for entry in (getattr(guider, "conds", {}) or {}).get("negative", []))
        if not weak.unet and not weak_texts and any(omega < 1.0 for omega in self.omega_plan(max(len(sigmas) - 1, 1))):
            raise PGError(f"{self.reference.name} has the same UNet weights as the model and the negative prompt was not "
                          "encoded with a reference text encoder: PG would change nothing. Connect the model your "
                          "personalized model was trained from (or the model before its LoRA loader)")
        self.sampling_inputs = {"latent_image": latent_image, "denoise_mask": denoise_mask, "seed": extra_args.get("seed")}
        self._weak_entries = {}
        unet = live.model.diffusion_model
        try:
            with TaggedGuidanceRun(unet, weak, self.settings,
                                   skip_reason="ComfyUI ran no unconditional branch (CFG 1)") as run:
                self.run = run
                try:
                    result = executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, *args, **kwargs)
                finally:
                    self.run = None
                    self.omega = 1.0
                    self._weak_entries = {}
        except UnroutedStep as error:
            raise PGError(f"{error.reason}. PG stops the generation rather than run without guidance") from None
        report = run.report
        note = f"{report.guided_steps} steps guided"
        if report.unguided_steps:
            note += f", {report.unguided_steps} at ω = 1 (plain CFG: ω is 1 there, or the step is outside start/end)"
        if report.steps_without_uncond:
            note += f", {report.steps_without_uncond} without an unconditional branch ({'; '.join(report.skip_reasons)})"
        if report.unrecognised_calls:
            note += f", {report.unrecognised_calls} UNet calls left on the live weights (no tags PG could lay out)"
        log(note)
        return result

    def predict_noise(self, executor, x, timestep, model_options, seed=None, *args, **kwargs):
        run = self.run
        if run is not None:
            sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
            step, total = step_of(sample_sigmas, timestep)
            self.omega = run.begin_step(step, total, x.shape[0])
        return executor(x, timestep, model_options, seed, *args, **kwargs)

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        omega = self.omega
        if self.run is not None and omega < 1.0 and len(conds) > 1 and conds[1]:
            if any(WEAK_TEXT_KEY in entry for entry in conds[1]):
                conds = [conds[0], [self.weak_entry(model, entry, omega, x_in) for entry in conds[1]]] + list(conds[2:])
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)

    # -- the weak negative conditioning -------------------------------------
    def weak_entry(self, model, entry, omega, x_in):
        """The unconditional entry with its text-dependent model conditioning
        (cross-attention, SDXL's pooled `y`) from the weak text encoder at ω,
        made by the model's own extra_conds as comfy.samplers.encode_model_conds does."""
        text = entry.get(WEAK_TEXT_KEY)
        if text is None:
            return entry
        key = (id(entry), omega)
        if key not in self._weak_entries:
            cross_attn, pooled = text.at(omega)
            params = dict(entry)
            params.update(cross_attn=cross_attn, device=x_in.device, noise=x_in,
                          width=entry.get("width", x_in.shape[3] * 8 if x_in.ndim >= 4 else None),
                          height=entry.get("height", x_in.shape[2] * 8), prompt_type=entry.get("prompt_type", "negative"))
            if pooled is not None:
                params["pooled_output"] = pooled
            for name, value in self.sampling_inputs.items():
                params.setdefault(name, value)
            out = model.extra_conds(**params)
            model_conds = dict(entry["model_conds"])
            for name in ("c_crossattn", "y"):
                if name in out:
                    model_conds[name] = out[name]
            weak = dict(entry)
            weak["model_conds"] = model_conds
            self._weak_entries[key] = (entry, weak)  # the entry is kept alive with its id
        return self._weak_entries[key][1]

    # -- the weak weights ---------------------------------------------------
    def weak_model(self, live):
        s = self.settings
        unet_param = next(live.model.diffusion_model.parameters())
        plan, active = self.weights_plan(live, unet_param)
        key = (patches_signature(live), self.reference.identity(), s.omega_key, str(unet_param.dtype), str(unet_param.device),
               plan.key)
        weak = CACHE.get(key)
        if weak is not None:
            return weak
        CACHE.clear()  # free the old weak weights before building new ones
        if s.omega_key[0] == "constant" and s.omega >= 1.0:
            return WeakModel()  # ω = 1 is plain CFG: nothing to route, no reference to load
        try:
            with torch.no_grad():
                weak = self.build_lean(live, active, plan) if plan.lean_budget is not None else self.build_exact(live)
        except torch.cuda.OutOfMemoryError as error:
            raise PGError(f"not enough GPU memory for the weak weights ({error}); lower the resolution/batch or free memory") from None
        except MemoryError:
            raise PGError("not enough memory to build the weak weights") from None
        CACHE.put(key, weak)
        return weak

    def build_exact(self, live):
        started = time.perf_counter()
        reference = self.reference.load()
        try:
            weak = build_weak_weights(live, reference, self.settings, self.reference.name)
        finally:
            reference = None
        weak.description = "exact"
        log(f"built weak weights from {self.reference.name} in {time.perf_counter() - started:.2f} s: {len(weak.unet)} "
            f"UNet layers differ, extra memory {weak.extra_bytes / 2**20:.1f} MiB")
        return weak

    def weights_plan(self, live, unet_param):
        """(WeightsPlan, the model's checkpoint path or None): exact copies, or lean factors of the UNet's
        difference between the model's checkpoint file and the base's within a budget (as on webui and
        the forks: lib_pg.lean_plan.weights_plan). Lean needs both files: a base checkpoint from the list
        (or Automatic) and a model without LoRA patches whose file is in the checkpoints folder."""
        s = self.settings
        if s.weights == "exact" or (s.omega_key[0] == "constant" and s.omega >= 1.0):
            return WeightsPlan(), None
        available = None if s.weights == "lean" else available_bytes(unet_param)
        if s.weights == "auto" and available is None:
            return WeightsPlan(), None  # no memory limit (a CPU): exact copies
        why_not, active = None, None
        if not isinstance(self.reference, BaseCheckpoint):
            why_not = "the reference is a MODEL input, not a checkpoint file (pick base_checkpoint instead)"
        elif any(k.startswith(UNET_PREFIX) for k in live.patches):
            why_not = "the model carries LoRA patches (lean factors hold the difference of two checkpoint files)"
        else:
            found = files.model_file(live)
            if found is None:
                why_not = ("the model's checkpoint file is not in ComfyUI's checkpoints folder (PG finds it by its weights)")
            else:
                active = found[1]
        if why_not is not None:
            if s.weights == "lean":
                raise PGError(f"lean weak weights are not possible here: {why_not}; use weights 'exact' or 'auto'")
            return WeightsPlan(), None
        element_size = torch.empty((), dtype=lean_dtype(unet_param.dtype)).element_size()
        size_key = (checkpoints.file_identity(active), checkpoints.file_identity(self.reference.path), element_size)
        if size_key not in EXACT_SIZES:
            with checkpoints.open_checkpoint(active, "model checkpoint") as a, \
                    checkpoints.open_checkpoint(self.reference.path, "base checkpoint") as b:
                EXACT_SIZES[size_key] = lowrank.estimated_differing_bytes(UNetPart(a), UNetPart(b), element_size)
        return weights_plan(s, EXACT_SIZES[size_key], available), active

    def build_lean(self, live, active, plan):
        """The UNet's difference (model file − base file) as lean factors, read from PG's cache file
        (models/PersonalizationGuidance, webui's and the forks' format) or factored and cached."""
        started = time.perf_counter()
        unet_param = next(live.model.diffusion_model.parameters())
        dtype = lean_dtype(unet_param.dtype)
        base = self.reference.path
        path = os.path.join(folder_paths.models_dir, LEAN_CACHE_FOLDER,
                            lean_file_name(files.sha256(active), files.sha256(base), plan.lean_budget, dtype, part="unet"))
        if os.path.isfile(path):
            lean = lowrank.read_lean_file(path)
            how = f"read {path} in {(time.perf_counter() - started) * 1000:.0f} ms"
        else:
            lean = factor_with_progress(active, base, plan.lean_budget, dtype, unet_param.device)
            how = f"factored in {time.perf_counter() - started:.1f} s"
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                lowrank.write_lean_file(lean, path, {"pg_active": os.path.basename(active), "pg_base": self.reference.name,
                                                     "pg_part": "unet"})
                how += f", cached as {path}"
            except OSError as error:
                how += f" (not cached: {error})"
        weak = lowrank.build_lean_weak_model(_LdmView(live.model), lean, self.settings.omega_key, correctable=correctable_layer)
        budget_mib = plan.lean_budget / 2**20
        weak.description = f"low-rank {budget_mib:.3g} MiB, {100 * lean.energy_share:.0f} %"
        log(f"lean weak weights from {self.reference.name}: UNet {len(lean.factors)} layers low-rank, {len(lean.exact)} tensors "
            f"exact, {sum(layer.nbytes() for layer in weak.unet) / 2**20:.1f} MiB of a {budget_mib:.3g} MiB budget (exact "
            f"copy: {lean.differing_bytes / 2**20:.0f} MiB), {100 * lean.energy_share:.1f} % of the difference's energy; {how}")
        return weak


def available_bytes(unet_param):
    """What automatic mode may spend: None (no limit) on a CPU; on a GPU its free memory (plus what
    the kept weak weights hold) less a margin for sampling."""
    if unet_param.device.type != "cuda":
        return None
    device = unet_param.device
    held = CACHE.weak.extra_bytes if CACHE.weak is not None else 0
    return gpu_available_bytes(comfy.model_management.get_free_memory(device),
                               comfy.model_management.get_total_memory(device), held)


def factor_with_progress(active, base, budget_bytes, dtype, device):
    """Factor the UNet's difference on the model's device (a GPU when it is on one), with ComfyUI's
    progress bar; ComfyUI's Cancel stops it between tensors (nothing is cached then)."""
    bar = comfy.utils.ProgressBar(100)

    def progress(done, total):
        bar.update_absolute(int(100 * done / max(total, 1)))

    device = device if device.type == "cuda" else torch.device("cpu")
    log("factoring the weak weights (once per model, base and budget: cached in models/PersonalizationGuidance)")
    try:
        with checkpoints.open_checkpoint(active, "model checkpoint") as a, checkpoints.open_checkpoint(base, "base checkpoint") as b:
            return lowrank.factor_pair(UNetPart(a), UNetPart(b), budget_bytes, dtype, device, progress,
                                       comfy.model_management.processing_interrupted)
    except lowrank.FactoringInterrupted:
        raise PGError("interrupted while factoring the weak weights (nothing was cached)") from None
