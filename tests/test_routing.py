"""The weak branch, routed row by row inside one UNet call, equals the whole
weak model run on those rows; the conditional rows equal the live model."""

import pytest
import torch

from lib_pg.guidance import GuidanceRun
from lib_pg.patching import LivePatch, module_state_fingerprint, swapped_parameters
from lib_pg.routing import StepRouter
from lib_pg.settings import PGSettings
from lib_pg.weights import build_weak_model
from tests.helpers import base_state, interpolated_copy, make_pair


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def step_inputs(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 8, 8, generator=g)
    t = torch.full((rows,), 500.0)
    context = torch.randn(rows, 77, 32, generator=g)
    return x, t, context


class LinearUNet(torch.nn.Module):
    """One linear layer behind a UNet's call signature (x, timesteps, context)."""

    def __init__(self, width):
        super().__init__()
        self.layer = torch.nn.Linear(width, width)

    def forward(self, x, timesteps=None, context=None):
        return self.layer(x)


def unet_of(model):
    return model.model.diffusion_model


@pytest.mark.parametrize("omega", [0.0, 0.35])
def test_one_call_splits_cond_and_weak_rows(pair, omega):
    base, tuned = pair
    weak = build_weak_model(tuned, base_state(base), ("constant", omega))
    reference = interpolated_copy(base, tuned, omega) if omega else base
    x, t, ctx = step_inputs(4)
    with torch.no_grad(), GuidanceRun(unet_of(tuned), weak, PGSettings(True, omega)) as run:
        run.begin_step(0, 10, lambda: (ctx[:2], ctx[2:]))
        out = unet_of(tuned)(x, t, context=ctx)
        expected_cond = unet_of(tuned)(x[:2], t[:2], context=ctx[:2])  # outside any UNet plan: live weights
    with torch.no_grad():
        expected_weak = unet_of(reference)(x[2:], t[2:], context=ctx[2:])
    assert torch.equal(out[:2], expected_cond)
    assert torch.equal(out[2:], expected_weak)
    assert run.router.unet_calls == 2 and run.report.guided_steps == 1


def test_omega_one_is_plain_cfg_bit_for_bit(pair):
    base, tuned = pair
    weak = build_weak_model(tuned, base_state(base), ("scheduled",))
    x, t, ctx = step_inputs(4)
    with torch.no_grad():
        plain = unet_of(tuned)(x, t, context=ctx)
        with GuidanceRun(unet_of(tuned), weak, PGSettings(True, 1.0, schedule="linear", omega_end=0.2)) as run:
            assert run.begin_step(0, 10, lambda: (ctx[:2], ctx[2:])) == 1.0
            routed = unet_of(tuned)(x, t, context=ctx)
    assert torch.equal(plain, routed)
    assert run.report.unguided_steps == 1


def test_scheduled_omega_matches_the_interpolated_model(pair):
    base, tuned = pair
    weak = build_weak_model(tuned, base_state(base), ("scheduled",))
    settings = PGSettings(True, 0.2, schedule="linear", omega_end=0.6)
    x, t, ctx = step_inputs(2)
    with torch.no_grad(), GuidanceRun(unet_of(tuned), weak, settings) as run:
        omega = run.begin_step(5, 10, lambda: (ctx[:1], ctx[1:]))
        out = unet_of(tuned)(x, t, context=ctx)
    assert omega == pytest.approx(0.4)
    with torch.no_grad():
        expected = unet_of(interpolated_copy(base, tuned, omega))(x[1:], t[1:], context=ctx[1:])
    assert torch.allclose(out[1:], expected, atol=1e-6)


def routed_rows(calls, cond, uncond):
    """Per UNet call (given by its context rows): the rows the router sends to
    the weak weights; and whether every unconditional row of the step was routed."""
    router = StepRouter()
    router.begin_step(lambda: (cond, uncond), 0.5)
    result = []
    for context in calls:
        router.enter_unet(context.shape[0], context)
        result.append(None if router.current is None else router.current.weak)
        router.exit_unet()
    return result, router.weak_positions_routed >= router.uncond_positions()


