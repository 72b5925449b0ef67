"""What Forge and reForge share: webui's front end over a ComfyUI-style backend.

Both keep `p.sample`, the `on_cfg_denoiser` callback (which still sets the
step's negative conditioning: Forge backend/sampling/sampling_function.py
reads `denoiser_params.text_uncond`, reForge modules_forge/forge_sampler.py
too) and webui's checkpoint list, and both sample through a backend whose
calc_cond(_uncond)_batch tags each chunk of a UNet call in
`transformer_options["cond_or_uncond"]` (lib_pg.forks routes by those tags).
What differs is where the UNet and text encoder live, how a base checkpoint
is read, how LoRAs are patched and which model families exist: each fork's
controller says that.

LoRAs (a prompt's, stripped or kept next to a base checkpoint) are read from
the fork's own patch lists and merged with the fork's own function
(lib_pg.hosts.common.fork_loras); PG never edits those lists.
"""

import os
import time

import torch

from lib_pg.errors import PGError
from lib_pg.forks import TaggedGuidanceRun, place_like_live
from lib_pg.guidance import UnroutedStep
from lib_pg.hosts.common.conditioning import WeakConditioning
from lib_pg.hosts.common.controller import Controller
from lib_pg.hosts.common.fork_loras import (low_rank_corrections, originals_fingerprint, reference_weights, strips_anything,
                                            without_loras_state)
from lib_pg.hosts.common.frontend import check_memory_budget, log, record_skipped
from lib_pg.hosts.common.networks import network_file, stripped_networks
from lib_pg.interop import carry_marks
from lib_pg.weights import build_weak_model, layers_to_copy, live_parameters

from modules import script_callbacks, shared  # noqa: E402


class ForkWeakConditioning(WeakConditioning):
    """The front end's weak conditioning, with the fork's text encoder loaded
    first: after that load, swapping its parameters for the call cannot be
    undone by a load inside the call."""

    def __init__(self, p, settings, weak, model, load_text_encoder):
        super().__init__(p, settings, weak, model)
        self.load_text_encoder = load_text_encoder

    def _compute(self, hires, omega):
        if omega < 1.0 and self.weak.text:
            self.load_text_encoder(self.model)
            place_like_live(self.weak.text)
        return super()._compute(hires, omega)


