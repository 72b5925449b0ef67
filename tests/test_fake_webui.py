"""Tests of the fake webui 1.10.1 in tests/fake_webui (the test double the extension's tests run on).

They prove that the fake CFGDenoiser takes each of webui's batching paths (counted at the
UNet: number of calls, rows per call, context tokens), that prompt scheduling / AND /
long prompts produce webui's shapes, that callbacks and scripts behave like webui's
(exceptions only logged), and that a whole process_images run (hires fix, checkpoint
switch, infotext) works on the tiny ldm model.
"""

import ast
import inspect
import os
import sys
import warnings
import zlib

import pytest
import torch

FAKE_WEBUI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_webui")
if FAKE_WEBUI not in sys.path:
    sys.path.insert(0, FAKE_WEBUI)

import gradio as gr  # noqa: E402  (the fake one)
from modules import (devices, errors, processing, prompt_parser, script_callbacks, scripts, sd_models,  # noqa: E402
                     sd_samplers, sd_samplers_cfg_denoiser, sd_samplers_common, shared, ui_common, ui_components)

REAL_WEBUI = "/tmp/webui"


# ---------------------------------------------------------------------------
# a toy model: fast, records every UNet call
# ---------------------------------------------------------------------------

CTX = 8


def word_vector(word):
    g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
    return torch.randn(CTX, generator=g)


class ToyUNet(torch.nn.Module):
    def __init__(self, in_channels=4):
        super().__init__()
        self.in_channels = in_channels
        self.conv = torch.nn.Conv2d(in_channels, 4, 1)
        self.proj = torch.nn.Linear(CTX, 4)
        self.calls = []

    def forward(self, x, timesteps=None, context=None, y=None):
        self.calls.append({"rows": x.shape[0], "tokens": context.shape[1], "context": context.detach().clone(),
                           "x": x.detach().clone(), "t": timesteps.detach().clone(), "y": y})
        return 0.1 * self.conv(x) + 0.1 * self.proj(context.mean(1))[:, :, None, None]


class _Wrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class ToyInner(torch.nn.Module):
    """(B, 77, CTX) conditioning: BOS, one vector per word (at most 75), EOS repeated."""

    def __init__(self):
        super().__init__()
        self.model = _Wrapper(ToyUNet())

    def encode(self, text):
        words = text.split()[:75]
        rows = [torch.ones(CTX)] + [word_vector(w) for w in words]
        rows += [-torch.ones(CTX)] * (77 - len(rows))
        return torch.stack(rows)

    def get_learned_conditioning(self, texts):
        return torch.stack([self.encode(t) for t in texts])


class ToyInnerXL(ToyInner):
    """SDXL-style dict conditioning {"crossattn", "vector"}."""

    def __init__(self):
        super().__init__()
        self.conditioner = torch.nn.Module()
        self.conditioner.embedders = torch.nn.ModuleList()

    def get_learned_conditioning(self, texts, width=1024, height=1024):
        crossattn = super().get_learned_conditioning(texts)
        return {"crossattn": crossattn, "vector": crossattn.mean(1)[:, :6] + 1.0}


@pytest.fixture(autouse=True)
def clean_webui(monkeypatch):
    shared.reset()
    script_callbacks.clear_callbacks()
    processing.clear_cond_cache()
    errors.reported.clear()
    gr.reset()
    sd_models.checkpoints_list.clear()
    sd_models.checkpoint_aliases.clear()
    monkeypatch.setattr(processing, "switch_checkpoint_hook", None)
    yield
    shared.reset()
    script_callbacks.clear_callbacks()
    processing.clear_cond_cache()


def toy_model(inner=None):
    model = sd_models.FakeSdModel(inner or ToyInner())
    sd_models.set_model(model)
    model.model.diffusion_model.calls.clear()
    return model


def run_txt2img(model, **kw):
    args = dict(prompt="a cat", negative_prompt="ugly", steps=4, cfg_scale=5.0, width=16, height=16, seed=1,
                sampler_name="Euler")
    args.update(kw)
    p = processing.StableDiffusionProcessingTxt2Img(**args)
    model.model.diffusion_model.calls.clear()
    return p, processing.process_images(p)


def rows_tokens(model):
    return [(c["rows"], c["tokens"]) for c in model.model.diffusion_model.calls]


LONG_PROMPT = " ".join(f"w{i}" for i in range(80))  # > 75 words: two 77-token chunks


# ---------------------------------------------------------------------------
# CFGDenoiser batching paths
# ---------------------------------------------------------------------------

def test_batch_cond_uncond_on_one_call_per_step():
    model = toy_model()
    p, res = run_txt2img(model)
    assert rows_tokens(model) == [(2, 77)] * 4
    assert len(res.images) == 1 and res.images[0].shape == (4, 2, 2)


