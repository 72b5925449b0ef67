"""Route the unconditional rows of each denoiser step to the weak weights.

webui's CFG denoiser stacks a step's conditioning as [conditional rows...,
unconditional rows] and evaluates it in one or more UNet calls: one call,
chunks of the batch size, or a separate unconditional call (see
modules/sd_samplers_cfg_denoiser.py). Other extensions lay calls out their own
way: Tiled Diffusion repeats every row once per tile inside a call, PAG adds an
all-conditional call. So the weak rows are found by what they are: each row of
a UNet call is compared, exactly, with the step's conditioning rows (a row's
text conditioning, over the token length both share: webui pads or truncates
one side after the step callback). A row equal to an unconditional row runs on
the weak weights; one equal to a conditional row, or to none (another
extension's conditioning), runs on the live weights. Where a row equals both a
conditional and an unconditional row (the prompt equals the negative prompt),
its position decides: rows continue the step's order from the previous row or
call, and start again from the first row where they cannot continue.

Every module with personalized weights splits its input by those rows: the
conditional part runs with the live weights, the weak part with the weak
weights, in the same forward (no extra model evaluation). A module whose weak
weights differ only by stripped low-rank networks is not split: it runs once
over all rows and the weak rows get the networks' correction added.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from lib_pg.patching import LivePatch, swapped_parameters


@dataclass(frozen=True)
class CallRows:
    """For one UNet call: which of its rows belong to the weak branch.

    `split` is set when the weak rows are the call's suffix [split, rows)
    (webui's own layouts): then inputs are sliced, not gathered."""

    rows: int
    weak: tuple  # indices of the weak rows, ascending
    omega: float
    split: int = None
    cond_index: torch.Tensor = None  # gather indices when the rows interleave (split is None)
    weak_index: torch.Tensor = None


def call_rows(weak_rows, rows: int, omega: float, device=None):
    """The CallRows of a call with `rows` rows, of which `weak_rows` are weak."""
    weak = tuple(weak_rows)
    if weak == tuple(range(rows - len(weak), rows)):
        return CallRows(rows, weak, omega, split=rows - len(weak))
    weak_set = set(weak)
    cond = [i for i in range(rows) if i not in weak_set]
    return CallRows(rows, weak, omega, cond_index=torch.tensor(cond, dtype=torch.long, device=device),
                    weak_index=torch.tensor(weak, dtype=torch.long, device=device))


class StepConditioning:
    """A step's conditioning rows in the denoiser's order (conditional rows,
    then unconditional), kept once per distinct row for matching."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor):
        self.cond_rows = cond.shape[0]
        self.total_rows = cond.shape[0] + uncond.shape[0]
        self.uncond_positions = frozenset(range(self.cond_rows, self.total_rows))
        self.groups = []  # (distinct row [tokens, width], positions holding it)
        for offset, rows in ((0, cond), (self.cond_rows, uncond)):
            for first, positions in _equal_row_groups(rows):
                self.groups.append((rows[first].detach(), tuple(offset + i for i in positions)))
        self._cast = {}

    def _groups_as(self, dtype, device):
        # webui casts the conditioning to the UNet's dtype before the call
        # (sd_hijack_unet.apply_model): compare in the call's dtype, cast once per step.
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = [(row.to(device=device, dtype=dtype), positions) for row, positions in self.groups]
        return self._cast[key]

    def matches(self, context: torch.Tensor):
        """For each row of a call's context: the sorted positions of the step's
        rows it equals exactly (over the token length both share)."""
        rows = context.shape[0]
        groups = self._groups_as(context.dtype, context.device)
        equal = []
        for row, _positions in groups:
            tokens = min(row.shape[0], context.shape[1])
            if row.shape[1:] != context.shape[2:] or tokens == 0:
                equal.append(torch.zeros(rows, dtype=torch.bool, device=context.device))
            else:
                equal.append((context[:, :tokens] == row[:tokens]).flatten(1).all(1))
        found = torch.stack(equal).cpu().tolist() if equal else []  # one device sync per call
        return [sorted(p for g, (_row, positions) in enumerate(groups) if found[g][i] for p in positions)
                for i in range(rows)]


def _equal_row_groups(rows: torch.Tensor):
    """(first index, all indices) of each set of bit-equal rows (a batch of one
    prompt has one), so that a call is compared with each distinct row once."""
    if rows.shape[0] == 0:
        return []
    flat = rows.detach().flatten(1)
    equal = torch.stack([(flat == flat[i]).all(1) for i in range(flat.shape[0])]).cpu().tolist()
    groups, taken = [], set()
    for i, row in enumerate(equal):
        if i not in taken:
            members = [j for j, same in enumerate(row) if same and j not in taken]
            taken.update(members)
            groups.append((i, members))
    return groups


def assign_positions(matches, start: int, total: int):
    """Give each call row one step position among its matches: the one that
    continues the previous row (webui's chunks continue across calls), else the
    first (a new tile, an extra call). Returns (positions, None for a row that
    matched nothing, and the position the next call would continue from)."""
    expected = start
    positions = []
    for candidates in matches:
        if not candidates:
            positions.append(None)
            expected = total  # nothing to continue from
            continue
        position = expected if expected in candidates else candidates[0]
        positions.append(position)
        expected = position + 1
    return positions, expected


class StepRouter:
    """Which rows of the current UNet call belong to the weak branch."""

    def __init__(self):
        self.current = None  # CallRows while a routed UNet call runs
        self.unet_calls = 0
        self._omega = 1.0
        self._conditioning = None  # a callable giving (cond, uncond) tensors, read at the step's first call
        self._step = None  # StepConditioning of the step in flight
        self._next = 0
        self.weak_positions_routed = set()  # unconditional positions this step routed to the weak weights
        self.unrecognised_calls = 0  # calls with rows equal to no conditioning row of their step
        self.failure = None  # an error from the step's callback, raised at the next UNet call

    def fail(self, error: BaseException):
        self.failure = error

    def begin_step(self, conditioning, omega: float):
        """Called from the CFG denoiser callback, before the step's UNet calls.
        `conditioning` returns the step's (cond, uncond) text-conditioning
        tensors; it is read when the first UNet call starts, after every
        extension's step callback had its say.

        ω = 1 leaves the step exactly as webui computes it."""
        self._omega = omega
        self._conditioning = conditioning if omega < 1.0 else None
        self._step = None
        self._next = 0
        self.weak_positions_routed = set()

    def end_step(self):
        self._conditioning = None
        self._step = None

    def uncond_positions(self):
        """The step's unconditional positions (read from its conditioning even
        when no UNet call came)."""
        if self._step is None and self._conditioning is not None:
            cond, uncond = self._conditioning()
            return frozenset(range(cond.shape[0], cond.shape[0] + uncond.shape[0]))
        return self._step.uncond_positions if self._step is not None else frozenset()

    def enter_unet(self, rows: int, context=None):
        self.unet_calls += 1
        self.current = None
        if self.failure is not None:
            raise self.failure
        if self._conditioning is None:
            return
        if self._step is None:
            self._step = StepConditioning(*self._conditioning())
        if context is None or context.shape[0] != rows:
            self.unrecognised_calls += 1
            return
        positions, self._next = assign_positions(self._step.matches(context), self._next, self._step.total_rows)
        if None in positions:
            self.unrecognised_calls += 1
        uncond = self._step.uncond_positions
        weak = [i for i, position in enumerate(positions) if position in uncond]
        if weak:
            self.weak_positions_routed.update(positions[i] for i in weak)
            self.current = call_rows(weak, rows, self._omega, context.device)

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
    def weak_forward(x, omega, *args, **kwargs):
        scope = layer.scope(omega) if layer.scope is not None else _NO_SCOPE
        with swapped_parameters(layer.swaps_at(omega)), scope:
            out = original(x, *args, **kwargs)
        if layer.corrections:
            # Stripped low-rank networks next to swapped weights or a scope:
            # their contribution, scaled from ω = 1 down to ω, on these rows only.
            out = out + _scaled_correction(layer, x, omega, out.dtype)
        return out

    def forward(x, *args, **kwargs):
        plan = router.current
        if plan is None:
            return original(x, *args, **kwargs)
        if x.shape[0] != plan.rows:
            raise RuntimeError(
                f"Personalization Guidance: layer input has batch {x.shape[0]}, the UNet call has {plan.rows}; "
                "another extension changes the batch inside the UNet, which PG cannot route"
            )
        omega = plan.omega
        k = plan.split
        if layer.corrections_only:
            # Same weights for both branches: one forward over every row (the
            # conditional rows come out exactly as CFG's), then the weak rows
            # get the stripped networks' contribution scaled from ω = 1 to ω.
            out = original(x, *args, **kwargs)
            if k is not None:
                out[k:] += _scaled_correction(layer, x[k:], omega, out.dtype)
            else:
                rows = plan.weak_index
                correction = _scaled_correction(layer, x.index_select(0, rows), omega, out.dtype)
                # a bias-only correction (lean weights) is the bias difference itself: broadcast to the rows
                out.index_add_(0, rows, torch.broadcast_to(correction, (rows.numel(),) + tuple(out.shape[1:])))
            return out
        # The conditional rows run first, on the live weights: a host that
        # finalises weights lazily in forward (webui's Lora) does it there.
        if k is not None:  # the weak rows are a suffix (webui's layouts): slices, no gather
            cond_out = original(x[:k], *args, **kwargs) if k else None
            weak_out = weak_forward(x[k:] if k else x, omega, *args, **kwargs)
            return weak_out if cond_out is None else torch.cat([cond_out, weak_out])
        # Interleaved rows (e.g. one [cond, uncond] group per tile): gather each
        # branch, run it, put its rows back where they came from.
        cond_out = original(x.index_select(0, plan.cond_index), *args, **kwargs)
        weak_out = weak_forward(x.index_select(0, plan.weak_index), omega, *args, **kwargs)
        out = cond_out.new_empty((plan.rows,) + cond_out.shape[1:])
        out.index_copy_(0, plan.cond_index, cond_out)
        out.index_copy_(0, plan.weak_index, weak_out.to(out.dtype))
        return out

    return forward


def _call_context(args, kwargs):
    """The text conditioning of a UNet call: ldm's and sgm's UNetModel.forward
    take (x, timesteps, context, y); webui passes context by keyword."""
    context = kwargs.get("context")
    if context is None and len(args) > 2:
        context = args[2]
    return context if isinstance(context, torch.Tensor) else None


def install_routing(patch: LivePatch, unet: torch.nn.Module, layers, router: StepRouter):
    """Patch each personalized UNet module's forward and hook the UNet's calls,
    all through `patch`, so that `patch.restore()` takes every trace away."""
    for layer in layers:
        module = layer.module
        original = module.forward  # bound now: includes any class-level patch (e.g. webui's Lora)
        patch.set_attribute(module, "forward", _routed_forward(layer, router, original))

    def before_unet(_module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        router.enter_unet(x.shape[0], _call_context(args, kwargs))

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
