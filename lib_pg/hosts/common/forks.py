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

Key spaces. SD 1.x keeps the ldm key view each fork has had (checkpoint keys
match its parameter names). Every other family (SDXL, SD 2.x) is seen in the
fork's own key space (`NativeView`): `model.diffusion_model.` + the UNet's
names (ldm's, as in checkpoints) and `cond_stage_model.` + the names of the
text-encoder patcher's model (`forge_objects.clip.cond_stage_model`:
`clip_l.transformer.text_model...`, `clip_g...`), which are also the LoRA
patch keys. A base checkpoint's text encoders are converted into that space
by the fork's own function (`process_clip_state_dict` of the live model's
config: a rename, a split of OpenCLIP's fused attention and a transpose, all
linear, so lerps of converted tensors are exact); its UNet is read tensor by
tensor (`NativeBaseState`): an SDXL fork process holds ~16 GiB, a whole second
state dict would not fit next to it on small machines.
"""

import os
import time
from collections.abc import Mapping

import torch

from lib_pg import checkpoints, lowrank
from lib_pg.errors import PGError
from lib_pg.forks import TaggedGuidanceRun, place_like_live
from lib_pg.guidance import UnroutedStep
from lib_pg.hosts.common.conditioning import WeakConditioning
from lib_pg.hosts.common.controller import Controller
from lib_pg.hosts.common.fork_loras import (correctable_layer, low_rank_corrections, originals_fingerprint, reference_weights, strips_anything,
                                            without_loras_state)
from lib_pg.hosts.common.frontend import check_memory_budget, log, mib_text, record_skipped
from lib_pg.hosts.common.lean import (WeightsPlan, active_file, factor_with_progress, lean_cache_path, lean_dtype,
                                      weights_plan)
from lib_pg.hosts.common.networks import network_file, stripped_networks
from lib_pg.interop import carry_marks
from lib_pg.lean_plan import UNetPart
from lib_pg.weights import UNET_PREFIX, WeakLayer, build_weak_model, layers_to_copy, live_parameters

from modules import script_callbacks, shared  # noqa: E402


# Where a checkpoint file keeps its text encoders (SD 1.x/2.x ldm, SDXL sgm): what the fork's
# process_clip_state_dict reads.
TEXT_FILE_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")
TEXT_PREFIX = "cond_stage_model."


class NativeView(torch.nn.Module):
    """The fork's UNet and text encoders in the fork's own key space (shares their modules, owns
    nothing): `model.diffusion_model` is the UNet, `cond_stage_model` the text-encoder patcher's
    model (`forge_objects.clip.cond_stage_model`), so parameter keys are
    `model.diffusion_model.<ldm name>` and `cond_stage_model.<LoRA patch key>`. Without a UNet,
    the text encoders alone."""

    def __init__(self, unet, text_encoders):
        super().__init__()
        if unet is not None:
            self.model = torch.nn.Module()
            self.model.diffusion_model = unet
        self.cond_stage_model = text_encoders


class TextOnlyView(torch.nn.Module):
    """The text encoder(s) of a view, under the same keys (for the text part of lean weak weights)."""

    def __init__(self, view):
        super().__init__()
        self.cond_stage_model = view.cond_stage_model


class NativeBaseState(Mapping):
    """A base checkpoint in the fork's key space, read lazily: UNet tensors one at a time from the
    file (its keys are the fork's), the text encoders converted at once by the fork's own
    `convert_text` (a fresh dict of the file's text-encoder tensors in, fork-native keys relative to
    the text-encoder model out). Keys set later (the LoRA references) override the file's."""

    def __init__(self, path, convert_text, with_unet=True):
        self._file = checkpoints.open_checkpoint(path, "base checkpoint")
        try:
            text = {k: self._file.get(k) for k in self._file.keys if k.startswith(TEXT_FILE_PREFIXES)}
            # contiguous: the fork copies each converted tensor into its own parameter (a transposed
            # projection is a strided view here, and kernels round differently on one)
            self._text = {TEXT_PREFIX + k: v.contiguous() for k, v in convert_text(text).items() if isinstance(v, torch.Tensor)}
        except PGError:
            self._file.close()
            raise
        except Exception as error:  # the fork's converter on a file of another family
            self._file.close()
            raise PGError(f"the fork could not convert the base checkpoint's text encoders ({type(error).__name__}: {error}); "
                          "pick the checkpoint your model was trained from") from None
        self._unet = [k for k in self._file.keys if k.startswith(UNET_PREFIX)] if with_unet else []
        self._unet_set = set(self._unet)
        self._set = {}

    def __getitem__(self, key):
        if key in self._set:
            return self._set[key]
        if key in self._text:
            return self._text[key]
        if key in self._unet_set:
            return self._file.get(key)
        raise KeyError(key)

    def __contains__(self, key):
        return key in self._set or key in self._text or key in self._unet_set

    def __iter__(self):
        yield from self._set
        yield from (k for k in self._text if k not in self._set)
        yield from (k for k in self._unet if k not in self._set)

    def __len__(self):
        return len(set(self._set) | set(self._text) | self._unet_set)

    def __setitem__(self, key, value):
        self._set[key] = value

    def update(self, other):
        self._set.update(other)

    def shapes(self):
        """key -> shape without reading the UNet's tensors."""
        found = {k: tuple(self._file.shapes[k]) for k in self._unet}
        found.update((k, tuple(v.shape)) for k, v in self._text.items())
        found.update((k, tuple(v.shape)) for k, v in self._set.items())
        return found

    def close(self):
        self._file.close()
        self._text, self._set = {}, {}


class AliasedLayer(WeakLayer):
    """The weak tensors of another layer, for a second module that registers the same Parameter
    objects (reForge's front end registers clip_g's bare `text_projection` Parameter on its own
    embedder too, and reads it from there): swapped together with that layer, held once."""

    def nbytes(self) -> int:
        return 0


def add_aliases(weak, root):
    """Append an AliasedLayer to `weak.text` for every module under `root` that holds one of the
    weak text layers' live Parameters under its own `_parameters` (without being that layer)."""
    if root is None:
        return
    owners = {}
    for layer in weak.text:
        for name, param in zip(layer.names, layer.live()):
            owners[id(param)] = (layer, name)
    if not owners:
        return
    seen = {id(layer.module) for layer in weak.text}
    for module in root.modules():
        if id(module) in seen:
            continue
        for alias_name, param in module._parameters.items():
            found = owners.get(id(param)) if param is not None else None
            if found is None:
                continue
            layer, name = found
            index = layer.names.index(name)
            pick = lambda tensors, i=index: (tensors[i],) if tensors else tensors  # noqa: E731
            weak.text.append(AliasedLayer(module, (alias_name,), ref=pick(layer.ref), fixed=pick(layer.fixed),
                                          fixed_omega=layer.fixed_omega))


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
        """SD 1.x: an nn.Module with ldm's layout (`model.diffusion_model`, `cond_stage_model`) over the fork's model."""
        return model

    def native(self, model):
        """Whether PG sees this model in the fork's own key space (NativeView): every family but SD 1.x."""
        return False

    def convert_text(self, model):
        """The fork's own conversion of a checkpoint's text encoders into its key space (relative to
        `forge_objects.clip.cond_stage_model`): the live model's process_clip_state_dict."""
        raise NotImplementedError

    def alias_root(self, model):
        """A module tree in which the fork's front end registers text-encoder Parameters a second
        time (their swaps must reach it too), or None."""
        return None

    def read_base(self, path):
        """SD 1.x: the base checkpoint's state dict, ldm keys, on the CPU."""
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
        if settings.weights == "lean" and settings.strip_loras:
            raise PGError("lean weak weights ('weights': 'lean') factor a base checkpoint's difference; "
                          "they cannot be combined with LoRAs to strip")
        model = shared.sd_model
        self.check_model(model)
        return self._chosen_base(settings, model)

    def view(self, model):
        """The module PG reads the live weights through: the fork-native view, or SD 1.x's ldm view."""
        if self.native(model):
            return NativeView(model.forge_objects.unet.model.diffusion_model, model.forge_objects.clip.cond_stage_model)
        return self.ldm_view(model)

    # -- the sampling call -----------------------------------------------
    def _sample(self, p, settings, base_info, passes_without_pg, original_sample, args, kwargs):
        model = shared.sd_model
        checkpoint = getattr(model, "sd_checkpoint_info", None)
        try:
            weak = self._weak_model(model, settings, base_info)
        except PGError as error:
            log(f"Error: {error.reason}")
            raise
        unet = self.view(model).model.diffusion_model
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
        view = self.view(model)
        patchers = self.lora_patchers(model, files)
        if stripped and not strips_anything(patchers):
            names = ", ".join(net.name for net in stripped)
            raise PGError(f"{self.HOST} applied no weight of LoRA {names} ('strip_loras') to this model: nothing to strip")
        unet_param = next(view.model.diffusion_model.parameters())
        plan = self._weights_plan(model, settings, base_info, patchers, unet_param)
        base_key = None
        if base_info is not None:
            stat = os.stat(base_info.filename)
            base_key = (base_info.filename, stat.st_size, stat.st_mtime)
        key = (id(model), *self.cache_identity(model), originals_fingerprint(view, patchers), base_key, settings.omega_key,
               str(unet_param.dtype), self.lora_signature(model), tuple(sorted(files)), plan.key)
        weak = self.cache.get(key)
        if weak is None:
            self.cache.clear()  # free the old weak weights before building new ones
            if plan.lean_budget is not None:
                weak = self._build_lean(model, view, settings, base_info, plan)
            else:
                weak = self._build(model, view, settings, base_info, patchers, stripped)
            self.cache.put(key, weak)
        try:
            check_memory_budget(weak)  # on every generation: a kept weak model too
        except PGError:
            self.cache.clear()
            raise
        self.weights_note = weak.description if base_info is not None else None
        return weak

    def _base_state(self, model, view, path, with_unet=True):
        """The base checkpoint in the view's key space: SD 1.x the fork's read (ldm keys), other
        families lazily in the fork's own space (NativeBaseState); the fork's own parameters that
        no checkpoint holds taken from the live model."""
        if self.native(model):
            state = NativeBaseState(path, self.convert_text(model), with_unet=with_unet)
            own = self._fork_text_parameters(model)
            for live_key, (_module, _name, param) in live_parameters(view).items():
                if live_key in own and live_key not in state:
                    state[live_key] = param.detach()
            return state
        base_state = self.read_base(path)
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
        if not with_unet:
            base_state = {k: v for k, v in base_state.items() if not k.startswith(UNET_PREFIX)}
        return base_state

    def _fork_text_parameters(self, model):
        """The text-encoder keys of the live model that the fork adds itself (its conversion of the
        active checkpoint's text encoders does not produce them: logit_scale, CLIP-L's projection):
        found by converting the active file's keys as meta tensors (no data read)."""
        info = getattr(model, "sd_checkpoint_info", None)
        if info is None or not os.path.isfile(info.filename):
            raise PGError("a base checkpoint needs the active model's checkpoint file (to tell the fork's own parameters)")
        with checkpoints.open_checkpoint(info.filename, "active checkpoint") as active:
            meta = {k: torch.empty(active.shapes[k], dtype=active.dtypes[k], device="meta")
                    for k in active.keys if k.startswith(TEXT_FILE_PREFIXES)}
        converted = {TEXT_PREFIX + k for k in self.convert_text(model)(meta)}
        live = {k for k in live_parameters(NativeView(None, model.forge_objects.clip.cond_stage_model))}
        return live - converted

    def _build(self, model, view, settings, base_info, patchers, stripped):
        """The weak weights from the reference: the base checkpoint (with the prompt's kept
        LoRAs merged by the fork's function), or the live model without the stripped LoRAs;
        against the weights the fork will sample with (its merge of every LoRA)."""
        started = time.perf_counter()
        base_state = None
        try:
            if base_info is not None:
                base_state = self._base_state(model, view, base_info.filename)
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
            if isinstance(base_state, NativeBaseState):
                base_state.close()
            base_state = None
        self.adjust_weak(weak)
        add_aliases(weak, self.alias_root(model))
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

    # -- lean weak weights (a base checkpoint's UNet difference as low-rank factors) --------------
    def _weights_plan(self, model, settings, base_info, patchers, unet_param):
        """Exact copies or lean factors (lib_pg.hosts.common.lean.weights_plan). On the forks the
        factors cover the UNet (its keys are the same in the file and the fork); the text encoders'
        differing layers stay exact copies, in the fork's key space."""
        if base_info is None or settings.weights == "exact":
            return WeightsPlan()
        if any(patcher.live for patcher in patchers):
            if settings.weights == "lean":
                raise PGError(f"lean weak weights ('weights': 'lean') with LoRAs in the prompt are not supported on {self.HOST} "
                              "yet; use 'exact' (or 'auto')")
            return WeightsPlan()
        element_size = torch.empty((), dtype=lean_dtype(unet_param.dtype)).element_size()
        active_path = active_file(model)
        key = (checkpoints.file_identity(active_path), checkpoints.file_identity(base_info.filename), element_size, "unet")
        if key not in self.exact_sizes:
            with checkpoints.open_checkpoint(active_path, "active checkpoint") as active, \
                    checkpoints.open_checkpoint(base_info.filename, "base checkpoint") as base:
                self.exact_sizes[key] = lowrank.estimated_differing_bytes(UNetPart(active), UNetPart(base), element_size)
        available = None if settings.weights == "lean" else self._available_bytes(unet_param)
        return weights_plan(settings, self.exact_sizes[key], available)

    def _available_bytes(self, unet_param):
        """Settings' memory budget, else on a GPU its free memory (plus what the kept weak weights
        hold) less a margin for sampling; None (no limit) on a CPU."""
        from lib_pg.hosts.common.frontend import memory_budget_bytes
        from lib_pg.hosts.common.lean import GPU_MARGIN_BYTES, GPU_MARGIN_SHARE

        budget = memory_budget_bytes()
        if budget is not None:
            return budget
        if unet_param.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(unet_param.device)
        held = self.cache.weak.extra_bytes if self.cache.weak is not None else 0
        return max(free + held - max(GPU_MARGIN_BYTES, int(GPU_MARGIN_SHARE * total)), 0)

    def _build_lean(self, model, view, settings, base_info, plan):
        """The UNet as lean factors of (active file − base file), read from PG's cache file or
        factored; the text encoders' differing layers as exact copies from the fork's conversion."""
        started = time.perf_counter()
        unet_param = next(view.model.diffusion_model.parameters())
        dtype = lean_dtype(unet_param.dtype)
        active_info = model.sd_checkpoint_info
        path = lean_cache_path(active_info, base_info, plan.lean_budget, dtype, part="unet")
        if os.path.isfile(path):
            lean = lowrank.read_lean_file(path)
            how = f"read {path} in {(time.perf_counter() - started) * 1000:.0f} ms"
        else:
            lean = factor_with_progress(active_info.filename, base_info.filename, plan.lean_budget, dtype, part=UNetPart)
            how = f"factored in {time.perf_counter() - started:.1f} s"
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                lowrank.write_lean_file(lean, path, {"pg_active": active_info.title, "pg_base": base_info.title,
                                                     "pg_part": "unet"})
                how += f", cached as {path}"
            except OSError as error:
                how += f" (not cached: {error})"
        try:
            weak = lowrank.build_lean_weak_model(view, lean, settings.omega_key, correctable=correctable_layer)
            text_view = TextOnlyView(view)
            text_state = self._base_state(model, text_view, base_info.filename, with_unet=False)
            try:
                text = build_weak_model(text_view, text_state, settings.omega_key, base_name=base_info.title)
            finally:
                if isinstance(text_state, NativeBaseState):
                    text_state.close()
                text_state = None
        except torch.cuda.OutOfMemoryError as error:
            raise PGError(f"not enough GPU memory for the weak weights ({error}); lower the resolution/batch or free memory") from None
        except MemoryError:
            raise PGError("not enough memory to read the base checkpoint and build the weak weights") from None
        weak.text = text.text
        weak.differing_bytes += text.differing_bytes
        self.adjust_weak(weak)
        add_aliases(weak, self.alias_root(model))
        unet_bytes = sum(layer.nbytes() for layer in weak.unet)
        weak.description = f"low-rank {mib_text(plan.lean_budget)} MiB, {100 * lean.energy_share:.0f} %"
        log(f"lean weak weights from {base_info.title}: UNet {len(lean.factors)} layers low-rank, {len(lean.exact)} tensors exact, "
            f"{unet_bytes / 2**20:.1f} MiB of a {plan.lean_budget / 2**20:.0f} MiB budget (exact copy: "
            f"{lean.differing_bytes / 2**20:.0f} MiB), {100 * lean.energy_share:.1f} % of the difference's energy; "
            f"{len(weak.text)} text-encoder layers exact, {sum(layer.nbytes() for layer in weak.text) / 2**20:.1f} MiB; {how}")
        return weak