def test_router_follows_every_batching_path():
    # rows: 3 conditional (an AND prompt with batch 2), 2 unconditional
    g = torch.Generator().manual_seed(1)
    c, u = torch.randn(3, 77, 8, generator=g), torch.randn(2, 77, 8, generator=g)
    rows = torch.cat([c, u])

    def calls(*sizes):
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return [rows[a:b] for a, b in zip(bounds, bounds[1:])]

    assert routed_rows(calls(5), c, u) == ([(3, 4)], True)  # batch_cond_uncond: one call
    assert routed_rows(calls(2, 2, 1), c, u) == ([None, (1,), (0,)], True)  # chunks of the batch size: one call is mixed
    assert routed_rows(calls(3, 2), c, u) == ([None, (0, 1)], True)  # different token lengths: a separate unconditional call
    assert routed_rows(calls(3), c, u) == ([None], False)  # NGMS / skip early CFG: x_in lost its unconditional rows
    assert routed_rows([rows, c], c, u) == ([(3, 4), None], True)  # an extra all-conditional call (PAG): live weights


def test_router_finds_weak_rows_by_their_conditioning():
    g = torch.Generator().manual_seed(2)
    c, u = torch.randn(1, 77, 8, generator=g), torch.randn(1, 77, 8, generator=g)
    tile = torch.cat([c, u])
    # Tiled Diffusion: [cond, uncond] once per tile, in one call or one call per tile
    assert routed_rows([torch.cat([tile] * 3)], c, u) == ([(1, 3, 5)], True)
    assert routed_rows([tile, tile, tile], c, u) == ([(1,), (1,), (1,)], True)
    # webui pads the shorter conditioning (pad_cond_uncond) or truncates it (v0) after the callback
    padded_u = torch.cat([u, torch.randn(1, 77, 8, generator=g)], dim=1)
    assert routed_rows([torch.cat([torch.cat([c, c], 1), padded_u])], torch.cat([c, c], 1), u) == ([(1,)], True)
    assert routed_rows([torch.cat([c[:, :40], u[:, :40]])], c[:, :40], u) == ([(1,)], True)
    # a row of another extension's conditioning is left on the live weights, and counted
    router = StepRouter()
    router.begin_step(lambda: (c, u), 0.5)
    router.enter_unet(3, torch.cat([c, torch.randn(1, 77, 8, generator=g), u]))
    assert router.current.weak == (2,) and router.unrecognised_calls == 1
    # the UNet's dtype: webui casts the conditioning before the call
    assert routed_rows([tile.half()], c, u) == ([(1,)], True)


def test_identical_prompt_and_negative_prompt_are_told_apart_by_position():
    c = torch.randn(1, 77, 8)
    same = c.clone()
    assert routed_rows([torch.cat([c, same])], c, same) == ([(1,)], True)  # one call
    assert routed_rows([c, same], c, same) == ([None, (0,)], True)  # chunks: the second call continues the step
    assert routed_rows([torch.cat([c, same] * 2)], c, same) == ([(1, 3)], True)  # tiles start again
    assert routed_rows([torch.cat([c, same]), c], c, same) == ([(1,), None], True)  # then an extra conditional call


def test_every_trace_is_removed_on_success_and_on_exception(pair):
    base, tuned = pair
    weak = build_weak_model(tuned, base_state(base), ("constant", 0.5))
    before = module_state_fingerprint(tuned)
    x, t, ctx = step_inputs(2)
    with torch.no_grad(), GuidanceRun(unet_of(tuned), weak, PGSettings(True, 0.5)) as run:
        run.begin_step(0, 4, lambda: (ctx[:1], ctx[1:]))
        unet_of(tuned)(x, t, context=ctx)
        assert module_state_fingerprint(tuned) != before  # installed
    assert module_state_fingerprint(tuned) == before

    with pytest.raises(KeyboardInterrupt), torch.no_grad(), GuidanceRun(unet_of(tuned), weak, PGSettings(True, 0.5)) as run:
        run.begin_step(0, 4, lambda: (ctx[:1], ctx[1:]))
        run.router.fail(KeyboardInterrupt())  # e.g. an error in the step callback
        unet_of(tuned)(x, t, context=ctx)
    assert module_state_fingerprint(tuned) == before


def test_live_patch_restores_instance_attributes_in_reverse_order():
    class Thing:
        pass

    thing = Thing()
    thing.kept = "own"
    with LivePatch() as patch:
        patch.set_attribute(thing, "kept", "patched")
        patch.set_attribute(thing, "added", 1)
        patch.set_attribute(thing, "kept", "patched twice")
        assert thing.kept == "patched twice"
    assert thing.kept == "own" and not hasattr(thing, "added")


def test_swapped_parameters_put_the_same_objects_back():
    layer = torch.nn.Linear(2, 2)
    weight = layer.weight
    with swapped_parameters([(layer, "weight", torch.zeros(2, 2))]):
        assert torch.count_nonzero(layer.weight) == 0
    assert layer.weight is weight