def test_batch_cond_uncond_off_chunks_of_batch_size():
    model = toy_model()
    shared.opts.batch_cond_uncond = False
    run_txt2img(model, batch_size=2)
    assert rows_tokens(model) == [(2, 77), (2, 77)] * 4


def test_batch_cond_uncond_on_and_off_give_the_same_result():
    model = toy_model()
    _, on = run_txt2img(model, batch_size=2)
    shared.opts.batch_cond_uncond = False
    _, off = run_txt2img(model, batch_size=2)
    for a, b in zip(on.images, off.images):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("batch_cond_uncond, expected", [
    (True, [(1, 154), (1, 77)]),
    (False, [(1, 154), (1, 77)]),
])
def test_long_prompt_short_negative_separate_uncond_call(batch_cond_uncond, expected):
    model = toy_model()
    shared.opts.batch_cond_uncond = batch_cond_uncond
    run_txt2img(model, prompt=LONG_PROMPT)
    assert rows_tokens(model) == expected * 4


def test_long_prompt_batch_2_cond_chunk_is_two_batches_wide():
    model = toy_model()
    run_txt2img(model, prompt=LONG_PROMPT, batch_size=2, steps=2)
    # cond rows 0:2 in one call (chunk = 2*batch_size), then the two uncond rows
    assert rows_tokens(model) == [(2, 154), (2, 77)] * 2
    shared.opts.batch_cond_uncond = False
    run_txt2img(model, prompt=LONG_PROMPT, batch_size=2, steps=2)
    assert rows_tokens(model) == [(2, 154), (2, 77)] * 2


def test_pad_cond_uncond_pads_with_the_empty_prompt():
    model = toy_model()
    shared.opts.pad_cond_uncond = True
    run_txt2img(model, prompt=LONG_PROMPT, steps=2)
    assert rows_tokens(model) == [(2, 154)] * 2
    uncond_ctx = model.model.diffusion_model.calls[0]["context"][1]
    torch.testing.assert_close(uncond_ctx[:77], model.get_learned_conditioning(["ugly"])[0])
    torch.testing.assert_close(uncond_ctx[77:], model.cond_stage_model_empty_prompt[0])


def test_pad_cond_uncond_v0_repeats_the_last_vector():
    model = toy_model()
    shared.opts.pad_cond_uncond_v0 = True
    shared.opts.pad_cond_uncond = True  # v0 wins
    run_txt2img(model, prompt=LONG_PROMPT, steps=2)
    assert rows_tokens(model) == [(2, 154)] * 2
    uncond_ctx = model.model.diffusion_model.calls[0]["context"][1]
    torch.testing.assert_close(uncond_ctx[77:], uncond_ctx[76:77].expand(77, CTX))


def test_and_prompts_batch_2_repeat_rows():
    model = toy_model()
    seen = []
    script_callbacks.on_cfg_denoiser(lambda params: seen.append(params))
    p, _ = run_txt2img(model, prompt="a cat AND a dog:0.5", batch_size=2, steps=2)
    # 2 images x 2 sub-prompts + 2 uncond rows, one call
    assert rows_tokens(model) == [(6, 77)] * 2
    params = seen[0]
    assert params.x.shape[0] == 6 and params.sigma.shape == (6,) and params.image_cond.shape[0] == 6
    x = params.x
    torch.testing.assert_close(x[0], x[1])
    torch.testing.assert_close(x[2], x[3])
    torch.testing.assert_close(x[4], x[0])
    torch.testing.assert_close(x[5], x[2])
    assert params.text_cond.shape == (4, 77, CTX) and params.text_uncond.shape == (2, 77, CTX)
    assert params.denoiser.p is p and params.denoiser.total_steps == 2

    shared.opts.batch_cond_uncond = False
    run_txt2img(model, prompt="a cat AND a dog:0.5", batch_size=2, steps=2)
    assert rows_tokens(model) == [(2, 77)] * 3 * 2


def test_and_weights_combine_like_webui():
    den = sd_samplers_cfg_denoiser.CFGDenoiser(sampler=None)
    x_out = torch.arange(5.0).view(5, 1)
    conds_list = [[(0, 1.0), (1, 0.5)], [(2, 1.0)]]
    out = den.combine_denoised(x_out, conds_list, torch.zeros(2, 77, 1), 2.0)
    # uncond rows are 3 and 4
    assert out[0].item() == 3 + (0 - 3) * 2 + (1 - 3) * 1.0
    assert out[1].item() == 4 + (2 - 4) * 2


