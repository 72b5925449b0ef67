"""Routing on the Forge-family webuis (reForge; Forge's backend tags rows the same way).

Host-free: torch only. The forks no longer stack a step's rows as webui does
([cond..., uncond] in CFGDenoiser.forward). Their backend (ComfyUI's
calc_cond_batch) evaluates a list of conditioning entries, each a chunk of
exactly B rows (the step's batch), concatenates the chunks of one UNet call and
tags them in `transformer_options["cond_or_uncond"]`: 0 for a conditional
chunk, 1 for the unconditional one, in the call's chunk order (observed
`[1, 0]`: the unconditional chunk first). A wrapper that tiles the latent
(MultiDiffusion) repeats that block of chunks inside one call with the same
tags. So the weak rows of a call are read from the tags, block by block:
no counters, no comparison of conditioning. A call whose rows are not a whole
number of tagged blocks (something sliced the rows) is left alone and counted.

The diffusion model is called with `transformer_options` by keyword
(reForge ldm_patched/modules/model_base.py BaseModel._apply_model, Forge
backend/modules/k_model.py KModel.apply_model), which is where the pre-hook
reads it.
"""

from lib_pg.guidance import GuidanceRun, UnroutedStep
from lib_pg.routing import _routed_forward, call_rows

UNCOND_TAG = 1  # the unconditional entry's tag in cond_or_uncond (Forge's UNCOND, reForge's index into [cond, uncond])


def weak_rows_from_tags(tags, rows: int, batch: int):
    """The weak (unconditional) row indices of a call with `rows` rows whose
    chunks are tagged `tags`, each chunk `batch` rows; repeated blocks of the
    tagged chunks (tiles) repeat the layout. None when the rows are not a whole
    number of blocks."""
    tags = list(tags)
    if not tags or batch <= 0:
        return None
    block = len(tags) * batch
    if rows % block:
        return None
    return [start + j * batch + i
            for start in range(0, rows, block)
            for j, tag in enumerate(tags) if tag == UNCOND_TAG
            for i in range(batch)]


def call_tags(args, kwargs):
    """`cond_or_uncond` of a diffusion-model call: forward(x, timesteps, context,
    y, control, transformer_options, **kwargs), the options by keyword."""
    options = kwargs.get("transformer_options")
    if options is None and len(args) > 5:
        options = args[5]
    tags = options.get("cond_or_uncond") if isinstance(options, dict) else None
    return list(tags) if isinstance(tags, (list, tuple)) else None


class TaggedStepRouter:
    """Which rows of the current diffusion-model call are weak, from the
    backend's tags. Same interface as routing.StepRouter where GuidanceRun
    and the routed forwards use it (current, fail, end_step,
    weak_positions_routed, unrecognised_calls, exit_unet)."""

    def __init__(self):
        self.current = None
        self.unet_calls = 0
        self.unrecognised_calls = 0
        self.failure = None
        self._omega = 1.0
        self._batch = None  # the step's batch size while the step is guided
        self.weak_positions_routed = set()
        self.uncond_chunks_seen = 0  # tagged unconditional chunks in the step's calls
        self.uncond_chunks_unroutable = 0  # of those, in calls PG could not lay out
        self.untagged_calls = 0  # calls of the step without tags (a wrapper dropped them)
        self.on_first_routed_call = None  # called once before the first routed call (weights follow the UNet's device)

    def fail(self, error: BaseException):
        self.failure = error

    def begin_step(self, batch: int, omega: float):
        self._omega = omega
        self._batch = batch if omega < 1.0 else None
        self.weak_positions_routed = set()
        self.uncond_chunks_seen = 0
        self.uncond_chunks_unroutable = 0
        self.untagged_calls = 0

    def end_step(self):
        self._batch = None

    def uncond_positions(self):
        return frozenset(range(self._batch)) if self._batch else frozenset()

    def enter_call(self, args, kwargs):
        self.unet_calls += 1
        self.current = None
        if self.failure is not None:
            raise self.failure
        if self._batch is None:
            return
        x = args[0] if args else kwargs["x"]
        rows = x.shape[0]
        tags = call_tags(args, kwargs)
        if tags is None:
            self.untagged_calls += 1
            self.unrecognised_calls += 1
            return
        uncond_chunks = sum(1 for tag in tags if tag == UNCOND_TAG)
        self.uncond_chunks_seen += uncond_chunks
        weak = weak_rows_from_tags(tags, rows, self._batch)
        if weak is None:
            self.uncond_chunks_unroutable += uncond_chunks
            self.unrecognised_calls += 1
            return
        if not weak:
            return
        if self.on_first_routed_call is not None:
            first, self.on_first_routed_call = self.on_first_routed_call, None
            first()
        self.weak_positions_routed.update(range(self._batch))
        self.current = call_rows(weak, rows, self._omega, x.device)

    def exit_unet(self):
        self.current = None


