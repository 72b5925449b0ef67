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


def unet_of(model):
    return model.model.diffusion_model


@pytest.mark.parametrize("omega", [0.0, 0.35])
def test_one_call_splits_cond_and_weak_rows(pair, omega):
    base, tuned = pair
    weak = build_weak_model(tuned, base_state(base), ("constant", omega))
    reference = interpolated_copy(base, tuned, omega) if omega else base
    x, t, ctx = step_inputs(4)
    with torch.no_grad(), GuidanceRun(unet_of(tuned), weak, PGSettings(True, omega)) as run:
        run.begin_step(0, 10, total_rows=4, weak_rows=2)
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
            assert run.begin_step(0, 10, 4, 2) == 1.0
            routed = unet_of(tuned)(x, t, context=ctx)
    assert torch.equal(plain, routed)
    assert run.report.unguided_steps == 1


def test_scheduled_omega_matches_the_interpolated_model(pair):
    base, tuned = pair
    weak = build_weak_model(tuned, base_state(base), ("scheduled",))
    settings = PGSettings(True, 0.2, schedule="linear", omega_end=0.6)
    x, t, ctx = step_inputs(2)
    with torch.no_grad(), GuidanceRun(unet_of(tuned), weak, settings) as run:
        omega = run.begin_step(5, 10, 2, 1)
        out = unet_of(tuned)(x, t, context=ctx)
    assert omega == pytest.approx(0.4)
    with torch.no_grad():
        expected = unet_of(interpolated_copy(base, tuned, omega))(x[1:], t[1:], context=ctx[1:])
    assert torch.allclose(out[1:], expected, atol=1e-6)


def test_router_follows_every_batching_path():
    # rows: 3 conditional (an AND prompt with batch 2), 2 unconditional
    def splits(call_sizes, total=5, weak=2):
        router = StepRouter()
        router.begin_step(total, weak, 0.5)
        result = []
        for rows in call_sizes:
            router.enter_unet(rows)
            result.append(None if router.current is None else router.current.split)
            router.exit_unet()
        return result, router.weak_rows_seen

    assert splits([5]) == ([3], True)  # batch_cond_uncond: one call
    assert splits([2, 2, 1]) == ([None, 1, 0], True)  # chunks of the batch size: one call is mixed
    assert splits([3, 2]) == ([None, 0], True)  # different token lengths: a separate unconditional call
    assert splits([3]) == ([None], False)  # NGMS / skip early CFG: x_in lost its unconditional rows
    assert splits([5, 5]) == ([3, None], True)  # a second, unplanned call is left alone


def test_every_trace_is_removed_on_success_and_on_exception(pair):
    base, tuned = pair
    weak = build_weak_model(tuned, base_state(base), ("constant", 0.5))
    before = module_state_fingerprint(tuned)
    x, t, ctx = step_inputs(2)
    with torch.no_grad(), GuidanceRun(unet_of(tuned), weak, PGSettings(True, 0.5)) as run:
        run.begin_step(0, 4, 2, 1)
        unet_of(tuned)(x, t, context=ctx)
        assert module_state_fingerprint(tuned) != before  # installed
    assert module_state_fingerprint(tuned) == before

    with pytest.raises(KeyboardInterrupt), torch.no_grad(), GuidanceRun(unet_of(tuned), weak, PGSettings(True, 0.5)) as run:
        run.begin_step(0, 4, 2, 1)
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
    unet = holder.model.diffusion_model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    layer = unet[0]
    down, up = torch.randn(rank, 16) * 0.1, torch.randn(16, rank) * 0.1
    delta = LowRankDelta(output=lambda x: x @ down.T @ up.T, weight=lambda: up @ down, nbytes=(down.numel() + up.numel()) * 4)
    with torch.no_grad():
        layer.weight.add_(up @ down)  # the LoRA merged into the live weights, as webui does
    weak = build_weak_model(holder, None, ("constant", 0.25), corrections={layer: [delta]})
    assert (weak.extra_bytes > 0) == copied and weak.extra_bytes <= 2 * delta.nbytes
    x = torch.randn(4, 16)
    with torch.no_grad():
        plain = unet(x)  # CFG: every row through the live (LoRA-merged) layer in one call
    with torch.no_grad(), GuidanceRun(unet, weak, PGSettings(True, 0.25)) as run:
        run.begin_step(0, 1, total_rows=4, weak_rows=2)
        out = unet(x)
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
