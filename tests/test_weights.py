import pytest
import torch

from lib_pg.errors import PGError
from lib_pg.weights import build_weak_model, detect_family, read_checkpoint, same_bits
from tests.helpers import base_state, make_pair
from tests.ldm_models import make_sd1, make_sdxl_like_state_dict, save_checkpoint


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_families_from_real_key_layouts():
    assert detect_family(shapes(make_sd1("tiny").state_dict())) == "SD 1.x"
    assert detect_family(shapes(make_sd1("tiny", inpainting=True).state_dict())) == "SD 1.x inpainting"
    assert detect_family(shapes(make_sdxl_like_state_dict("tiny"))) == "SDXL"


def test_omega_zero_keeps_the_base_weights_unchanged():
    base, tuned = make_pair()
    weak = build_weak_model(tuned, base_state(base), ("constant", 0.0))
    base_params = dict(base.named_parameters())
    names = {id(m): n for n, m in tuned.named_modules()}
    assert weak.unet and not weak.text  # the text encoder was not tuned: no work for it
    for layer in weak.unet:
        for param_name, tensor in zip(layer.names, layer.tensors_at(0.0)):
            assert same_bits(tensor, base_params[f"{names[id(layer.module)]}.{param_name}"])


def test_constant_omega_holds_one_copy_of_the_differing_weights():
    base, tuned = make_pair(text_encoder=True)
    weak = build_weak_model(tuned, base_state(base), ("constant", 0.4))
    unet_bytes = sum(p.numel() * 4 for p in tuned.model.diffusion_model.parameters())
    text_bytes = sum(p.numel() * 4 for p in tuned.cond_stage_model.parameters())
    assert weak.differing_bytes == unet_bytes + text_bytes  # the VAE is not part of the weak model
    assert weak.extra_bytes == weak.differing_bytes
    assert weak.text_differs
    layer = weak.unet[0]
    expected = torch.lerp(
        dict(base.named_parameters())["model.diffusion_model.time_embed.0.weight"],
        tuned.model.diffusion_model.time_embed[0].weight, 0.4)
    assert layer.module is tuned.model.diffusion_model.time_embed[0]
    assert torch.equal(layer.tensors_at(0.4)[0], expected)


def test_scheduled_omega_keeps_the_reference_and_interpolates_on_demand():
    base, tuned = make_pair()
    weak = build_weak_model(tuned, base_state(base), ("scheduled",))
    layer = weak.unet[0]
    assert same_bits(layer.tensors_at(0.0)[0], layer.ref[0])
    assert same_bits(layer.tensors_at(1.0)[0], layer.module.weight)  # lerp is exact at its ends
    assert weak.extra_bytes == weak.differing_bytes


def test_omega_one_keeps_nothing_but_still_checks_the_architecture():
    base, tuned = make_pair()
    weak = build_weak_model(tuned, base_state(base), ("constant", 1.0))
    assert weak.extra_bytes == 0 and not weak.unet
    with pytest.raises(PGError):
        build_weak_model(tuned, make_sdxl_like_state_dict("tiny"), ("constant", 1.0))


def test_other_architecture_is_refused_naming_both_families_and_the_key():
    _, tuned = make_pair()
    with pytest.raises(PGError) as info:
        build_weak_model(tuned, make_sdxl_like_state_dict("tiny"), ("constant", 0.5), base_name="sdxl_base.safetensors")
    message = str(info.value)
    assert "'sdxl_base.safetensors' (SDXL)" in message and "active model (SD 1.x)" in message
    assert "first mismatching key model.diffusion_model." in message


def test_inpainting_model_needs_an_inpainting_base():
    inpaint = make_sd1("tiny", inpainting=True)
    with pytest.raises(PGError) as info:
        build_weak_model(inpaint, make_sd1("tiny").state_dict(), ("constant", 0.5))
    assert "(SD 1.x) does not match the active model (SD 1.x inpainting)" in str(info.value)
    assert "model.diffusion_model.input_blocks.0.0.weight (active shape [32, 9, 3, 3], base shape [32, 4, 3, 3])" in str(info.value)


def test_fp16_live_model_gets_fp16_weak_weights():
    base, tuned = make_pair(dtype=torch.float16)
    weak = build_weak_model(tuned, {k: v.float() for k, v in base.state_dict().items()}, ("constant", 0.5))
    assert all(t.dtype == torch.float16 for layer in weak.unet for t in layer.tensors_at(0.5))


def test_safetensors_round_trip_and_missing_file(tmp_path):
    base, _ = make_pair()
    path = tmp_path / "base.safetensors"
    save_checkpoint(base.state_dict(), path)
    loaded = read_checkpoint(str(path))
    assert all(same_bits(loaded[k], v) for k, v in base.state_dict().items())
    with pytest.raises(PGError, match="not found"):
        read_checkpoint(str(tmp_path / "nope.safetensors"))


def test_weak_weights_read_from_a_file_compute_exactly_what_the_base_model_does(tmp_path):
    """safetensors hands out tensors at the file's (unaligned) offsets; CPU kernels
    round differently on those. The weak branch at ω = 0 must be the base model, bit for bit."""
    from lib_pg.guidance import GuidanceRun
    from lib_pg.settings import PGSettings
    from lib_pg.weights import build_weak_model, read_checkpoint
    from tests.helpers import make_pair
    from tests.ldm_models import save_checkpoint

    base, tuned = make_pair()
    save_checkpoint(base.state_dict(), tmp_path / "base.safetensors")
    weak = build_weak_model(tuned, read_checkpoint(str(tmp_path / "base.safetensors")), ("constant", 0.0))
    assert all(t.data_ptr() % 64 == 0 for layer in weak.unet for t in layer.fixed)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.full((1,), 500.0)
    c, u = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        expected = base.model.diffusion_model(x, t, context=u)
        with GuidanceRun(tuned.model.diffusion_model, weak, PGSettings(True, 0.0)) as run:
            run.begin_step(0, 10, lambda: (c, u))
            out = tuned.model.diffusion_model(x, t, context=u)
    assert torch.equal(out, expected)