def place_like_live(layers):
    """Move each weak layer's tensors to the device of the live parameter they
    stand in for, where they differ (the fork moved the model since the weak
    weights were built). Returns the number of layers moved."""
    moved = 0
    for layer in layers:
        live = layer.live()
        for attr in ("fixed", "ref"):
            tensors = getattr(layer, attr)
            if not tensors or not layer.names:
                continue
            if any(t.device != p.device for t, p in zip(tensors, live)):
                setattr(layer, attr, tuple(t.to(p.device) for t, p in zip(tensors, live)))
                layer._fixed_swaps = None
                moved += 1
    return moved


class TaggedGuidanceRun(GuidanceRun):
    """GuidanceRun for the forks: the weak rows come from the backend's tags.

    A guided step in which the backend evaluated no unconditional chunk at all
    (CFG Scale 1, NGMS, Skip Early CFG: the fork drops the entry) is counted as
    a step without unconditional pass, under `skip_reason`; one whose
    unconditional chunks reached a call PG could not lay out, or calls without
    tags, raises UnroutedStep as on webui."""

    def __init__(self, unet, weak, settings, skip_reason="the host ran no unconditional pass"):
        super().__init__(unet, weak, settings)
        self.router = TaggedStepRouter()
        self.skip_reason = skip_reason
        self.router.on_first_routed_call = lambda: place_like_live(self.weak.unet)

    def __enter__(self):
        try:
            for layer in self.weak.unet:
                module = layer.module
                self._patch.set_attribute(module, "forward", _routed_forward(layer, self.router, module.forward))
            router = self.router

            def before(_module, args, kwargs):
                router.enter_call(args, kwargs)

            def after(_module, _args, _output):
                router.exit_unet()

            self._patch.keep_handle(self.unet.register_forward_pre_hook(before, with_kwargs=True))
            self._patch.keep_handle(self.unet.register_forward_hook(after))
        except BaseException:
            self._patch.restore()
            raise
        return self

    def begin_step(self, step, total_steps, batch, model_is_ours=True):
        """Plan the step; returns the ω in effect (1.0: left to the host)."""
        self._close_step()
        self.steps_begun += 1
        omega = self.omega_for(step, total_steps) if model_is_ours else 1.0
        if not model_is_ours:
            self.report.steps_other_model += 1
        elif omega >= 1.0:
            self.report.unguided_steps += 1
        self.router.begin_step(batch, omega)
        if model_is_ours and omega < 1.0:
            self._pending = step
        return omega

    def _close_step(self):
        step, self._pending = self._pending, None
        router = self.router
        seen, unroutable, untagged = router.uncond_chunks_seen, router.uncond_chunks_unroutable, router.untagged_calls
        routed = router.weak_positions_routed
        expected = len(router.uncond_positions())
        router.end_step()
        if step is None:
            return
        if routed and not unroutable:
            self.report.guided_steps += 1
        elif not seen and not untagged:
            self.report.steps_without_uncond += 1
            if self.skip_reason not in self.report.skip_reasons:
                self.report.skip_reasons += (self.skip_reason,)
        else:
            raise UnroutedStep(step, 0 if unroutable else len(routed), expected)
