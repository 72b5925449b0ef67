"""SDXL through the fake webui: dict conditioning (crossattn + vector), two text
encoders under conditioner.embedders, and webui's zeroed empty negative prompt."""

import pytest
import torch

from modules import sd_models, shared

from lib_pg.hosts.webui import controller as webui_controller
from lib_pg.patching import module_state_fingerprint
from tests.ldm_models import make_sdxl, save_checkpoint
from tests.helpers import fine_tune
from tests.test_script import UNetRecorder, generate_with, load_script_module, pg_args, reset_fake_webui, same_images


@pytest.fixture
def xl(tmp_path):
    reset_fake_webui()
    base = make_sdxl("tiny", seed=0)
    tuned = fine_tune(base, text_encoder=True)
    sd_models.model_path = str(tmp_path)
    save_checkpoint(base.state_dict(), tmp_path / "xlbase.safetensors")
    save_checkpoint(tuned.state_dict(), tmp_path / "xltuned.safetensors")
    sd_models.list_models()
    model = sd_models.FakeSdModel(tuned)
    module = load_script_module()
    sd_models.set_model(model, sd_models.get_closet_checkpoint_match("xltuned"))
    yield base, tuned, model, module
    shared.reset()


def generate(module, pg=None, **kwargs):
    return generate_with(module, pg, **{"negative_prompt": "", "steps": 2, "seed": 3, **kwargs})[0]


def test_sdxl_routes_and_restores(xl):
    base, tuned, model, module = xl
    before = module_state_fingerprint(tuned)
    plain = generate(module)
    assert same_images(plain, generate(module, pg_args(1.0, base="xlbase")))
    recorder = UNetRecorder(tuned.model.diffusion_model)
    vectors = []
    handle = tuned.model.diffusion_model.register_forward_pre_hook(lambda m, a, k: vectors.append(k["y"].clone()), with_kwargs=True)
    guided = generate(module, pg_args(0.0, base="xlbase", weak_prompt="empty"))
    handle.remove()
    recorder.remove()
    assert not same_images(plain, guided)
    assert module_state_fingerprint(tuned) == before
    weak = webui_controller.CONTROLLER.cache.weak
    assert weak.text and weak.live_family == "SDXL" and weak.base_family == "SDXL"
    x, t, context, output, split = recorder.calls[0]
    assert split is not None and split.split == 1
    # webui's convention: an empty negative prompt gives zeroed text embeddings on SDXL
    assert torch.count_nonzero(context[1:]) == 0
    y = vectors[0]
    with torch.no_grad():
        expected = base.model.diffusion_model(x[1:], t[1:], context=context[1:], y=y[1:])
    torch.testing.assert_close(output[1:], expected, rtol=1e-5, atol=1e-5)  # ω = 0: the base UNet
