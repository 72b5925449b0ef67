"""Reading a base checkpoint and building the weak model's weights from it.

θ_ω = θ_ref + ω·(θ_live − θ_ref) for every parameter of the UNet and the text
encoder(s) that differs between the two; the VAE is not part of the weak model.
Pure torch/safetensors: the webui adapter passes in webui's own loader.
"""

import os
from dataclasses import dataclass, field

import torch

from lib_pg.errors import PGError

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")

# webui wraps the text encoder and its token embedding (sd_hijack.py); these
# attribute names appear in live parameter names but never in checkpoint keys.
_WRAPPER_SEGMENTS = ("wrapped",)


def checkpoint_key(live_name: str) -> str:
    """The checkpoint key of a live parameter name (webui's wrappers removed)."""
    return ".".join(part for part in live_name.split(".") if part not in _WRAPPER_SEGMENTS)


def is_weak_model_key(key: str) -> bool:
    return key.startswith(UNET_PREFIX) or key.startswith(TEXT_PREFIXES)


def detect_family(shapes) -> str:
    """A readable model family from checkpoint keys -> shapes (a mapping)."""
    in_key = UNET_PREFIX + "input_blocks.0.0.weight"
    in_channels = shapes[in_key][1] if in_key in shapes else None
    if "conditioner.embedders.1.model.ln_final.weight" in shapes or UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        family = "SDXL"
    elif "cond_stage_model.model.ln_final.weight" in shapes:
        family = "SD 2.x"
    elif any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        family = "SD 1.x"
    elif in_channels is None:
        return "not a Stable Diffusion checkpoint (no UNet keys)"
    else:
        family = "unknown family"
    if in_channels == 9:
        family += " inpainting"
    elif in_channels == 8:
        family += " InstructPix2Pix (edit)"
    return family


def read_checkpoint(path: str):
    """A safetensors or .ckpt file as a dict of CPU tensors (a .ckpt's
    `state_dict` nesting unwrapped). Used outside webui (tests, benchmark);
    inside webui the adapter uses webui's own loader, with its key clean-up."""
    if not os.path.isfile(path):
        raise PGError(f"base checkpoint file not found: {path}")
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data.get("state_dict", data)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal calls -0.0 and 0.0 equal, and NaN unequal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = _SAME_SIZE_INT[a.element_size()]
    return torch.equal(a.contiguous().view(-1).view(as_int), b.contiguous().view(-1).view(as_int))


def differs(ref: torch.Tensor, live: torch.Tensor) -> bool:
    """Whether fine-tuning changed this tensor. A fine-tuned tensor usually
    differs in its first elements already, which spares the full comparison."""
    head = min(ref.numel(), 256)
    if not same_bits(ref.reshape(-1)[:head], live.reshape(-1)[:head]):
        return True
    return not same_bits(ref, live)


@dataclass
class WeakLayer:
    """One live module whose parameters differ from the reference.

    `names` are the module's own parameter names; `ref` holds θ_ref (live dtype
    and device) for a scheduled ω, `fixed` holds θ_ω for the one constant ω.
    A layer whose only difference is stripped low-rank networks holds no
    tensors at all, just `corrections`.
    """

    module: torch.nn.Module
    names: tuple
    ref: tuple = None
    fixed: tuple = None
    fixed_omega: float = None
    corrections: tuple = ()  # x -> Δy of stripped low-rank networks; weak rows add (ω − 1)·ΣΔy
    scope: object = None  # ω -> context manager the weak rows run in (e.g. network multipliers set to ω·m)
    correction_bytes: int = 0  # memory the corrections hold (lean factors; a LoRA's own weights count elsewhere)
    _fixed_swaps: tuple = field(default=None, init=False, repr=False, compare=False)

    @property
    def corrections_only(self) -> bool:
        """Whether the weak rows differ only by `corrections`: no tensor to swap, no scope."""
        return not self.names and self.scope is None and bool(self.corrections)

    def live(self):
        return tuple(self.module._parameters[n] for n in self.names)

    def tensors_at(self, omega: float):
        """The weak model's parameters of this module at ω."""
        if self.fixed is not None and omega == self.fixed_omega:
            return self.fixed
        if self.ref is None:
            raise RuntimeError(f"weak weights were built for ω={self.fixed_omega}, asked for ω={omega}")
        if omega == 0.0:
            return self.ref
        return tuple(interpolate(r, l, omega) for r, l in zip(self.ref, self.live()))

    def swaps_at(self, omega: float):
        """(module, name, tensor) triples that give the module its weak parameters
        at ω (for the constant ω, built once: this runs on every routed call)."""
        if self.fixed is not None and omega == self.fixed_omega:
            if self._fixed_swaps is None:
                self._fixed_swaps = tuple((self.module, n, t) for n, t in zip(self.names, self.fixed))
            return self._fixed_swaps
        return tuple((self.module, n, t) for n, t in zip(self.names, self.tensors_at(omega)))

    def nbytes(self) -> int:
        held = (self.ref or ()) + (self.fixed or ())
        return sum(t.numel() * t.element_size() for t in held) + self.correction_bytes