class ForkController(Controller):
    """The sampling and weak weights both forks share; a fork's subclass names
    the host and provides the methods under "what each fork provides"."""

    HOST = "a Forge-based fork"

    @property
    def skip_reason(self):
        return f"{self.HOST} ran no unconditional pass: CFG Scale 1, NGMS or Skip Early CFG"

    # -- what each fork provides ------------------------------------------
    def check_model(self, model):
        """Raise PGError for a model PG does not support on this fork."""
        raise NotImplementedError

    def lora_patchers(self, model, stripped_files):
        """[PatcherLoras] of the UNet's and the text encoder's LoRA patches: the fork's entries,
        those the reference keeps (the LoRAs read from `stripped_files` left out), the originals
        and the fork's merge (lib_pg.hosts.common.fork_loras)."""
        raise NotImplementedError

    def lora_signature(self, model):
        """What identifies the fork's LoRA patches now (for the weak-weight cache)."""
        raise NotImplementedError

    def check_routed_modules(self, layers):
        """At the first routed UNet call (the fork has loaded the UNet): raise PGError for a
        layer whose weights PG cannot swap as the fork has loaded it."""

    def ldm_view(self, model):
        """An nn.Module with ldm's layout (`model.diffusion_model`, `cond_stage_model`) over the fork's model."""
        return model

    def read_base(self, path):
        """The base checkpoint's state dict, ldm keys, on the CPU."""
        raise NotImplementedError

    def host_parameters(self, model):
        """A predicate: is this live parameter one the fork adds (no checkpoint holds it)?
        Such a parameter is the same in the live and the base model."""
        return lambda _key: False

    def load_text_encoder(self, model):
        raise NotImplementedError

    def adjust_weak(self, weak):
        """Fix up layers the fork wraps (after build_weak_model)."""

    def cache_identity(self, model):
        return ()

    # -- the request ------------------------------------------------------
    def _check_request(self, p, settings):
        if not settings.base and not settings.strip_loras:
            raise PGError("choose a base checkpoint ('base', the checkpoint your personalized model was trained from) "
                          "or LoRAs to strip ('strip_loras')")
        if settings.weights == "lean":
            raise PGError(f"lean weak weights ('weights': 'lean') are not supported on {self.HOST} yet; "
                          "use 'auto' or 'exact'")
        model = shared.sd_model
        self.check_model(model)
        return self._chosen_base(settings, model)

    # -- the sampling call -----------------------------------------------
    def _sample(self, p, settings, base_info, passes_without_pg, original_sample, args, kwargs):
        model = shared.sd_model
        checkpoint = getattr(model, "sd_checkpoint_info", None)
        try:
            weak = self._weak_model(model, settings, base_info)
        except PGError as error:
            log(f"Error: {error.reason}")
            raise
        unet = self.ldm_view(model).model.diffusion_model
        texts = ForkWeakConditioning(p, settings, weak, model, self.load_text_encoder)
        loras = getattr(model, "current_lora_hash", None)  # the prompt's LoRAs the weak weights were built with
        with TaggedGuidanceRun(unet, weak, settings, skip_reason=self.skip_reason) as run:
            place = run.router.on_first_routed_call

            def first_routed_call():
                self.check_routed_modules(weak.unet)
                place()

            run.router.on_first_routed_call = first_routed_call
            if texts.needed and settings.schedule == "constant" and settings.omega < 1.0:
                # Before sampling: encoding loads the text encoder, which may move the UNet.
                texts.at(settings.omega, 0)

            def on_denoiser(params):
                if params.denoiser is None or params.denoiser.p is not p:
                    return
                try:
                    # (a hires pass with other LoRAs runs on another model than the weak weights were built for)
                    ours = (shared.sd_model is model and getattr(shared.sd_model, "sd_checkpoint_info", None) is checkpoint
                            and getattr(model, "current_lora_hash", None) == loras)
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
        record_skipped(p, run.report, passes_without_pg)
        return result

    # -- the weak weights -------------------------------------------------
    def _weak_model(self, model, settings, base_info):
        stripped = stripped_networks(settings)
        files = frozenset(network_file(net) for net in stripped)
        view = self.ldm_view(model)
        patchers = self.lora_patchers(model, files)
        if stripped and not strips_anything(patchers):
            names = ", ".join(net.name for net in stripped)
            raise PGError(f"{self.HOST} applied no weight of LoRA {names} ('strip_loras') to this model: nothing to strip")
        unet_param = next(view.model.diffusion_model.parameters())
        base_key = None
        if base_info is not None:
            stat = os.stat(base_info.filename)
            base_key = (base_info.filename, stat.st_size, stat.st_mtime)
        key = (id(model), *self.cache_identity(model), originals_fingerprint(view, patchers), base_key, settings.omega_key,
               str(unet_param.dtype), self.lora_signature(model), tuple(sorted(files)))
        weak = self.cache.get(key)
        if weak is None:
            self.cache.clear()  # free the old weak weights before building new ones
            weak = self._build(model, view, settings, base_info, patchers, stripped)
            self.cache.put(key, weak)
        try:
            check_memory_budget(weak)  # on every generation: a kept weak model too
        except PGError:
            self.cache.clear()
            raise
        self.weights_note = weak.description if base_info is not None else None
        return weak

    def _build(self, model, view, settings, base_info, patchers, stripped):
        """The weak weights from the reference: the base checkpoint (with the prompt's kept
        LoRAs merged by the fork's function), or the live model without the stripped LoRAs;
        against the weights the fork will sample with (its merge of every LoRA)."""
        started = time.perf_counter()
        base_state = None
        try:
            if base_info is not None:
                base_state = self.read_base(base_info.filename)
                is_host_parameter = self.host_parameters(model)
                for live_key, (_module, _name, param) in live_parameters(view).items():
                    if live_key not in base_state:
                        if is_host_parameter(live_key):
                            base_state[live_key] = param.detach()
                    elif base_state[live_key].dtype == param.dtype:
                        # A tensor read from the file may sit at any offset of its buffer; BLAS kernels
                        # can round differently on unaligned memory, so ω = 0 would not be the base
                        # model bit for bit. A copy is freshly (aligned) allocated, like the live weights.
                        base_state[live_key] = base_state[live_key].clone()
            # LoRA mode: layers that differ only by stripped plain LoRAs get low-rank corrections
            # (no copy), as on webui; a base checkpoint keeps copies of every layer that differs.
            corrections, corrected = low_rank_corrections(view, patchers) if base_info is None else ({}, {})
            # The UNet layers where a copy costs least next to its correction get a copy, within
            # twice the LoRAs' weights, as on webui; here that copy is the fork's own merge.
            unet_modules = {id(module) for module in view.model.diffusion_model.modules()}
            for module in layers_to_copy({m: d for m, d in corrections.items() if id(m) in unet_modules}):
                del corrections[module], corrected[module]
            live_state, ref_state = reference_weights(view, patchers, base_state, skip=set(corrected.values()))
            if base_state is None:
                base_state = without_loras_state(view, live_state, ref_state)
            else:
                base_state.update(ref_state)
            weak = build_weak_model(view, base_state, settings.omega_key,
                                    base_name=base_info.title if base_info is not None else "", live_state=live_state,
                                    corrections=corrections, choose_copies=False)
        except torch.cuda.OutOfMemoryError as error:
            raise PGError(f"not enough GPU memory for the weak weights ({error}); lower the resolution/batch or free memory") from None
        except MemoryError:
            raise PGError("not enough memory to read the base checkpoint and build the weak weights") from None
        finally:
            base_state = None
        self.adjust_weak(weak)
        weak.description = "exact"
        source = base_info.title if base_info is not None else "the active model"
        if any(patcher.reference for patcher in patchers):
            source += " with the prompt's other LoRAs" if stripped else " with the prompt's LoRAs"
        if stripped:
            source += f" (LoRA {', '.join(net.name for net in stripped)} stripped)"
        log(f"built weak model from {source} in {time.perf_counter() - started:.2f} s: "
            f"{len(weak.unet)} UNet ({sum(1 for layer in weak.unet if layer.corrections_only)} low-rank) and "
            f"{len(weak.text)} text-encoder layers ({sum(1 for layer in weak.text if layer.corrections_only)} low-rank) differ, "
            f"extra memory {weak.extra_bytes / 2**20:.1f} MiB")
        return weak
