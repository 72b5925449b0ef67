"""Route the unconditional rows of each denoiser step to the weak weights.

webui's CFG denoiser stacks a step's inputs as [conditional rows..., unconditional
rows] and evaluates them in one or more UNet calls over consecutive row ranges
(one call, chunks of the batch size, or a separate unconditional call; see
modules/sd_samplers_cfg_denoiser.py). The weak rows are therefore always a
suffix of a call. `StepRouter` follows the row offset across the calls of a
step; every module with personalized weights splits its input there: the
conditional part runs with the live weights, the unconditional part with the
weak weights, in the same forward (no extra model evaluation). A module whose
weak weights differ only by stripped low-rank networks is not split: it runs
once over all rows and the weak rows get the networks' correction added.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from lib_pg.patching import LivePatch, swapped_parameters


@dataclass(frozen=True)
class CallSplit:
    """For one UNet call: rows [0, split) are conditional, [split, rows) weak."""

    rows: int
    split: int
    omega: float


class StepRouter:
    """Which rows of the current UNet call belong to the weak branch."""

    def __init__(self):
        self.current = None  # CallSplit while a routed UNet call runs
        self.unet_calls = 0
        self._plan = None  # (total rows, first weak row, omega) for the step
        self._offset = 0
        self.unexpected_calls = 0
        self.weak_rows_seen = False  # did a call of this step reach the weak rows?
        self.failure = None  # an error from the step's callback, raised at the next UNet call

    def fail(self, error: BaseException):
        self.failure = error

    def begin_step(self, total_rows: int, weak_rows: int, omega: float):
        """Called from the CFG denoiser callback, before the step's UNet calls.

        ω = 1 (or no weak rows) leaves the step exactly as webui computes it."""
        self._plan = None if (omega >= 1.0 or weak_rows <= 0) else (total_rows, total_rows - weak_rows, omega)
        self._offset = 0
        self.weak_rows_seen = False

    def end_step(self):
        self._plan = None

    def enter_unet(self, rows: int):
        self.unet_calls += 1
        self.current = None
        if self.failure is not None:
            raise self.failure
        if self._plan is None:
            return
        total, first_weak, omega = self._plan
        start, stop = self._offset, self._offset + rows
        self._offset = stop
        if stop <= first_weak:
            return  # conditional rows only
        if stop > total:
            # A call webui's denoiser did not plan (another extension calling the
            # UNet again): it is not ours to route.
            self.unexpected_calls += 1
            return
        self.current = CallSplit(rows, max(first_weak - start, 0), omega)
        self.weak_rows_seen = True

    def exit_unet(self):
        self.current = None


_NO_SCOPE = nullcontext()


def _scaled_correction(layer, x, omega, dtype):
    """(ω − 1)·ΣΔy: the layer's stripped low-rank networks' output for rows x,
    scaled from ω = 1 (what the live layer computes) down to ω."""
    return sum(delta(x) for delta in layer.corrections).to(dtype) * (omega - 1.0)


def _routed_forward(layer, router, original):
    # Runs around every call of every personalized layer: kept lean (one check
    # on the fast path, no per-call allocation beyond the outputs).
    def forward(x, *args, **kwargs):
        split = router.current
        if split is None:
            return original(x, *args, **kwargs)
        if x.shape[0] != split.rows:
            raise RuntimeError(
                f"Personalization Guidance: layer input has batch {x.shape[0]}, the UNet call has {split.rows}; "
                "another extension changes the batch inside the UNet, which PG cannot route"
            )
        k = split.split
        omega = split.omega
        if layer.corrections_only:
            # Same weights for both branches: one forward over every row (the
            # conditional rows come out exactly as CFG's), then the weak rows
            # get the stripped networks' contribution scaled from ω = 1 to ω.
            out = original(x, *args, **kwargs)
            out[k:] += _scaled_correction(layer, x[k:], omega, out.dtype)
            return out
        # The conditional rows run first, on the live weights: a host that
        # finalises weights lazily in forward (webui's Lora) does it there.
        cond_out = original(x[:k], *args, **kwargs) if k else None
        weak_x = x[k:] if k else x
        scope = layer.scope(omega) if layer.scope is not None else _NO_SCOPE
        with swapped_parameters(layer.swaps_at(omega)), scope:
            weak_out = original(weak_x, *args, **kwargs)
        if layer.corrections:
            # Stripped low-rank networks next to swapped weights or a scope:
            # their contribution, scaled from ω = 1 down to ω, on these rows only.
            weak_out = weak_out + _scaled_correction(layer, weak_x, omega, weak_out.dtype)
        return weak_out if cond_out is None else torch.cat([cond_out, weak_out])

    return forward


def install_routing(patch: LivePatch, unet: torch.nn.Module, layers, router: StepRouter):
    """Patch each personalized UNet module's forward and hook the UNet's calls,
    all through `patch`, so that `patch.restore()` takes every trace away."""
    for layer in layers:
        module = layer.module
        original = module.forward  # bound now: includes any class-level patch (e.g. webui's Lora)
        patch.set_attribute(module, "forward", _routed_forward(layer, router, original))

    def before_unet(_module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        router.enter_unet(x.shape[0])

    def after_unet(_module, _args, _output):
        router.exit_unet()

    patch.keep_handle(unet.register_forward_pre_hook(before_unet, with_kwargs=True))
    patch.keep_handle(unet.register_forward_hook(after_unet))


def _corrected_forward(layer, original, omega):
    def forward(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        out += _scaled_correction(layer, x, omega, out.dtype)
        return out

    return forward


@contextmanager
def corrected_text_layers(layers, omega: float):
    """While the weak negative conditioning is computed (a text-encoder call in
    which every row is weak): the text-encoder layers of stripped low-rank
    networks add (ω − 1)·ΣΔy to their output, instead of holding weight copies
    for as long as the weak model is cached."""
    with LivePatch() as patch:
        for layer in layers:
            if layer.corrections:
                patch.set_attribute(layer.module, "forward", _corrected_forward(layer, layer.module.forward, omega))
        yield


def text_encoder_swaps(layers, omega: float):
    """(module, name, tensor) triples that make the text encoder the weak one at ω."""
    for layer in layers:
        yield from layer.swaps_at(omega)