# torch's CPU allocator aligns every tensor it allocates to 64 bytes, so the
# live weights are; tensors read from a safetensors file are slices of one
# buffer at the file's offsets. CPU kernels take other (vectorised) paths on
# unaligned data and round differently in the last bits.
_ALLOCATOR_ALIGNMENT = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a fresh copy of it where its data is not aligned as torch
    aligns its own allocations: the weak branch then computes exactly what
    the same weights would as a loaded model's parameters."""
    if tensor.device.type == "cpu" and tensor.data_ptr() % _ALLOCATOR_ALIGNMENT:
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def interpolate(ref: torch.Tensor, live: torch.Tensor, omega: float) -> torch.Tensor:
    """θ_ref + ω·(θ_live − θ_ref), computed in float32, stored in the live dtype.

    ω = 0 returns θ_ref itself (the base weights unchanged)."""
    if omega == 0.0:
        return ref
    if live.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.lerp(ref, live, omega)  # computed in float32 internally, rounded once
    return torch.lerp(ref.float(), live.float(), omega).to(live.dtype)  # e.g. webui's fp8 weight storage


@dataclass(frozen=True)
class LowRankDelta:
    """A stripped network's contribution to one layer, in its low-rank form.

    `output(x)` is its contribution to the layer's output for input x and
    `weight()` the full weight delta it merges, both at its multiplier;
    `nbytes` is the size of the network's own weights for this layer, and
    `held_bytes` the memory the correction itself holds beyond the host's
    (0 on webui, which keeps the network's weights; the forks' factors are
    copies in the layer's dtype)."""

    output: object
    weight: object
    nbytes: int
    held_bytes: int = 0


def layers_to_copy(corrections) -> set:
    """The layers (from module -> stripped LowRankDeltas) better served by a copy
    of their weak weight than by low-rank corrections, within the memory the
    LoRA mode may spend: twice the networks' own weights.

    A correction costs r·(in + out) multiply-adds per weak token, a copy costs
    in·out weights of memory and nothing per token. So the layers with the most
    LoRA weight per byte of layer are copied first (where the rank is large
    next to the layer; in SD UNets also the narrow layers that run at the
    highest resolution, on the most tokens), until the budget is spent."""
    def layer_bytes(module):
        return module.weight.numel() * module.weight.element_size()

    budget = 2 * sum(d.nbytes for deltas in corrections.values() for d in deltas)
    ranked = sorted(corrections, key=lambda m: -sum(d.nbytes for d in corrections[m]) / layer_bytes(m))
    chosen, spent = set(), 0
    for module in ranked:
        if spent + layer_bytes(module) <= budget:
            chosen.add(module)
            spent += layer_bytes(module)
    return chosen


@dataclass
class WeakModel:
    """The weights that differ between the live model and the reference."""

    unet: list = field(default_factory=list)
    text: list = field(default_factory=list)
    differing_bytes: int = 0
    build_seconds: float = 0.0
    text_scope: object = None  # ω -> context manager for the weak text encoder's call, if any
    base_family: str = ""
    live_family: str = ""
    description: str = ""  # how the weak weights are held, for the infotext ("exact", "low-rank 256 MiB, 91 %")

    @property
    def extra_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.unet + self.text)

    @property
    def text_differs(self) -> bool:
        return bool(self.text) or self.text_scope is not None


def live_parameters(model: torch.nn.Module):
    """checkpoint key -> (owning module, parameter name, parameter) for the
    UNet and text encoder parameters of a live webui/ldm model."""
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, param in module._parameters.items():
            if param is None:
                continue
            key = checkpoint_key(f"{module_name}.{param_name}" if module_name else param_name)
            if is_weak_model_key(key) and key not in owners:
                owners[key] = (module, param_name, param)
    return owners


def check_compatible(live_shapes: dict, base_shapes: dict, base_name: str):
    """Refuse a base of another architecture, naming both families and the first mismatch."""
    for key, shape in live_shapes.items():
        base_shape = base_shapes.get(key)
        if base_shape is None or tuple(base_shape) != tuple(shape):
            live_family, base_family = detect_family(live_shapes), detect_family(base_shapes)
            found = "missing" if base_shape is None else f"shape {list(base_shape)}"
            raise PGError(
                f"base checkpoint '{base_name}' ({base_family}) does not match the active model ({live_family}): "
                f"first mismatching key {key} (active shape {list(shape)}, base {found}). "
                "Pick the checkpoint your model was trained from."
            )