@pytest.mark.parametrize("skip, skipped_steps", [(0.5, 3), (0.25, 2), (1.0, 4)])
def test_skip_early_cfg(skip, skipped_steps):
    model = toy_model()
    shared.opts.skip_early_cond = skip
    p, res = run_txt2img(model)
    assert rows_tokens(model) == [(1, 77)] * skipped_steps + [(2, 77)] * (4 - skipped_steps)
    assert p.extra_generation_params["Skip Early CFG"] == skip
    assert f"Skip Early CFG: {skip}" in res.infotexts[0]


def test_ngms_skips_odd_steps_and_all_steps():
    model = toy_model()
    p, res = run_txt2img(model, s_min_uncond=100.0)
    assert rows_tokens(model) == [(2, 77), (1, 77), (2, 77), (1, 77)]
    assert p.extra_generation_params["NGMS"] == 100.0 and "NGMS all steps" not in p.extra_generation_params

    shared.opts.s_min_uncond_all = True
    p, res = run_txt2img(model, s_min_uncond=100.0)
    assert rows_tokens(model) == [(1, 77)] * 4
    assert p.extra_generation_params["NGMS all steps"] is True
    assert "NGMS: 100.0, NGMS all steps: True" in res.infotexts[0]


def test_ngms_threshold_and_opts_default():
    model = toy_model()
    shared.opts.s_min_uncond = 100.0  # p.s_min_uncond None -> filled from opts
    p, _ = run_txt2img(model)
    assert p.s_min_uncond == 100.0
    assert rows_tokens(model)[1] == (1, 77)
    p, _ = run_txt2img(model, s_min_uncond=1e-6)  # sigma never below it
    assert rows_tokens(model) == [(2, 77)] * 4 and "NGMS" not in p.extra_generation_params


def test_skipped_uncond_with_long_prompt_takes_the_equal_length_path():
    model = toy_model()
    shared.opts.skip_early_cond = 1.0
    run_txt2img(model, prompt=LONG_PROMPT, steps=2)
    assert rows_tokens(model) == [(1, 154)] * 2


def test_callback_can_replace_text_uncond_and_sees_steps():
    model = toy_model()
    steps = []

    def cb(params):
        steps.append((params.denoiser.step, params.sampling_step, params.total_sampling_steps))
        params.text_uncond = torch.zeros_like(params.text_uncond)

    script_callbacks.on_cfg_denoiser(cb, name="test")
    run_txt2img(model)
    assert steps == [(0, 0, 4), (1, 0, 4), (2, 1, 4), (3, 2, 4)]  # webui's sampling_step lags one step
    for call in model.model.diffusion_model.calls:
        assert torch.count_nonzero(call["context"][1]) == 0 and torch.count_nonzero(call["context"][0]) > 0


def test_callback_exception_is_only_logged():
    model = toy_model()

    def bad(params):
        raise ValueError("boom")

    script_callbacks.on_cfg_denoiser(bad)
    _, res = run_txt2img(model)
    assert len(res.images) == 1 and len(rows_tokens(model)) == 4
    assert len(errors.reported) == 4
    assert "cfg_denoiser_callback" in errors.reported[0][0] and isinstance(errors.reported[0][1], ValueError)


def test_remove_callbacks_for_function_and_names():
    calls = []

    def on_loaded(m):
        calls.append(m)

    script_callbacks.on_model_loaded(on_loaded, name="x")
    script_callbacks.on_model_loaded(on_loaded, name="x")
    names = [c.name for c in script_callbacks.callback_map["callbacks_model_loaded"]]
    assert names == ["base/test_fake_webui.py/model_loaded/x", "base/test_fake_webui.py/model_loaded/x-1"]
    script_callbacks.model_loaded_callback("m")
    assert calls == ["m", "m"]
    script_callbacks.remove_callbacks_for_function(on_loaded)
    script_callbacks.model_loaded_callback("m")
    assert calls == ["m", "m"]
    assert script_callbacks.ordered_callbacks("model_loaded") == []


def test_script_unloaded_runs_in_reverse_and_can_unregister_itself():
    order = []

    def first():
        order.append(1)

    def second():
        order.append(2)
        script_callbacks.remove_callbacks_for_function(second)

    script_callbacks.on_script_unloaded(first)
    script_callbacks.on_script_unloaded(second)
    script_callbacks.script_unloaded_callback()
    assert order[0] == 2
    assert [c.callback for c in script_callbacks.callback_map["callbacks_script_unloaded"]] == [first]