@pytest.mark.parametrize("rank, copied", [(1, False), (16, True)])
def test_low_rank_strip_uses_corrections_or_a_copy_within_twice_the_lora_size(rank, copied):
    from lib_pg.weights import LowRankDelta

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    unet = holder.model.diffusion_model = LinearUNet(16)
    layer = unet.layer
    down, up = torch.randn(rank, 16) * 0.1, torch.randn(16, rank) * 0.1
    delta = LowRankDelta(output=lambda x: x @ down.T @ up.T, weight=lambda: up @ down, nbytes=(down.numel() + up.numel()) * 4)
    with torch.no_grad():
        layer.weight.add_(up @ down)  # the LoRA merged into the live weights, as webui does
    weak = build_weak_model(holder, None, ("constant", 0.25), corrections={layer: [delta]})
    assert (weak.extra_bytes > 0) == copied and weak.extra_bytes <= 2 * delta.nbytes
    x = torch.randn(4, 16)
    ctx = torch.randn(4, 1, 1)
    with torch.no_grad():
        plain = unet(x, context=ctx)  # CFG: every row through the live (LoRA-merged) layer in one call
    with torch.no_grad(), GuidanceRun(unet, weak, PGSettings(True, 0.25)) as run:
        run.begin_step(0, 1, lambda: (ctx[:2], ctx[2:]))
        out = unet(x, context=ctx)
        expected = torch.nn.functional.linear(x[2:], layer.weight - 0.75 * (up @ down), layer.bias)
    torch.testing.assert_close(out[2:], expected, rtol=1e-5, atol=1e-6)
    if not copied:
        # A corrected layer is not split: it runs once over all rows, so the
        # conditional rows are CFG's own, bit for bit, and the weak rows differ
        # from them by exactly the added correction.
        assert torch.equal(out[:2], plain[:2])
        assert torch.equal(out[2:], plain[2:] + delta.output(x[2:]) * (0.25 - 1.0))


def test_layers_to_copy_spends_twice_the_lora_weights_on_the_layers_where_corrections_cost_most():
    from lib_pg.weights import LowRankDelta, layers_to_copy

    def lora(module, rank):
        nbytes = rank * (module.in_features + module.out_features) * 4
        return [LowRankDelta(output=None, weight=None, nbytes=nbytes)]

    narrow, middle, wide = torch.nn.Linear(8, 8), torch.nn.Linear(16, 16), torch.nn.Linear(64, 64)
    # LoRA bytes per layer byte: narrow 4·16/64 = 1, middle 4·32/256 = 0.5, wide 4·128/4096 = 0.125
    corrections = {wide: lora(wide, 4), narrow: lora(narrow, 4), middle: lora(middle, 4)}
    budget = 2 * sum(d.nbytes for deltas in corrections.values() for d in deltas)  # 2·(256+512+2048) bytes
    chosen = layers_to_copy(corrections)
    assert chosen == {narrow, middle}  # 256 + 1024 bytes fit; the wide layer's 16384 would not
    assert sum(m.weight.numel() * 4 for m in chosen) <= budget


def test_swapped_parameters_puts_back_what_it_swapped_when_a_swap_fails():
    layer = torch.nn.Linear(2, 2)
    weight, bias = layer.weight, layer.bias
    with pytest.raises(KeyError):
        with swapped_parameters([(layer, "weight", torch.zeros(2, 2)), (layer, "missing", torch.zeros(1))]):
            pass
    assert layer.weight is weight and layer.bias is bias and "missing" not in layer._parameters


def test_corrected_text_layers_add_the_scaled_correction_and_leave_no_trace():
    from lib_pg.routing import corrected_text_layers
    from lib_pg.weights import WeakLayer

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    weak = WeakLayer(layer, (), ref=(), fixed=(), fixed_omega=0.25, corrections=(lambda x: x @ down.T @ up.T,))
    x = torch.randn(3, 8)
    before = module_state_fingerprint(layer)
    with torch.no_grad():
        plain = layer(x)
        with corrected_text_layers([weak], 0.25):
            corrected = layer(x)
        assert torch.equal(corrected, plain + (x @ down.T @ up.T) * (0.25 - 1.0))
        with pytest.raises(RuntimeError):
            with corrected_text_layers([weak], 0.25):
                raise RuntimeError("interrupted")
        assert torch.equal(layer(x), plain)
    assert module_state_fingerprint(layer) == before