def build_weak_model(model: torch.nn.Module, base_state, settings_omega_key, base_name: str = "base",
                     device_for=None, offsets=None, corrections=None, scope=None, scoped_modules=(),
                     text_scope=None, live_state=None, choose_copies=True) -> WeakModel:
    """Match the reference key by key against the live model and keep, for each
    module whose weights differ, what the weak branch needs.

    The reference θ_ref of a parameter is `base_state[key]` (a base checkpoint)
    plus `offsets[key]` where given; without a base state only the keys in
    `offsets` have a reference (θ_live + offset: the live model with LoRAs
    stripped). `corrections` maps a module (UNet or text encoder) to the
    `LowRankDelta`s of its stripped networks: the weak rows get (ω − 1)·ΣΔy
    added (no weight copy), except where `layers_to_copy` picks a copy of a
    UNet layer instead (unless `choose_copies` is False: the caller chose them). `scope(ω)` is a context the weak rows of every UNet layer run in, and `scoped_modules` the UNet modules
    that need routing for it even where no weight differs (networks applied in
    forward, whose multipliers the scope sets); `text_scope(ω)` likewise wraps
    the weak text encoder's call.

    `settings_omega_key` is ("constant", ω) to store θ_ω itself (one copy of the
    differing weights), or ("scheduled",) to store θ_ref and interpolate per step.
    `device_for(param)` gives where a weak tensor must live (default: with the param).
    `live_state[key]`, where given, stands for the live parameter: the weights
    the host will sample with when they are not the parameter yet (a host that
    merges LoRA patches only when it loads the model for sampling).
    """
    import time

    started = time.perf_counter()
    offsets = dict(offsets or {})
    corrections = dict(corrections or {})
    owners = live_parameters(model)
    prefixes = {id(module): key[: -len(name) - 1] for key, (module, name, _) in owners.items()}
    # Copies only pay off in the UNet, which runs every step: the text encoder
    # runs once per generation, so its layers always keep their corrections.
    unet_corrections = {m: d for m, d in corrections.items() if prefixes[id(m)].startswith(UNET_PREFIX) and choose_copies}
    with torch.no_grad():
        for module in layers_to_copy(unet_corrections):
            deltas = corrections.pop(module)
            key = f"{prefixes[id(module)]}.weight"
            offsets[key] = offsets.get(key, 0) - sum(d.weight().float().reshape(module.weight.shape) for d in deltas)
    live_shapes = {k: tuple(p.shape) for k, (_, _, p) in owners.items()}
    if base_state is not None:
        # a lazily read state (the forks' NativeBaseState) gives its shapes without reading tensors
        base_shapes = (base_state.shapes() if callable(getattr(base_state, "shapes", None))
                       else {k: tuple(t.shape) for k, t in base_state.items() if hasattr(t, "shape")})
        check_compatible(live_shapes, base_shapes, base_name)
        base_family = detect_family(base_shapes)
    else:
        base_family = "the active model without the stripped LoRAs"

    constant = settings_omega_key[0] == "constant"
    omega = settings_omega_key[1] if constant else None
    by_module = {}
    differing = 0
    # ω = 1 is plain CFG: nothing is routed, so nothing is kept beyond the check above.
    keep = {} if constant and omega >= 1.0 else owners
    with torch.no_grad():
        for key, (module, name, param) in keep.items():
            if base_state is None and key not in offsets:
                continue
            device = device_for(param) if device_for else param.device
            live = live_state.get(key) if live_state else None
            live = (param if live is None else live).detach()
            if live.device != device:
                live = live.to(device)
            if base_state is not None:
                ref = aligned(base_state[key].to(device=device, dtype=param.dtype))
                if key in offsets:
                    ref = (ref.float() + offsets[key].to(device).float()).to(param.dtype)
            else:
                ref = (live.float() + offsets[key].to(device).float()).to(param.dtype)
            if not differs(ref, live):
                continue  # this part of the model is not personalized: nothing to do
            differing += param.numel() * param.element_size()
            weak = interpolate(ref, live, omega) if constant else ref
            entry = by_module.setdefault(id(module), (module, key, []))
            entry[2].append((name, weak))

    live_family = detect_family(live_shapes)
    result = WeakModel(differing_bytes=differing, base_family=base_family, live_family=live_family)
    for module, key, items in by_module.values():
        names = tuple(n for n, _ in items)
        tensors = tuple(t for _, t in items)
        layer = WeakLayer(module, names, fixed=tensors, fixed_omega=omega) if constant else WeakLayer(module, names, ref=tensors)
        (result.unet if key.startswith(UNET_PREFIX) else result.text).append(layer)
    if not (constant and omega >= 1.0):
        for module, deltas in corrections.items():
            outputs = tuple(d.output for d in deltas)
            layer = WeakLayer(module, (), ref=(), fixed=(), fixed_omega=omega, corrections=outputs,
                              correction_bytes=sum(d.held_bytes for d in deltas))
            (result.unet if prefixes[id(module)].startswith(UNET_PREFIX) else result.text).append(layer)
        routed = {id(layer.module) for layer in result.unet}
        for module in scoped_modules:
            if id(module) not in routed:
                result.unet.append(WeakLayer(module, (), ref=(), fixed=(), fixed_omega=omega))
        for layer in result.unet:
            layer.scope = scope
        result.text_scope = text_scope
    result.build_seconds = time.perf_counter() - started
    return result