def test_interrupt_returns_last_latent():
    model = toy_model()

    def cb(params):
        if params.denoiser.step == 1:  # the UNet still runs for step 1; step 2 raises at its start
            shared.state.interrupted = True

    script_callbacks.on_cfg_denoiser(cb)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a", steps=4, width=16, height=16, seed=3, sampler_name="Euler")
    p.setup_prompts()
    p.prompts, p.negative_prompts, p.seeds, p.subseeds = p.all_prompts, p.all_negative_prompts, [3], [3]
    p.rng = processing.rng.ImageRNG((4, 2, 2), [3])
    p.fill_fields_from_opts()
    p.setup_conds()
    out = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=[3], subseeds=[3], subseed_strength=0, prompts=p.prompts)
    assert len(rows_tokens(model)) == 2 and out is p.sampler.last_latent
    assert out.shape == (1, 4, 2, 2)
    with pytest.raises(sd_samplers_common.InterruptedException):
        p.sampler.model_wrap_cfg(out, torch.ones(1), p.uc, p.c, 5.0, 0.0, torch.zeros(1, 5, 1, 1))
    # like webui, an interruption stops the remaining batches of the job (webui resets the flag when a job begins)
    shared.state.interrupted = False
    _, res = run_txt2img(model, n_iter=2)
    assert len(res.images) == 1 and len(rows_tokens(model)) == 2
    script_callbacks.remove_callbacks_for_function(cb)
    shared.state.interrupted = False
    _, res = run_txt2img(model, n_iter=2)
    assert len(res.images) == 2


def test_second_order_sampler_total_steps_and_calls():
    assert sd_samplers.find_sampler_config("DPM2").total_steps(5) == 10
    assert sd_samplers.find_sampler_config("Euler").total_steps(5) == 5
    assert sd_samplers.find_sampler_config("Euler a").total_steps(5) == 5
    assert sd_samplers.find_sampler_config("DDIM").total_steps(5) == 5
    assert sd_samplers.find_sampler_config("nope") is None
    assert sd_samplers.find_sampler_config(None).name == "Euler a"
    model = toy_model()
    totals = []
    script_callbacks.on_cfg_denoiser(lambda params: totals.append(params.denoiser.total_steps))
    p, _ = run_txt2img(model, sampler_name="DPM2", steps=3)
    assert p.firstpass_steps == 6 and p.step_multiplier == 2
    assert len(rows_tokens(model)) == 5 and set(totals) == {6}


def test_euler_a_is_seeded_and_batch_independent():
    model = toy_model()
    _, one = run_txt2img(model, sampler_name="Euler a", seed=7)
    _, two = run_txt2img(model, sampler_name="Euler a", seed=7, batch_size=2)
    torch.testing.assert_close(one.images[0], two.images[0])
    assert not torch.allclose(two.images[0], two.images[1])


def test_dict_conds_sdxl_style():
    model = toy_model(ToyInnerXL())
    assert model.is_sdxl and model.cond_stage_model_empty_prompt.shape == (1, 77, CTX)
    seen = []
    script_callbacks.on_cfg_denoiser(lambda params: seen.append(params))
    run_txt2img(model, prompt="a cat AND a dog", negative_prompt="", steps=2)
    assert rows_tokens(model) == [(3, 77)] * 2
    assert isinstance(seen[0].text_uncond, dict) and seen[0].text_uncond.shape == (1, 77, CTX)
    call = model.model.diffusion_model.calls[0]
    assert call["y"].shape == (3, 6)
    # an all-empty negative batch is zeroed (crossattn and pooled part) like webui's SDXL conditioner
    assert torch.count_nonzero(call["context"][2]) == 0 and torch.count_nonzero(call["y"][2]) == 0
    shared.opts.batch_cond_uncond = False
    run_txt2img(model, prompt="a cat AND a dog", negative_prompt="", steps=2)
    assert rows_tokens(model) == [(1, 77)] * 3 * 2


# ---------------------------------------------------------------------------
# prompt parser
# ---------------------------------------------------------------------------

def test_prompt_editing_schedules():
    sched = prompt_parser.get_learned_conditioning_prompt_schedules
    assert sched(["a [b:c:3] d"], 10) == [[[3, "a b d"], [10, "a c d"]]]
    assert sched(["a [b:c:0.25] d"], 10) == [[[2, "a b d"], [10, "a c d"]]]
    assert sched(["a [b:3]"], 10) == [[[3, "a "], [10, "a b"]]]
    assert sched(["a [b:.5] c"], 10, 10) == [[[10, "a b c"]]]
    assert sched(["a [b:1.5] c"], 10, 10) == [[[5, "a  c"], [10, "a b c"]]]
    assert sched(["a [b:c:15] d"], 10, 10) == [[[5, "a b d"], [10, "a c d"]]]
    assert sched(["a [b:c:0.5]"], 10, use_old_scheduling=True) == [[[5, "a b"], [10, "a c"]]]
    assert sched(["[(a:2):3]"], 10) == [[[3, ""], [10, "(a:2)"]]]


