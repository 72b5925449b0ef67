"""SDXL through the fake webui: dict conditioning (crossattn + vector), two text
encoders under conditioner.embedders, and webui's zeroed empty negative prompt."""

import copy

import pytest
import torch

import gradio as gr
from modules import errors, processing, prompt_parser, script_callbacks, scripts, sd_models, shared

from lib_pg import webui_adapter
from lib_pg.patching import module_state_fingerprint
from tests.ldm_models import make_sdxl, save_checkpoint
from tests.test_script import UNetRecorder, load_script_module, pg_args, same_images


@pytest.fixture
def xl(tmp_path):
    shared.reset()
    script_callbacks.clear_callbacks()
    processing.clear_cond_cache()
    gr.reset()
    errors.reported.clear()
    webui_adapter.CONTROLLER.shutdown()
    base = make_sdxl("tiny", seed=0)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.startswith(("model.diffusion_model.", "conditioner.embedders.0.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
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
    runner = scripts.ScriptRunner()
    script = runner.add_script(module.PersonalizationGuidanceScript)
    args = runner.make_script_args({script: pg} if pg is not None else None)
    params = dict(prompt="a photo of sks dog", negative_prompt="", steps=2, cfg_scale=5.0, width=32, height=32, seed=3,
                  sampler_name="Euler")
    params.update(kwargs)
    return processing.process_images(processing.StableDiffusionProcessingTxt2Img(scripts=runner, script_args=args, **params))


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
    weak = webui_adapter.CONTROLLER.cache.weak
    assert weak.text and weak.live_family == "SDXL" and weak.base_family == "SDXL"
    x, t, context, output, split = recorder.calls[0]
    assert split is not None and split.split == 1
    # webui's convention: an empty negative prompt gives zeroed text embeddings on SDXL
    assert torch.count_nonzero(context[1:]) == 0
    y = vectors[0]
    with torch.no_grad():
        expected = base.model.diffusion_model(x[1:], t[1:], context=context[1:], y=y[1:])
    torch.testing.assert_close(output[1:], expected, rtol=1e-5, atol=1e-5)  # ω = 0: the base UNet