def test_learned_conditioning_schedule_and_reconstruct():
    model = sd_models.FakeSdModel(ToyInner())
    conds = prompt_parser.get_learned_conditioning(model, ["red [cat:dog:2]", "plain"], 4)
    assert [e.end_at_step for e in conds[0]] == [2, 4] and [e.end_at_step for e in conds[1]] == [4]
    red_cat = model.get_learned_conditioning(["red cat"])[0]
    red_dog = model.get_learned_conditioning(["red dog"])[0]
    for step, want in [(0, red_cat), (2, red_cat), (3, red_dog), (4, red_dog), (5, red_cat)]:
        got = prompt_parser.reconstruct_cond_batch(conds, step)
        assert got.shape == (2, 77, CTX)
        torch.testing.assert_close(got[0], want)


def test_multicond_and_stack_conds_pad_with_last_vector():
    model = sd_models.FakeSdModel(ToyInner())
    c = prompt_parser.get_multicond_learned_conditioning(model, [LONG_PROMPT + " AND b:0.3", "b"], 10)
    assert c.shape == (2,) and [x.weight for x in c.batch[0]] == [1.0, 0.3]
    conds_list, tensor = prompt_parser.reconstruct_multicond_batch(c, 0)
    assert conds_list == [[(0, 1.0), (1, 0.3)], [(2, 1.0)]]
    assert tensor.shape == (3, 154, CTX)
    b = model.get_learned_conditioning(["b"])[0]
    torch.testing.assert_close(tensor[1, :77], b)
    torch.testing.assert_close(tensor[1, 77:], b[-1:].expand(77, CTX))
    sd = prompt_parser.SdConditioning(["x"], is_negative_prompt=True, width=64)
    copy = prompt_parser.SdConditioning(["y"], copy_from=sd)
    assert copy.is_negative_prompt and copy.width == 64 and copy.height is None


# ---------------------------------------------------------------------------
# scripts, UI stand-ins
# ---------------------------------------------------------------------------

class RecordingScript(scripts.Script):
    def __init__(self):
        self.calls = []

    def title(self):
        return "Recording"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with ui_components.InputAccordion(False, label="Rec", elem_id="rec_enabled") as enabled:
            with gr.Row():
                strength = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Strength", elem_id="rec_strength")
            base = gr.Dropdown(choices=sd_models.checkpoint_tiles(), value="", label="Base", elem_id="rec_base")
            ui_common.create_refresh_button(base, sd_models.list_models, lambda: {"choices": sd_models.checkpoint_tiles()}, "rec_refresh")
            with gr.Accordion("Advanced", open=False):
                mode = gr.Radio(["A", "B"], value="A", label="Mode", elem_id="rec_mode")
        return [enabled, strength, base, mode]

    def process(self, p, *args):
        self.calls.append(("process", args, p.prompts))

    def process_batch(self, p, *args, **kwargs):
        self.calls.append(("process_batch", kwargs["batch_number"], p.prompts))

    def postprocess(self, p, processed, *args):
        self.calls.append(("postprocess", len(processed.images)))


class FailingScript(scripts.Script):
    def title(self):
        return "Failing"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        raise RuntimeError("script failed")


def test_script_runner_and_fake_gradio(tmp_path, monkeypatch):
    toy_model()
    runner = scripts.ScriptRunner()
    rec = runner.add_script(RecordingScript)
    failing = runner.add_script(FailingScript(), args=[])
    assert (rec.args_from, rec.args_to, failing.args_from, failing.args_to) == (1, 5, 5, 5)
    assert runner.default_args == [0, False, 0.5, "", "A"]

    acc = gr.find("rec_enabled-checkbox")
    assert isinstance(acc, ui_components.InputAccordion) and acc.value is False and acc.label == "Rec"
    assert gr.find("rec_enabled").open is False
    slider = gr.find("rec_strength")
    assert slider.parent.parent is acc.accordion and slider.minimum == 0.0 and slider.value == 0.5
    assert gr.find("rec_mode").parent.label == "Advanced"

    (tmp_path / "sub").mkdir()
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "sub" / "one.ckpt")
    monkeypatch.setattr(sd_models, "model_path", str(tmp_path))
    dropdown = gr.find("rec_base")
    update = gr.find("rec_refresh").trigger("click")[0]
    assert update["choices"] == dropdown.choices and dropdown.choices[0].startswith(os.path.join("sub", "one.ckpt") + " [")

    script_args = runner.make_script_args({rec: [True, 0.25]})
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a", steps=2, width=16, height=16, n_iter=2, sampler_name="Euler",
                                                    scripts=runner, script_args=script_args)
    res = processing.process_images(p)
    assert rec.calls[0] == ("process", (True, 0.25, "", "A"), None)
    assert rec.calls[1:] == [("process_batch", 0, ["a"]), ("process_batch", 1, ["a"]), ("postprocess", 2)]
    assert any("Error running process" in msg and isinstance(e, RuntimeError) for msg, e in errors.reported)
    assert len(res.images) == 2


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------

def test_checkpoints_registry_and_read_state_dict(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(sd_models, "model_path", str(tmp_path))
    sd = {"cond_stage_model.transformer.embeddings.token_embedding.weight": torch.ones(2, 2),
          "cond_stage_model.transformer.final_layer_norm.bias": torch.zeros(2),
          "model.diffusion_model.out.2.bias": torch.arange(4.0)}
    safetensors.torch.save_file(sd, str(tmp_path / "base.safetensors"))
    (tmp_path / "sub").mkdir()
    torch.save({"state_dict": dict(sd), "global_step": 5}, tmp_path / "sub" / "tuned.ckpt")
    torch.save({"x": torch.ones(1)}, tmp_path / "thing.vae.ckpt")
    sd_models.list_models()

    titles = sd_models.checkpoint_tiles()
    assert len(titles) == 2
    base = sd_models.get_closet_checkpoint_match("base.safetensors")
    import hashlib
    sha = hashlib.sha256((tmp_path / "base.safetensors").read_bytes()).hexdigest()
    assert base.title == f"base.safetensors [{sha[:10]}]" and base.shorthash == sha[:10] and base.sha256 == sha
    assert base.short_title == f"base [{sha[:10]}]" and base.model_name == "base" and base.name_for_extra == "base"
    tuned = sd_models.get_closet_checkpoint_match("tuned")
    assert tuned.name == os.path.join("sub", "tuned.ckpt") and tuned.model_name == "sub_tuned"
    assert sd_models.get_closet_checkpoint_match(sha[:10]) is base
    assert sd_models.get_closet_checkpoint_match("base.safetensors [0123456789]") is base  # checksum stripped
    assert sd_models.get_closet_checkpoint_match("missing") is None
    assert sd_models.checkpoint_tiles(use_short=True) == [x.short_title for x in sd_models.checkpoints_list.values()]

    for info in (base, tuned):
        got = sd_models.read_state_dict(info.filename, map_location="cpu")
        assert set(got) == {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                            "cond_stage_model.transformer.text_model.final_layer_norm.bias",
                            "model.diffusion_model.out.2.bias"}
        torch.testing.assert_close(got["model.diffusion_model.out.2.bias"], torch.arange(4.0))


# ---------------------------------------------------------------------------
# a whole run on the tiny ldm model
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ldm():
    ldm_models = pytest.importorskip("tests.ldm_models")
    return ldm_models


def test_process_images_with_ldm_model_hires_and_checkpoint_switch(ldm, tmp_path, monkeypatch):
    import safetensors.torch

    main_inner = ldm.make_sd1("tiny", seed=0)
    other_inner = ldm.make_sd1("tiny", seed=1)
    monkeypatch.setattr(sd_models, "model_path", str(tmp_path))
    safetensors.torch.save_file({"a": torch.zeros(1)}, str(tmp_path / "main.safetensors"))
    safetensors.torch.save_file({"a": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    sd_models.list_models()
    main_info = sd_models.get_closet_checkpoint_match("main")
    other_info = sd_models.get_closet_checkpoint_match("other")

    main = sd_models.FakeSdModel(main_inner)
    other = sd_models.FakeSdModel(other_inner)
    loaded = []
    script_callbacks.on_model_loaded(lambda m: loaded.append(m))
    sd_models.set_model(main, main_info)
    assert shared.opts.sd_model_checkpoint == main_info.title and main.sd_checkpoint_info is main_info

    switches = []

    def hook(title):
        switches.append(title)
        return {main_info.title: main, other_info.title: other}[title]

    monkeypatch.setattr(processing, "switch_checkpoint_hook", hook)
    stages = []
    script_callbacks.on_cfg_denoiser(lambda params: stages.append((params.denoiser.p.is_hr_pass, shared.sd_model is other,
                                                                    params.denoiser.total_steps, params.x.shape[-1])))
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt="a photo, of a cat AND a dog:0.5", negative_prompt="blurry", steps=3, cfg_scale=6.0, width=64, height=64,
        batch_size=2, n_iter=2, seed=11, sampler_name="Euler", enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2,
        hr_checkpoint_name="other", hr_negative_prompt="bad")
    res = processing.process_images(p)

    assert len(res.images) == 4 and all(img.shape == (4, 12, 12) for img in res.images)
    assert all(torch.isfinite(img).all() for img in res.images)
    assert p.hr_upscale_to_x == 96 and p.hr_negative_prompts == ["bad", "bad"] and not p.is_hr_pass
    assert switches == [other_info.title, main_info.title, other_info.title]
    assert loaded == [main, other, main, other] and shared.opts.sd_model_checkpoint == main_info.title
    assert stages == [(False, False, 3, 8)] * 3 + [(True, True, 2, 12)] * 2 + [(False, False, 3, 8)] * 3 + [(True, True, 2, 12)] * 2
    info = res.infotexts[0]
    assert info.startswith("a photo, of a cat AND a dog:0.5\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 6.0, Seed: 11, Size: 64x64")
    assert "Model hash: " + main_info.shorthash in info and "Hires negative prompt: bad" in info
    assert "Hires checkpoint: " + other_info.short_title in info
    assert [t.split("Seed: ")[1].split(",")[0] for t in res.infotexts] == ["11", "12", "13", "14"]

    # webui quotes values with commas/colons
    p.extra_generation_params["Note"] = "a, b"
    assert 'Note: "a, b"' in processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds)


def test_ldm_long_prompt_gives_154_tokens(ldm):
    model = sd_models.FakeSdModel(ldm.make_sd1("tiny", seed=0))
    c = model.get_learned_conditioning(prompt_parser.SdConditioning([LONG_PROMPT, "short"]))
    assert c.shape[:2] == (2, 154)
    torch.testing.assert_close(c[1, 77:], model.cond_stage_model_empty_prompt[0])
    assert model.cond_stage_model_empty_prompt.shape[:2] == (1, 77)


# ---------------------------------------------------------------------------
# signatures equal webui 1.10.1's (when its source is available)
# ---------------------------------------------------------------------------

SIGNATURES = {
    "script_callbacks": ["CFGDenoiserParams.__init__", "CFGDenoisedParams.__init__", "AfterCFGCallbackParams.__init__",
                         "add_callback", "sort_callbacks", "ordered_callbacks", "clear_callbacks", "model_loaded_callback",
                         "cfg_denoiser_callback", "cfg_denoised_callback", "cfg_after_cfg_callback", "script_unloaded_callback",
                         "remove_callbacks_for_function", "on_cfg_denoiser", "on_model_loaded", "on_script_unloaded",
                         "on_ui_settings", "on_cfg_denoised", "on_cfg_after_cfg", "report_exception"],
    "scripts": ["Script.title", "Script.ui", "Script.show", "Script.process", "Script.before_process", "Script.setup",
                "Script.process_batch", "Script.postprocess", "Script.postprocess_batch", "Script.before_hr",
                "Script.process_before_every_sampling", "Script.elem_id", "ScriptRunner.__init__", "ScriptRunner.process",
                "ScriptRunner.before_process", "ScriptRunner.process_batch", "ScriptRunner.postprocess",
                "ScriptRunner.setup_scrips", "ScriptRunner.ordered_scripts", "ScriptRunner.before_hr", "wrap_call",
                "MaskBlendArgs.__init__", "PostSampleArgs.__init__", "ScriptRunner.process_before_every_sampling"],
    "prompt_parser": ["SdConditioning.__init__", "get_learned_conditioning", "get_multicond_learned_conditioning",
                      "get_learned_conditioning_prompt_schedules", "get_multicond_prompt_list", "reconstruct_cond_batch",
                      "reconstruct_multicond_batch", "stack_conds", "ComposableScheduledPromptConditioning.__init__",
                      "MulticondLearnedConditioning.__init__", "DictWithShape.__init__"],
    "processing": ["StableDiffusionProcessing.sample", "StableDiffusionProcessing.setup_conds", "StableDiffusionProcessing.get_conds",
                   "StableDiffusionProcessing.init", "StableDiffusionProcessing.get_conds_with_caching",
                   "StableDiffusionProcessing.cached_params", "StableDiffusionProcessing.txt2img_image_conditioning",
                   "StableDiffusionProcessingTxt2Img.sample", "StableDiffusionProcessingTxt2Img.sample_hr_pass",
                   "StableDiffusionProcessingTxt2Img.init", "StableDiffusionProcessingTxt2Img.calculate_hr_conds",
                   "StableDiffusionProcessingTxt2Img.setup_conds", "Processed.__init__", "create_infotext",
                   "process_images", "process_images_inner", "get_fixed_seed", "txt2img_image_conditioning"],
    "sd_models": ["CheckpointInfo.__init__", "CheckpointInfo.register", "checkpoint_tiles", "list_models",
                  "get_closet_checkpoint_match", "read_state_dict", "get_state_dict_from_checkpoint",
                  "transform_checkpoint_dict_key", "reload_model_weights", "select_checkpoint", "model_hash",
                  "read_metadata_from_safetensors"],
    "sd_samplers": ["find_sampler_config", "create_sampler"],
    "sd_samplers_common": ["SamplerData.total_steps", "setup_img2img_steps", "store_latent"],
    "sd_samplers_cfg_denoiser": ["CFGDenoiser.__init__", "CFGDenoiser.forward", "CFGDenoiser.combine_denoised",
                                 "CFGDenoiser.pad_cond_uncond", "CFGDenoiser.pad_cond_uncond_v0", "CFGDenoiser.get_pred_x0",
                                 "CFGDenoiser.update_inner_model", "catenate_conds", "subscript_cond", "pad_cond"],
    "devices": ["autocast", "without_autocast", "torch_gc", "get_optimal_device_name"],
    "ui_components": ["InputAccordion.__init__", "InputAccordion.extra"],
    "ui_common": ["create_refresh_button"],
    "rng": ["ImageRNG.__init__"],
    "errors": ["report", "display"],
}


def _real_arg_names(tree, qualname):
    node, parts = tree, qualname.split(".")
    for part in parts:
        node = next(n for n in ast.iter_child_nodes(node)
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
    a = node.args
    return ([x.arg for x in a.posonlyargs + a.args], a.vararg and a.vararg.arg, [x.arg for x in a.kwonlyargs], a.kwarg and a.kwarg.arg)


def _fake_arg_names(obj):
    params = inspect.signature(obj).parameters.values()
    pos = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    kwonly = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    kw = next((p.name for p in params if p.kind == p.VAR_KEYWORD), None)
    return pos, var, kwonly, kw


@pytest.mark.skipif(not os.path.isdir(os.path.join(REAL_WEBUI, "modules")), reason="webui 1.10.1 source not at /tmp/webui")
@pytest.mark.parametrize("module", sorted(SIGNATURES))
def test_signatures_equal_webui(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(open(os.path.join(REAL_WEBUI, "modules", f"{module}.py"), encoding="utf8").read())
    fake = sys.modules[f"modules.{module}"] if f"modules.{module}" in sys.modules else __import__(f"modules.{module}", fromlist=["x"])
    for qualname in SIGNATURES[module]:
        obj = fake
        for part in qualname.split("."):
            obj = getattr(obj, part)
        assert _fake_arg_names(obj) == _real_arg_names(tree, qualname), f"{module}.{qualname}"


@pytest.mark.skipif(not os.path.isdir(os.path.join(REAL_WEBUI, "modules")), reason="webui 1.10.1 source not at /tmp/webui")
def test_processing_init_fields_equal_webui_dataclass_fields():
    tree = ast.parse(open(os.path.join(REAL_WEBUI, "modules", "processing.py"), encoding="utf8").read())

    def init_fields(class_name):
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
        out = []
        for n in cls.body:
            if isinstance(n, ast.AnnAssign):
                v = n.value
                if isinstance(v, ast.Call) and any(k.arg == "init" for k in v.keywords):
                    continue
                out.append(n.target.id)
        return out

    base = init_fields("StableDiffusionProcessing")
    txt2img = base + [f for f in init_fields("StableDiffusionProcessingTxt2Img") if f not in base]
    for cls, want in ((processing.StableDiffusionProcessing, base), (processing.StableDiffusionProcessingTxt2Img, txt2img)):
        pos, _, kwonly, _ = _fake_arg_names(cls.__init__)
        assert pos[1:] == want and kwonly == ["scripts", "script_args"]


def test_module_docstrings_name_the_real_file():
    import importlib
    for name in ["shared", "script_callbacks", "scripts", "processing", "prompt_parser", "sd_models", "sd_samplers",
                 "sd_samplers_common", "sd_samplers_cfg_denoiser", "devices", "ui_components", "ui_common", "rng",
                 "errors", "infotext_utils"]:
        mod = importlib.import_module(f"modules.{name}")
        assert f"modules/{name}.py" in mod.__doc__ and "1.10.1" in mod.__doc__


def test_devices_and_shared_defaults():
    assert devices.device == torch.device("cpu") and devices.dtype == torch.float32
    with devices.autocast():
        pass
    o = shared.opts
    assert (o.batch_cond_uncond, o.pad_cond_uncond, o.pad_cond_uncond_v0, o.skip_early_cond, o.s_min_uncond_all,
            o.use_old_scheduling, o.lora_functional, o.live_preview_content, o.sd_checkpoint_dropdown_use_short) == \
        (True, False, False, 0.0, False, False, False, "Prompt", False)
    c = shared.cmd_opts
    assert (c.lowvram, c.medvram, c.medvram_sdxl, c.ckpt_dir) == (False, False, False, None)
    assert getattr(o, "prioritized_callbacks_cfg_denoiser", None) is None
    shared.state.interrupt()
    shared.state.reset()
    assert not shared.state.interrupted and shared.sd_model is None
